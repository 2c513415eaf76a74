"""A service that answers each request after calling a downstream, propagating (or not).

Usage: hop_service.py HOST PORT MODE DOWN_HOST DOWN_PORT

Thread per request (http.server): the outbound call is made by the thread that read the
inbound request. MODE says what the outbound request carries:

  propagate  traceparent with the inbound trace id and flags and a new span id, tracestate
             and baggage forwarded; a malformed inbound traceparent is dropped and a new
             root started (what a compliant service does)
  both       like propagate, plus the same context as a b3 header
  strip      no propagation header at all
  restart    a traceparent with a new random trace id
  b3         the inbound W3C context converted to a b3 header, no traceparent
  flip       the inbound traceparent with the sampled flag flipped
  forward    the inbound traceparent forwarded unchanged, valid or not
"""

import http.client
import re
import secrets
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST, PORT, MODE, DOWN_HOST, DOWN_PORT = (
    sys.argv[1],
    int(sys.argv[2]),
    sys.argv[3],
    sys.argv[4],
    int(sys.argv[5]),
)
VALID = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def outbound(headers: "http.client.HTTPMessage") -> dict[str, str]:
    raw = headers.get("traceparent")
    m = VALID.fullmatch(raw) if raw is not None else None
    if m is not None and (m.group(1) == "0" * 32 or m.group(2) == "0" * 16):
        m = None
    if MODE == "strip" or raw is None:
        return {}
    if MODE == "forward":
        return {"traceparent": raw}
    span = secrets.token_hex(8)
    if m is None:  # malformed inbound: a new root
        return {"traceparent": f"00-{secrets.token_hex(16)}-{span}-01"}
    trace, flags = m.group(1), m.group(3)
    sampled = int(flags, 16) & 1
    if MODE == "restart":
        return {"traceparent": f"00-{secrets.token_hex(16)}-{span}-{flags}"}
    if MODE == "b3":
        return {"b3": f"{trace}-{span}-{sampled}"}
    if MODE == "flip":
        return {"traceparent": f"00-{trace}-{span}-{int(flags, 16) ^ 1:02x}"}
    out = {"traceparent": f"00-{trace}-{span}-{flags}"}
    for name in ("tracestate", "baggage"):
        value = headers.get(name)
        if value is not None:
            out[name] = value
    if MODE == "both":
        out["b3"] = f"{trace}-{span}-{sampled}"
    elif MODE != "propagate":
        raise SystemExit(f"unknown mode {MODE!r}")
    return out


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        conn = http.client.HTTPConnection(DOWN_HOST, DOWN_PORT, timeout=10)
        conn.request("GET", "/down" + self.path, headers=outbound(self.headers))
        resp = conn.getresponse()
        resp.read()
        conn.close()
        body = f"downstream said {resp.status}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer((HOST, PORT), Handler).serve_forever()
