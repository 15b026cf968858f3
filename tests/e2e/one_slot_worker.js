'use strict';
// A one-slot Node.js worker for tests/e2e/test_credit.py: serves the node `js_slot` of the
// workflow `js_slot`, reconnecting after 0.3-0.6 s.
//   node tests/e2e/one_slot_worker.js HOST:PORT NAMESPACE DIR
// Each execution N (counted from 1) appends "start N RUNNING" to DIR/log (RUNNING: how many run
// now, itself included), writes its run id to DIR/started-N, waits for DIR/release-N or
// DIR/free, and appends "end N".
const fs = require('node:fs');
const path = require('node:path');
const { Worker } = require(path.resolve(__dirname, '..', '..', 'clients', 'node', 'src'));

const [server, namespace, dir] = process.argv.slice(2);
let running = 0;
let count = 0;

async function slot(x, { runId }) {
  running += 1;
  count += 1;
  const n = count;
  try {
    fs.appendFileSync(path.join(dir, 'log'), `start ${n} ${running}\n`);
    fs.writeFileSync(path.join(dir, `started-${n}`), runId);
    while (!fs.existsSync(path.join(dir, `release-${n}`)) && !fs.existsSync(path.join(dir, 'free'))) {
      await new Promise((r) => setTimeout(r, 10));
    }
  } finally {
    running -= 1;
    fs.appendFileSync(path.join(dir, 'log'), `end ${n}\n`);
  }
  return x;
}

const worker = new Worker({
  server,
  namespace,
  workflow: 'js_slot',
  nodes: { js_slot: slot },
  slots: 1,
  workerId: 'node-one-slot',
  backoffMs: 600,
  maxBackoffMs: 600,
});
process.on('SIGTERM', () => worker.shutdown());
worker.run().then(
  () => process.exit(0),
  (error) => { console.error(error); process.exit(1); },
);
