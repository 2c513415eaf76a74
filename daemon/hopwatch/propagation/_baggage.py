"""``baggage`` (W3C Baggage).

Grammar (current W3C text, OWS allowed around ``=`` and ``;``)::

    baggage-string = list-member 0*179( OWS "," OWS list-member )
    list-member    = key OWS "=" OWS value *( OWS ";" OWS property )
    property       = key OWS "=" OWS value / key OWS
    key            = token                            ; RFC 9110 5.6.2
    value          = *baggage-octet                   ; percent-encoded UTF-8
    baggage-octet  = %x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E

Repeated ``baggage`` lines combine per RFC 9110 list rules; empty list elements are
ignored as RFC 9110 5.6.1.2 asks of recipients. Sizes are checked against ``Limits``
(oversized), not against the grammar's 180-member ceiling.

Privacy: values are percent-decoded before the sensitive-data detectors run, and the
detectors also run over the raw text so that a secret in a malformed member is still
found. Findings name the member's index and key, never its value.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_to_bytes

from . import _sensitive
from ._members import OWS, MemberProblems, byte_length, split_list
from ._model import MALFORMED, OVERSIZED, SENSITIVE, Finding, Limits

__all__ = ["check_baggage"]

HEADER = "baggage"
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_VALUE = r"[\x21\x23-\x2b\x2d-\x3a\x3c-\x5b\x5d-\x7e]*"
_W = r"[ \t]*"
_MEMBER = re.compile(
    rf"({_TOKEN}){_W}={_W}({_VALUE})((?:{_W};{_W}{_TOKEN}(?:{_W}={_W}{_VALUE})?)*)"
)
_TOKEN_RE = re.compile(_TOKEN)
_VALUE_RE = re.compile(_VALUE)
_WHOLE = re.compile(rf"{_W}{_MEMBER.pattern}{_W}(?:,{_W}{_MEMBER.pattern}{_W})*")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_NON_ASCII_ESCAPE = re.compile(r"%[89A-Fa-f]")
# Shortest text any detector but the e-mail one can fire on ("-----BEGIN PRIVATE KEY" is
# longer, a card number is 13 digits): shorter values without "@" are not scanned.
_SCAN_MIN = 12
_KEY_SHOWN = 40


def _show_key(key: str) -> str:
    return repr(key if len(key) <= _KEY_SHOWN else key[:_KEY_SHOWN] + "...")


def check_baggage(
    values: list[str], limits: Limits, sensitive: bool | frozenset[str], out: list[Finding]
) -> bool:
    """Check the ``baggage`` field lines of one message. Returns whether any baggage is present.

    ``sensitive``: True runs every privacy detector, False (or an empty set) none, a set of
    detector codes (``sensitive.email`` ...) only those.
    """
    combined, members = split_list(values)
    problems: MemberProblems | None = None
    # (member index, key, text to scan): what follows the key, raw and percent-decoded
    texts: list[tuple[int, str, str]] = []
    if _WHOLE.fullmatch(combined) is not None:
        # Fast path: every member is well-formed and none is empty.
        count = len(members)
        for index, member in enumerate(members, 1):
            if "%" not in member and not sensitive:
                continue
            eq = member.index("=")
            rest = member[eq + 1 :]
            text = rest
            if "%" in rest:
                problems, text = _percent(index, rest, problems, sensitive)
            if sensitive and (len(text) >= _SCAN_MIN or "@" in text):
                texts.append((index, member[:eq].strip(OWS), text))
    else:
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
                if sensitive:
                    # Still look for secrets: decode what can be decoded, keep the rest.
                    text = unquote(member, errors="replace") if "%" in member else member
                    if len(text) >= _SCAN_MIN or "@" in text:
                        texts.append((count, "", text))
                continue
            key = m.group(1)
            rest = member[m.end(1) :]
            text = rest
            if "%" in rest:
                problems, text = _percent(count, rest, problems, sensitive)
            if sensitive and (len(text) >= _SCAN_MIN or "@" in text):
                texts.append((count, key, text))
    if problems is not None:
        problems.emit(out)
    if count > limits.baggage_members:
        out.append(
            Finding(
                OVERSIZED,
                HEADER,
                "baggage.too_many_members",
                f"{count} list members, limit {limits.baggage_members}",
            )
        )
    size = byte_length(combined)
    if size > limits.baggage_bytes:
        out.append(
            Finding(
                OVERSIZED,
                HEADER,
                "baggage.too_long",
                f"{size} bytes combined, limit {limits.baggage_bytes}",
            )
        )
    if texts:
        _scan(texts, out, None if sensitive is True else frozenset(sensitive or ()))
    return count > 0


def _percent(
    index: int, rest: str, problems: MemberProblems | None, sensitive: bool | frozenset[str]
) -> tuple[MemberProblems | None, str]:
    """Validate the percent-encoding of a member's value and properties.

    Returns the problems so far and the text the detectors should see: the decoded text
    (best effort when the encoding is broken), or "" when nothing needs a look.
    """
    if _BAD_PERCENT.search(rest) is not None:
        if problems is None:
            problems = MemberProblems(MALFORMED, HEADER)
        problems.add(
            "baggage.bad_percent_encoding", index, "a percent sign not followed by two hex digits"
        )
        return problems, unquote(rest, errors="replace") if sensitive else ""
    scan = sensitive and (len(rest) >= _SCAN_MIN or "@" in rest or "%40" in rest)
    if not scan and _NON_ASCII_ESCAPE.search(rest) is None:
        return problems, ""  # short, ASCII-only escapes: valid, nothing to look at
    try:
        plain = unquote_to_bytes(rest).decode("utf-8")
    except UnicodeDecodeError:
        if problems is None:
            problems = MemberProblems(MALFORMED, HEADER)
        problems.add("baggage.bad_utf8", index, "percent-decoded value is not UTF-8")
        return problems, unquote(rest, errors="replace") if sensitive else ""
    return problems, plain


def _scan(
    texts: list[tuple[int, str, str]], out: list[Finding], enabled: frozenset[str] | None
) -> None:
    where: dict[str, tuple[int, str]] = {}
    for index, key, text in texts:
        for code in _sensitive.scan(text, enabled):
            if code not in where:
                where[code] = (index, key)
    for code in _sensitive.DESCRIPTIONS:
        if code not in where:
            continue
        index, key = where[code]
        what = _sensitive.DESCRIPTIONS[code]
        named = f" (key {_show_key(key)})" if key else ""
        out.append(Finding(SENSITIVE, HEADER, code, f"member {index}{named} carries {what}"))


def _diagnose(member: str, index: int, problems: MemberProblems) -> None:
    head, eq, rest = member.partition("=")
    if not eq:
        problems.add("baggage.bad_member", index, "a list member needs key, equals sign, value")
        return
    key = head.strip(OWS)
    if _TOKEN_RE.fullmatch(key) is None:
        problems.add(
            "baggage.bad_key",
            index,
            "the key is not an HTTP token (letters, digits and !#$%&'*+-.^_`|~)",
        )
        return
    value, _, _ = rest.partition(";")
    if _VALUE_RE.fullmatch(value.strip(OWS)) is None:
        problems.add(
            "baggage.bad_value",
            index,
            "the value holds a character that must be percent-encoded "
            "(space, double quote, comma, semicolon, backslash, control or non-ASCII)",
        )
        return
    problems.add("baggage.bad_property", index, "a property is not key or key=value")
