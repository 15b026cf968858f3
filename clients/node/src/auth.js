'use strict';
// Bearer tokens: every call says who makes it (docs/protocol.md, "Tokens and roles").
const { grpc } = require('./proto');

/** FLOXIDE_TOKEN, or undefined when unset or empty. */
function tokenFromEnv(env = process.env) {
  return env.FLOXIDE_TOKEN || undefined;
}

/** The metadata of every call: `authorization: Bearer <token>` (none without a token). */
function metadataOf(token) {
  const metadata = new grpc.Metadata();
  if (token) metadata.set('authorization', `Bearer ${token}`);
  return metadata;
}

module.exports = { tokenFromEnv, metadataOf };
