'use strict';
// A failed call's floxide error: the google.rpc.ErrorInfo the server puts in the
// `grpc-status-details-bin` trailer (a google.rpc.Status), read with protobufjs.
const protobuf = require('protobufjs');

const DOMAIN = 'floxide.v1';

// google/rpc/status.proto and google/rpc/error_details.proto, the two messages we read.
const root = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: { nested: { Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } } } },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
          },
        },
      },
    },
  },
});
const Status = root.lookupType('google.rpc.Status');
const ErrorInfo = root.lookupType('google.rpc.ErrorInfo');
const ERROR_INFO_URL = 'type.googleapis.com/google.rpc.ErrorInfo';

/**
 * The floxide error of a failed call: `{code, message, reason, metadata}`, where `reason` is the
 * stable UPPER_SNAKE name (docs/protocol.md lists them) and `metadata` its fields (run_id, node,
 * ...); `reason` is '' when the status carries none (a proxy's, or gRPC's own).
 */
function floxideError(error) {
  const found = { code: error.code, message: error.details || '', reason: '', metadata: {} };
  const [trailer] = error.metadata ? error.metadata.get('grpc-status-details-bin') : [];
  if (!trailer) return found;
  const status = Status.decode(trailer);
  for (const detail of status.details) {
    if (detail.type_url !== ERROR_INFO_URL) continue;
    const info = ErrorInfo.decode(detail.value);
    if (info.domain === DOMAIN) return { ...found, reason: info.reason, metadata: { ...info.metadata } };
  }
  return found;
}

module.exports = { floxideError, DOMAIN };
