"""Command line: a thin shell over the library (uvicorn habit)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def run(
    config: Optional[str] = typer.Option(
        None, "--config", "-c", metavar="FILE", help="TOML configuration file."
    ),
    metrics_addr: Optional[str] = typer.Option(
        None, "--metrics-addr", metavar="HOST:PORT", help="Serve /metrics here (127.0.0.1:9647)."
    ),
    audit_log: Optional[str] = typer.Option(
        None, "--audit-log", metavar="FILE", help="Append findings as JSON lines to FILE."
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error."),
) -> None:
    """Run the daemon: live eBPF capture, findings, Prometheus metrics."""
    from hopwatch._run_cmd import run as run_daemon

    raise typer.Exit(run_daemon(config, metrics_addr, audit_log, log_level))


@app.command()
def doctor() -> None:
    """Check every prerequisite of live capture; print a fix for each failure."""
    from hopwatch._run_cmd import doctor as run_doctor

    raise typer.Exit(run_doctor())


@app.command()
def check(
    lines: Optional[list[str]] = typer.Argument(  # noqa: B008
        None,
        metavar="HEADER_LINE",
        help="'name: value' header lines; read from stdin when none are given.",
    ),
    json_output: bool = typer.Option(
        False, "--json", help="One JSON object per input line instead of a table."
    ),
) -> None:
    """Validate propagation header lines (traceparent, tracestate, baggage, b3, x-b3-*)."""
    from hopwatch._check_cmd import UsageError, check_lines, parse_lines, render_json, render_table

    source = lines if lines else sys.stdin
    try:
        pairs = parse_lines(source)
    except UsageError as exc:
        typer.echo(f"hopwatch check: {exc}", err=True)
        raise typer.Exit(1) from None
    checked = check_lines(pairs)
    if checked:
        typer.echo(render_json(checked) if json_output else render_table(checked))


@app.command()
def audit(
    path: str = typer.Argument(..., metavar="FILE", help="The audit log (JSON lines)."),
    json_output: bool = typer.Option(False, "--json", help="One JSON document instead of text."),
    rotated: bool = typer.Option(
        True, "--rotated/--no-rotated", help="Also read FILE.1 ... FILE.N (rotated lines)."
    ),
) -> None:
    """Which third-party destinations received trace context or baggage, from which
    process, how often, first and last seen."""
    import json as _json

    from hopwatch.audit import format_report, read_audit_lines, summarize

    try:
        report = summarize(read_audit_lines(path, rotated=rotated))
    except OSError as exc:
        typer.echo(f"hopwatch audit: cannot read {path}: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    if json_output:
        typer.echo(_json.dumps(report.as_dict(), indent=2))
    else:
        typer.echo(format_report(report))


config_app = typer.Typer(no_args_is_help=True, help="Configuration file tools.")
app.add_typer(config_app, name="config")


@config_app.command("check")
def config_check(
    path: str = typer.Argument(..., metavar="FILE", help="The TOML configuration file."),
) -> None:
    """Validate FILE: every error with its line (exit 1), else the effective configuration."""
    from hopwatch.config import ConfigError, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for err in exc.errors:
            typer.echo(f"error: {err}", err=True)
        typer.echo(f"{path}: invalid ({len(exc.errors)} error(s))", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{path}: valid")
    typer.echo(cfg.summary())


@app.command()
def replay(
    path: str = typer.Argument(..., metavar="FILE", help="A pcap or pcapng capture."),
    config: Optional[str] = typer.Option(
        None, "--config", "-c", metavar="FILE", help="TOML configuration file."
    ),
    json_output: bool = typer.Option(
        False, "--json", help="One JSON object per finding (the audit log's fields)."
    ),
    ends: str = typer.Option(
        "both",
        "--ends",
        metavar="both|client|server",
        help="Which end of each connection is observed: both (loopback, both peers local), "
        "client (requests this host sent) or server (requests it received).",
    ),
) -> None:
    """Run the daemon's pipeline over a capture file (tcpdump -w); process = host IP."""
    from hopwatch._replay_cmd import replay as run_replay
    from hopwatch.capture.pcap import ENDS

    if ends not in ENDS:
        typer.echo(f"hopwatch replay: --ends must be one of {', '.join(ENDS)}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(run_replay(path, config, json_output, ends))


_TRACE_HELP = (
    "Send a request with a fresh trace id and follow it through every hop on this node.\n\n"
    "Exit status: 0 the context reached every hop intact; 1 stripped or restarted (broken); "
    "2 usage or setup error (needs root); 3 the request failed or no process on this node "
    "received it; 4 survived but flagged (leak, format changed, sampling flipped)."
)


@app.command(help=_TRACE_HELP)
def trace(
    url: str = typer.Argument(..., metavar="URL", help="http:// or https:// URL to probe."),
    header: list[str] = typer.Option(  # noqa: B008
        [], "--header", "-H", metavar="'NAME: VALUE'", help="Extra request header (repeatable)."
    ),
    fmt: str = typer.Option("w3c", "--format", help="Trace context to send: w3c, b3 or both."),
    count: int = typer.Option(1, "--count", "-n", help="Probes to send, each its own trace id."),
    json_output: bool = typer.Option(False, "--json", help="One JSON document for machines."),
    http2: bool = typer.Option(
        False, "--http2", help="HTTP/2: prior knowledge (h2c) on http://, ALPN h2 on https://."
    ),
    method: str = typer.Option("GET", "--method", "-X", help="Request method."),
    insecure: bool = typer.Option(False, "--insecure", "-k", help="Do not verify TLS."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds to wait for the response."),
    wait: float = typer.Option(
        3.0, "--wait", help="At most this many seconds after the response for hops to settle."
    ),
    config: Optional[str] = typer.Option(
        None, "--config", "-c", metavar="FILE", help="TOML configuration (egress allowlist)."
    ),
) -> None:
    """Follow a synthetic trace id through every hop on this node (see _TRACE_HELP)."""
    from hopwatch._trace_cmd import run as run_trace

    raise typer.Exit(
        run_trace(
            url,
            header_lines=header,
            fmt=fmt,
            count=count,
            json_output=json_output,
            http2=http2,
            method=method,
            insecure=insecure,
            timeout=timeout,
            wait=wait,
            config_path=config,
        )
    )


def main() -> None:
    app()
