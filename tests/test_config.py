from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hopwatch.cli import app
from hopwatch.config import (
    DEFAULT_METRICS_ADDR,
    DETECTOR_KEYS,
    Config,
    ConfigError,
    EgressRule,
    load_config,
    parse_config,
    split_host_port,
)
from hopwatch.propagation import SENSITIVE_DETECTORS, check_message

runner = CliRunner()


def test_defaults_allow_loopback_and_private_ranges() -> None:
    cfg = Config()
    assert cfg.metrics_addr == DEFAULT_METRICS_ADDR
    allowed = lambda ip: any(r.matches_ip(ip) for r in cfg.egress_allow)  # noqa: E731
    for ip in ("127.0.0.1", "10.1.2.3", "172.20.0.1", "192.168.1.1", "::1", "fd00::1"):
        assert allowed(ip), ip
    for ip in ("8.8.8.8", "172.32.0.1", "2001:db8::1"):
        assert not allowed(ip), ip
    assert cfg.limits.baggage_bytes == 8192
    assert cfg.limits.baggage_members == 64
    assert cfg.limits.tracestate_members == 32
    assert cfg.limits.header_block_bytes == 16384


def test_design_example_parses() -> None:
    cfg = parse_config(
        """
[egress]
allow = ["127.0.0.0/8", "10.0.0.0/8", "*.svc.cluster.local", "api.partner.example:443"]
[limits]
baggage_bytes = 8192
baggage_members = 64
tracestate_members = 32
header_block_bytes = 16384
"""
    )
    rules = cfg.egress_allow
    assert [r.text for r in rules][2:] == ["*.svc.cluster.local", "api.partner.example:443"]
    assert any(r.matches_host("orders.prod.svc.cluster.local") for r in rules)
    assert not any(r.matches_host("svc.cluster.local.evil.example") for r in rules)
    assert any(r.matches_host("API.Partner.Example", 443) for r in rules)
    assert not any(r.matches_host("api.partner.example", 80) for r in rules)
    assert not any(r.matches_ip("192.168.1.1") for r in rules)  # replaced the defaults


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("10.0.0.0/8", "net"),
        ("[fd00::]/8", None),
        ("[::1]:8443", "net"),
        ("2001:db8::/32", "net"),
        ("example.com", "host"),
        ("*.example.com:443", "host"),
    ],
    ids=lambda v: str(v),
)
def test_egress_rule_forms(text: str, kind: str | None) -> None:
    if kind is None:
        with pytest.raises(ValueError):
            EgressRule.parse(text)
        return
    rule = EgressRule.parse(text)
    assert (rule.network is not None) == (kind == "net")


def test_v4_mapped_address_matches_v4_rule() -> None:
    assert EgressRule.parse("127.0.0.0/8").matches_ip("::ffff:127.0.0.1")


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("[limits]\nbaggage_bytes = 'big'\n", 2, "must be an integer"),
        ("[limits]\n\nbaggage_members = -1\n", 3, "must not be negative"),
        ("[limits]\nbagage_bytes = 1\n", 2, "unknown key 'bagage_bytes'"),
        ("[nope]\nx = 1\n", 1, "unknown section [nope]"),
        ("[egress]\nallow = ['not a host!']\n", 2, "neither a CIDR nor a hostname"),
        ("[egress]\nallow = 'x'\n", 2, "must be a list"),
        ("[limits\n", 1, "not valid TOML"),
        ("[capture]\nring_buffer_bytes = 5000\n", 2, "power of two"),
        ("[metrics]\naddr = 'localhost'\n", 2, "HOST:PORT"),
        ("[capture]\n\nscheduling = 'fast'\n", 3, "capture.scheduling must be one of"),
        ("[capture]\nshed_cpu_percent = 0\n", 2, "between 1 and 100"),
    ],
    ids=[
        "type",
        "negative",
        "unknown-key",
        "unknown-section",
        "bad-host",
        "not-list",
        "syntax",
        "ring-size",
        "addr",
        "scheduling",
        "shed-budget",
    ],
)
def test_config_errors_name_the_line(text: str, line: int, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, source="x.toml")
    assert err.value.line == line
    assert needle in str(err.value)
    assert str(err.value).startswith(f"x.toml:{line}: ")


def test_load_missing_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")
    assert load_config(None) == Config()


def test_split_host_port() -> None:
    assert split_host_port("127.0.0.1:9647") == ("127.0.0.1", 9647)
    assert split_host_port("[::1]:80") == ("::1", 80)
    assert split_host_port(":80") == ("0.0.0.0", 80)
    for bad in ("x", "host:0", "host:99999", "host:", "host:80\u00b3", "host:\u0663"):
        with pytest.raises(ValueError):
            split_host_port(bad)


# -- [sensitive] detectors, one switch each -------------------------------------------------

EMAIL_AND_CARD = "user=alice%40example.com,card=4111111111111111"


def _sensitive_codes(cfg: Config, baggage: str = EMAIL_AND_CARD) -> set[str]:
    verdict = check_message((("baggage", baggage),), sensitive=cfg.sensitive_selection)
    return {f.code for f in verdict.findings if f.kind == "sensitive"}


def test_every_detector_is_on_by_default() -> None:
    cfg = Config()
    assert cfg.sensitive_detectors == frozenset(SENSITIVE_DETECTORS)
    assert cfg.sensitive_selection is True
    assert _sensitive_codes(cfg) == {"sensitive.email", "sensitive.card_number"}


def test_one_detector_switched_off() -> None:
    cfg = parse_config("[sensitive]\nemail = false\ncard_number = true\n")
    assert cfg.sensitive_detectors == frozenset(SENSITIVE_DETECTORS) - {"sensitive.email"}
    assert _sensitive_codes(cfg) == {"sensitive.card_number"}


def test_all_detectors_off_and_the_master_switch() -> None:
    every_off = "\n".join(f"{k} = false" for k in DETECTOR_KEYS)
    cfg = parse_config(f"[sensitive]\n{every_off}\n")
    assert cfg.sensitive_selection is False
    assert _sensitive_codes(cfg) == set()
    cfg = parse_config("[sensitive]\nenabled = false\n")
    assert cfg.sensitive_selection is False and _sensitive_codes(cfg) == set()


def test_detector_selection_keeps_syntax_checks() -> None:
    # Selecting detectors never hides a malformed or oversized baggage.
    verdict = check_message(
        (("baggage", "a=b c,user=alice%40example.com"),), sensitive=frozenset({"sensitive.jwt"})
    )
    assert {f.kind for f in verdict.findings} == {"malformed"}


@pytest.mark.parametrize("code", sorted(SENSITIVE_DETECTORS))
def test_each_detector_key_is_a_config_key(code: str) -> None:
    key = code.removeprefix("sensitive.")
    cfg = parse_config(f"[sensitive]\n{key} = false\n")
    assert cfg.sensitive_detectors == frozenset(SENSITIVE_DETECTORS) - {code}


# -- [processes] include / exclude ----------------------------------------------------------


def test_process_filter_defaults_select_everything() -> None:
    f = Config().processes
    assert not f.active and f.selects("nginx", None, "nginx")


def test_process_filter_include_exclude_by_comm_unit_label() -> None:
    cfg = parse_config(
        '[processes]\ninclude = ["nginx*", "orders.service", "docker/*"]\nexclude = ["nginx-dbg"]\n'
    )
    f = cfg.processes
    assert f.selects("nginx", None, "nginx")
    assert f.selects("python3", "orders.service", "orders.service")  # by unit
    assert f.selects("java", None, "docker/3f4e5a6b7c8d")  # by label (container)
    assert not f.selects("nginx-dbg", None, "nginx-dbg")  # exclude wins
    assert not f.selects("curl", None, "curl")  # not included
    assert not f.selects("python3", "other.service", "other.service")


def test_process_filter_exclude_only() -> None:
    f = parse_config('[processes]\nexclude = ["sshd", "*.scope"]\n').processes
    assert not f.selects("sshd", None, "sshd")
    assert f.selects("curl", None, "curl")


# -- every error, each with its line --------------------------------------------------------

BAD = """\
[egress]
allow = ["127.0.0.0/8", "bad host!"]

[limits]
baggage_bytes = "x"

[sensitive]
email = false
jwt = 3

[processes]
exclude = [""]
"""


def test_every_error_is_reported_with_its_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(BAD, source="bad.toml")
    assert [(e.line, e.message.split(" ")[0]) for e in err.value.errors] == [
        (2, "egress.allow:"),
        (5, "limits.baggage_bytes"),
        (9, "sensitive.jwt"),
        (12, "processes.exclude"),
    ]
    assert err.value.line == 2  # the first one is the exception itself


def test_config_check_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD)
    res = runner.invoke(app, ["config", "check", str(bad)])
    assert res.exit_code == 1
    for line in (2, 5, 9, 12):
        assert f"{bad}:{line}: " in res.output
    assert "invalid (4 error(s))" in res.output

    good = tmp_path / "good.toml"
    good.write_text(
        '[egress]\nallow = ["10.0.0.0/8", "*.svc.cluster.local"]\n'
        "[sensitive]\nemail = false\n"
        '[processes]\nexclude = ["sshd"]\n'
        "[metrics]\nmax_peer_labels = 50\n"
    )
    res = runner.invoke(app, ["config", "check", str(good)])
    assert res.exit_code == 0, res.output
    out = res.output
    assert f"{good}: valid" in out
    assert "egress allow: 10.0.0.0/8, *.svc.cluster.local" in out
    assert "sensitive baggage: on, except email" in out
    assert "processes: include -; exclude sshd" in out
    assert "peer 50" in out

    res = runner.invoke(app, ["config", "check", str(tmp_path / "absent.toml")])
    assert res.exit_code == 1 and "cannot read" in res.output


def test_pipeline_applies_the_process_filter_and_tells_the_kernel() -> None:
    import socket

    from hopwatch.capture._types import ConnOpened, DataChunk, Direction, SockAddr
    from hopwatch.conntrack import ConnectionTable
    from hopwatch.metrics import Metrics
    from hopwatch.pipeline import Pipeline

    class Control:
        def __init__(self) -> None:
            self.ignored: list[tuple[int, int]] = []

        def ignore(self, tgid: int, fd: int, *, as_of_ns: int | None = None) -> None:
            self.ignored.append((tgid, fd))

        def adopt(self, tgid: int, fd: int, role: str) -> bool:
            return True

        def set_skip_until(
            self, tgid: int, fd: int, direction: object, offset: int, **kw: object
        ) -> bool:
            return True

    cfg = parse_config('[processes]\nexclude = ["noisy*"]\n')
    metrics, control = Metrics(), Control()
    pipeline = Pipeline(cfg, metrics, ConnectionTable(), control=control)  # type: ignore[arg-type]
    peer = SockAddr(socket.AF_INET, "10.0.0.5", 40000)
    head = b"GET /x HTTP/1.1\r\nHost: a\r\ntraceparent: 00-zz\r\n\r\n"
    # Pids that do not exist: identity falls back to the event's comm.
    for tgid, comm in ((4_000_001, "noisy-agent"), (4_000_002, "api")):
        pipeline.handle(ConnOpened(tgid, tgid, 7, "server", peer, 1, comm=comm))
        for _ in range(2):
            pipeline.handle(DataChunk(tgid, tgid, 7, Direction.RECV, 2, len(head), head, comm=comm))
    seen = {
        s.labels["process"]: s.value
        for f in metrics.registry.collect()
        for s in f.samples
        if s.name == "hopwatch_http_messages_total"
    }
    assert seen == {"api": 2.0}
    assert control.ignored == [(4_000_001, 7)]
    # SIGHUP: a new filter applies to new connections.
    pipeline.config = parse_config('[processes]\ninclude = ["noisy*"]\n')
    pipeline.handle(ConnOpened(4_000_003, 4_000_003, 7, "server", peer, 1, comm="api"))
    pipeline.handle(
        DataChunk(4_000_003, 4_000_003, 7, Direction.RECV, 2, len(head), head, comm="api")
    )
    assert control.ignored[-1] == (4_000_003, 7)
