"""grpcio over h2c without generated code: raw-bytes unary method /hw.Echo/Call.

Usage: grpc_peer.py server HOST PORT | grpc_peer.py client HOST PORT N [key: value ...]
"""

import sys
import time
from concurrent import futures

import grpc

METHOD = "/hw.Echo/Call"


def serve(host: str, port: int) -> None:
    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "hw.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    while True:
        time.sleep(3600)


def client(host: str, port: int, n: int, metadata: list[tuple[str, str]]) -> None:
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        call = channel.unary_unary(METHOD)
        for i in range(n):
            assert call(b"ping%d" % i, metadata=metadata, timeout=10) == b"ping%d" % i


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "server":
        serve(host, port)
    else:
        md = [tuple(h.split(": ", 1)) for h in sys.argv[5:]]
        client(host, port, int(sys.argv[4]), md)  # type: ignore[arg-type]
