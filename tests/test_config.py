from __future__ import annotations

import pytest

from hopwatch.config import (
    DEFAULT_METRICS_ADDR,
    Config,
    ConfigError,
    EgressRule,
    load_config,
    parse_config,
    split_host_port,
)


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
    for bad in ("x", "host:0", "host:99999", "host:"):
        with pytest.raises(ValueError):
            split_host_port(bad)
