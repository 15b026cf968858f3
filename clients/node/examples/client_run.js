'use strict';
// Registers a one-node workflow written here, starts a run of it and prints its output, while a
// worker in this same process serves the node.
//   node examples/client_run.js HOST:PORT NAMESPACE INPUT
const { Client, Worker, tlsFromEnv } = require('../src');

const [server, namespace, input] = process.argv.slice(2);
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

async function main() {
  const tls = tlsFromEnv(); // FLOXIDE_TLS_*: none, plain text
  const client = new Client(server, { namespace, tls });
  await client.registerWorkflow(definition);
  const worker = new Worker({
    server, namespace, workflow: 'js_greeting', nodes: { greet: async (name) => `hello, ${name}` }, slots: 1, tls,
  });
  const serving = worker.run();
  const output = await client.run('js_greeting', JSON.parse(input));
  console.log(JSON.stringify(output));
  worker.shutdown();
  await serving;
  client.close();
}

main().catch((error) => { console.error(error); process.exit(1); });
