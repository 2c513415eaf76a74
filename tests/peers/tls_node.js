// Node.js peers over TLS (OpenSSL embedded in the node binary, memory BIOs).
//
//   tls_node.js https URL N SERVERNAME [Header: value ...]   N keep-alive requests (https)
//   tls_node.js h2 URL N SERVERNAME [Header: value ...]      N requests on one HTTP/2 session (ALPN)
//   tls_node.js server PORT CERT KEY                         HTTPS server (HTTP/1.1)
'use strict';
const fs = require('fs');
const https = require('https');
const http2 = require('http2');

const [mode, ...args] = process.argv.slice(2);

function headersOf(list) {
  const out = {};
  for (const h of list) {
    const i = h.indexOf(': ');
    out[h.slice(0, i).toLowerCase()] = h.slice(i + 2);
  }
  return out;
}

if (mode === 'server') {
  const [port, cert, key] = args;
  const srv = https.createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key)}, (req, res) => {
    req.resume();
    req.on('end', () => {
      res.writeHead(200, {'content-type': 'text/plain', 'content-length': '3'});
      res.end('ok\n');
    });
  });
  srv.keepAliveTimeout = 30000;
  srv.listen(Number(port), '127.0.0.1', () => console.log('listening'));
} else if (mode === 'https') {
  const [url, n, servername, ...hdrs] = args;
  const agent = new https.Agent({keepAlive: true, maxSockets: 1});
  let done = 0;
  const one = () => {
    const req = https.request(url, {agent, servername, rejectUnauthorized: false, headers: headersOf(hdrs)}, (res) => {
      res.resume();
      res.on('end', () => {
        if (res.statusCode !== 200) process.exit(2);
        if (++done === Number(n)) agent.destroy(); else one();
      });
    });
    req.on('error', (e) => { console.error(e); process.exit(1); });
    req.end();
  };
  one();
} else if (mode === 'h2') {
  const [url, n, servername, ...hdrs] = args;
  const session = http2.connect(url, {servername, rejectUnauthorized: false});
  session.on('error', (e) => { console.error(e); process.exit(1); });
  const path = new URL(url).pathname;
  let done = 0;
  const one = () => {
    const req = session.request({':path': path, ...headersOf(hdrs)});
    req.on('response', (h) => { if (h[':status'] !== 200) process.exit(2); });
    req.resume();
    req.on('end', () => { if (++done === Number(n)) session.close(); else one(); });
    req.end();
  };
  one();
} else {
  console.error('usage: tls_node.js https|h2 URL N SERVERNAME [headers] | server PORT CERT KEY');
  process.exit(1);
}
