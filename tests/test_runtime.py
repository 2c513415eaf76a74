"""Which interpreter `hopwatch run` ends up on (hopwatch.runtime)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hopwatch import runtime
from hopwatch.runtime import GC_ENV, PYPY_LINK, RuntimeChoiceError, exec_plan
from tests.helpers import (
    PEERS,
    REPO,
    SYSTEM_PYTHON,
    VENV,
    Daemon,
    counts,
    free_port,
    make_env,
    named,
    run,
    server,
)

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def _venv(tmp_path: Path, with_pypy: bool) -> Path:
    prefix = tmp_path / ("venv-pypy" if with_pypy else "venv")
    prefix.mkdir()
    if with_pypy:
        target = tmp_path / "pypy-venv-hopwatch"
        target.write_text("#!/bin/sh\n")
        target.chmod(0o755)
        (prefix / PYPY_LINK).symlink_to(target)
    return prefix


def plan(
    prefix: Path, env: dict[str, str], impl: str = "CPython", argv: list[str] | None = None
) -> tuple[str, list[str], dict[str, str]] | None:
    return exec_plan(
        argv or ["/x/bin/hopwatch", "run", "--metrics-addr", "127.0.0.1:1"],
        env,
        implementation=impl,
        executable="/usr/bin/python3",
        prefix=str(prefix),
    )


def test_cpython_execs_the_installed_pypy_with_the_same_arguments(tmp_path: Path) -> None:
    prefix = _venv(tmp_path, with_pypy=True)
    got = plan(prefix, {"PATH": "/bin"})
    assert got is not None
    path, argv, env = got
    assert path == str(prefix / PYPY_LINK)
    assert argv == [path, "run", "--metrics-addr", "127.0.0.1:1"]
    assert env == {"PATH": "/bin", "PYPY_GC_NURSERY": "4M", "PYPY_GC_MAX_DELTA": "16MB"}


def test_an_operators_gc_settings_are_kept(tmp_path: Path) -> None:
    prefix = _venv(tmp_path, with_pypy=True)
    got = plan(prefix, {"PYPY_GC_NURSERY": "8M", "HOPWATCH_RUNTIME": "auto"})
    assert got is not None
    assert got[2]["PYPY_GC_NURSERY"] == "8M" and got[2]["PYPY_GC_MAX_DELTA"] == "16MB"
    got = plan(prefix, {"PYPY_GC_MAX_DELTA": "64MB"})
    assert got is not None
    assert got[2]["PYPY_GC_NURSERY"] == "4M" and got[2]["PYPY_GC_MAX_DELTA"] == "64MB"


def test_cpython_stays_without_pypy(tmp_path: Path) -> None:
    assert plan(_venv(tmp_path, with_pypy=False), {}) is None


def test_cpython_stays_when_asked(tmp_path: Path) -> None:
    assert plan(_venv(tmp_path, with_pypy=True), {"HOPWATCH_RUNTIME": "cpython"}) is None
    assert plan(_venv(tmp_path, with_pypy=False), {"HOPWATCH_RUNTIME": " CPython "}) is None


def test_pypy_required_but_missing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeChoiceError, match=r"hopwatch-pypy is missing.*make setup"):
        plan(_venv(tmp_path, with_pypy=False), {"HOPWATCH_RUNTIME": "pypy"})


def test_an_unknown_choice_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeChoiceError, match="expected one of auto, cpython, pypy"):
        plan(_venv(tmp_path, with_pypy=True), {"HOPWATCH_RUNTIME": "jython"})


def test_pypy_restarts_itself_once_to_size_its_gc(tmp_path: Path) -> None:
    script = tmp_path / "hw_named"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    argv = [str(script), "run"]
    got = plan(tmp_path, {"A": "1"}, impl="PyPy", argv=argv)
    # The script itself (so the process keeps its name), with the GC settings made...
    assert got == (
        str(script), argv, {"A": "1", "PYPY_GC_NURSERY": "4M", "PYPY_GC_MAX_DELTA": "16MB"}
    )
    # ...and once they are all set, it goes on; one missing is still set (once).
    assert plan(tmp_path, dict(GC_ENV), impl="PyPy", argv=argv) is None
    got = plan(tmp_path, {"PYPY_GC_NURSERY": "2M"}, impl="PyPy", argv=argv)
    assert got is not None and got[2] == {"PYPY_GC_NURSERY": "2M", "PYPY_GC_MAX_DELTA": "16MB"}
    # `pypy -m hopwatch run`: argv[0] is not executable, the interpreter is.
    got = plan(tmp_path, {}, impl="PyPy", argv=[str(tmp_path / "__main__.py"), "run"])
    assert got is not None and got[1] == ["/usr/bin/python3", "-m", "hopwatch", "run"]


def test_pypy_refuses_a_cpython_request(tmp_path: Path) -> None:
    with pytest.raises(RuntimeChoiceError, match="this is PyPy"):
        plan(tmp_path, {"HOPWATCH_RUNTIME": "cpython"}, impl="PyPy")


def test_describe_names_this_interpreter() -> None:
    import platform

    assert runtime.describe() == f"CPython {platform.python_version()}"


# -- set-up: `make run` takes PyPy where it is 3.9 or later; `make test` always builds it ------
def _fake_pypy(tmp_path: Path, version_ok: bool) -> Path:
    """A `pypy3` that only answers the version check (a dry run executes nothing else)."""
    fake = tmp_path / ("pypy-new" if version_ok else "pypy-old")
    fake.write_text(f"#!/bin/sh\nexit {0 if version_ok else 1}\n")
    fake.chmod(0o755)
    return fake


def _make(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["make", "-C", str(REPO), *args], env=make_env(), check=check)


def test_make_run_builds_pypy_only_where_it_is_chosen_and_usable(tmp_path: Path) -> None:
    elsewhere = tmp_path / "venv-pypy"
    dry = ["-n", f"PYPY_VENV={elsewhere}"]
    new, old = _fake_pypy(tmp_path, True), _fake_pypy(tmp_path, False)
    build = f"{new} -m venv {elsewhere}"
    # auto, the default: PyPy when it is 3.9 or later, CPython (and no PyPy venv) otherwise.
    assert build in _make([*dry, "run", f"PYPY={new}"]).stdout
    auto_old = _make([*dry, "run", f"PYPY={old}"]).stdout
    assert str(elsewhere) not in auto_old
    assert "runtime: cpython (RUNTIME=auto)" in auto_old
    assert str(elsewhere) not in _make([*dry, "run", "PYPY=/nonexistent/pypy3"]).stdout
    # Asked for by name: never PyPy with cpython; PyPy with pypy (its rule checks the version).
    assert str(elsewhere) not in _make([*dry, "run", "RUNTIME=cpython", f"PYPY={new}"]).stdout
    old_build = f"{old} -m venv {elsewhere}"
    assert old_build in _make([*dry, "run", "RUNTIME=pypy", f"PYPY={old}"]).stdout
    assert old_build in _make([*dry, "test", f"PYPY={old}"]).stdout  # the tests run both
    res = _make(["runtime", "RUNTIME=graalpy"], check=False)
    assert res.returncode == 2
    assert "RUNTIME must be auto, pypy or cpython, not 'graalpy'" in res.stderr


def test_a_pypy_older_than_3_9_is_refused_with_its_version(tmp_path: Path) -> None:
    venv = tmp_path / "venv-pypy"  # as Ubuntu 22.04's pypy3 (3.8) would make it
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "python"
    fake.write_text(
        "#!/bin/sh\ncase \"$*\" in *version_info*) exit 1;; *python_version*) echo 3.8.16;;"
        " *) echo \"ran: $*\" >&2; exit 3;; esac\n"
    )
    fake.chmod(0o755)
    res = _make([f"PYPY_VENV={venv}", f"{venv}/.installed"], check=False)
    assert res.returncode != 0
    assert "is Python 3.8.16: the daemon needs 3.9 or later" in res.stderr
    assert "ran:" not in res.stderr  # nothing installed into it
    assert not (venv / ".installed").exists()


# -- the real daemon ------------------------------------------------------------------------
PYPY_INSTALLED = (VENV / PYPY_LINK).exists()  # `make setup RUNTIME=pypy`
PYPY_HOPWATCH = REPO / ".venv-pypy" / "bin" / "hopwatch"  # built by `make test`


@pytest.mark.kernel
def test_the_session_daemon_runs_on_the_runtime_make_set_up(daemon: Daemon) -> None:
    """`.venv/bin/hopwatch run` stays on CPython, or execs PyPy when `make setup
    RUNTIME=pypy` linked it: same pid, same name; python_info tells which one serves."""
    pid = daemon.proc.pid
    exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    assert Path(f"/proc/{pid}/comm").read_text().strip() == daemon.name
    info = daemon.python_info()
    if PYPY_INSTALLED:
        assert exe.startswith("pypy"), exe
        assert info["implementation"] == "PyPy"
    else:
        assert exe.startswith("python"), exe
        assert info["implementation"] == "CPython"


@pytest.mark.kernel
@pytest.mark.parametrize("runtime_name", ["CPython", "PyPy"])
def test_each_runtime_captures_exactly(tmp_path: Path, runtime_name: str) -> None:
    """The same traffic, exactly counted, by a daemon on each interpreter. PyPy: its own
    environment's `hopwatch`, which restarts itself once to size its GC (same pid,
    same name)."""
    if runtime_name == "PyPy":
        assert PYPY_HOPWATCH.exists(), "`make test` builds .venv-pypy (pypy3 from apt)"
        d = Daemon(tmp_path, name="hw_rt_pypy", exe=str(PYPY_HOPWATCH))
    else:
        d = Daemon(tmp_path, name="hw_rt_cpython", env={"HOPWATCH_RUNTIME": "cpython"})
    try:
        pid = d.proc.pid
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        assert exe.startswith("pypy" if runtime_name == "PyPy" else "python"), exe
        assert Path(f"/proc/{pid}/comm").read_text().strip() == d.name
        assert d.python_info()["implementation"] == runtime_name
        if runtime_name == "PyPy":
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            for name, value in GC_ENV.items():
                assert f"{name}={value}".encode() in environ
        port = free_port()
        srv = named(tmp_path, "t_rt_srv", SYSTEM_PYTHON)
        cli = named(tmp_path, "t_rt_cli", SYSTEM_PYTHON)
        with server([srv, str(PEERS / "h1_server.py"), "127.0.0.1", str(port)], port):
            before = d.settle()
            run(
                [
                    cli,
                    str(PEERS / "h1_client.py"),
                    "127.0.0.1",
                    str(port),
                    "7",
                    f"traceparent: {TP}",
                ]
            )
            run(
                [
                    cli,
                    str(PEERS / "h1_client.py"),
                    "127.0.0.1",
                    str(port),
                    "3",
                    "traceparent: 00-bad",
                ]
            )
            delta = d.settle(since=before) - before
        assert counts(delta, "t_rt_cli") == {
            ("outbound", "request", "http1", "w3c"): 7,
            ("outbound", "request", "http1", "none"): 3,
            ("inbound", "response", "http1", "none"): 10,
        }
        assert counts(delta, "t_rt_srv") == {
            ("inbound", "request", "http1", "w3c"): 7,
            ("inbound", "request", "http1", "none"): 3,
            ("outbound", "response", "http1", "none"): 10,
        }
        malformed = delta.series("hopwatch_findings_total", finding="malformed", process="t_rt_cli")
        assert sum(malformed.values()) == 3, malformed
    finally:
        assert d.stop() == 0, d.log_text()
