'use strict';
// The floxide.v1 contracts, loaded at run time from proto/ (no generated code to keep in sync).
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = process.env.FLOXIDE_PROTO_DIR || path.resolve(__dirname, '..', '..', '..', 'proto');
const FILES = [
  'floxide/v1/orchestrator_service.proto',
  'floxide/v1/worker_service.proto',
];

let cached = null;

/** The `floxide.v1` package: service constructors and message types. */
function floxide() {
  if (cached === null) {
    const definition = protoLoader.loadSync(FILES, {
      includeDirs: [PROTO_DIR],
      keepCase: true, // field names as in the .proto files
      longs: String,
      enums: String,
      defaults: true,
      oneofs: true,
    });
    cached = grpc.loadPackageDefinition(definition).floxide.v1;
  }
  return cached;
}

/** A JSON Payload: JSON text in bytes, without NaN or Infinity (JSON.stringify writes null). */
function toPayload(value) {
  if (typeof value === 'number' && !Number.isFinite(value)) {
    throw new Error('NaN and Infinity are not valid JSON');
  }
  return { encoding: 'ENCODING_JSON', data: Buffer.from(JSON.stringify(value === undefined ? null : value)) };
}

/** The value of a JSON Payload. */
function fromPayload(payload) {
  if (!payload || !payload.data || payload.data.length === 0) return null;
  if (payload.encoding !== 'ENCODING_JSON') throw new Error(`unsupported payload encoding ${payload.encoding}`);
  return JSON.parse(Buffer.from(payload.data).toString('utf8'));
}

module.exports = { floxide, toPayload, fromPayload, grpc };
