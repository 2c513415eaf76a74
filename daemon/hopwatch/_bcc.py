"""Import Debian's bcc (pure ctypes) on CPython and on PyPy.

bcc 0.26 declares two ctypes structures that PyPy's ctypes rejects at import time (bit
fields inside an anonymous union: `ValueError: sequence of pairs expected`): the
`perf_event_attr` of `bcc/perf.py` and the instruction layout of `bcc/disassembler.py`.
hopwatch uses neither (no perf events, no disassembly), so on PyPy both modules are
replaced by placeholders before bcc is imported; everything hopwatch calls (compile, attach
tracepoints and uprobes, maps) is plain ctypes and works there.
"""

from __future__ import annotations

import platform
import sys
import types
from typing import Any


def _placeholders() -> None:
    if "bcc" in sys.modules or platform.python_implementation() != "PyPy":
        return

    def unavailable(*_args: Any, **_kwargs: Any) -> Any:
        raise NotImplementedError("not available under PyPy (hopwatch does not use it)")

    perf = types.ModuleType("bcc.perf")
    # libbcc.py only names `Perf.perf_event_attr` in an argtypes list nobody reads.
    perf.Perf = type("Perf", (), {"perf_event_attr": type("perf_event_attr", (), {})})  # type: ignore[attr-defined]
    dis = types.ModuleType("bcc.disassembler")
    dis.disassemble_prog = dis.decode_map = unavailable  # type: ignore[attr-defined]
    sys.modules.setdefault("bcc.perf", perf)
    sys.modules.setdefault("bcc.disassembler", dis)


def import_bcc() -> types.ModuleType:
    """The `bcc` module (ImportError or OSError when it is not installed)."""
    _placeholders()
    import bcc

    return bcc
