"""HTTP/1.1 client (http.client), N requests on one keep-alive connection.

Usage: h1_client.py HOST PORT N [Header: value ...]
"""

import http.client
import sys

host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
headers = dict(h.split(": ", 1) for h in sys.argv[4:])
conn = http.client.HTTPConnection(host, port, timeout=10)
for i in range(n):
    conn.request("GET", f"/item/{i}", headers=headers)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200, resp.status
conn.close()
