'use strict';
// TLS to a floxide server. The files are read each time a connection is made (a worker makes one
// per stream), so a rotated certificate is taken at the next reconnect.
const fs = require('node:fs');
const { grpc } = require('./proto');

/**
 * TLS settings from the environment, as every floxide program reads them: FLOXIDE_TLS_CA,
 * FLOXIDE_TLS_CERT, FLOXIDE_TLS_KEY, FLOXIDE_TLS_SERVER_NAME (FLOXIDE_TLS=1 alone: the system's
 * roots). Undefined when they say nothing: plain text.
 * @returns {{ca?: string, cert?: string, key?: string, serverName?: string}|undefined}
 */
function tlsFromEnv(env = process.env) {
  const tls = {
    ca: env.FLOXIDE_TLS_CA || undefined,
    cert: env.FLOXIDE_TLS_CERT || undefined,
    key: env.FLOXIDE_TLS_KEY || undefined,
    serverName: env.FLOXIDE_TLS_SERVER_NAME || undefined,
  };
  const on = ['1', 'true', 'yes', 'on'].includes(String(env.FLOXIDE_TLS || '').toLowerCase());
  return on || Object.values(tls).some(Boolean) ? tls : undefined;
}

/** Channel credentials: TLS from the files as they are now, or plain text without `tls`. */
function credentials(tls) {
  if (!tls) return grpc.credentials.createInsecure();
  if (Boolean(tls.cert) !== Boolean(tls.key)) {
    throw new Error('a client certificate needs its key, and a key its certificate');
  }
  const read = (file) => (file ? fs.readFileSync(file) : null);
  return grpc.credentials.createSsl(read(tls.ca), read(tls.key), read(tls.cert));
}

/** Channel options: the name to check in the server's certificate, if set. */
function channelOptions(tls) {
  if (!tls || !tls.serverName) return {};
  return { 'grpc.ssl_target_name_override': tls.serverName, 'grpc.default_authority': tls.serverName };
}

module.exports = { tlsFromEnv, credentials, channelOptions };
