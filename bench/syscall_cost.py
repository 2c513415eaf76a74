"""What the capture adds to one syscall: ns per call, measured side by side in one run.

`bench/syscall_loop.c` times a tight loop of `write(2)` of 1 byte to /dev/null (a traced
data syscall on an untracked fd: what every process on the node pays) and of `getppid(2)`
(traced by nothing: what attaching any syscall tracepoint costs every syscall), best of 7
passes of 300,000 calls each. Slices, interleaved over several rounds: no programs; trivial
`return 0` programs on the exit tracepoints of the data syscalls (what the daemon attaches on
x86-64) and on their enter and exit tracepoints (what it attaches elsewhere); the daemon's
capture with the arguments read from the saved registers (the default on x86-64) and with
them stashed by enter programs. Medians per slice; the added ns are against the medians
without programs.

Run as root after `make setup`:  .venv/bin/python bench/syscall_cost.py [--rounds 5]
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


@contextmanager
def capture(regs: bool) -> Iterator[None]:
    from hopwatch.capture.live import CaptureConfig, LiveCapture

    with LiveCapture(CaptureConfig(tls=False, args_from_regs=regs)) as cap:
        cap.poll(0)
        yield


def slices() -> dict[str, Callable[[], AbstractContextManager[None]]]:
    return {
        "no programs": nullcontext,
        "trivial, exit only": lambda: trivial_programs(("exit",), FULL_SYSCALLS),
        "trivial, enter and exit": lambda: trivial_programs(("enter", "exit"), FULL_SYSCALLS),
        "capture, arguments from the registers": lambda: capture(True),
        "capture, arguments stashed at enter": lambda: capture(False),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=300_000)
    ap.add_argument("--out", default=str(BENCH / "RESULTS-syscall-cost.md"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hw-sc-"))
    try:
        exe = tmp / "syscall_loop"
        subprocess.run(["gcc", "-O2", "-o", str(exe), str(BENCH / "syscall_loop.c")], check=True)

        def measure() -> tuple[float, float]:
            out = subprocess.run(
                [str(exe), str(args.calls)], capture_output=True, text=True, check=True
            ).stdout.split()
            return float(out[0]), float(out[1])

        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in slices()}
        for r in range(args.rounds):
            order = list(slices().items())
            for name, make in order if r % 2 == 0 else order[::-1]:
                with make():
                    runs[name] += [measure(), measure()]
            print(r, {k: v[-1] for k, v in runs.items()}, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {
        k: (statistics.median(w for w, _ in v), statistics.median(g for _, g in v))
        for k, v in runs.items()
    }
    w0, g0 = med["no programs"]
    lines = [
        "# What the capture adds to one syscall (bench/syscall_cost.py)",
        "",
        f"Machine: {os.cpu_count()} CPUs, kernel {os.uname().release}. Best of 7 passes of "
        f"{args.calls:,} calls, medians of {args.rounds} interleaved rounds (2 runs per slice "
        "each). `write` is 1 byte to /dev/null (a traced data syscall on an untracked fd); "
        "`getppid` is traced by nothing.",
        "",
        "| slice | ns per write | added | ns per getppid | added |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, (w, g) in med.items():
        lines.append(f"| {name} | {w:.0f} | {w - w0:+.0f} | {g:.0f} | {g - g0:+.0f} |")
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
