'use strict';
// The orchestrator client: register workflows, start runs and wait for them.
const crypto = require('node:crypto');
const { floxide, toPayload, fromPayload } = require('./proto');
const { credentials, channelOptions } = require('./tls');
const { tokenFromEnv, metadataOf } = require('./auth');

const FINISHED = new Set(['RUN_STATUS_COMPLETED', 'RUN_STATUS_FAILED', 'RUN_STATUS_CANCELLED']);

class Client {
  /**
   * @param {string} target host:port of a server
   * @param {{namespace?: string, timeoutMs?: number, tls?: object, token?: string}} options
   *   `tls`: {ca, cert, key, serverName} (file paths; `tlsFromEnv()` reads them from
   *   FLOXIDE_TLS_*), none: plain text; `token`: the bearer token, FLOXIDE_TOKEN by default
   */
  constructor(target, { namespace = 'default', timeoutMs = 10000, tls, token = tokenFromEnv() } = {}) {
    this.namespace = namespace;
    this.timeoutMs = timeoutMs;
    this.metadata = metadataOf(token);
    this.stub = new (floxide().OrchestratorService)(target, credentials(tls), channelOptions(tls));
  }

  call(method, request) {
    return new Promise((resolve, reject) => {
      const deadline = new Date(Date.now() + this.timeoutMs);
      this.stub[method]({ namespace: this.namespace, ...request }, this.metadata, { deadline }, (error, response) =>
        error ? reject(error) : resolve(response));
    });
  }

  /** Register a WorkflowDefinition (a plain object shaped like the proto); its hash. */
  async registerWorkflow(definition) {
    return (await this.call('RegisterWorkflow', { definition })).definition_hash;
  }

  /** Start a run; an idempotency key is always sent, so a retried start starts one run. */
  async startRun(workflow, input, { idempotencyKey = crypto.randomUUID() } = {}) {
    const response = await this.call('StartRun', {
      workflow,
      input: toPayload(input),
      idempotency_key: idempotencyKey,
    });
    return response.run;
  }

  /** Wait until a run is completed, failed or cancelled (the server streams its statuses). */
  waitForCompletion(runId, { timeoutMs = 60000 } = {}) {
    return new Promise((resolve, reject) => {
      const call = this.stub.WaitForCompletion(
        { namespace: this.namespace, run_id: runId },
        this.metadata,
        { deadline: new Date(Date.now() + timeoutMs) },
      );
      let last = null;
      call.on('data', (response) => {
        last = response.run;
        if (FINISHED.has(last.status)) resolve(last);
      });
      call.on('error', (error) => { if (!last || !FINISHED.has(last.status)) reject(error); });
      call.on('end', () => { if (last && FINISHED.has(last.status)) resolve(last); });
    });
  }

  /** Start a run, wait for it, and return its output (throws if it did not complete). */
  async run(workflow, input, options = {}) {
    const started = await this.startRun(workflow, input, options);
    const final = await this.waitForCompletion(started.run_id, options);
    if (final.status !== 'RUN_STATUS_COMPLETED') {
      throw new Error(`run ${final.run_id} ${final.status}: ${final.error ? final.error.message : ''}`);
    }
    return fromPayload(final.output);
  }

  close() {
    this.stub.close();
  }
}

module.exports = { Client };
