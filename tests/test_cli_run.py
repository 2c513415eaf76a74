"""`hopwatch run` and `hopwatch doctor` started as an operator would: startup failures
exit non-zero with the cause and the fix."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers import HOPWATCH

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]


def hopwatch(
    *args: str, prefix: list[str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(prefix or []), str(HOPWATCH), *args], capture_output=True, text=True, timeout=timeout
    )


def test_bad_config_exits_2_naming_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[limits]\nbaggage_bytes = 8192\nbaggage_members = 'many'\n")
    res = hopwatch("run", "--config", str(cfg))
    assert res.returncode == 2
    assert f"{cfg}:3: limits.baggage_members must be an integer" in res.stderr
    assert "Traceback" not in res.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    res = hopwatch("run", "--config", str(tmp_path / "nope.toml"))
    assert res.returncode == 2
    assert "cannot read" in res.stderr and "Traceback" not in res.stderr


def test_bad_metrics_addr() -> None:
    res = hopwatch("run", "--metrics-addr", "localhost")
    assert res.returncode == 2
    assert "HOST:PORT" in res.stderr


@pytest.mark.kernel
def test_port_in_use_exits_1_with_the_fix() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        res = hopwatch("run", "--metrics-addr", f"127.0.0.1:{port}")
    assert res.returncode == 1, res.stderr
    assert "cannot serve metrics" in res.stderr and "--metrics-addr" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.kernel
def test_unprivileged_run_exits_1_with_the_fix() -> None:
    res = hopwatch("run", prefix=NOBODY)
    assert res.returncode == 1, res.stderr
    assert "cannot start" in res.stderr
    assert "root" in res.stderr or "CAP_BPF" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.kernel
def test_doctor_as_root_passes_and_unprivileged_fails_with_fixes() -> None:
    ok = hopwatch("doctor")
    assert ok.returncode == 0, ok.stdout
    assert "all prerequisites met" in ok.stdout
    for name in ("privileges", "tracefs", "kernel headers", "bcc", "ring buffer"):
        assert any(line.startswith("ok") and name in line for line in ok.stdout.splitlines()), name
    assert "the daemon reads it in place (mmap)" in ok.stdout  # x86-64: no libbpf reader
    bad = hopwatch("doctor", prefix=NOBODY)
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("FAIL") and "privileges" in line)
    assert "fix:" in lines[i + 1]
