"""Shared helpers for the list headers (``tracestate``, ``baggage``)."""

from __future__ import annotations

from ._model import Finding

__all__ = ["OWS", "MemberProblems", "byte_length", "split_list"]

OWS = " \t"


def byte_length(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def split_list(values: list[str]) -> tuple[str, list[str]]:
    """Combine repeated field lines (RFC 9110 5.3) and split on commas.

    Returns the combined value and its raw, unstripped members.
    """
    combined = values[0] if len(values) == 1 else ",".join(values)
    return combined, combined.split(",")


class MemberProblems:
    """Collects per-member problems and reports each reason code once.

    A 1 MiB header with thousands of bad members yields one finding per code
    ("member 3, and 4,211 more"), not thousands.
    """

    __slots__ = ("_header", "_kind", "_problems")

    def __init__(self, kind: str, header: str) -> None:
        self._kind = kind
        self._header = header
        self._problems: dict[str, tuple[int, int, str]] = {}

    def add(self, code: str, index: int, detail: str) -> None:
        p = self._problems.get(code)
        if p is None:
            self._problems[code] = (index, 1, detail)
        else:
            self._problems[code] = (p[0], p[1] + 1, p[2])

    def emit(self, out: list[Finding]) -> None:
        for code, (index, count, detail) in self._problems.items():
            more = f", and {count - 1:,} more" if count > 1 else ""
            out.append(Finding(self._kind, self._header, code, f"member {index}{more}: {detail}"))
