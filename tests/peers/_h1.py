"""What the HTTP/1.1 client peers share (imported from the peer's own folder, which Python
puts first on sys.path when it runs a script): one request with a traceparent, and one
exchange on a keep-alive connection."""

import socket

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def request(host: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: {host}\r\ntraceparent: {TP}\r\n\r\n".encode()


def exchange(s: socket.socket, host: str) -> None:
    """Send one request and read its whole response (head, then Content-Length bytes)."""
    s.sendall(request(host))
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = s.recv(65536)
        if not got:
            raise SystemExit("connection closed before the response head")
        buf += got
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        got = s.recv(65536)
        if not got:
            raise SystemExit("connection closed before the response body")
        body += got
