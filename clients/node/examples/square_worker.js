'use strict';
// Serves the node `js_square` of the workflow `mixed` (its other nodes run on a Python worker).
//   node examples/square_worker.js HOST:PORT NAMESPACE
// FLOXIDE_BAD_OUTPUT=1 returns a string (breaking the node's output schema);
// FLOXIDE_GATE=DIR announces each attempt in DIR/started-PID and waits for DIR/release.
const fs = require('node:fs');
const path = require('node:path');
const { Worker, tlsFromEnv } = require('../src');

const [server, namespace] = process.argv.slice(2);
const gate = process.env.FLOXIDE_GATE;

async function square(x) {
  if (gate) {
    fs.writeFileSync(path.join(gate, `started-${process.pid}`), '');
    while (!fs.existsSync(path.join(gate, 'release'))) await new Promise((r) => setTimeout(r, 50));
  }
  if (process.env.FLOXIDE_BAD_OUTPUT) return `${x * x}`;
  return x * x;
}

const worker = new Worker({
  server, namespace, workflow: 'mixed', nodes: { js_square: square }, slots: 2, tls: tlsFromEnv(),
});
process.on('SIGTERM', () => worker.shutdown());
worker.run().then(
  () => process.exit(0),
  (error) => { console.error(error); process.exit(1); },
);
