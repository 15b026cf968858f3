'use strict';
// floxide-grpc for Node.js: a client and a worker built from proto/floxide/v1 alone.
const { Client } = require('./client');
const { Worker, PROTOCOL_VERSION } = require('./worker');
const { floxide, toPayload, fromPayload } = require('./proto');
const { tlsFromEnv } = require('./tls');
const { tokenFromEnv } = require('./auth');
const { floxideError } = require('./errors');

module.exports = { Client, Worker, PROTOCOL_VERSION, floxide, toPayload, fromPayload, tlsFromEnv, tokenFromEnv, floxideError };
