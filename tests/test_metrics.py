"""FastCounter: the lock-free counter of the per-message hot path, read back through the
registry exactly as Prometheus scrapes it."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from hopwatch.metrics import FastCounter, Metrics


def test_labelled_counter_exposes_each_label_set() -> None:
    reg = CollectorRegistry()
    c = FastCounter("hw_things", "Things.", ["kind", "side"], registry=reg)
    c.labels("a", "x").inc()
    c.labels("a", "x").inc(2)
    c.labels("b", "y").inc(0.5)
    assert reg.get_sample_value("hw_things_total", {"kind": "a", "side": "x"}) == 3
    assert reg.get_sample_value("hw_things_total", {"kind": "b", "side": "y"}) == 0.5
    assert c.value("a", "x") == 3 and c.value("c", "z") == 0
    text = generate_latest(reg).decode()
    assert "# TYPE hw_things_total counter" in text  # as prometheus_client's own Counter
    assert 'hw_things_total{kind="a",side="x"} 3.0' in text


def test_non_string_label_values_share_one_series() -> None:
    reg = CollectorRegistry()
    c = FastCounter("hw_codes", "Codes.", ["code"], registry=reg)
    c.labels(200).inc()  # type: ignore[arg-type]
    c.labels("200").inc()
    samples = [s for f in reg.collect() for s in f.samples]
    assert [(s.labels, s.value) for s in samples] == [({"code": "200"}, 2)]


def test_unlabelled_counter_starts_at_zero() -> None:
    reg = CollectorRegistry()
    c = FastCounter("hw_plain", "Plain.", registry=reg)
    assert reg.get_sample_value("hw_plain_total") == 0
    c.inc()
    c.inc(4)
    assert reg.get_sample_value("hw_plain_total") == 5


def test_misuse_is_an_error() -> None:
    reg = CollectorRegistry()
    labelled = FastCounter("hw_l", "L.", ["a"], registry=reg)
    plain = FastCounter("hw_p", "P.", registry=reg)
    with pytest.raises(ValueError):
        labelled.labels("x", "y")
    with pytest.raises(ValueError):
        labelled.inc()
    with pytest.raises(ValueError):
        plain.inc(-1)
    with pytest.raises(ValueError):  # the registry refuses a second family of the same name
        FastCounter("hw_p", "again", registry=reg)


def test_metrics_families_are_unique_and_typed() -> None:
    m = Metrics()
    m.messages.labels("inbound", "request", "http1", "w3c", "nginx").inc()
    m.gap_bytes.inc(10)
    text = generate_latest(m.registry).decode()
    assert (
        'hopwatch_http_messages_total{context="w3c",direction="inbound",kind="request",'
        'process="nginx",protocol="http1"} 1.0' in text
    )
    assert "hopwatch_stream_gap_bytes_total 10.0" in text
    assert text.count("# TYPE hopwatch_http_messages_total counter") == 1
