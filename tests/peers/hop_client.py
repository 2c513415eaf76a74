"""HTTP/1.1 client: N GET requests on one keep-alive connection, each answered STATUS.

Usage: hop_client.py HOST PORT N STATUS [Header: value ...]
"""

import http.client
import sys

host, port, n, status = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
headers = dict(h.split(": ", 1) for h in sys.argv[5:])
conn = http.client.HTTPConnection(host, port, timeout=10)
for i in range(n):
    conn.request("GET", f"/hop/{i}", headers=headers)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == status, (resp.status, status)
conn.close()
