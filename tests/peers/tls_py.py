"""Python peers over TLS (the ssl module: OpenSSL's SSL_read_ex/SSL_write_ex).

Usage:
  tls_py.py server HOST PORT CERT KEY          HTTP/1.1 keep-alive server over TLS
  tls_py.py client HOST PORT N SNI [Header: value ...]
                                               N requests on one connection (http.client),
                                               the handshake asking for server name SNI
"""

import http.client
import socket
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


class Client(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, sni: str) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        super().__init__(host, port, timeout=10, context=ctx)
        self._ctx, self._sni = ctx, sni

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(raw, server_hostname=self._sni)


def main() -> None:
    mode = sys.argv[1]
    if mode == "server":
        host, port, cert, key = sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ThreadingHTTPServer.daemon_threads = True
        srv = ThreadingHTTPServer((host, port), Handler)
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        srv.serve_forever()
    host, port, n, sni = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    headers = dict(h.split(": ", 1) for h in sys.argv[6:])
    conn = Client(host, port, sni)
    for i in range(n):
        conn.request("GET", f"/tls/{i}", headers=headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
    conn.close()


main()
