"""``traceparent`` (W3C Trace Context Level 1 and Level 2).

Theory of operation: almost every value on the wire is a well-formed version-00 header,
so one precompiled ``fullmatch`` decides the common case and builds the context. Only a
value that misses the fast path goes through ``_diagnose``, which walks the rules in the
order a receiver applies them (version, then the version-specific layout, then the ids)
and names every rule the value breaks.

Future versions (``01``..``fe``) follow the spec's forward-compatible parse: the first 55
characters must hold the version-00 fields, and the flags are followed either by the end
of the value or by ``-`` and fields this version does not interpret.
"""

from __future__ import annotations

import re

from ._model import MALFORMED, Finding, TraceContext, new_context

__all__ = ["check_traceparent", "duplicate_finding", "valid_traceparent"]

HEADER = "traceparent"
_OWS = " \t"
_FAST = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_HEX = re.compile(r"[0-9a-f]+")
_UPPER_HEX = re.compile(r"[A-F]")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_SAMPLED_LAST_DIGIT = frozenset("13579bdf")


def _finding(code: str, detail: str) -> Finding:
    return Finding(MALFORMED, HEADER, "traceparent." + code, detail)


def duplicate_finding(count: int) -> Finding:
    return _finding(
        "duplicate",
        f"{count} traceparent fields in one message; a receiver must discard them all",
    )


def check_traceparent(value: str, out: list[Finding]) -> TraceContext | None:
    """Check one ``traceparent`` value; append findings to ``out``.

    Returns the context when the value is valid, else ``None``.
    """
    m = _FAST.fullmatch(value)
    if m is None:
        value = value.strip(_OWS)
        m = _FAST.fullmatch(value)
        if m is None:
            return _diagnose(value, out)
    trace_id, span_id, flags = m.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return _diagnose(value, out)
    return new_context("w3c", trace_id, span_id, flags[1] in _SAMPLED_LAST_DIGIT)


def valid_traceparent(value: str) -> TraceContext | None:
    """The context of an exactly well-formed version-00 value (no OWS), else ``None``
    (which means only "not the fast case": ask `check_traceparent`)."""
    m = _FAST.fullmatch(value)
    if m is None:
        return None
    trace_id, span_id, flags = m.groups()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return new_context("w3c", trace_id, span_id, flags[1] in _SAMPLED_LAST_DIGIT)


def _is_hex(s: str, n: int) -> bool:
    return len(s) == n and _HEX.fullmatch(s) is not None


def _diagnose(v: str, out: list[Finding]) -> TraceContext | None:
    start = len(out)
    if not v:
        out.append(_finding("empty", "empty traceparent value"))
        return None
    if "," in v:
        out.append(
            _finding(
                "multiple_values",
                "a comma in traceparent: several values were folded into one field",
            )
        )
        return None
    if _UPPER_HEX.search(v, 0, 55):
        out.append(_finding("uppercase_hex", "hex digits must be lowercase (0-9, a-f)"))
        v = v[:55].lower() + v[55:]
    if len(v) < 3 or v[2] != "-" or not _is_hex(v[:2], 2):
        out.append(
            _finding("bad_version", "the value must start with a 2-hex-digit version and '-'")
        )
        return None
    version = v[:2]
    if version == "ff":
        out.append(_finding("version_ff", "version ff is forbidden"))
        return None
    if version == "00":
        parts = v.split("-")
        if len(parts) != 4:
            if len(v) != 55:
                out.append(
                    _finding(
                        "bad_length",
                        f"version 00 is exactly 55 characters with 4 fields, got {len(v)} "
                        f"characters and {len(parts)} fields",
                    )
                )
            else:
                out.append(_finding("bad_format", "version 00 has exactly 4 '-'-separated fields"))
            return None
        trace_id, span_id, flags = parts[1], parts[2], parts[3]
    else:
        fields = v[3:].split("-", 3)
        if len(fields) < 3:
            out.append(
                _finding(
                    "bad_format",
                    f"version {version} must still carry trace-id, parent-id and flags "
                    f"(got {len(fields)} of 3 fields)",
                )
            )
            return None
        trace_id, span_id, flags = fields[0], fields[1], fields[2]
    if not _is_hex(trace_id, 32):
        out.append(
            _finding(
                "bad_trace_id",
                f"trace-id must be 32 lowercase hex digits (got {len(trace_id)} characters)",
            )
        )
    elif trace_id == _ZERO_TRACE:
        out.append(_finding("zero_trace_id", "trace-id is all zeros"))
    if not _is_hex(span_id, 16):
        out.append(
            _finding(
                "bad_parent_id",
                f"parent-id must be 16 lowercase hex digits (got {len(span_id)} characters)",
            )
        )
    elif span_id == _ZERO_SPAN:
        out.append(_finding("zero_parent_id", "parent-id is all zeros"))
    if not _is_hex(flags, 2):
        out.append(
            _finding(
                "bad_flags",
                "trace-flags must be 2 lowercase hex digits"
                + ("" if version == "00" else ", then the end of the value or '-'"),
            )
        )
    if len(out) != start:
        return None
    return new_context("w3c", trace_id, span_id, flags[1] in _SAMPLED_LAST_DIGIT)
