"""Hot path: the daemon's Python work per ring record (decode, pipeline, hop analysis).

Records the capture's raw ring records while bench/pacer.c drives nginx on loopback
(keep-alive, traceparent on every request), then replays them, in a child process, through
`LiveCapture`'s decoder, the `Pipeline` and the `HopAnalyzer` as `Daemon.process` does:

* under `valgrind --tool=cachegrind` for a short and a long prefix of the records: the
  difference in instructions divided by the extra records is the cost per record, a count
  that does not drift with this VM's speed (apt install valgrind; skipped without it);
* timed: CPU seconds of all records, best of several rounds (warm, one process).

`--against DIR` replays the same records through another checkout's `daemon/` too (the
record format must be the same). Writes bench/RESULTS-hotpath.md.

Run as root after `make setup`:  .venv/bin/python bench/hotpath_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
TRACEPARENT = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def record(path: Path, rate: int, seconds: float) -> int:
    """Raw ring records of `rate` req/s for `seconds` into `path` (pickled list of bytes)."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers import free_port, named, nginx_args, server

    from hopwatch.capture.live import CaptureConfig, LiveCapture

    kept: list[bytes] = []

    class Recording(LiveCapture):
        def _read(self, timeout_ms: int) -> None:
            n = len(self._raw)
            super()._read(timeout_ms)
            kept.extend(self._raw[n:])

    tmp = Path(tempfile.mkdtemp(prefix="hw-hotpath-"))
    subprocess.run(["gcc", "-O2", "-o", str(tmp / "pacer"), str(BENCH / "pacer.c")], check=True)
    pacer = named(tmp, "hp_pacer", str(tmp / "pacer"))
    port = free_port()
    keepalive = "keepalive_requests 100000000; keepalive_timeout 300s;"
    with server(nginx_args(tmp, "hp_nginx", f"127.0.0.1:{port}", keepalive), port):
        cap = Recording(CaptureConfig(tls=False))
        cap.open()
        try:
            cap.poll(10)
            kept.clear()
            args = [pacer, "127.0.0.1", str(port), "64", str(rate), str(seconds), TRACEPARENT]
            proc = subprocess.Popen(args, stdout=subprocess.DEVNULL)
            while proc.poll() is None:
                cap.poll(50)
            deadline = time.monotonic() + 1
            while time.monotonic() < deadline:
                cap.poll(50)
        finally:
            cap.close()
        shutil.rmtree(tmp, ignore_errors=True)
    path.write_bytes(pickle.dumps(kept))
    return len(kept)


def replay(path: str, count: int, rounds: int) -> None:
    """Child: replay the first `count` records `rounds` times; print the best CPU time."""
    from hopwatch.capture._types import DataChunk, SockAddr
    from hopwatch.capture.live import CaptureConfig, LiveCapture
    from hopwatch.config import Config
    from hopwatch.conntrack import ConnectionTable, Identity
    from hopwatch.hops import HopAnalyzer
    from hopwatch.metrics import Metrics
    from hopwatch.pipeline import Pipeline
    from hopwatch.procfs import ProcessInfo

    raw = pickle.loads(Path(path).read_bytes())[:count]
    loopback = SockAddr(2, "127.0.0.1", 1)

    def identity(ev: Any) -> Identity:
        return Identity(ProcessInfo(ev.tgid, ev.comm), loopback)

    best = float("inf")
    for _ in range(rounds):
        cap = LiveCapture(CaptureConfig(tls=False))  # the decoder only: never opened
        cfg = Config()
        m = Metrics(max_process_labels=cfg.max_process_labels, max_peer_labels=cfg.max_peer_labels)
        conns = ConnectionTable(max_entries=cfg.max_connections, identity=identity)
        hops = HopAnalyzer(cfg, m, None)
        pipe = Pipeline(cfg, m, conns, observers=(hops,))
        handle, hop_event = pipe.handle, hops.handle_event
        t0 = time.process_time()
        for i in range(0, len(raw), 256):
            cap._raw = raw[i : i + 256]
            for ev in cap._drain():  # as Daemon.process
                handle(ev)
                if type(ev) is not DataChunk:
                    hop_event(ev)
        best = min(best, time.process_time() - t0)
    import hopwatch

    print(json.dumps({"records": len(raw), "seconds": best, "from": hopwatch.__file__}))


def _child(daemon_dir: str, path: Path, count: int, rounds: int, valgrind: bool) -> str:
    env = dict(os.environ, PYTHONPATH=daemon_dir)
    cmd = [sys.executable, __file__, "replay", str(path), str(count), str(rounds)]
    if valgrind:
        cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=no",
               "--cachegrind-out-file=/dev/null", *cmd]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def instructions(daemon_dir: str, path: Path, short: int, long: int) -> float:
    counts = []
    for n in (short, long):
        out = _child(daemon_dir, path, n, 1, valgrind=True)
        m = re.search(r"I\s+refs:\s+([\d,]+)", out)
        assert m, out
        counts.append(int(m.group(1).replace(",", "")))
    return (counts[1] - counts[0]) / (long - short)


def measure(daemon_dir: str, path: Path, n: int, rounds: int) -> dict[str, float]:
    res: dict[str, float] = {}
    out = json.loads(_child(daemon_dir, path, n, rounds, valgrind=False).strip().splitlines()[-1])
    if not out["from"].startswith(daemon_dir):  # the editable install must not win
        sys.exit(f"replay imported {out['from']}, not {daemon_dir}")
    res["us_per_record"] = out["seconds"] / n * 1e6
    if shutil.which("valgrind"):
        res["instructions_per_record"] = instructions(daemon_dir, path, 1000, min(n, 11000))
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "replay":
        replay(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--against", help="another checkout's root, replayed side by side")
    ap.add_argument("--out", default=str(BENCH / "RESULTS-hotpath.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hw-hotpath-") as d:
        path = Path(d) / "records.pkl"
        n = record(path, args.rate, args.seconds)
        roots = {"this checkout": str(ROOT / "daemon")}
        if args.against:
            other = Path(args.against).resolve() / "daemon"
            if not (other / "hopwatch" / "pipeline.py").is_file():
                sys.exit(f"--against {args.against}: no daemon/hopwatch there")
            roots[f"--against {args.against}"] = str(other)
        results = {name: measure(root, path, n, args.rounds) for name, root in roots.items()}
    lines = [
        "# Hot-path benchmark (bench/hotpath_bench.py)",
        "",
        f"{n} ring records of {args.rate} req/s for {args.seconds:g} s (bench/pacer.c, "
        "keep-alive, traceparent on each) to nginx, recorded from the live capture and "
        "replayed through the decoder, the pipeline and the hop analyzer (no kernel). "
        "Instructions from `valgrind --tool=cachegrind` (records 1,000 to 11,000); time: "
        f"CPU of all records, best of {args.rounds}, warm.",
        "",
        "| daemon code | instructions per record | µs per record |",
        "| --- | ---: | ---: |",
    ]
    for name, r in results.items():
        ins = r.get("instructions_per_record")
        lines.append(
            f"| {name} | {f'{ins:,.0f}' if ins is not None else 'no valgrind'} "
            f"| {r['us_per_record']:.2f} |"
        )
    lines += ["", "```json", json.dumps(results, indent=1), "```", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
