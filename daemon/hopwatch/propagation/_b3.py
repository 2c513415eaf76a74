"""B3 propagation (openzipkin/b3-propagation README): the ``b3`` single header and the
``x-b3-*`` multi-header set.

Single header forms::

    b3: {trace-id}-{span-id}
    b3: {trace-id}-{span-id}-{sampling}
    b3: {trace-id}-{span-id}-{sampling}-{parent-span-id}
    b3: {sampling}                       ; 0 (deny), 1 (accept) or d (debug) alone

Trace ids are 16 or 32 lower-hex characters, span and parent ids 16; all-zero ids are
invalid. A sampling-only header carries no trace id: it is valid but is not trace
context (``Verdict.b3`` stays ``None``; ``Verdict.context`` ignores it).

Each check returns ``(context, sampled, ok)``: the context when ids are present and valid,
the sampling decision (``None`` = deferred), and whether the header(s) raised no finding.
"""

from __future__ import annotations

import re
from typing import Optional

from ._model import MALFORMED, Finding, TraceContext, new_context

__all__ = ["B3Result", "check_b3_multi", "check_b3_single"]

B3Result = tuple[Optional[TraceContext], Optional[bool], bool]

_OWS = " \t"
_SINGLE = re.compile(r"([0-9a-f]{32}|[0-9a-f]{16})-([0-9a-f]{16})(?:-([01d])(?:-([0-9a-f]{16}))?)?")
_HEX = re.compile(r"[0-9a-f]+")
_UPPER_HEX = re.compile(r"[A-F]")
_PAD = "0" * 16
_SAMPLING = {"1": True, "0": False, "d": True}
_SAMPLED_MULTI = {"1": True, "0": False, "true": True, "false": False}

TRACE_ID = "x-b3-traceid"
SPAN_ID = "x-b3-spanid"
PARENT_ID = "x-b3-parentspanid"
SAMPLED = "x-b3-sampled"
FLAGS = "x-b3-flags"
MULTI_HEADERS = (TRACE_ID, SPAN_ID, PARENT_ID, SAMPLED, FLAGS)


def _bad(out: list[Finding], header: str, code: str, detail: str) -> None:
    out.append(Finding(MALFORMED, header, code, detail))


def _is_zero(s: str) -> bool:
    return s.count("0") == len(s)


def _context(trace_id: str, span_id: str, sampled: bool | None) -> TraceContext:
    padded = trace_id if len(trace_id) == 32 else _PAD + trace_id
    return new_context("b3", padded, span_id, sampled)


# --- single header ---------------------------------------------------------------------


def check_b3_single(value: str, out: list[Finding]) -> B3Result:
    """Check one ``b3`` value; append findings to ``out``."""
    v = value.strip(_OWS)
    m = _SINGLE.fullmatch(v)
    if m is not None:
        trace_id, span_id, sampling, parent = m.groups()
        if not (_is_zero(trace_id) or _is_zero(span_id) or (parent and _is_zero(parent))):
            sampled = None if sampling is None else _SAMPLING[sampling]
            return _context(trace_id, span_id, sampled), sampled, True
    elif v in _SAMPLING:
        return None, _SAMPLING[v], True
    _diagnose_single(v, out)
    return None, None, False


def _diagnose_single(v: str, out: list[Finding]) -> None:
    h = "b3"
    if not v:
        _bad(out, h, "b3.empty", "empty b3 value")
        return
    if _UPPER_HEX.search(v):
        _bad(out, h, "b3.uppercase_hex", "hex digits must be lowercase (0-9, a-f)")
        v = v.lower()
    parts = v.split("-")
    if len(parts) == 1:
        if len(v) == 1:
            if v not in _SAMPLING:
                _bad(out, h, "b3.bad_sampling", "a sampling state is 0, 1 or d")
        else:
            _bad(
                out,
                h,
                "b3.bad_format",
                "b3 is trace-id-span-id[-sampling[-parent-id]] or a sampling state alone",
            )
        return
    if len(parts) > 4:
        _bad(out, h, "b3.bad_format", f"{len(parts)} '-'-separated fields, at most 4")
        return
    trace_id, span_id = parts[0], parts[1]
    if len(trace_id) not in (16, 32) or _HEX.fullmatch(trace_id) is None:
        _bad(
            out,
            h,
            "b3.bad_trace_id",
            f"trace-id must be 16 or 32 lower-hex digits (got {len(trace_id)} characters)",
        )
    elif _is_zero(trace_id):
        _bad(out, h, "b3.zero_trace_id", "trace-id is all zeros")
    if len(span_id) != 16 or _HEX.fullmatch(span_id) is None:
        _bad(
            out,
            h,
            "b3.bad_span_id",
            f"span-id must be 16 lower-hex digits (got {len(span_id)} characters)",
        )
    elif _is_zero(span_id):
        _bad(out, h, "b3.zero_span_id", "span-id is all zeros")
    if len(parts) >= 3 and parts[2] not in _SAMPLING:
        _bad(
            out,
            h,
            "b3.bad_sampling",
            "the third field is the sampling state 0, 1 or d (a parent id goes fourth)",
        )
    if len(parts) == 4:
        parent = parts[3]
        if len(parent) != 16 or _HEX.fullmatch(parent) is None:
            _bad(
                out,
                h,
                "b3.bad_parent_id",
                f"parent-span-id must be 16 lower-hex digits (got {len(parent)} characters)",
            )
        elif _is_zero(parent):
            _bad(out, h, "b3.zero_parent_id", "parent-span-id is all zeros")


# --- multi header ----------------------------------------------------------------------


def _check_id(header: str, value: str, widths: tuple[int, ...], out: list[Finding]) -> bool:
    if len(value) in widths and _HEX.fullmatch(value) is not None:
        if _is_zero(value):
            _bad(out, header, header + ".zero_id", "the id is all zeros")
            return False
        return True
    want = " or ".join(str(w) for w in widths)
    if len(value) in widths and _HEX.fullmatch(value.lower()) is not None:
        _bad(out, header, header + ".uppercase_hex", "hex digits must be lowercase (0-9, a-f)")
    elif len(value) not in widths:
        _bad(
            out,
            header,
            header + ".bad_length",
            f"must be {want} lower-hex digits (got {len(value)} characters)",
        )
    else:
        _bad(out, header, header + ".not_hex", f"must be {want} lower-hex digits")
    return False


def check_b3_multi(
    fields: dict[str, list[str]], out: list[Finding], set_rules: bool = True
) -> B3Result:
    """Check the ``x-b3-*`` fields of one message (lowercase name -> values in order).

    ``set_rules`` adds the rules about the set (a span id without a trace id, ...); a
    single header line checked on its own (``hopwatch check``) has no set to judge.
    """
    start = len(out)
    first: dict[str, str] = {}
    for name in MULTI_HEADERS:
        values = fields.get(name)
        if not values:
            continue
        v = values[0].strip(_OWS)
        first[name] = v
        if len(values) > 1 and any(x.strip(_OWS) != v for x in values[1:]):
            _bad(
                out,
                name,
                name + ".duplicate",
                f"{len(values)} {name} fields with different values in one message",
            )
    trace_id = first.get(TRACE_ID)
    span_id = first.get(SPAN_ID)
    parent = first.get(PARENT_ID)
    sampled_raw = first.get(SAMPLED)
    flags = first.get(FLAGS)
    ids_ok = True
    if trace_id is not None:
        ids_ok &= _check_id(TRACE_ID, trace_id, (16, 32), out)
    if span_id is not None:
        ids_ok &= _check_id(SPAN_ID, span_id, (16,), out)
    if parent is not None:
        ids_ok &= _check_id(PARENT_ID, parent, (16,), out)
    sampled: bool | None = None
    if sampled_raw is not None:
        s = _SAMPLED_MULTI.get(sampled_raw.lower())
        if s is None:
            _bad(out, SAMPLED, SAMPLED + ".bad_value", "x-b3-sampled is 1 or 0")
        sampled = s
    debug = False
    if flags is not None:
        if flags == "1":
            debug = True
        elif flags != "0":
            _bad(out, FLAGS, FLAGS + ".bad_value", "x-b3-flags is 1 (debug)")
    if set_rules:
        if span_id is not None and trace_id is None:
            _bad(out, SPAN_ID, "x-b3.span_without_trace", "x-b3-spanid without x-b3-traceid")
        if trace_id is not None and span_id is None:
            _bad(out, TRACE_ID, "x-b3.trace_without_span", "x-b3-traceid without x-b3-spanid")
        if parent is not None and (span_id is None or trace_id is None):
            _bad(
                out,
                PARENT_ID,
                "x-b3.parent_without_span",
                "x-b3-parentspanid without both x-b3-traceid and x-b3-spanid",
            )
        if debug and sampled is False:
            _bad(
                out,
                FLAGS,
                "x-b3.debug_not_sampled",
                "x-b3-flags 1 (debug implies accept) contradicts x-b3-sampled 0",
            )
    if debug:
        sampled = True
    ok = len(out) == start
    if ids_ok and ok and trace_id is not None and span_id is not None:
        return _context(trace_id, span_id, sampled), sampled, True
    return None, sampled, ok
