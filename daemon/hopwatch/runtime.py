"""The interpreter that runs the daemon: PyPy where the install provides it.

The analysis loop is plain Python that runs once per observed message; PyPy's JIT runs it
at about half the CPU that CPython needs (docs/performance.md). bcc, the CLI and the tests
stay on CPython; only `hopwatch run` moves:

* Under CPython, `hopwatch run` execs the PyPy runtime that `make setup` / `make install`
  put next to the venv (``<venv>/hopwatch-pypy``, a link to the PyPy environment's
  ``hopwatch``), with the same arguments, the same pid and, set again after the exec, the
  same process name (comm): systemd, `kill`, `pgrep` and the tests see one process.
* Under PyPy it makes sure the garbage collector is sized for a daemon (``GC_ENV``):
  - the nursery: PyPy sizes it from the CPU cache it detects, and a VM that reports a
    300 MiB L3 got a nursery that left the idle daemon at 310 MiB instead of ~165;
  - the growth allowed between two major collections: by default the heap may grow to
    1.82x its size after the last one, so a connection storm left 20-40 MB of garbage
    that sat in arenas afterwards (100,000 connections: 201-203 MiB). With at most 16 MB
    of growth: 181-186 MiB, and the same CPU per message at 10,000 req/s.
  PyPy reads these only at start, so a process started without them execs itself once
  with them set. An operator's own values are kept.

``HOPWATCH_RUNTIME`` chooses: ``auto`` (the default: PyPy when installed), ``cpython``
(stay on the interpreter that was started) or ``pypy`` (PyPy or refuse to start).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "ENV",
    "GC_ENV",
    "PYPY_LINK",
    "RuntimeChoiceError",
    "describe",
    "exec_plan",
    "restore_name",
    "switch",
]

ENV = "HOPWATCH_RUNTIME"
CHOICES = ("auto", "cpython", "pypy")
PYPY_LINK = "hopwatch-pypy"  # in the venv (sys.prefix) that runs `hopwatch` under CPython
NAME_ENV = "HOPWATCH_COMM"  # the name to take back after the exec (then removed)
_PR_SET_NAME = 15
#: PyPy's GC settings for the daemon (docs/performance.md). The nursery: at 10,000 req/s
#: 4 MiB used less CPU than 16 MiB and than PyPy's own choice on this VM. The major
#: collection's growth cap: 16 MB kept the heap of a 100,000-connection storm ~18 MiB
#: smaller (8 MB measured the same) at the same CPU per message.
GC_ENV = {"PYPY_GC_NURSERY": "4M", "PYPY_GC_MAX_DELTA": "16MB"}


class RuntimeChoiceError(Exception):
    """``HOPWATCH_RUNTIME`` asks for something this install cannot do."""


def exec_plan(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    implementation: str,
    executable: str,
    prefix: str,
) -> tuple[str, list[str], dict[str, str]] | None:
    """What `hopwatch run` should exec instead of going on (path, argv, environment), or
    None to go on in this process. Pure: the caller execs."""
    choice = env.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise RuntimeChoiceError(f"{ENV}={env.get(ENV)!r}: expected one of {', '.join(CHOICES)}")
    new_env = dict(env)
    if implementation == "PyPy":
        if choice == "cpython":
            raise RuntimeChoiceError(f"{ENV}=cpython, but this is PyPy ({executable})")
        if all(name in env for name in GC_ENV):
            return None
        new_env = {**GC_ENV, **env}
        script = argv[0] if argv else ""
        if script and os.path.isfile(script) and os.access(script, os.X_OK):
            # The script itself, so the process keeps its name (comm).
            return script, list(argv), new_env
        return executable, [executable, "-m", "hopwatch", *argv[1:]], new_env
    if choice == "cpython":
        return None
    link = Path(prefix) / PYPY_LINK
    if not (link.is_file() and os.access(link, os.X_OK)):
        if choice == "pypy":
            raise RuntimeChoiceError(
                f"{ENV}=pypy, but {link} is missing: run `make setup` (or `make install`) "
                "with pypy3 installed"
            )
        return None
    new_env = {**GC_ENV, **new_env}
    return str(link), [str(link), *argv[1:]], new_env


def switch(argv: Sequence[str]) -> None:
    """Exec the runtime `exec_plan` names; return only when this process goes on."""
    plan = exec_plan(
        argv,
        os.environ,
        implementation=platform.python_implementation(),
        executable=sys.executable,
        prefix=sys.prefix,
    )
    if plan is None:
        return
    path, args, env = plan
    try:
        env[NAME_ENV] = Path("/proc/self/comm").read_text().rstrip("\n")
    except OSError:
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(path, args, env)


def restore_name() -> None:
    """After `switch` exec'd this process: take back the name it was started under (the
    kernel names a process after the file it executes, here the PyPy link)."""
    name = os.environ.pop(NAME_ENV, "")
    if not name:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def describe() -> str:
    """``PyPy 7.3.11 (Python 3.9.16)`` or ``CPython 3.11.2``."""
    impl = platform.python_implementation()
    pyver = platform.python_version()
    pypy = getattr(sys, "pypy_version_info", None)
    if pypy is not None:
        return f"{impl} {pypy.major}.{pypy.minor}.{pypy.micro} (Python {pyver})"
    return f"{impl} {pyver}"
