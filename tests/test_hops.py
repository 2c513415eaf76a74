"""Hop analysis: attribution rules and every hop finding, from hand-built observations.

Messages are real `MessageParsed` values and verdicts come from the real `check_message`;
metric values are read back from the registry, exactly.
"""

from __future__ import annotations

import socket
from dataclasses import replace

import pytest

from hopwatch.capture._types import (
    ConnClosed,
    ConnOpened,
    ProcessExecuted,
    ProcessExited,
    SockAddr,
)
from hopwatch.config import Config, EgressRule
from hopwatch.hops import Destination, HopAnalyzer, HopFinding, destination_of, is_allowed
from hopwatch.metrics import Metrics
from hopwatch.pipeline import Observation
from hopwatch.propagation import Limits, check_message
from hopwatch.protocols._events import MessageParsed, Origin

TRACE_A = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACE_B = "0af7651916cd43dd8448eb211c80319c"
TRACE_C = "5b8efff798038103d269b633813fc60c"
TP_A = f"00-{TRACE_A}-00f067aa0ba902b7-01"
TP_A_UNSAMPLED = f"00-{TRACE_A}-00f067aa0ba902b7-00"
TP_A_CHILD = f"00-{TRACE_A}-b7ad6b7169203331-01"
TP_B = f"00-{TRACE_B}-b7ad6b7169203331-01"
TP_C = f"00-{TRACE_C}-eee19b7ec3c1b174-01"
B3_A = f"{TRACE_A}-e457b5a2e4d86bd1-1"
B3_B = f"{TRACE_B}-e457b5a2e4d86bd1-1"
B3_A_64 = f"{TRACE_A[16:]}-e457b5a2e4d86bd1-1"  # 64-bit id: the low half of TRACE_A
BAGGAGE = "userId=alice-7781,tenant=acme"

CLIENT = SockAddr(socket.AF_INET, "10.0.0.5", 40000)  # calls our service
SERVICE = SockAddr(socket.AF_INET, "10.0.0.7", 8080)  # our service's listening address
UPSTREAM = SockAddr(socket.AF_INET, "10.0.0.9", 8080)  # a private upstream
THIRD_PARTY = SockAddr(socket.AF_INET, "203.0.113.7", 443)
PROXY = SockAddr(socket.AF_INET, "10.0.0.3", 3128)
OUTSIDE_CLIENT = SockAddr(socket.AF_INET, "198.51.100.20", 51000)

Headers = tuple[tuple[str, str], ...]


def _obs(
    direction: str,
    msg: MessageParsed,
    *,
    tgid: int = 100,
    tid: int = 100,
    fd: int = 5,
    ts_ns: int = 1_000,
    limits: Limits | None = None,
    peer: SockAddr | None = None,
    process: str = "orders.service",
) -> Observation:
    verdict = check_message(
        msg.headers, limits or Limits(), header_block_bytes=msg.header_block_bytes
    )
    server = (direction == "inbound") == msg.is_request
    return Observation(
        message=msg,
        verdict=verdict,
        direction=direction,
        tgid=tgid,
        tid=tid,
        fd=fd,
        ts_ns=ts_ns,
        process=process,
        comm="orders",
        role="server" if server else "client",
        local=SERVICE if server else SockAddr(socket.AF_INET, "10.0.0.7", 45000),
        peer=peer if peer is not None else (CLIENT if server else UPSTREAM),
    )


def request(
    headers: Headers = (),
    *,
    method: str = "GET",
    path: str = "/orders",
    authority: str | None = "upstream.svc.cluster.local",
    stream_id: int | None = None,
) -> MessageParsed:
    return MessageParsed(
        origin=Origin.CLIENT,
        protocol="http1" if stream_id is None else "http2",
        method=method,
        path=path,
        authority=authority,
        headers=headers,
        header_block_bytes=200,
        stream_id=stream_id,
    )


def response(
    status: int = 200, headers: Headers = (), *, stream_id: int | None = None
) -> MessageParsed:
    return MessageParsed(
        origin=Origin.SERVER,
        protocol="http1" if stream_id is None else "http2",
        status=status,
        headers=headers,
        header_block_bytes=100,
        stream_id=stream_id,
        informational=100 <= status < 200,
    )


class Sink:
    def __init__(self) -> None:
        self.items: list[HopFinding] = []

    def hop_finding(self, finding: HopFinding) -> None:
        self.items.append(finding)


class Rig:
    """One analyzer on a fresh registry, with readers for its counters."""

    def __init__(self, config: Config | None = None, **kw: int) -> None:
        self.metrics = Metrics(max_process_labels=50, max_peer_labels=50)
        self.sink = Sink()
        self.hops = HopAnalyzer(config or Config(), self.metrics, self.sink, **kw)

    def __call__(self, obs: Observation) -> None:
        self.hops(obs)

    def value(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def finding(self, finding: str, header: str, peer: str, process: str = "orders.service"):
        return self.value(
            "hopwatch_findings_total", finding=finding, header=header, process=process, peer=peer
        )

    def all_findings(self) -> dict[tuple[str, str, str], float]:
        out: dict[tuple[str, str, str], float] = {}
        for family in self.metrics.registry.collect():
            if family.name != "hopwatch_findings":
                continue
            for s in family.samples:
                if s.name == "hopwatch_findings_total":
                    key = (s.labels["finding"], s.labels["header"], s.labels["peer"])
                    out[key] = s.value
        return out

    def hop(self, inbound: str, outbound: str, peer: str = "upstream.svc.cluster.local"):
        return self.value(
            "hopwatch_hops_total",
            process="orders.service",
            peer=peer,
            inbound_context=inbound,
            outbound_context=outbound,
        )

    def unattributed(self, process: str = "orders.service") -> float | None:
        return self.value("hopwatch_unattributed_requests_total", process=process)

    def evictions(self, reason: str) -> float | None:
        return self.value("hopwatch_hop_state_evictions_total", reason=reason)


def serve(
    rig: Rig,
    inbound: Headers,
    outbound: Headers,
    *,
    out_path: str = "/orders",
    tid_out: int = 100,
) -> None:
    """One request in, one request out on the same thread, the response back."""
    rig(_obs("inbound", request(inbound, path="/checkout", authority="orders"), fd=5))
    rig(_obs("outbound", request(outbound, path=out_path), fd=9, tid=tid_out))
    rig(_obs("outbound", response(200), fd=5))


UP = "upstream.svc.cluster.local"


# -- negative controls ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inbound", "outbound", "ctx_in", "ctx_out"),
    [
        ((("traceparent", TP_A),), (("traceparent", TP_A_CHILD),), "w3c", "w3c"),
        ((("b3", B3_A),), (("b3", B3_A),), "b3", "b3"),
        (
            (("traceparent", TP_A), ("b3", B3_A)),
            (("traceparent", TP_A_CHILD), ("b3", B3_A)),
            "both",
            "both",
        ),
        # B3 in, both out: the migration adds W3C, nothing is broken
        ((("b3", B3_A),), (("traceparent", TP_A_CHILD), ("b3", B3_A)), "b3", "both"),
        (
            (("traceparent", TP_A), ("baggage", BAGGAGE)),
            (("traceparent", TP_A_CHILD), ("baggage", BAGGAGE)),
            "w3c",
            "w3c",
        ),
        ((), (), "none", "none"),
        # no context in, a new root out: the process starts the trace
        ((), (("traceparent", TP_B),), "none", "w3c"),
    ],
)
def test_correct_propagation_has_no_findings(
    inbound: Headers, outbound: Headers, ctx_in: str, ctx_out: str
) -> None:
    rig = Rig()
    serve(rig, inbound, outbound)
    assert rig.all_findings() == {}
    assert rig.sink.items == []
    assert rig.hop(ctx_in, ctx_out) == 1.0
    assert rig.unattributed() is None
    assert rig.hops.open_requests() == 0


def test_process_that_never_receives_requests_has_no_hop_findings() -> None:
    rig = Rig()
    # a cron job: context, none, another context; all to allowed destinations
    rig(_obs("outbound", request((("traceparent", TP_A),)), tgid=7, tid=7))
    rig(_obs("outbound", request(()), tgid=7, tid=7))
    rig(_obs("outbound", request((("b3", B3_B),)), tgid=7, tid=7, fd=6))
    rig(_obs("inbound", response(200), tgid=7, tid=7))
    assert rig.all_findings() == {}
    assert rig.unattributed() is None
    assert (
        rig.value(
            "hopwatch_hops_total",
            process="orders.service",
            peer=UP,
            inbound_context="none",
            outbound_context="w3c",
        )
        is None
    )


# -- findings ---------------------------------------------------------------------------------


def test_stripped_names_each_header_the_inbound_carried() -> None:
    rig = Rig()
    serve(rig, (("traceparent", TP_A),), ())
    assert rig.all_findings() == {("stripped", "traceparent", UP): 1.0}
    assert rig.hop("w3c", "none") == 1.0

    rig = Rig()
    serve(rig, (("traceparent", TP_A), ("b3", B3_A)), (("baggage", BAGGAGE),))
    assert rig.all_findings() == {
        ("stripped", "traceparent", UP): 1.0,
        ("stripped", "b3", UP): 1.0,
    }
    assert [(f.header, f.reason, f.trace_id) for f in rig.sink.items] == [
        ("traceparent", "stripped.no_context", TRACE_A),
        ("b3", "stripped.no_context", TRACE_A),
    ]


def test_stripped_b3_multi_header_set_is_labelled_b3() -> None:
    rig = Rig()
    multi = (("x-b3-traceid", TRACE_A), ("x-b3-spanid", "e457b5a2e4d86bd1"), ("x-b3-sampled", "1"))
    serve(rig, multi, ())
    assert rig.all_findings() == {("stripped", "b3", UP): 1.0}


def test_restarted_when_the_outbound_trace_id_differs() -> None:
    rig = Rig()
    serve(rig, (("traceparent", TP_A),), (("traceparent", TP_B),))
    assert rig.all_findings() == {("restarted", "traceparent", UP): 1.0}
    (f,) = rig.sink.items
    assert (f.reason, f.trace_id, f.other_trace_id) == ("restarted.new_trace_id", TRACE_A, TRACE_B)
    assert rig.hop("w3c", "w3c") == 1.0


def test_format_changed_same_trace_disjoint_formats() -> None:
    rig = Rig()
    serve(rig, (("traceparent", TP_A),), (("b3", B3_A),))
    assert rig.all_findings() == {("format_changed", "b3", UP): 1.0}
    assert rig.sink.items[0].reason == "format_changed.w3c_to_b3"
    assert rig.hop("w3c", "b3") == 1.0

    rig = Rig()
    serve(rig, (("b3", B3_A),), (("traceparent", TP_A_CHILD),))
    assert rig.all_findings() == {("format_changed", "traceparent", UP): 1.0}
    assert rig.sink.items[0].reason == "format_changed.b3_to_w3c"


def test_64_bit_b3_id_continues_the_w3c_trace() -> None:
    # W3C in, 64-bit B3 out naming the low half: the same trace in another format.
    rig = Rig()
    serve(rig, (("traceparent", TP_A),), (("b3", B3_A_64),))
    assert rig.all_findings() == {("format_changed", "b3", UP): 1.0}


def test_sampling_flipped_same_trace_both_known() -> None:
    rig = Rig()
    serve(rig, (("traceparent", TP_A),), (("traceparent", TP_A_UNSAMPLED),))
    assert rig.all_findings() == {("sampling_flipped", "traceparent", UP): 1.0}
    assert rig.sink.items[0].reason == "sampling_flipped.sampled_to_unsampled"

    # a deferred B3 decision out is not a flip
    rig = Rig()
    serve(rig, (("b3", B3_A),), (("b3", f"{TRACE_A}-e457b5a2e4d86bd1"),))
    assert rig.all_findings() == {}


def test_malformed_forwarded_unchanged_value() -> None:
    bad = TP_A.upper().replace("00-", "00-", 1)  # uppercase hex: malformed
    rig = Rig()
    serve(rig, (("traceparent", bad),), (("traceparent", bad),))
    assert rig.all_findings() == {("malformed_forwarded", "traceparent", UP): 1.0}
    assert rig.hop("none", "none") == 1.0

    # control: the malformed header dropped and a new root started
    rig = Rig()
    serve(rig, (("traceparent", bad),), (("traceparent", TP_B),))
    assert rig.all_findings() == {}

    # a different malformed value out is the outbound's own problem, not a forward
    rig = Rig()
    serve(rig, (("traceparent", bad),), (("traceparent", "00-zz"),))
    assert rig.all_findings() == {}


def test_malformed_baggage_forwarded() -> None:
    bad = "userId=alice,=novalue"
    rig = Rig()
    serve(
        rig,
        (("traceparent", TP_A), ("baggage", bad)),
        (("traceparent", TP_A_CHILD), ("baggage", bad)),
    )
    assert rig.all_findings() == {("malformed_forwarded", "baggage", UP): 1.0}


def test_conflict_is_left_to_the_pipeline() -> None:
    # the outbound carries W3C and B3 with different trace ids: a per-message conflict,
    # counted by the pipeline; the hop itself continues trace A.
    rig = Rig()
    serve(rig, (("traceparent", TP_A),), (("traceparent", TP_A_CHILD), ("b3", B3_B)))
    assert rig.all_findings() == {}


# -- attribution ------------------------------------------------------------------------------


def test_same_thread_wins_most_recent_first() -> None:
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),)), fd=5, tid=1))
    rig(_obs("inbound", request((("b3", B3_B),)), fd=6, tid=2))
    rig(_obs("inbound", request((("traceparent", TP_C),)), fd=7, tid=1))
    rig(_obs("outbound", request(()), fd=9, tid=1))
    assert rig.all_findings() == {("stripped", "traceparent", UP): 1.0}
    assert rig.sink.items[0].trace_id == TRACE_C  # the most recent request thread 1 read
    assert rig.unattributed() is None


def test_event_loop_thread_prefers_method_and_path() -> None:
    # an nginx worker: one thread reads every request, proxies /a without traceparent
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),), path="/a"), fd=5, tid=1))
    rig(_obs("inbound", request((("b3", B3_B),), path="/b"), fd=6, tid=1))
    rig(_obs("outbound", request((), path="/a"), fd=9, tid=1))
    assert rig.all_findings() == {("stripped", "traceparent", UP): 1.0}


def test_proxy_same_method_and_path() -> None:
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),), path="/a"), fd=5, tid=1))
    rig(_obs("inbound", request((("b3", B3_B),), path="/b"), fd=6, tid=2))
    rig(_obs("outbound", request((), path="/b"), fd=9, tid=3))
    assert rig.all_findings() == {("stripped", "b3", UP): 1.0}

    # two open requests with the same method and path: no guess
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),), path="/b"), fd=5, tid=1))
    rig(_obs("inbound", request((("b3", B3_B),), path="/b"), fd=6, tid=2))
    rig(_obs("outbound", request((), path="/b"), fd=9, tid=3))
    assert rig.all_findings() == {}
    assert rig.unattributed() == 1.0


def test_forward_proxy_absolute_form_matches_origin_form() -> None:
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),), path="http://upstream/x?q=1"), tid=1))
    rig(_obs("inbound", request((("b3", B3_B),), path="/y"), fd=6, tid=2))
    rig(_obs("outbound", request((), path="/x?q=1"), fd=9, tid=3))
    assert rig.all_findings() == {("stripped", "traceparent", UP): 1.0}


def test_only_open_request() -> None:
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),)), tid=1))
    rig(_obs("outbound", request(()), fd=9, tid=42))  # another thread (a pool)
    assert rig.all_findings() == {("stripped", "traceparent", UP): 1.0}
    assert rig.unattributed() is None


def test_two_open_and_a_third_thread_is_unattributed_never_guessed() -> None:
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),), path="/a"), fd=5, tid=1))
    rig(_obs("inbound", request((("traceparent", TP_B),), path="/b"), fd=6, tid=2))
    rig(_obs("outbound", request((), path="/c"), fd=9, tid=3))
    assert rig.unattributed() == 1.0
    assert rig.all_findings() == {}
    assert rig.sink.items == []
    rig(_obs("outbound", request((), path="/c"), fd=9, tid=3))
    assert rig.unattributed() == 2.0
    assert rig.hop("w3c", "none") is None


def test_unattributed_orphan_with_a_new_trace_id_is_restarted() -> None:
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),), path="/a"), fd=5, tid=1))
    rig(_obs("inbound", request((("b3", B3_B),), path="/b"), fd=6, tid=2))
    rig(_obs("outbound", request((("traceparent", TP_C),), path="/c"), fd=9, tid=3))
    assert rig.unattributed() == 1.0
    assert rig.all_findings() == {("restarted", "traceparent", UP): 1.0}
    (f,) = rig.sink.items
    assert (f.reason, f.other_trace_id) == ("restarted.orphan", TRACE_C)

    # not when one open request carries no context (the new root may serve it)
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),), path="/a"), fd=5, tid=1))
    rig(_obs("inbound", request((), path="/b"), fd=6, tid=2))
    rig(_obs("outbound", request((("traceparent", TP_C),), path="/c"), fd=9, tid=3))
    assert rig.unattributed() == 1.0
    assert rig.all_findings() == {}


def test_unattributed_request_continuing_an_open_trace_is_attributed_to_it() -> None:
    # an event loop: one thread reads both requests; the outbound continues trace A
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),), path="/a"), fd=5, tid=1))
    rig(_obs("inbound", request((("traceparent", TP_B),), path="/b"), fd=6, tid=1))
    rig(_obs("outbound", request((("traceparent", TP_A_CHILD),), path="/c"), fd=9, tid=1))
    assert rig.all_findings() == {}
    assert rig.hop("w3c", "w3c") == 1.0
    assert rig.unattributed() is None


def test_http2_responses_pair_by_stream() -> None:
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),), stream_id=1), fd=5, tid=1))
    rig(_obs("inbound", request((("b3", B3_B),), stream_id=3), fd=5, tid=1))
    rig(_obs("outbound", response(200, stream_id=1), fd=5, tid=1))  # answers stream 1 only
    rig(_obs("outbound", request(()), fd=9, tid=7))
    assert rig.all_findings() == {("stripped", "b3", UP): 1.0}
    rig(_obs("outbound", response(200, stream_id=3), fd=5, tid=1))
    assert rig.hops.open_requests() == 0
    rig(_obs("outbound", request(()), fd=9, tid=7))
    assert rig.all_findings() == {("stripped", "b3", UP): 1.0}  # nothing open: no hop


def test_pipelined_http1_responses_pair_first_in_first_out() -> None:
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),), path="/1"), fd=5, tid=1))
    rig(_obs("inbound", request((("b3", B3_B),), path="/2"), fd=5, tid=1))
    rig(_obs("outbound", response(100), fd=5, tid=1))  # informational: answers nothing
    assert rig.hops.open_requests() == 2
    rig(_obs("outbound", response(200), fd=5, tid=1))  # answers /1
    rig(_obs("outbound", request(()), fd=9, tid=7))
    assert rig.all_findings() == {("stripped", "b3", UP): 1.0}


def test_one_message_counts_each_finding_header_once() -> None:
    rig = Rig(Config(egress_allow=()))
    rig(_obs("inbound", request((("traceparent", TP_A),))))
    out = (("traceparent", TP_B), ("traceparent", TP_B), ("baggage", "a=1"), ("baggage", "b=2"))
    rig(_obs("outbound", request(out), fd=9))
    # duplicate traceparent: malformed, so no context out (stripped) and a leak of both
    assert rig.all_findings() == {
        ("leak", "traceparent", UP): 1.0,
        ("leak", "baggage", UP): 1.0,
        ("stripped", "traceparent", UP): 1.0,
    }


# -- egress -----------------------------------------------------------------------------------


def allow(*entries: str) -> Config:
    return Config(egress_allow=tuple(EgressRule.parse(e) for e in entries))


def test_leak_judged_by_hostname_port_aware() -> None:
    rig = Rig(allow("10.0.0.0/8", "api.partner.example:443"))
    headers = (("traceparent", TP_A), ("baggage", BAGGAGE))
    rig(_obs("outbound", request(headers, authority="api.partner.example"), peer=THIRD_PARTY))
    assert rig.all_findings() == {}  # Host allowed on the port the request really used
    rig(
        _obs(
            "outbound",
            request(headers, authority="api.partner.example:8443"),
            peer=SockAddr(socket.AF_INET, "203.0.113.7", 8443),
        )
    )
    rig(_obs("outbound", request(headers, authority="tracker.example"), peer=THIRD_PARTY))
    assert rig.all_findings() == {
        ("leak", "traceparent", "api.partner.example:8443"): 1.0,
        ("leak", "baggage", "api.partner.example:8443"): 1.0,
        ("leak", "traceparent", "tracker.example"): 1.0,
        ("leak", "baggage", "tracker.example"): 1.0,
    }
    leak = rig.sink.items[-1]
    assert (leak.reason, leak.destination, leak.via) == (
        "leak.destination_not_allowed",
        "tracker.example",
        "direct",
    )


def test_leak_judged_by_cidr() -> None:
    rig = Rig(allow("10.0.0.0/8", "192.0.2.0/24:443"))
    headers = (("b3", B3_A),)
    rig(_obs("outbound", request(headers, authority=None)))  # 10.0.0.9:8080
    rig(
        _obs(
            "outbound",
            request(headers, authority=None),
            peer=SockAddr(socket.AF_INET, "192.0.2.10", 443),
        )
    )
    assert rig.all_findings() == {}
    rig(
        _obs(
            "outbound",
            request(headers, authority=None),
            peer=SockAddr(socket.AF_INET, "192.0.2.10", 80),
        )
    )  # the rule is for :443
    rig(_obs("outbound", request(headers, authority=None), peer=THIRD_PARTY))
    assert rig.all_findings() == {
        ("leak", "b3", "192.0.2.10:80"): 1.0,
        ("leak", "b3", "203.0.113.7:443"): 1.0,
    }


def test_no_propagation_headers_no_leak() -> None:
    rig = Rig(allow("10.0.0.0/8"))
    rig(_obs("outbound", request((), authority="tracker.example"), peer=THIRD_PARTY))
    assert rig.all_findings() == {}


def test_forward_proxy_absolute_form_judged_by_named_host() -> None:
    rig = Rig(allow("10.0.0.0/8", "*.svc.cluster.local"))
    headers = (("traceparent", TP_A),)
    # to the proxy (allowed address) but naming a third party
    rig(
        _obs(
            "outbound",
            request(headers, path="http://tracker.example/collect", authority="tracker.example"),
            peer=PROXY,
        )
    )
    # naming an allowed host through the same proxy
    rig(
        _obs(
            "outbound",
            request(
                headers,
                path="http://users.svc.cluster.local/u",
                authority="users.svc.cluster.local",
            ),
            peer=PROXY,
        )
    )
    assert rig.all_findings() == {("leak", "traceparent", "tracker.example:80"): 1.0}
    assert rig.sink.items[0].via == "proxy"
    assert rig.sink.items[0].reason == "leak.proxy_target_not_allowed"


def test_connect_tunnel_judged_by_target() -> None:
    rig = Rig(allow("10.0.0.0/8", "api.partner.example:443"))
    headers = (("traceparent", TP_A),)
    rig(
        _obs(
            "outbound",
            request(
                headers,
                method="CONNECT",
                path="tracker.example:443",
                authority="tracker.example:443",
            ),
            peer=PROXY,
            fd=11,
        )
    )
    # a request inside that tunnel (plaintext from the TLS probes), Host says nothing new
    rig(_obs("outbound", request(headers, authority="tracker.example"), peer=PROXY, fd=11))
    assert rig.all_findings() == {("leak", "traceparent", "tracker.example:443"): 2.0}
    assert [f.via for f in rig.sink.items] == ["connect", "tunnel"]
    # an allowed CONNECT target; and the tunnel is gone with the connection
    rig(
        _obs(
            "outbound",
            request(
                headers,
                method="CONNECT",
                path="api.partner.example:443",
                authority="api.partner.example:443",
            ),
            peer=PROXY,
            fd=12,
        )
    )
    rig(_obs("outbound", request(headers, authority="api.partner.example"), peer=PROXY, fd=12))
    rig.hops.connection_closed(100, 11)
    rig(_obs("outbound", request(headers, authority="users"), peer=PROXY, fd=11))
    assert rig.all_findings() == {("leak", "traceparent", "tracker.example:443"): 2.0}


def test_destination_helpers() -> None:
    obs = _obs(
        "outbound",
        request((), authority="[2001:db8::1]:8443"),
        peer=SockAddr(socket.AF_INET6, "2001:db8::1", 8443),
    )
    dest = destination_of(obs)
    assert dest == Destination("direct", "2001:db8::1", 8443, ip="2001:db8::1", ip_port=8443)
    assert dest.label == "[2001:db8::1]:8443"
    assert is_allowed(allow("2001:db8::/32").egress_allow, dest) is True
    assert is_allowed((), Destination("direct", None, None)) is None
    proxied = destination_of(_obs("outbound", request((), path="https://192.0.2.1/x")))
    assert proxied == Destination("proxy", "192.0.2.1", 443)
    assert is_allowed(allow("192.0.2.0/24").egress_allow, proxied) is True


def test_an_authority_port_of_non_ascii_digits_is_no_port() -> None:
    """'³' is a digit to str.isdigit() but not to int(): found by the pipeline fuzz target
    (the hop analysis raised for such a Host, and that message's hop was lost)."""
    peer = SockAddr(socket.AF_INET, "10.0.0.9", 8080)
    for authority in ("api:5293\u00b3", "api:\u0663"):
        dest = destination_of(_obs("outbound", request((), authority=authority), peer=peer))
        assert (dest.host, dest.port, dest.port_named) == ("api", 8080, False), authority


def test_direct_destinations_are_kept_per_authority_server_name_and_peer() -> None:
    """destination_of keeps direct destinations; each part of the key still tells them apart."""
    a = SockAddr(socket.AF_INET, "10.0.0.9", 8080)
    b = SockAddr(socket.AF_INET, "10.0.0.9", 8081)

    def dest(authority: str | None, peer: SockAddr, sni: str | None = None) -> Destination:
        obs = _obs("outbound", request((), authority=authority), peer=peer)
        obs.sni = sni
        return destination_of(obs)

    first = dest("users", a)
    assert dest("users", a) is first  # the same connection's next request: kept
    assert first == Destination("direct", "users", 8080, ip="10.0.0.9", ip_port=8080,
                                port_named=False)
    assert dest("users", b) == Destination("direct", "users", 8081, ip="10.0.0.9",
                                           ip_port=8081, port_named=False)
    assert dest("users:9000", a).port == 9000
    assert dest(None, a) == Destination("direct", None, None, ip="10.0.0.9", ip_port=8080)
    assert dest("users", a, sni="api.partner.example").host == "api.partner.example"


def test_response_leak_to_client_outside_allowlist() -> None:
    rig = Rig()  # defaults: loopback and private ranges
    echo = (("traceparent", TP_A), ("baggage", BAGGAGE), ("b3", B3_A))
    rig(_obs("inbound", request((("traceparent", TP_A),)), peer=OUTSIDE_CLIENT))
    rig(_obs("outbound", response(200, echo), peer=OUTSIDE_CLIENT))
    rig(_obs("inbound", request((("traceparent", TP_A),)), peer=CLIENT))
    rig(_obs("outbound", response(200, echo), peer=CLIENT))  # a private client: fine
    assert rig.all_findings() == {
        ("response_leak", "traceparent", "198.51.100.20"): 1.0,
        ("response_leak", "baggage", "198.51.100.20"): 1.0,
        ("response_leak", "b3", "198.51.100.20"): 1.0,
    }
    assert rig.sink.items[0].reason == "response_leak.client_not_allowed"


def test_update_config_applies_to_the_next_message() -> None:
    rig = Rig(allow("10.0.0.0/8"))
    headers = (("traceparent", TP_A),)
    rig(_obs("outbound", request(headers, authority="tracker.example"), peer=THIRD_PARTY))
    rig.hops.update_config(allow("10.0.0.0/8", "tracker.example"))
    rig(_obs("outbound", request(headers, authority="tracker.example"), peer=THIRD_PARTY))
    assert rig.all_findings() == {("leak", "traceparent", "tracker.example"): 1.0}


# -- oversized_rejected -----------------------------------------------------------------------

SMALL = Limits(baggage_bytes=32)
BIG_BAGGAGE = "k=" + "v" * 40


@pytest.mark.parametrize("status", [400, 413, 431])
def test_oversized_rejected_seen_by_the_server(status: int) -> None:
    rig = Rig()
    rig(_obs("inbound", request((("baggage", BIG_BAGGAGE),)), limits=SMALL))
    rig(_obs("outbound", response(status)))
    assert rig.all_findings() == {("oversized_rejected", "baggage", "10.0.0.5"): 1.0}
    assert rig.sink.items[0].reason == f"oversized_rejected.status_{status}"


def test_oversized_answered_200_or_small_rejected_is_no_finding() -> None:
    rig = Rig()
    rig(_obs("inbound", request((("baggage", BIG_BAGGAGE),)), limits=SMALL))
    rig(_obs("outbound", response(200)))
    rig(_obs("inbound", request((("baggage", "k=v"),)), limits=SMALL))
    rig(_obs("outbound", response(431)))
    assert rig.all_findings() == {}


def test_oversized_rejected_seen_by_the_client_pipelined_and_http2() -> None:
    rig = Rig()
    # HTTP/1: three pipelined requests, the second oversized; answers in order
    rig(_obs("outbound", request((), path="/1"), fd=9))
    rig(_obs("outbound", request((("baggage", BIG_BAGGAGE),), path="/2"), fd=9, limits=SMALL))
    rig(_obs("outbound", request((), path="/3"), fd=9))
    rig(_obs("inbound", response(200), fd=9))
    assert rig.all_findings() == {}
    rig(_obs("inbound", response(431), fd=9))
    rig(_obs("inbound", response(431), fd=9))  # /3 was small: not this finding
    assert rig.all_findings() == {("oversized_rejected", "baggage", UP): 1.0}
    # HTTP/2 by stream
    rig(_obs("outbound", request((("baggage", BIG_BAGGAGE),), stream_id=5), fd=10, limits=SMALL))
    rig(_obs("outbound", request((), stream_id=7), fd=10))
    rig(_obs("inbound", response(413, stream_id=7), fd=10))
    assert rig.all_findings() == {("oversized_rejected", "baggage", UP): 1.0}
    rig(_obs("inbound", response(413, stream_id=5), fd=10))
    assert rig.all_findings() == {("oversized_rejected", "baggage", UP): 2.0}


# -- state bounds -----------------------------------------------------------------------------


def test_close_exit_and_exec_free_state() -> None:
    rig = Rig()
    rig(_obs("inbound", request((("traceparent", TP_A),)), fd=5, tid=1))
    rig(_obs("inbound", request((("traceparent", TP_B),)), fd=6, tid=2))
    rig.hops.handle_event(ConnClosed(100, 5, 0))
    assert rig.hops.open_requests() == 1
    rig(_obs("outbound", request(()), fd=9, tid=3))  # only fd 6's request is open now
    assert rig.sink.items[-1].trace_id == TRACE_B
    rig.hops.handle_event(ConnOpened(100, 2, 6, "server", CLIENT, 0))  # fd reused
    assert rig.hops.open_requests() == 0
    rig(_obs("inbound", request((("traceparent", TP_A),)), fd=5, tid=1))
    rig.hops.handle_event(ProcessExited(100, 0))
    assert rig.hops.open_requests() == 0
    assert rig.hops.tracked_processes() == 0
    # An exec: the new image answers none of the old one's requests.
    rig(_obs("inbound", request((("traceparent", TP_A),)), fd=5, tid=1))
    assert rig.hops.open_requests() == 1
    rig.hops.handle_event(ProcessExecuted(100, 0))
    assert rig.hops.open_requests() == 0 and rig.hops.tracked_processes() == 0


def test_open_requests_per_process_are_capped_and_counted() -> None:
    rig = Rig(max_open_per_process=3)
    for i in range(5):
        rig(_obs("inbound", request((("traceparent", TP_A),), path=f"/{i}"), fd=10 + i, tid=i))
    assert rig.hops.open_requests() == 3
    assert rig.evictions("open_cap") == 2.0


def test_processes_are_capped_and_counted() -> None:
    rig = Rig(max_processes=2)
    for tgid in (1, 2, 3):
        rig(_obs("inbound", request((("traceparent", TP_A),)), tgid=tgid))
    assert rig.hops.tracked_processes() == 2
    assert rig.evictions("process_cap") == 1.0


def test_stale_open_requests_expire() -> None:
    rig = Rig(max_open_age_ns=1_000_000)
    rig(_obs("inbound", request((("traceparent", TP_A),)), ts_ns=1_000))
    rig(_obs("outbound", request(()), fd=9, ts_ns=5_000_000))  # the response was never seen
    assert rig.evictions("expired") == 1.0
    assert rig.all_findings() == {}


def test_peer_labels_stay_within_the_cap() -> None:
    metrics = Metrics(max_peer_labels=100)
    hops = HopAnalyzer(allow("10.0.0.0/8"), metrics)
    for i in range(10_000):
        hops(
            _obs(
                "outbound",
                request((("traceparent", TP_A),), authority=f"h{i}.example"),
                peer=THIRD_PARTY,
            )
        )
    metrics.overflow_check()
    series = [
        s
        for f in metrics.registry.collect()
        if f.name == "hopwatch_findings"
        for s in f.samples
        if s.name == "hopwatch_findings_total"
    ]
    assert len(series) == 101  # 100 peers + "other"
    assert sum(s.value for s in series) == 10_000
    assert (
        metrics.registry.get_sample_value(
            "hopwatch_findings_total",
            {
                "finding": "leak",
                "header": "traceparent",
                "process": "orders.service",
                "peer": "other",
            },
        )
        == 9_900.0
    )


def test_no_raw_id_or_value_in_metric_labels() -> None:
    rig = Rig(allow("10.0.0.0/8"))
    serve(rig, (("traceparent", TP_A), ("baggage", BAGGAGE)), (("traceparent", TP_B),))
    rig(
        _obs(
            "outbound",
            request((("traceparent", TP_A), ("baggage", BAGGAGE)), authority="tracker.example"),
            peer=THIRD_PARTY,
        )
    )
    labels = " ".join(
        v for f in rig.metrics.registry.collect() for s in f.samples for v in s.labels.values()
    )
    assert "restarted" in labels and "leak" in labels
    for raw in (TRACE_A, TRACE_B, TRACE_A[16:], "alice", BAGGAGE):
        assert raw not in labels


def test_observation_with_unknown_peer_is_not_judged() -> None:
    rig = Rig(allow("10.0.0.0/8"))
    obs = _obs("outbound", request((("traceparent", TP_A),), authority=None))
    rig(replace(obs, peer=None))
    assert rig.all_findings() == {}
