"""One service of a test chain. Usage: chain_service.py PORT DOWNSTREAM_URL MODE

Answers every request on 127.0.0.1:PORT; first, unless DOWNSTREAM_URL is "-", calls
DOWNSTREAM_URL (same path) on a fresh connection, from the thread serving the request.
MODE says what that call carries of the inbound trace context:

  propagate  traceparent, tracestate, b3, x-b3-*, baggage copied unchanged
  strip      nothing (the classic broken hop)
  restart    a new traceparent with a new trace id (a new root)
  b3         the inbound trace id, converted to a B3 single header only
"""

from __future__ import annotations

import http.client
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

PORT = int(sys.argv[1])
DOWNSTREAM = sys.argv[2]
MODE = sys.argv[3]
PROPAGATION = ("traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
               "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "baggage")  # fmt: skip


def outbound_headers(inbound: dict[str, str]) -> dict[str, str]:
    span = os.urandom(8).hex()
    if MODE == "propagate":
        return {k: v for k, v in inbound.items() if k in PROPAGATION}
    if MODE == "strip":
        return {}
    if MODE == "restart":
        return {"traceparent": f"00-{os.urandom(16).hex()}-{span}-01"}
    if MODE == "b3":
        tp = inbound.get("traceparent", "")
        parts = tp.split("-")
        return {"b3": f"{parts[1]}-{span}-1"} if len(parts) == 4 else {}
    raise SystemExit(f"unknown mode {MODE!r}")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        status = 200
        if DOWNSTREAM != "-":
            url = urlsplit(DOWNSTREAM)
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
            try:
                inbound = {k.lower(): v for k, v in self.headers.items()}
                conn.request("GET", self.path, headers=outbound_headers(inbound))
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except OSError:
                status = 502
            finally:
                conn.close()
        body = f"{PORT} {MODE} downstream={status}\n".encode()
        self.send_response(200 if status == 200 else 502)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", PORT), Handler).serve_forever()
