"""Value objects shared by every check: limits in, findings and contexts out."""

from __future__ import annotations

from dataclasses import dataclass

from .._compat import SLOTS, field_setter

__all__ = [
    "CONFLICT",
    "MALFORMED",
    "OVERSIZED",
    "SENSITIVE",
    "Finding",
    "Limits",
    "TraceContext",
    "new_context",
]

MALFORMED = "malformed"
OVERSIZED = "oversized"
SENSITIVE = "sensitive"
CONFLICT = "conflict"


@dataclass(frozen=True, **SLOTS)
class Limits:
    """Size limits; a header over one of them is ``oversized`` (DESIGN.md defaults)."""

    baggage_bytes: int = 8192
    baggage_members: int = 64
    tracestate_members: int = 32
    tracestate_bytes: int = 512
    header_block_bytes: int = 16384


@dataclass(frozen=True, **SLOTS)
class Finding:
    """One problem with one header of one message.

    ``code`` is stable and machine-readable (``traceparent.uppercase_hex``); ``detail`` is
    for people and never repeats the header value, a trace id or a baggage value.
    """

    kind: str
    header: str
    code: str
    detail: str


@dataclass(frozen=True, **SLOTS)
class TraceContext:
    """A valid trace context carried by one format.

    ``trace_id`` is always 32 lowercase hex characters (a 64-bit B3 id is left-padded
    with zeros); ``sampled`` is ``None`` when the sender deferred the decision.
    """

    format: str
    trace_id: str
    span_id: str | None
    sampled: bool | None


# Fast constructors for the hot path. A frozen dataclass's generated ``__init__`` goes
# through ``object.__setattr__`` once per field; setting the slots through their
# descriptors is about twice as fast. The result is an ordinary, fully-initialised
# instance (equality, repr, hashing and immutability unchanged).
_tc_new = TraceContext.__new__
_tc_format = field_setter(TraceContext, "format")
_tc_trace_id = field_setter(TraceContext, "trace_id")
_tc_span_id = field_setter(TraceContext, "span_id")
_tc_sampled = field_setter(TraceContext, "sampled")


def new_context(
    format: str, trace_id: str, span_id: str | None, sampled: bool | None
) -> TraceContext:
    ctx = _tc_new(TraceContext)
    _tc_format(ctx, format)
    _tc_trace_id(ctx, trace_id)
    _tc_span_id(ctx, span_id)
    _tc_sampled(ctx, sampled)
    return ctx
