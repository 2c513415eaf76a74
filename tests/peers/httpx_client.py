"""HTTP/2 prior-knowledge (h2c) client: N requests on one connection with httpx.

Usage: httpx_client.py URL N [Header: value ...]
"""

import sys

import httpx

url, n = sys.argv[1], int(sys.argv[2])
headers = dict(h.split(": ", 1) for h in sys.argv[3:])
with httpx.Client(http1=False, http2=True, timeout=10) as client:
    for i in range(n):
        r = client.get(f"{url}/item/{i}", headers=headers)
        assert r.status_code == 200 and r.http_version == "HTTP/2", (r.status_code, r.http_version)
