'use strict';
// A floxide-grpc worker: one stream to a server, work pushed within its credit (docs/protocol.md).
//
// Credit (docs/protocol.md, "A worker's duties" 5-6): a slot is busy while its item runs, and for
// an item of the current session until its result's acknowledgement (which returns the slot). The
// hello grants the slots running nothing: results waiting for an acknowledgement are of earlier
// sessions, which the new one never holds, and take none of its slots. An item of an earlier
// session that finishes after the hello frees its slot then (`credit: 1` with its result, once);
// a result sent again never carries credit. So the credit granted to the current session plus
// the items of earlier sessions still running never pass `slots`.
//
// Held claims: the hello sets `lists_claims`, and every heartbeat lists the claim tokens of the
// current session the worker holds (running, or reported and not yet acknowledged), so that the
// server may release a claim whose assignment never arrived.
const os = require('node:os');
const { floxide, toPayload, fromPayload } = require('./proto');
const { credentials, channelOptions } = require('./tls');
const { tokenFromEnv, metadataOf } = require('./auth');

const { Client } = require('./client');

const PROTOCOL_VERSION = 1;
const NOT_FOUND = 5;
const DEADLINE_EXCEEDED = 4;
const UNAVAILABLE = 14;

class Worker {
  /**
   * @param {object} options
   * @param {string} options.server host:port of a server (any replica), or of several,
   *   comma-separated: after a stream fails or ends, the worker tries the next
   * @param {string} options.workflow the workflow whose nodes this worker serves
   * @param {Object<string, Function>} options.nodes node name -> async (input, ctx) => output
   * @param {string} [options.namespace]
   * @param {number} [options.slots] items run at once (the credit granted)
   * @param {string} [options.workerId]
   * @param {number} [options.backoffMs] the first wait before reconnecting; it doubles
   * @param {number} [options.maxBackoffMs] the longest wait between reconnects
   * @param {object} [options.definition] the workflow's WorkflowDefinition (a plain object shaped
   *   like the proto): registered before the first hello, and again once whenever a hello is
   *   refused NOT_FOUND (a server on a fresh store); without it, the workflow must be registered
   *   by someone else, and such a refusal stops the worker
   * @param {object} [options.tls] {ca, cert, key, serverName}: TLS to the server, its files read at
   *   each connection (`tlsFromEnv()` reads them from FLOXIDE_TLS_*); none: plain text
   * @param {string} [options.token] the bearer token, FLOXIDE_TOKEN by default; refused
   *   (UNAUTHENTICATED or PERMISSION_DENIED), the worker stops with the reason
   */
  constructor({
    server, workflow, nodes, namespace = 'default', slots = 4, workerId, backoffMs = 100, maxBackoffMs = 5000,
    definition, tls, token = tokenFromEnv(),
  }) {
    this.servers = String(server).split(',').map((s) => s.trim()).filter(Boolean);
    if (this.servers.length === 0) throw new Error('no server given (host:port[,host:port...])');
    this.turn = 0; // which of them this worker talks to now
    this.workflow = workflow;
    this.nodes = nodes;
    this.namespace = namespace;
    this.slots = slots;
    this.workerId = workerId || `${os.hostname()}-node-${process.pid}`;
    this.backoffMs = backoffMs;
    this.maxBackoffMs = maxBackoffMs;
    this.definition = definition;
    this.tls = tls;
    this.token = token;
    this.held = new Map(); // claim token -> {session, abort}, while its node runs
    this.unacked = new Map(); // claim token -> {result, session, stream}, until its ack
    this.draining = false;
    this.stopped = false;
    this.stream = null;
    this.sessionId = '';
    this.executions = 0;
    this.log = (...args) => console.error(`[floxide-node ${this.workerId}]`, ...args);
  }

  /** The server this worker talks to now. */
  get server() {
    return this.servers[this.turn % this.servers.length];
  }

  /** Serve until shutdown(), reconnecting with backoff when the stream breaks. */
  async run() {
    let backoff = this.backoffMs;
    let reregistered = false; // since the last hello the server acknowledged
    if (this.definition) await this.register();
    while (!this.stopped) {
      const outcome = await this.serveOnce();
      if (this.stopped || (this.draining && this.held.size === 0 && this.unacked.size === 0)) break;
      if (outcome && outcome.acked) reregistered = false;
      if (outcome && outcome.notFound && this.definition && !reregistered) {
        // A server on a fresh store knows not our workflow: register it again and say hello
        // again, once per refusal.
        this.log(`hello refused (${outcome.reason}): registering ${this.workflow} again`);
        reregistered = true;
        await this.register();
        continue;
      }
      if (outcome && outcome.fatal) throw outcome.error;
      this.log(`stream to ${this.server} ended (${outcome ? outcome.reason : 'closed'}); reconnecting`);
      this.turn += 1; // to the next server, if it was given several
      await new Promise((r) => setTimeout(r, backoff * (0.5 + Math.random() / 2)));
      backoff = Math.min(backoff * 2, this.maxBackoffMs);
    }
  }

  /** One connection: hello, then assignments, results and heartbeats until it ends. */
  serveOnce() {
    return new Promise((resolve) => {
      let stub;
      try {
        stub = new (floxide().WorkerService)(this.server, credentials(this.tls), {
          'grpc.keepalive_time_ms': 30000,
          'grpc.keepalive_timeout_ms': 10000,
          ...channelOptions(this.tls),
        });
      } catch (error) { // a TLS file that cannot be read: said, and tried again at the next connection
        resolve({ reason: `TLS: ${error.message}` });
        return;
      }
      const stream = stub.Connect(metadataOf(this.token));
      let heartbeat = null;
      let settled = false;
      const finish = (outcome) => {
        if (settled) return;
        settled = true;
        if (heartbeat) clearInterval(heartbeat);
        this.disconnect(stream);
        stub.close();
        resolve(outcome);
      };
      this.connect(stream);
      stream.on('data', (response) => {
        if (response.hello_ack) {
          const seconds = Number(response.hello_ack.heartbeat_interval.seconds || 0);
          const nanos = Number(response.hello_ack.heartbeat_interval.nanos || 0);
          const every = Math.max(seconds * 1000 + nanos / 1e6, 100);
          heartbeat = setInterval(() => this.send({ heartbeat: this.heartbeat() }), every);
        }
        this.take(stream, response);
      });
      let acked = false;
      stream.on('data', (response) => { if (response.hello_ack) acked = true; });
      stream.on('error', (error) => {
        // NOT_FOUND, FAILED_PRECONDITION, INVALID_ARGUMENT with nothing held; UNAUTHENTICATED and
        // PERMISSION_DENIED always (its token: no retry changes the answer).
        // RESOURCE_EXHAUSTED before the hello's ack: over a limit of the server's, likewise.
        const fatal = ([5, 9, 3].includes(error.code) && this.held.size === 0)
          || [16, 7].includes(error.code) || (error.code === 8 && !acked);
        const notFound = error.code === NOT_FOUND && !acked;
        finish({ reason: `${error.code} ${error.details}`, fatal, error, acked, notFound });
      });
      stream.on('end', () => finish({ reason: 'end', acked }));
    });
  }

  /** Register the workflow's definition, waiting for a server that is not up yet. */
  async register() {
    let backoff = this.backoffMs;
    for (;;) {
      const client = new Client(this.server, { namespace: this.namespace, tls: this.tls, token: this.token });
      try {
        await client.registerWorkflow(this.definition);
        return;
      } catch (error) {
        if (error.code !== UNAVAILABLE && error.code !== DEADLINE_EXCEEDED) throw error;
        this.log(`cannot register at ${this.server} yet (${error.details}); retrying`);
        this.turn += 1;
      } finally {
        client.close();
      }
      if (this.stopped) return;
      await new Promise((r) => setTimeout(r, backoff * (0.5 + Math.random() / 2)));
      backoff = Math.min(backoff * 2, this.maxBackoffMs);
    }
  }

  /** A new stream is the current one: say hello, granting the slots running nothing (duty 6). */
  connect(stream) {
    this.stream = stream;
    this.sessionId = ''; // until hello_ack: every item still running is of an earlier session
    stream.write({
      hello: {
        protocol_version: PROTOCOL_VERSION,
        namespace: this.namespace,
        worker_id: this.workerId,
        nodes: Object.keys(this.nodes).map((node) => ({ workflow: this.workflow, node })),
        credit: this.draining ? 0 : Math.max(this.slots - this.held.size, 0),
        sdk: `node/${process.version}`,
        lists_claims: true,
      },
    });
  }

  /** A heartbeat, listing the claims of the current session held: running, or not acknowledged. */
  heartbeat() {
    const held_claim_tokens = [];
    for (const [token, held] of this.held) {
      if (held.session === this.sessionId) held_claim_tokens.push(token);
    }
    for (const [token, reported] of this.unacked) {
      if (reported.session === this.sessionId) held_claim_tokens.push(token);
    }
    return { sent_at: now(), held_claim_tokens };
  }

  /** A stream ended: results wait for the next one. */
  disconnect(stream) {
    if (this.stream === stream) this.stream = null;
  }

  /** One message of the server on `stream` (the current one). */
  take(stream, response) {
    if (response.hello_ack) {
      this.sessionId = response.hello_ack.session_id;
      for (const reported of this.unacked.values()) {
        if (reported.stream === stream) continue; // sent on this stream since its hello
        reported.stream = stream; // no credit: the hello counted its slot free
        this.send({ results: [reported.result] });
      }
      if (this.draining) this.send({ drain: { reason: 'worker draining' } });
      this.log(`session ${this.sessionId} open on ${this.server}`);
    }
    // Acknowledgements before assignments (docs/protocol.md): a slot a result returned is free
    // before an assignment in the same frame takes it.
    for (const ack of response.result_acks || []) this.acknowledged(ack);
    for (const assignment of response.assignments || []) this.execute(assignment);
    for (const cancel of response.cancels || []) {
      const held = this.held.get(cancel.claim_token);
      if (held) held.abort.abort(new Error(`cancelled: ${cancel.reason}`));
    }
    if (response.drain) this.log('the server is draining this stream; will reconnect');
    this.settleDrain();
  }

  send(message) {
    if (this.stream) this.stream.write(message);
  }

  async execute(assignment) {
    const item = assignment.item;
    const abort = new AbortController();
    const session = this.sessionId;
    this.held.set(assignment.claim_token, { session, abort });
    const result = {
      claim_token: assignment.claim_token,
      run_id: item.run_id,
      item_id: item.item_id,
      attempt: item.attempt,
      started_at: now(),
    };
    // The attempt's timeout is a duration, measured from now on this process's clock.
    const timeoutMs = durationMs(assignment.timeout);
    let timedOut = false;
    const timer = timeoutMs > 0 ? setTimeout(() => {
      timedOut = true;
      abort.abort(new Error(`node '${item.node}' timed out after ${timeoutMs / 1000}s`));
    }, timeoutMs) : null;
    try {
      const handler = this.nodes[item.node];
      if (!handler) throw new Error(`this worker has no code for node ${item.node}`);
      this.executions += 1;
      // A handler that ignores its signal keeps its slot until it returns (the server has
      // already failed the attempt if its timeout passed; its result will be refused).
      const output = await handler(fromPayload(item.input), {
        context: fromPayload(assignment.context) || {},
        attempt: item.attempt,
        runId: item.run_id,
        itemId: item.item_id,
        signal: abort.signal,
      });
      if (abort.signal.aborted) throw abort.signal.reason;
      result.transition = { next: { output: toPayload(output), route: '' } };
    } catch (error) {
      const kind = timedOut ? 'ERROR_KIND_TIMEOUT' : abort.signal.aborted ? 'ERROR_KIND_CANCELLED' : 'ERROR_KIND_GENERIC';
      result.transition = { abort: { kind, message: String(error && error.message ? error.message : error), error_type: error && error.name ? error.name : 'Error' } };
    } finally {
      if (timer) clearTimeout(timer);
    }
    result.finished_at = now();
    this.report(assignment.claim_token, session, result);
  }

  /** An item's node returned: its slot is free of it; its result goes out, kept until its ack. */
  report(token, session, result) {
    this.held.delete(token);
    const reported = { result, session, stream: this.stream };
    this.unacked.set(token, reported);
    if (!this.stream) return; // sent when a stream is back, whose hello counts the slot free
    // An item of this session returns its slot with its acknowledgement. One of an earlier
    // session was running when this stream's hello was sent, which counted its slot busy; that
    // slot is free now: grant it, once (the server returns none for such a result).
    const credit = session === this.sessionId || this.draining ? 0 : 1;
    this.send({ results: [result], credit });
  }

  acknowledged(ack) {
    const reported = this.unacked.get(ack.claim_token);
    if (ack.code === UNAVAILABLE && reported) {
      reported.stream = this.stream;
      this.send({ results: [reported.result] });
      return;
    }
    this.unacked.delete(ack.claim_token);
    if (ack.code !== 0) {
      this.log(`result of ${reported ? reported.result.item_id : ack.claim_token} refused: ${ack.code} ${ack.message}`);
    }
  }

  settleDrain() {
    if (this.draining && this.held.size === 0 && this.unacked.size === 0 && this.stream) {
      this.stopped = true;
      this.stream.end();
    }
  }

  /** Drain: take nothing new, finish and report what is held, then close. */
  shutdown() {
    if (this.draining) return;
    this.draining = true;
    this.send({ drain: { reason: 'worker shutting down' } });
    this.settleDrain();
    if (!this.stream) this.stopped = true;
  }
}

function now() {
  const ms = Date.now();
  return { seconds: String(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1e6 };
}

/** A google.protobuf.Duration in milliseconds (0 when unset). */
function durationMs(duration) {
  if (!duration) return 0;
  return Number(duration.seconds || 0) * 1000 + Math.floor((duration.nanos || 0) / 1e6);
}

module.exports = { Worker, PROTOCOL_VERSION };
