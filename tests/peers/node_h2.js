// Node.js http2 over cleartext: `node node_h2.js server PORT` or
// `node node_h2.js client PORT N [name: value ...]`.
const http2 = require('http2');
const [mode, port, n, ...hdrs] = process.argv.slice(2);
if (mode === 'server') {
  const server = http2.createServer();
  server.on('stream', (stream) => {
    stream.respond({ ':status': 200, 'content-type': 'text/plain' });
    stream.end('ok\n');
  });
  server.listen(Number(port), '127.0.0.1', () => console.log('ready'));
} else {
  const headers = {};
  for (const h of hdrs) { const i = h.indexOf(': '); headers[h.slice(0, i).toLowerCase()] = h.slice(i + 2); }
  const client = http2.connect(`http://127.0.0.1:${port}`);
  let left = Number(n);
  const one = (i) => {
    const req = client.request({ ':path': `/item/${i}`, ...headers });
    req.on('data', () => {});
    req.on('end', () => { if (--left === 0) client.close(); else one(i + 1); });
    req.end();
  };
  one(0);
}
