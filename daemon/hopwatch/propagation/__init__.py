"""Propagation-header checks: the headers of one message in, a ``Verdict`` out.

Pure functions and frozen value objects, no IO. See docs/propagation.md for the rules
and for every choice made where the specifications disagree.
"""

from __future__ import annotations

from ._model import CONFLICT, MALFORMED, OVERSIZED, SENSITIVE, Finding, Limits, TraceContext
from ._sensitive import DESCRIPTIONS as SENSITIVE_DETECTORS
from ._verdict import DEFAULT_LIMITS, HEADER_NAMES, Verdict, check_header, check_message

__all__ = [
    "CONFLICT",
    "DEFAULT_LIMITS",
    "HEADER_NAMES",
    "MALFORMED",
    "OVERSIZED",
    "SENSITIVE",
    "SENSITIVE_DETECTORS",
    "Finding",
    "Limits",
    "TraceContext",
    "Verdict",
    "check_header",
    "check_message",
]
