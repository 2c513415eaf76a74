"""What the capture adds to one syscall: ns per call, measured side by side in one run.

`bench/syscall_loop.c` times tight loops, best of 7 passes: `write(2)` of 1 byte to
/dev/null (a traced data syscall on an untracked fd: what every process on the node pays),
`getppid(2)` (traced by nothing: what attaching any syscall tracepoint costs every
syscall), and two loops on a loopback TCP connection the capture tracks (opened after it
started, an HTTP request head first): a 1-byte write and read across it (a pair: two
tracked syscalls and the TCP round trip) and a 1-byte write with TCP_CORK set (one tracked
syscall that moves no packet). The capture's ring is small and never read, as when the
daemon cannot keep up: every tracked syscall takes the kernel's shedding path (the
saturation benchmark's case: `bench/load_bench.py` (b)).

Slices, interleaved over several rounds: no programs; trivial `return 0` programs on the
exit tracepoints of the data syscalls (what the daemon attaches on x86-64) and on their
enter and exit tracepoints (what it attaches elsewhere); the daemon's capture with the
arguments read from the saved registers (the default on x86-64) and with them stashed by
enter programs. With `--stages`, copies of `bpf/capture.c` that return early, after each
step of the shedding path, split its cost. Medians per slice; the added ns are against the
medians without programs.

Run as root after `make setup`:  .venv/bin/python bench/syscall_cost.py [--rounds 5] [--stages]
Writes bench/RESULTS-syscall-cost.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load_bench import trivial_programs

BENCH = Path(__file__).resolve().parent
FULL_SYSCALLS = (
    "write",
    "writev",
    "sendto",
    "sendmsg",
    "sendmmsg",
    "sendfile64",
    "read",
    "readv",
    "recvfrom",
    "recvmsg",
    "recvmmsg",
)


# The shedding path of a tracked syscall, step by step (arguments from the registers):
# (stage, the line of data_exit after which a copy of capture.c returns).
STAGES = (
    ("the task's pid/tgid and the config", "    // storage below.\n"),
    ("and the registers (fd, buffer, count)", "    regs_args(task, &a);\n"),
    ("and the connection lookup", "    struct conn_val *cv = conns.lookup(&k);\n"),
)


def stage_sources(tmp: Path) -> dict[str, Path]:
    """Copies of bpf/capture.c whose data exit returns after each stage of STAGES."""
    from hopwatch.capture.live import BPF_SOURCE

    text = BPF_SOURCE.read_text()
    out = {}
    for i, (name, line) in enumerate(STAGES):
        if text.count(line) != 1:
            raise SystemExit(f"bench/syscall_cost.py: stage marker not found once: {line!r}")
        # A condition the compiler cannot drop; returns on every call.
        patched = text.replace(line, line + "    if (id != 0) return 0;  // stage cut\n")
        path = tmp / f"capture_stage{i}.c"
        path.write_text(patched)
        out[name] = path
    return out


@contextmanager
def capture(regs: bool, source: Path | None = None) -> Iterator[None]:
    from hopwatch.capture.live import CaptureConfig, LiveCapture

    # A small ring never read: the tracked syscalls fill it at once, then shed.
    config = CaptureConfig(tls=False, args_from_regs=regs, ring_bytes=64 * 1024)
    with LiveCapture(config, source=source) as cap:
        cap.poll(0)
        yield
        # (A stage copy returns before it would shed.)
        if source is None and cap.stats().get("ring_full", 0) == 0:
            raise SystemExit("bench/syscall_cost.py: the capture never shed: not measured")


def slices(stages: dict[str, Path]) -> dict[str, Callable[[], AbstractContextManager[None]]]:
    out: dict[str, Callable[[], AbstractContextManager[None]]] = {
        "no programs": nullcontext,
        "trivial, exit only": lambda: trivial_programs(("exit",), FULL_SYSCALLS),
        "trivial, enter and exit": lambda: trivial_programs(("enter", "exit"), FULL_SYSCALLS),
    }
    for name, path in stages.items():
        out[f"shedding path stage: {name}"] = lambda path=path: capture(True, path)
    out["capture, arguments from the registers"] = lambda: capture(True)
    out["capture, arguments stashed at enter"] = lambda: capture(False)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=300_000)
    ap.add_argument("--stages", action="store_true", help="split the shedding path's cost")
    ap.add_argument("--out", default=str(BENCH / "RESULTS-syscall-cost.md"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hw-sc-"))
    try:
        exe = tmp / "syscall_loop"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(BENCH / "syscall_loop.c")], check=True)

        def measure() -> list[float]:
            out = subprocess.run(
                [str(exe), str(args.calls)], capture_output=True, text=True, check=True
            ).stdout.split()
            return [float(x) for x in out]

        todo = slices(stage_sources(tmp) if args.stages else {})
        runs: dict[str, list[list[float]]] = {k: [] for k in todo}
        for r in range(args.rounds):
            order = list(todo.items())
            for name, make in order if r % 2 == 0 else order[::-1]:
                with make():
                    runs[name] += [measure(), measure()]
            print(r, {k: v[-1] for k, v in runs.items()}, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: [statistics.median(col) for col in zip(*v)] for k, v in runs.items()}
    base = med["no programs"]
    lines = [
        "# What the capture adds to one syscall (bench/syscall_cost.py)",
        "",
        f"Machine: {os.cpu_count()} CPUs, kernel {os.uname().release}. Best of 7 passes "
        f"({args.calls:,} calls; {args.calls // 8:,} pairs), medians of {args.rounds} "
        "interleaved rounds (2 runs per slice each). `write` is 1 byte to /dev/null (a "
        "traced data syscall on an untracked fd); `getppid` is traced by nothing; a pair is "
        "a 1-byte write and read across a loopback TCP connection the capture tracks (two "
        "tracked syscalls); a corked write is a 1-byte write on it with TCP_CORK set (one "
        "tracked syscall, no packet). The capture's ring is never read: each tracked "
        "syscall takes the shedding path.",
        "",
        "| slice | ns per write | added | ns per getppid | added | ns per pair | added "
        "| ns per corked write | added |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, m in med.items():
        cells = " | ".join(f"{v:.0f} | {v - b:+.0f}" for v, b in zip(m, base))
        lines.append(f"| {name} | {cells} |")
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
