"""``hopwatch check``: validate ``name: value`` header lines, one verdict per line.

Kept out of cli.py so the command stays a thin shell and the logic is testable directly.

Choices:
- A line is split at its first colon; the name is trimmed and lowercased, the value is
  trimmed of surrounding spaces and tabs (as an HTTP parser would) and of a trailing CR.
- Blank lines are skipped. A non-blank line without a colon, or with an empty name, is a
  usage error: nothing is printed on stdout, stderr names the offending line NUMBER (its
  text may hold a secret), and the exit status is 1.
- A header that is not a propagation header is reported valid with no findings (the table
  says it was ignored).
- Each line is judged on its own (``check_header``): the ``x-b3-*`` set rules and the
  cross-format conflict need a whole message and do not apply.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hopwatch.propagation import HEADER_NAMES, Verdict, check_header

from ._compat import SLOTS

__all__ = ["CheckedLine", "UsageError", "check_lines", "parse_lines", "render_json", "render_table"]


class UsageError(ValueError):
    """The input is not a list of ``name: value`` lines."""


@dataclass(frozen=True, **SLOTS)
class CheckedLine:
    header: str
    verdict: Verdict

    @property
    def recognised(self) -> bool:
        return self.header in HEADER_NAMES


def parse_lines(lines: Iterable[str]) -> list[tuple[str, str]]:
    """Split ``name: value`` lines; raise ``UsageError`` on the first bad one."""
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        name, colon, value = line.partition(":")
        name = name.strip(" \t")
        if not colon:
            raise UsageError(f"line {number}: expected 'name: value', found no colon")
        if not name:
            raise UsageError(f"line {number}: expected 'name: value', the name is empty")
        pairs.append((name.lower(), value.strip(" \t\r")))
    return pairs


def check_lines(pairs: Sequence[tuple[str, str]]) -> list[CheckedLine]:
    return [CheckedLine(name, check_header(name, value)) for name, value in pairs]


def render_json(checked: Sequence[CheckedLine]) -> str:
    """One JSON object per line (JSON lines)."""
    out = []
    for c in checked:
        obj = {
            "header": c.header,
            "valid": c.verdict.valid,
            "findings": [
                {"kind": f.kind, "code": f.code, "detail": f.detail} for f in c.verdict.findings
            ],
        }
        out.append(json.dumps(obj, ensure_ascii=False))
    return "\n".join(out)


def render_table(checked: Sequence[CheckedLine]) -> str:
    """A table a person reads: one row per finding, one row for a clean line."""
    rows: list[tuple[str, str, str, str, str]] = []
    for c in checked:
        valid = "yes" if c.verdict.valid else "NO"
        if not c.verdict.findings:
            note = "ok" if c.recognised else "ignored: not a propagation header"
            rows.append((c.header, valid, "-", "-", note))
        for f in c.verdict.findings:
            rows.append((c.header, valid, f.kind, f.code, f.detail))
    head = ("HEADER", "VALID", "KIND", "CODE", "DETAIL")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(4)]

    def fmt(r: tuple[str, str, str, str, str]) -> str:
        return "  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4]

    return "\n".join(fmt(r).rstrip() for r in (head, *rows))
