"""``tracestate`` (W3C Trace Context Level 2 list grammar).

Level 2 key grammar (the current one; it replaced Level 1's ``tenant@system`` split)::

    key     = ( lcalpha / DIGIT ) 0*255 ( keychar )
    keychar = lcalpha / DIGIT / "_" / "-" / "*" / "/" / "@"
    value   = 0*255( chr ) nblk-chr      ; chr = %x20 / nblk-chr
    nblk-chr = %x21-2B / %x2D-3C / %x3E-7E

Every Level 1 key (simple or multi-tenant) is a valid Level 2 key, so ``tenant@system``
keys pass. Empty and OWS-only members are allowed and do not count.
"""

from __future__ import annotations

import re

from ._members import OWS, MemberProblems, byte_length, split_list
from ._model import MALFORMED, OVERSIZED, Finding, Limits

__all__ = ["check_tracestate"]

HEADER = "tracestate"
_MEMBER = re.compile(
    r"([a-z0-9][a-z0-9_\-*/@]{0,255})=([\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e])"
)
_KEY_CHARS = re.compile(r"[a-z0-9][a-z0-9_\-*/@]*")
_VALUE_CHARS = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]*")


def check_tracestate(values: list[str], limits: Limits, out: list[Finding]) -> None:
    """Check the ``tracestate`` field lines of one message, combined in order."""
    combined, members = split_list(values)
    problems: MemberProblems | None = None
    seen: set[str] = set()
    count = 0
    for raw in members:
        member = raw.strip(OWS)
        if not member:
            continue
        count += 1
        m = _MEMBER.fullmatch(member)
        if m is None:
            if problems is None:
                problems = MemberProblems(MALFORMED, HEADER)
            _diagnose(member, count, problems)
            continue
        key = m.group(1)
        if key in seen:
            if problems is None:
                problems = MemberProblems(MALFORMED, HEADER)
            problems.add(
                "tracestate.duplicate_key",
                count,
                f"key {key!r} appears more than once; only one entry per key is allowed",
            )
        else:
            seen.add(key)
    if problems is not None:
        problems.emit(out)
    if count > limits.tracestate_members:
        out.append(
            Finding(
                OVERSIZED,
                HEADER,
                "tracestate.too_many_members",
                f"{count} list members, limit {limits.tracestate_members}",
            )
        )
    size = byte_length(combined)
    if size > limits.tracestate_bytes:
        out.append(
            Finding(
                OVERSIZED,
                HEADER,
                "tracestate.too_long",
                f"{size} bytes combined, limit {limits.tracestate_bytes}",
            )
        )


def _diagnose(member: str, index: int, problems: MemberProblems) -> None:
    key, eq, value = member.partition("=")
    if not eq:
        problems.add("tracestate.bad_member", index, "a list member needs key, equals sign, value")
        return
    if len(key) > 256:
        problems.add("tracestate.key_too_long", index, f"key of {len(key)} characters, max 256")
    elif _KEY_CHARS.fullmatch(key) is None:
        problems.add(
            "tracestate.bad_key",
            index,
            "a key starts with a lowercase letter or digit and holds only a-z 0-9 _ - * / @",
        )
    if not value:
        problems.add("tracestate.empty_value", index, "empty value")
    elif len(value) > 256:
        problems.add(
            "tracestate.value_too_long", index, f"value of {len(value)} characters, max 256"
        )
    elif _VALUE_CHARS.fullmatch(value) is None:
        problems.add(
            "tracestate.bad_value",
            index,
            "a value holds printable ASCII except comma and equals sign",
        )
