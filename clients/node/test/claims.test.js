'use strict';
// The worker's side of orphan claims (worker_service.proto, Hello.lists_claims and
// Heartbeat.held_claim_tokens), on fake streams.
//   node --test test/
const test = require('node:test');
const assert = require('node:assert/strict');
const { Worker } = require('../src/worker');
const { toPayload } = require('../src/proto');

class FakeStream {
  constructor() {
    this.frames = [];
  }

  write(message) {
    this.frames.push(message);
  }
}

function gatedWorker() {
  const gates = new Map();
  const worker = new Worker({
    server: 'unused:0',
    workflow: 'wf',
    slots: 4,
    nodes: { step: (x, { itemId }) => new Promise((release) => gates.set(itemId, () => release(x))) },
  });
  worker.log = () => {};
  worker.release = async (itemId) => {
    gates.get(itemId)();
    for (let i = 0; i < 5; i += 1) await new Promise((r) => setImmediate(r));
  };
  return worker;
}

function assignment(token, itemId) {
  return {
    claim_token: token,
    item: { run_id: 'r', item_id: itemId, attempt: 1, node: 'step', input: toPayload(1) },
    context: toPayload({}),
  };
}

function open(worker, session) {
  const stream = new FakeStream();
  worker.connect(stream);
  worker.take(stream, { hello_ack: { session_id: session } });
  return stream;
}

const listed = (worker) => [...worker.heartbeat().held_claim_tokens].sort();

test('the hello says that heartbeats list the claims held', () => {
  const worker = gatedWorker();
  const stream = open(worker, 's1');
  assert.equal(stream.frames[0].hello.lists_claims, true);
});

test('a heartbeat lists the claims of the session running or not yet acknowledged, and no other', async () => {
  const worker = gatedWorker();
  const first = open(worker, 's1');
  worker.take(first, { assignments: [assignment('s1-a', 'a'), assignment('s1-b', 'b'), assignment('s1-c', 'c')] });
  assert.deepEqual(listed(worker), ['s1-a', 's1-b', 's1-c']);
  await worker.release('a');
  await worker.release('c');
  assert.deepEqual(listed(worker), ['s1-a', 's1-b', 's1-c']); // a and c reported, not acknowledged
  worker.take(first, { result_acks: [{ claim_token: 's1-c', code: 0 }] });
  assert.deepEqual(listed(worker), ['s1-a', 's1-b']);
  worker.take(first, { result_acks: [{ claim_token: 's1-a', code: 14 }] }); // sent again: still held
  assert.deepEqual(listed(worker), ['s1-a', 's1-b']);
  worker.disconnect(first);
  const second = open(worker, 's2'); // a (unacknowledged) and b (running) are the old session's
  assert.deepEqual(listed(worker), []);
  worker.take(second, { assignments: [assignment('s2-d', 'd')] });
  await worker.release('b');
  assert.deepEqual(listed(worker), ['s2-d']);
  await worker.release('d');
  assert.deepEqual(listed(worker), ['s2-d']);
  worker.take(second, {
    result_acks: [
      { claim_token: 's1-a', code: 9 }, { claim_token: 's1-b', code: 9 }, { claim_token: 's2-d', code: 0 },
    ],
  });
  assert.deepEqual(listed(worker), []);
  assert.equal(worker.unacked.size, 0);
});
