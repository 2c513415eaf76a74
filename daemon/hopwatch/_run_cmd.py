"""`hopwatch run` and `hopwatch doctor`, kept out of cli.py so the CLI stays a thin shell."""

from __future__ import annotations

import dataclasses
import logging
import sys

from hopwatch import runtime
from hopwatch.config import ConfigError, load_config, split_host_port

__all__ = ["doctor", "run"]

log = logging.getLogger("hopwatch")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(
    config_path: str | None, metrics_addr: str | None, audit_log: str | None, log_level: str
) -> int:
    _setup_logging(log_level)
    try:
        config = load_config(config_path)
        if metrics_addr is not None:
            split_host_port(metrics_addr)
            config = dataclasses.replace(config, metrics_addr=metrics_addr)
        if audit_log is not None:
            config = dataclasses.replace(config, audit_log=audit_log)
    except (ConfigError, ValueError) as exc:
        print(f"hopwatch: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        runtime.switch(sys.argv)  # PyPy where installed: returns only to go on here
        runtime.restore_name()
    except runtime.RuntimeChoiceError as exc:
        print(f"hopwatch: cannot start: {exc}", file=sys.stderr)
        return 2
    log.info("runtime: %s (%s)", runtime.describe(), sys.executable)

    from hopwatch.server import Daemon, StartupError

    daemon = Daemon(config, config_path=config_path)
    daemon.install_signal_handlers()
    try:
        daemon.run()
    except StartupError as exc:
        print(f"hopwatch: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def doctor() -> int:
    from hopwatch.doctor import run_checks

    checks = run_checks()
    width = max(len(c.name) for c in checks)
    failed_required = False
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        print(f"{mark}  {c.name:<{width}}  {c.detail}")
        if not c.ok:
            print(f"      {'':<{width}}  fix: {c.fix}")
            failed_required |= c.required
    print("all prerequisites met" if not failed_required else "some prerequisites are missing")
    return 1 if failed_required else 0
