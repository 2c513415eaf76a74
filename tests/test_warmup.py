"""The JIT warm-up's synthetic traffic is what the capture would deliver: the daemon's own
code parses it without a fault, counts its messages and finds its planted findings."""

from __future__ import annotations

from hopwatch.config import Config
from hopwatch.metrics import Metrics
from hopwatch.warmup import warm_up


def test_the_synthetic_traffic_parses_cleanly_and_has_its_findings() -> None:
    result = warm_up(Config(), seconds=30, max_records=20_000)
    assert 20_000 <= result.records < 20_000 + 4096
    # ~1 record in 10 is an HTTP message (the storms are opens and closes): each round of
    # HTTP/1 traffic has 8 exchanges seen at both ends plus 8 upstream calls.
    assert result.messages > result.records // 20
    # Upstream calls without trace context (1 in 10) and to a public address (1 in 16).
    assert result.findings > 0
    assert result.faults == 0  # no parse error, desync, gap or unknown fd: in step


def test_it_runs_on_its_own_registry() -> None:
    """A daemon's metrics built before and after a warm-up see none of its traffic."""
    before = Metrics()
    warm_up(Config(), seconds=30, max_records=2_000)
    after = Metrics()
    for metrics in (before, after):
        samples = [s for m in metrics.registry.collect() for s in m.samples
                   if s.name == "hopwatch_http_messages_total"]
        assert sum(s.value for s in samples) == 0
