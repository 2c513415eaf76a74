"""HTTP/1.1 client that replaces a connected socket's fd with dup2 (no close() of it) and
connects the new socket on the same fd to another port. Usage: dup_client.py PORT_A PORT_B

One request on PORT_A, then one on PORT_B. Prints the fd both used."""

import os
import socket
import sys

from _h1 import exchange

port_a, port_b = int(sys.argv[1]), int(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port_a))
exchange(s, "dup")
fresh = socket.socket()
os.dup2(fresh.fileno(), s.fileno())  # the connected socket is closed by dup2, not close()
fresh.close()
s.connect(("127.0.0.1", port_b))
exchange(s, "dup")
print(s.fileno(), flush=True)
s.close()
