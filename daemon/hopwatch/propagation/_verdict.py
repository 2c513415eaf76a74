"""One message in, one ``Verdict`` out.

``check_message`` makes a single pass over the message's header fields, keeps only the
propagation fields (in wire order, repeated lines kept), then runs the per-format checks
and the rules that need several fields at once: duplicate ``traceparent``, the ``x-b3-*``
set, ``b3`` versus ``x-b3-*``, and the cross-format ``conflict`` between W3C and B3.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .._compat import SLOTS, field_setter
from ._b3 import MULTI_HEADERS, SAMPLED, TRACE_ID, check_b3_multi, check_b3_single
from ._baggage import check_baggage
from ._model import CONFLICT, MALFORMED, OVERSIZED, Finding, Limits, TraceContext
from ._traceparent import check_traceparent, duplicate_finding, valid_traceparent
from ._tracestate import check_tracestate

__all__ = ["DEFAULT_LIMITS", "HEADER_NAMES", "Verdict", "check_header", "check_message"]

DEFAULT_LIMITS = Limits()

_TRACEPARENT, _TRACESTATE, _BAGGAGE, _B3, _XB3 = range(5)
_DISPATCH: dict[str, int] = {
    "traceparent": _TRACEPARENT,
    "tracestate": _TRACESTATE,
    "baggage": _BAGGAGE,
    "b3": _B3,
    **{name: _XB3 for name in MULTI_HEADERS},
}
HEADER_NAMES: frozenset[str] = frozenset(_DISPATCH)
"""Lowercase names of every header field the checks look at."""

_INVALIDATING = (MALFORMED, OVERSIZED)


@dataclass(frozen=True, **SLOTS)
class Verdict:
    """What the propagation headers of one message amount to."""

    findings: tuple[Finding, ...]
    w3c: TraceContext | None
    b3: TraceContext | None
    has_baggage: bool

    @property
    def context(self) -> str:
        """``w3c``, ``b3``, ``both`` or ``none``: valid trace contexts only."""
        if self.w3c is not None:
            return "both" if self.b3 is not None else "w3c"
        return "b3" if self.b3 is not None else "none"

    @property
    def valid(self) -> bool:
        """No ``malformed`` and no ``oversized`` finding."""
        return not any(f.kind in _INVALIDATING for f in self.findings)


_NO_FINDINGS: tuple[Finding, ...] = ()
# Hot-path constructor: see _model.new_context.
_v_new = Verdict.__new__
_v_findings = field_setter(Verdict, "findings")
_v_w3c = field_setter(Verdict, "w3c")
_v_b3 = field_setter(Verdict, "b3")
_v_has_baggage = field_setter(Verdict, "has_baggage")


def _new_verdict(
    findings: tuple[Finding, ...],
    w3c: TraceContext | None,
    b3: TraceContext | None,
    has_baggage: bool,
) -> Verdict:
    v = _v_new(Verdict)
    _v_findings(v, findings)
    _v_w3c(v, w3c)
    _v_b3(v, b3)
    _v_has_baggage(v, has_baggage)
    return v


_NOTHING = _new_verdict(_NO_FINDINGS, None, None, False)  # immutable, so shared


def check_message(
    headers: Iterable[tuple[str, str]],
    limits: Limits = DEFAULT_LIMITS,
    *,
    header_block_bytes: int | None = None,
    sensitive: bool | frozenset[str] = True,
) -> Verdict:
    """Check the propagation headers of ONE message.

    ``headers`` are ``(name, raw value)`` pairs in wire order, any case; other names are
    ignored. ``header_block_bytes`` is the size of the whole header block, when known.
    ``sensitive=False`` skips the baggage privacy detectors; a frozenset of detector codes
    (keys of ``SENSITIVE_DETECTORS``) runs only those.
    """
    # Fast paths for what most messages carry (the parsers hand over a tuple): nothing
    # (most responses) or one valid traceparent. They return what `_check` would.
    if type(headers) is tuple and (
        header_block_bytes is None or header_block_bytes <= limits.header_block_bytes
    ):
        if not headers:
            return _NOTHING
        if len(headers) == 1:
            name, value = headers[0]
            if name == "traceparent":
                w3c = valid_traceparent(value)
                if w3c is not None:
                    return _new_verdict(_NO_FINDINGS, w3c, None, False)
    return _check(headers, limits, header_block_bytes, sensitive, set_rules=True)


def check_header(name: str, value: str, limits: Limits = DEFAULT_LIMITS) -> Verdict:
    """Check one header line on its own (``hopwatch check``).

    Rules that need the rest of the message (the ``x-b3-*`` set, cross-format conflict)
    do not apply to a lone line.
    """
    return _check(((name, value),), limits, None, True, set_rules=False)


def _check(
    headers: Iterable[tuple[str, str]],
    limits: Limits,
    header_block_bytes: int | None,
    sensitive: bool | frozenset[str],
    set_rules: bool,
) -> Verdict:
    traceparents: list[str] | None = None
    tracestates: list[str] | None = None
    baggages: list[str] | None = None
    b3s: list[str] | None = None
    multi: dict[str, list[str]] | None = None
    for name, value in headers:
        kind = _DISPATCH.get(name)
        if kind is None:
            if name.islower():
                continue
            name = name.lower()
            kind = _DISPATCH.get(name)
            if kind is None:
                continue
        if kind == _TRACEPARENT:
            if traceparents is None:
                traceparents = [value]
            else:
                traceparents.append(value)
        elif kind == _TRACESTATE:
            if tracestates is None:
                tracestates = [value]
            else:
                tracestates.append(value)
        elif kind == _BAGGAGE:
            if baggages is None:
                baggages = [value]
            else:
                baggages.append(value)
        elif kind == _B3:
            if b3s is None:
                b3s = [value]
            else:
                b3s.append(value)
        else:
            if multi is None:
                multi = {}
            multi.setdefault(name, []).append(value)

    findings: list[Finding] = []
    if header_block_bytes is not None and header_block_bytes > limits.header_block_bytes:
        findings.append(
            Finding(
                OVERSIZED,
                "*",
                "headers.block_too_large",
                f"header block of {header_block_bytes} bytes, limit {limits.header_block_bytes}",
            )
        )

    w3c: TraceContext | None = None
    if traceparents is not None:
        if len(traceparents) == 1:
            w3c = check_traceparent(traceparents[0], findings)
        else:
            findings.append(duplicate_finding(len(traceparents)))
            for value in traceparents:
                check_traceparent(value, findings)
    if tracestates is not None:
        check_tracestate(tracestates, limits, findings)
    has_baggage = False
    if baggages is not None:
        has_baggage = check_baggage(baggages, limits, sensitive, findings)

    b3: TraceContext | None = None
    b3_header = "b3"
    if b3s is not None or multi is not None:
        b3, b3_header = _check_b3(b3s, multi, findings, set_rules)

    if set_rules and w3c is not None and b3 is not None:
        _cross_format(w3c, b3, b3_header, findings)

    if not findings:
        return _new_verdict(_NO_FINDINGS, w3c, b3, has_baggage)
    if len(findings) > 1:
        findings = _dedupe(findings)
    return _new_verdict(tuple(findings), w3c, b3, has_baggage)


def _check_b3(
    b3s: list[str] | None,
    multi: dict[str, list[str]] | None,
    findings: list[Finding],
    set_rules: bool,
) -> tuple[TraceContext | None, str]:
    single: TraceContext | None = None
    single_sampled: bool | None = None
    single_ok = False
    if b3s is not None:
        first = b3s[0].strip(" \t")
        if len(b3s) > 1 and any(v.strip(" \t") != first for v in b3s[1:]):
            findings.append(
                Finding(
                    MALFORMED,
                    "b3",
                    "b3.duplicate",
                    f"{len(b3s)} b3 fields with different values in one message",
                )
            )
        single, single_sampled, single_ok = check_b3_single(b3s[0], findings)
    if multi is None:
        return single, "b3"
    many, many_sampled, many_ok = check_b3_multi(multi, findings, set_rules)
    if set_rules and b3s is not None and single_ok and many_ok:
        contradicts = (
            single is not None
            and many is not None
            and (single.trace_id != many.trace_id or single.span_id != many.span_id)
        )
        if single_sampled is not None and many_sampled is not None:
            contradicts |= single_sampled != many_sampled
        if contradicts:
            findings.append(
                Finding(
                    MALFORMED,
                    "b3",
                    "b3.contradicts_multi",
                    "the b3 header and the x-b3-* headers carry different "
                    "ids or sampling decisions",
                )
            )
    if single is not None:
        return single, "b3"
    return many, TRACE_ID


def _cross_format(
    w3c: TraceContext, b3: TraceContext, b3_header: str, findings: list[Finding]
) -> None:
    # A 64-bit B3 id (zero high half after padding) names the low 64 bits of a W3C id.
    if b3.trace_id.startswith("0000000000000000"):
        same = w3c.trace_id[16:] == b3.trace_id[16:]
    else:
        same = w3c.trace_id == b3.trace_id
    if not same:
        findings.append(
            Finding(
                CONFLICT,
                b3_header,
                "conflict.trace_id",
                "traceparent and B3 name different trace ids",
            )
        )
    if b3.sampled is not None and w3c.sampled != b3.sampled:
        findings.append(
            Finding(
                CONFLICT,
                "b3" if b3_header == "b3" else SAMPLED,
                "conflict.sampled",
                "traceparent and B3 carry different sampling decisions",
            )
        )


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen: set[tuple[str, str, str]] = set()
    out: list[Finding] = []
    for f in findings:
        key = (f.kind, f.header, f.code)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out
