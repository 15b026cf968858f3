'use strict';
// A Node.js worker for tests/e2e/test_fresh_store.py: serves `js_greeting`, whose definition it
// registers itself, so that a server on a fresh store gets it again from the worker.
//   node tests/e2e/fresh_store_worker.js HOST:PORT NAMESPACE
const path = require('node:path');
const { Worker } = require(path.resolve(__dirname, '..', '..', 'clients', 'node', 'src'));

const [server, namespace] = process.argv.slice(2);
const definition = {
  name: 'js_greeting',
  start: 'greet',
  nodes: [{
    name: 'greet',
    kind: 'NODE_KIND_TASK',
    input_schema: JSON.stringify({ type: 'string' }),
    output_schema: JSON.stringify({ type: 'string' }),
    terminal: true,
  }],
};

const worker = new Worker({
  server,
  namespace,
  workflow: 'js_greeting',
  definition,
  nodes: { greet: async (name) => `hello, ${name}` },
  slots: 1,
  workerId: 'node-fresh-store',
  backoffMs: 200,
  maxBackoffMs: 1000,
});
process.on('SIGTERM', () => worker.shutdown());
worker.run().then(
  () => process.exit(0),
  (error) => { console.error(`stopped: ${error.details || error.message}`); process.exit(1); },
);
