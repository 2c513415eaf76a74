"""HTTP/1.1 server for hop tests. Usage: echo_server.py HOST PORT [echo] [reject:N]

``echo``: copy the request's traceparent and baggage into the response.
``reject:N``: answer 431 when the request's baggage is longer than N bytes.
"""

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ECHO = "echo" in sys.argv[3:]
REJECT = next((int(a[7:]) for a in sys.argv[3:] if a.startswith("reject:")), None)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        baggage = self.headers.get("baggage")
        status = 200
        if REJECT is not None and baggage is not None and len(baggage) > REJECT:
            status = 431
        body = b"ok\n" if status == 200 else b"request header fields too large\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if ECHO:
            for name in ("traceparent", "baggage"):
                value = self.headers.get(name)
                if value is not None:
                    self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
