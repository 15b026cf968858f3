'use strict';
// For tests/e2e/test_errors.py: ask for a run and print the floxide error of the refusal as JSON.
//   node tests/e2e/error_info.js HOST:PORT NAMESPACE RUN_ID
const path = require('node:path');
const { Client, floxideError } = require(path.resolve(__dirname, '..', '..', 'clients', 'node', 'src'));

const [server, namespace, runId] = process.argv.slice(2);
new Client(server, { namespace }).call('GetRun', { run_id: runId }).then(
  () => { console.error('the run was found'); process.exit(1); },
  (error) => { console.log(JSON.stringify(floxideError(error))); process.exit(0); },
);
