"""Detectors for what must never travel in baggage.

``scan(text)`` returns the reason codes of the detectors that fired, in a fixed order,
never the matched text. Every pattern is bounded and anchored with look-behinds so a scan
stays linear in the length of the text (baggage may be 8 KiB or more on every message).

Card numbers: 13-19 digits, optionally grouped by single spaces or dashes, that pass the
Luhn check AND start with an issuer prefix of a real card scheme (Visa, Mastercard, Amex,
Discover, JCB, Diners, UnionPay, Maestro, Mir). The prefix check keeps millisecond
timestamps and other long ids, one in ten of which pass Luhn, from being reported.
"""

from __future__ import annotations

import re

__all__ = ["DESCRIPTIONS", "scan"]

# code -> what a person is told (never the value)
DESCRIPTIONS: dict[str, str] = {
    "sensitive.email": "an e-mail address",
    "sensitive.card_number": "a payment card number (Luhn-valid, known issuer prefix)",
    "sensitive.jwt": "a JSON Web Token",
    "sensitive.bearer_token": "a bearer token",
    "sensitive.url_credentials": "a URL with a user name and password",
    "sensitive.private_key": "a private key",
    "sensitive.aws_access_key": "an AWS access key id",
    "sensitive.github_token": "a GitHub token",
    "sensitive.gitlab_token": "a GitLab token",
    "sensitive.slack_token": "a Slack token or webhook",
    "sensitive.stripe_key": "a Stripe secret key",
    "sensitive.google_api_key": "a Google API key",
    "sensitive.npm_token": "an npm token",
    "sensitive.api_key": "an API secret key (sk-...)",
}

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@"
    r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?){0,8}"
    r"\.[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)
# Starts with a plain digit class (the look-behinds come after it) so that the regex
# engine can skip non-digits quickly.
_CARD = re.compile(r"[0-9](?<![0-9]{2})(?<![0-9][ \-][0-9])(?:[ \-]?[0-9]){12,18}(?![ \-]?[0-9])")
_URL_CREDS = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,20}://[^/:@\s,;]{1,256}:[^/@\s,;]{1,256}@")

# Prefix-anchored secrets: one pass, the group name is the code suffix.
_TOKENS = re.compile(
    "|".join(
        (
            r"(?P<jwt>eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*)",
            r"(?P<bearer_token>(?<![A-Za-z])[Bb][Ee][Aa][Rr][Ee][Rr]"
            r"[ \t+]+[A-Za-z0-9\-._~+/]{12,})",
            r"(?P<private_key>-----BEGIN[ +A-Z0-9]{0,40}PRIVATE[ +]KEY)",
            r"(?P<aws_access_key>(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|APKA)"
            r"[A-Z0-9]{16}(?![A-Z0-9]))",
            r"(?P<github_token>(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22,}))",
            r"(?P<gitlab_token>(?<![A-Za-z0-9_])glpat-[A-Za-z0-9_\-]{20,})",
            r"(?P<slack_token>(?<![A-Za-z0-9])xox[abposre]-[A-Za-z0-9\-]{10,}"
            r"|hooks\.slack\.com/services/T[A-Za-z0-9]+/B[A-Za-z0-9]+/[A-Za-z0-9]+)",
            r"(?P<stripe_key>(?<![A-Za-z0-9])[sr]k_(?:live|test)_[A-Za-z0-9]{16,})",
            r"(?P<google_api_key>AIza[0-9A-Za-z_\-]{35})",
            r"(?P<npm_token>(?<![A-Za-z0-9_])npm_[A-Za-z0-9]{36})",
            r"(?P<api_key>(?<![A-Za-z0-9_\-])sk-(?:proj-|ant-[a-z0-9]{2,8}-)?[A-Za-z0-9_\-]{32,})",
        )
    )
)
_ORDER = tuple(DESCRIPTIONS)
# Literal substrings at least one of which every _TOKENS match contains: substring tests
# are an order of magnitude faster than a regex scan, and almost always all miss.
_TOKEN_GATES = (
    "eyJ",
    "earer",
    "EARER",
    "PRIVATE",
    "AKIA",
    "ASIA",
    "ABIA",
    "ACCA",
    "AGPA",
    "AIDA",
    "AROA",
    "ANPA",
    "ANVA",
    "APKA",
    "AIza",
    "gh",
    "glpat-",
    "xox",
    "hooks.slack",
    "k_live_",
    "k_test_",
    "npm_",
    "sk-",
)


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _issuer_ok(d: str) -> bool:
    n = len(d)
    p2, p3, p4 = int(d[:2]), int(d[:3]), int(d[:4])
    if d[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # American Express
    if 2200 <= p4 <= 2204:
        return n == 16  # Mir
    if 3528 <= p4 <= 3589:
        return n >= 16  # JCB
    if 300 <= p3 <= 305 or p2 in (36, 38, 39):
        return n >= 14  # Diners Club
    if p4 == 6011 or p2 == 65 or 644 <= p3 <= 649 or p2 == 62:
        return n >= 16  # Discover, UnionPay
    return p2 == 50 or 56 <= p2 <= 69  # Maestro (13-19 here)


def _has_card(text: str) -> bool:
    for m in _CARD.finditer(text):
        digits = m.group().replace(" ", "").replace("-", "")
        if _issuer_ok(digits) and _luhn(digits):
            return True
    return False


_TOKEN_CODES = frozenset("sensitive." + name for name in _TOKENS.groupindex)


def scan(text: str, enabled: frozenset[str] | None = None) -> tuple[str, ...]:
    """Reason codes of the detectors that fire on ``text`` (empty when clean).

    ``enabled``: only these detector codes (None: all of them). A detector that is off
    costs nothing: its regex never runs.
    """
    found: set[str] = set()
    if "@" in text:
        if (enabled is None or "sensitive.email" in enabled) and _EMAIL.search(text) is not None:
            found.add("sensitive.email")
        if (
            (enabled is None or "sensitive.url_credentials" in enabled)
            and "://" in text
            and _URL_CREDS.search(text) is not None
        ):
            found.add("sensitive.url_credentials")
    if (enabled is None or "sensitive.card_number" in enabled) and _has_card(text):
        found.add("sensitive.card_number")
    if enabled is None or not _TOKEN_CODES.isdisjoint(enabled):
        for gate in _TOKEN_GATES:
            if gate in text:
                for m in _TOKENS.finditer(text):
                    found.add("sensitive." + str(m.lastgroup))
                break
    if not found:
        return ()
    return tuple(code for code in _ORDER if code in found and (enabled is None or code in enabled))
