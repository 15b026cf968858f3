'use strict';
// The worker's credit across reconnects (docs/protocol.md, "A worker's duties" 5-6), driven
// frame by frame on fake streams: what each stream's hello and frames grant, and how many
// handlers run at once.
//   node --test test/
const test = require('node:test');
const assert = require('node:assert/strict');
const { Worker } = require('../src/worker');
const { toPayload } = require('../src/proto');

/** A stream that records what the worker writes. */
class FakeStream {
  constructor() {
    this.frames = [];
  }

  write(message) {
    this.frames.push(message);
  }

  /** The credit this stream's session was granted in all: the hello's and every frame's. */
  granted() {
    return this.frames.reduce((sum, f) => sum + (f.hello ? f.hello.credit : f.credit || 0), 0);
  }

  /** The claim tokens of the results sent on it, in order. */
  results() {
    return this.frames.flatMap((f) => (f.results || []).map((r) => r.claim_token));
  }
}

/** A one-slot worker whose handler waits for the test; it counts how many run at once. */
function oneSlot() {
  const gates = new Map();
  const worker = new Worker({
    server: 'unused:0',
    workflow: 'wf',
    slots: 1,
    nodes: {
      step: async (x, { itemId }) => {
        worker.running += 1;
        worker.peak = Math.max(worker.peak, worker.running);
        await new Promise((release) => gates.set(itemId, release));
        worker.running -= 1;
        return x;
      },
    },
  });
  worker.log = () => {};
  worker.running = 0;
  worker.peak = 0;
  worker.release = async (itemId) => {
    gates.get(itemId)();
    await settled();
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

/** Let the handlers and their reports run. */
async function settled() {
  for (let i = 0; i < 5; i += 1) await new Promise((r) => setImmediate(r));
}

/** Open a stream and its session; returns the stream. */
function open(worker, session) {
  const stream = new FakeStream();
  worker.connect(stream);
  worker.take(stream, { hello_ack: { session_id: session } });
  return stream;
}

test('a result whose ack was lost takes no slot of the next session, and is resent without credit', async () => {
  const worker = oneSlot();
  const first = open(worker, 's1');
  worker.take(first, { assignments: [assignment('s1-a', 'a')] });
  await settled();
  await worker.release('a');
  assert.deepEqual(first.results(), ['s1-a']);
  worker.disconnect(first); // before its ack
  const second = open(worker, 's2');
  assert.equal(second.frames[0].hello.credit, 1);
  assert.deepEqual(second.results(), ['s1-a']);
  assert.equal(second.granted(), 1); // not 2: the resent result adds nothing
  worker.take(second, { result_acks: [{ claim_token: 's1-a', code: 9 }] });
  assert.equal(worker.unacked.size, 0);
});

test('an item finishing while no stream is open frees its slot in the next hello, once', async () => {
  const worker = oneSlot();
  const first = open(worker, 's1');
  worker.take(first, { assignments: [assignment('s1-a', 'a')] });
  await settled();
  worker.disconnect(first);
  await worker.release('a');
  const second = open(worker, 's2');
  assert.equal(second.frames[0].hello.credit, 1);
  assert.deepEqual(second.results(), ['s1-a']);
  assert.equal(second.granted(), 1);
});

test('an item still running at the hello frees its slot with its result, once', async () => {
  const worker = oneSlot();
  const first = open(worker, 's1');
  worker.take(first, { assignments: [assignment('s1-a', 'a')] });
  await settled();
  worker.disconnect(first);
  const second = new FakeStream();
  worker.connect(second);
  assert.equal(second.frames[0].hello.credit, 0); // its slot is busy
  await worker.release('a'); // before the hello_ack: sent once, with its slot
  worker.take(second, { hello_ack: { session_id: 's2' } });
  assert.deepEqual(second.results(), ['s1-a']);
  assert.equal(second.granted(), 1);
  worker.disconnect(second); // its ack lost too
  const third = open(worker, 's3');
  assert.equal(third.granted(), 1);
  assert.deepEqual(third.results(), ['s1-a']);
});

test('a session never runs more than its slots across cuts, and a result resent on UNAVAILABLE adds nothing', async () => {
  const worker = oneSlot();
  const first = open(worker, 's1');
  worker.take(first, { assignments: [assignment('s1-a', 'a')] });
  await settled();
  await worker.release('a');
  assert.equal(first.frames.at(-1).credit, 0); // of this session: its ack returns the slot
  worker.take(first, { result_acks: [{ claim_token: 's1-a', code: 14 }] });
  assert.deepEqual(first.results(), ['s1-a', 's1-a']);
  assert.equal(first.granted(), 1);
  worker.take(first, { result_acks: [{ claim_token: 's1-a', code: 0 }], assignments: [assignment('s1-b', 'b')] });
  await settled();
  worker.disconnect(first);
  const second = open(worker, 's2');
  assert.equal(second.granted(), 0); // b still runs
  await worker.release('b');
  assert.equal(second.granted(), 1);
  worker.take(second, { result_acks: [{ claim_token: 's1-b', code: 9 }], assignments: [assignment('s2-c', 'c')] });
  await settled();
  await worker.release('c');
  assert.equal(worker.peak, 1);
  assert.equal(second.granted(), 1);
});

test('a draining worker grants nothing', async () => {
  const worker = oneSlot();
  const first = open(worker, 's1');
  worker.take(first, { assignments: [assignment('s1-a', 'a')] });
  await settled();
  worker.disconnect(first);
  worker.draining = true;
  const second = open(worker, 's2');
  await worker.release('a');
  assert.equal(second.granted(), 0);
  assert.deepEqual(second.results(), ['s1-a']);
});
