"""``hopwatch check``: through typer's CliRunner and through the real console script."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hopwatch._check_cmd import UsageError, parse_lines
from hopwatch.cli import app

HOPWATCH = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "hopwatch"
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
EMAIL_BAGGAGE = "baggage: user=alice%40example.com"

runner = CliRunner()


def run_script(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert HOPWATCH.exists(), f"console script missing: {HOPWATCH} (run `make test`)"
    return subprocess.run(
        [str(HOPWATCH), "check", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def objects(stdout: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in stdout.splitlines()]


LINES = [
    f"traceparent: {TP}",
    f"TraceParent: {TP.upper()}",
    "tracestate: rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
    "baggage: userId=alice,serverNode=DF%2028,isProduction=false",
    EMAIL_BAGGAGE,
    "b3: 0",
    "x-b3-spanid: a2fb4a1d1a96d312",
    "tracestate: " + ",".join(f"k{i}=v" for i in range(33)),
    "content-type: text/html",
]
EXPECTED = [
    ("traceparent", True, []),
    ("traceparent", False, [("malformed", "traceparent.uppercase_hex")]),
    ("tracestate", True, []),
    ("baggage", True, []),
    ("baggage", True, [("sensitive", "sensitive.email")]),
    ("b3", True, []),
    ("x-b3-spanid", True, []),
    ("tracestate", False, [("oversized", "tracestate.too_many_members")]),
    ("content-type", True, []),
]


def check_json(stdout: str) -> None:
    got = objects(stdout)
    assert len(got) == len(EXPECTED)
    for obj, (header, valid, findings) in zip(got, EXPECTED, strict=True):
        assert set(obj) == {"header", "valid", "findings"}
        assert obj["header"] == header
        assert obj["valid"] is valid
        fs = obj["findings"]
        assert isinstance(fs, list)
        assert [(f["kind"], f["code"]) for f in fs] == findings
        for f in fs:
            assert set(f) == {"kind", "code", "detail"}
            assert "alice" not in f["detail"] and TP.upper() not in f["detail"]


def test_runner_args_json() -> None:
    result = runner.invoke(app, ["check", "--json", *LINES])
    assert result.exit_code == 0, result.output
    check_json(result.stdout)


def test_runner_stdin_json() -> None:
    result = runner.invoke(app, ["check", "--json"], input="\r\n".join(LINES) + "\r\n\n")
    assert result.exit_code == 0, result.output
    check_json(result.stdout)


def test_runner_table() -> None:
    result = runner.invoke(app, ["check", *LINES])
    assert result.exit_code == 0
    out = result.stdout.splitlines()
    assert out[0].split() == ["HEADER", "VALID", "KIND", "CODE", "DETAIL"]
    assert any("traceparent.uppercase_hex" in row and " NO " in row for row in out)
    assert any("sensitive.email" in row and " yes " in row for row in out)
    assert any(row.startswith("content-type") and "ignored" in row for row in out)
    assert "alice" not in result.stdout


def test_runner_usage_error_on_line_without_colon() -> None:
    result = runner.invoke(app, ["check", "--json"], input=f"traceparent: {TP}\nsecret-token-xyz\n")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "line 2" in result.stderr and "colon" in result.stderr
    assert "secret-token-xyz" not in result.stderr


def test_runner_empty_stdin() -> None:
    result = runner.invoke(app, ["check"], input="")
    assert result.exit_code == 0
    assert result.stdout == ""


def test_script_args_json() -> None:
    proc = run_script("--json", *LINES)
    assert proc.returncode == 0, proc.stderr
    check_json(proc.stdout)


def test_script_stdin_json() -> None:
    proc = run_script("--json", stdin="\n".join(LINES) + "\n")
    assert proc.returncode == 0, proc.stderr
    check_json(proc.stdout)


def test_script_stdin_table() -> None:
    proc = run_script(stdin=f"traceparent: {TP}\nb3: zz\n")
    assert proc.returncode == 0
    assert "b3.bad_format" in proc.stdout
    assert proc.stdout.splitlines()[1].split()[:2] == ["traceparent", "yes"]


def test_script_usage_error() -> None:
    proc = run_script(f"traceparent: {TP}", "no colon here")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "line 2" in proc.stderr


def test_script_unknown_option_is_usage_error() -> None:
    proc = run_script("--nope")
    assert proc.returncode != 0


@pytest.mark.parametrize(
    ("lines", "pairs"),
    [
        (["Traceparent:x"], [("traceparent", "x")]),
        (["b3 : 0 "], [("b3", "0")]),
        (["tracestate: a=1:2\r\n"], [("tracestate", "a=1:2")]),
        (["", "  ", "baggage:"], [("baggage", "")]),
    ],
    ids=["no-space", "space-before-colon", "colon-in-value-crlf", "blank-lines-empty-value"],
)
def test_parse_lines(lines: list[str], pairs: list[tuple[str, str]]) -> None:
    assert parse_lines(lines) == pairs


@pytest.mark.parametrize(
    "line", ["nocolon", ": value", "  \t: v"], ids=["no-colon", "empty-name", "blank-name"]
)
def test_parse_lines_usage_errors(line: str) -> None:
    with pytest.raises(UsageError, match="line 1"):
        parse_lines([line])
