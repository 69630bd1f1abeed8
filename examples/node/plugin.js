'use strict';
// A POLKU ingestor plugin in Node.js: one event per line of the payload.
//
//   npm install && node plugin.js --registry 127.0.0.1:50051
//
// It loads the contract straight from ../../proto, serves polku.v1.IngestorPlugin,
// registers with the registry, renews its lease at the interval the registry returns
// over one KeepAlive stream (unary Heartbeat against a registry without KeepAlive,
// which answers UNIMPLEMENTED), registers again whenever a renewal is not acknowledged
// (the registry restarted with a fresh database, or the lease lapsed), and on
// SIGTERM/SIGINT unregisters, lets calls in flight finish, and exits 0.
//
// Options (each optional): --registry ADDR (else $POLKU_REGISTRY, else 127.0.0.1:50051),
// --listen HOST:PORT (127.0.0.1:0), --advertise HOST:PORT (the address to register when
// it is not the bound one: containers, NAT), --name NAME (node-lines),
// --source SOURCE (repeatable; node-lines), --lease-ttl SECONDS (0: the registry's),
// --token TOKEN (else $POLKU_REGISTRY_TOKEN: sent as `authorization: Bearer …`; refused in
// clear to anything but loopback), --tls-ca PEM (else $POLKU_REGISTRY_TLS_CA: the CA that
// verifies an https:// registry; without it, the system roots).
// Prints `listening on HOST:PORT` and `registered <id>` on stdout, the rest on stderr.
//
// Streaming (SPEC §10): it also serves polku.v1.IngestorStream, one answer per request in
// request order, and registers with the capability `ingest.stream.v1`, so the gateway
// sends over one stream instead of a unary call per payload. A failing ingest answers its
// own request (no events, one error `ingest failed: …`, details INTERNAL) and the stream
// goes on; a client that reads slowly pauses the reading of requests (backpressure).
//
// Emitter mode, `--emitter NAME`: it serves polku.v1.EmitterPlugin instead, registered
// as the emitter NAME (PLUGIN_TYPE_EMITTER, emitter_name NAME). Emit prints each event
// on stdout as `emitted {"id":…,"source":…,"type":…,"payload":…}`, once per id (the
// gateway delivers at least once: an id seen among the last 100000 is acknowledged and
// not printed again; an event without an id is refused, not retryable); Shutdown prints
// `shutdown` (the gateway closing) and keeps serving.

const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const GRACE_MS = 5000;
const CALL_TIMEOUT_MS = 5000;
const BACKOFF_INITIAL_MS = 200;
const BACKOFF_MAX_MS = 5000;

// google/protobuf/{empty,timestamp}.proto need no include directory: proto-loader's
// protobufjs bundles the well-known types.
const definition = protoLoader.loadSync('polku/v1/plugin.proto', {
  includeDirs: [PROTO_ROOT],
  keepCase: true, // field names as in the .proto: plugin_id, heartbeat_interval_seconds
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const polku = grpc.loadPackageDefinition(definition).polku;

function parseArgs(argv) {
  const args = { source: [] };
  for (let i = 0; i < argv.length; i += 2) {
    const flag = argv[i];
    const value = argv[i + 1];
    if (!flag.startsWith('--') || value === undefined) {
      throw new Error(`usage: node plugin.js [--registry ADDR] [--listen ADDR] [--advertise ADDR] [--name N] [--source S]... [--lease-ttl SECONDS] [--token T] [--tls-ca PEM] (at ${flag})`);
    }
    const key = flag.slice(2);
    if (key === 'source') args.source.push(value);
    else args[key] = value;
  }
  return args;
}

const args = parseArgs(process.argv.slice(2));
const config = {
  registry: args.registry || process.env.POLKU_REGISTRY || '127.0.0.1:50051',
  listen: args.listen || '127.0.0.1:0',
  advertise: args.advertise || '',
  leaseTtl: Number(args['lease-ttl'] || 0),
  token: args.token || process.env.POLKU_REGISTRY_TOKEN || '',
  tlsCa: args['tls-ca'] || process.env.POLKU_REGISTRY_TLS_CA || '',
};
const EMITTER = args.emitter || ''; // emitter mode: the emitter name
const INFO = EMITTER
  ? {
    name: args.name || `node-${EMITTER}`,
    version: '1.0.0',
    type: 'PLUGIN_TYPE_EMITTER',
    description: 'Node.js: events out as JSON lines on stdout',
    sources: [],
    emitter_name: EMITTER,
    capabilities: [],
  }
  : {
    name: args.name || 'node-lines',
    version: '1.0.0',
    type: 'PLUGIN_TYPE_INGESTOR',
    description: 'Node.js: one event per line',
    sources: args.source.length ? args.source : ['node-lines'],
    emitter_name: '',
    capabilities: ['ingest.stream.v1'],
  };

function log(message) {
  console.error(`${new Date().toISOString()} ${message}`);
}

// -- the plugin --------------------------------------------------------------------------

function ingest(request) {
  const data = request.data;
  const now = (BigInt(Date.now()) * 1000000n).toString();
  const events = [];
  let start = 0;
  let number = 0;
  while (start < data.length) {
    let end = data.indexOf(0x0a, start);
    if (end === -1) end = data.length;
    number += 1;
    let line = data.subarray(start, end);
    if (line.length && line[line.length - 1] === 0x0d) line = line.subarray(0, line.length - 1);
    if (line.length) {
      events.push({
        id: crypto.randomUUID(),
        timestamp_unix_ns: now,
        source: request.source,
        event_type: 'line',
        metadata: { line: String(number), offset: String(start) },
        payload: line,
      });
    }
    start = end + 1;
  }
  return { events, errors: [] };
}

// Emitter mode: each event as a JSON line, once per id (bounded memory of the ids seen).
const SEEN_MAX = 100000;
const seen = new Set();

function emit(request) {
  const response = { success_count: 0, failed_event_ids: [], errors: [] };
  for (const event of request.events) {
    if (!event.id) {
      response.errors.push({ event_id: '', message: 'an event needs an id', retryable: false });
      continue;
    }
    if (!seen.has(event.id)) {
      const line = {
        id: event.id,
        source: event.source,
        type: event.event_type,
        payload: Buffer.from(event.payload || []).toString('utf8'),
      };
      console.log(`emitted ${JSON.stringify(line)}`);
      seen.add(event.id);
      if (seen.size > SEEN_MAX) seen.delete(seen.values().next().value);
    }
    response.success_count += 1;
  }
  return response;
}

const server = new grpc.Server();
if (EMITTER) {
  server.addService(polku.v1.EmitterPlugin.service, {
    Info: (call, callback) => callback(null, INFO),
    Health: (call, callback) => callback(null, { healthy: true, message: '', components: {} }),
    Emit: (call, callback) => {
      try {
        callback(null, emit(call.request));
      } catch (err) {
        log(`emit failed: ${err.stack || err}`);
        callback({ code: grpc.status.INTERNAL, details: `emit failed: ${err.message}` });
      }
    },
    Shutdown: (call, callback) => {
      console.log('shutdown');
      callback(null, { success: true, message: 'flushed' });
    },
  });
}
if (!EMITTER) server.addService(polku.v1.IngestorPlugin.service, {
  Info: (call, callback) => callback(null, INFO),
  Health: (call, callback) => callback(null, { healthy: true, message: '', components: {} }),
  Ingest: (call, callback) => {
    try {
      callback(null, ingest(call.request));
    } catch (err) {
      log(`ingest failed: ${err.stack || err}`);
      callback({ code: grpc.status.INTERNAL, details: `ingest failed: ${err.message}` });
    }
  },
});

// One answer per request, in order: ingest is synchronous, so each is written as it comes.
function ingestStream(call) {
  call.on('data', (request) => {
    let response;
    try {
      response = ingest(request);
    } catch (err) {
      log(`ingest failed: ${err.stack || err}`);
      response = {
        events: [],
        errors: [{ message: `ingest failed: ${err.message}`, details: 'INTERNAL', offset: 0 }],
      };
    }
    if (!call.write(response)) {
      call.pause(); // the client is not reading: stop reading requests until it drains
      call.once('drain', () => call.resume());
    }
  });
  call.on('end', () => call.end());
  call.on('error', () => {}); // the client went away (cancelled, or its channel closed)
}

if (!EMITTER) server.addService(polku.v1.IngestorStream.service, { IngestStream: ingestStream });

// -- the registry ------------------------------------------------------------------------

function isLoopback(target) {
  if (target.startsWith('unix:')) return true;
  const host = target.slice(0, target.lastIndexOf(':')).replace(/^\[|\]$/g, '');
  if (host === 'localhost') return true;
  if (net.isIPv4(host)) return host.startsWith('127.');
  return host === '::1';
}

function newRegistryClient() {
  const tls = config.registry.startsWith('https://') || Boolean(config.tlsCa);
  const target = config.registry.replace(/^https?:\/\//, '');
  if (config.token && !tls && !isLoopback(target)) {
    throw new Error(`refusing to send a token in clear to ${target}: use https:// or --tls-ca`);
  }
  let credentials = tls
    ? grpc.credentials.createSsl(config.tlsCa ? fs.readFileSync(config.tlsCa) : null)
    : grpc.credentials.createInsecure();
  if (config.token) {
    const bearer = (params, callback) => {
      const metadata = new grpc.Metadata();
      metadata.set('authorization', `Bearer ${config.token}`);
      callback(null, metadata);
    };
    // grpc-js sends call credentials over TLS only; on a loopback plaintext channel
    // the token goes as per-call metadata instead.
    if (tls) {
      credentials = grpc.credentials.combineChannelCredentials(
        credentials,
        grpc.credentials.createFromMetadataGenerator(bearer),
      );
    } else {
      plainBearer = new grpc.Metadata();
      plainBearer.set('authorization', `Bearer ${config.token}`);
    }
  }
  return new polku.v1.PluginRegistry(target, credentials);
}

let plainBearer = null;

let registry = newRegistryClient();

// A channel that failed to connect waits out gRPC's reconnect backoff; a new one
// dials at once, so a restarted registry is found on the next attempt.
function resetRegistryClient() {
  closeKeepAlive();
  registry.close();
  registry = newRegistryClient();
}

function call(method, request, timeoutMs = CALL_TIMEOUT_MS) {
  return new Promise((resolve, reject) => {
    const options = { deadline: Date.now() + timeoutMs };
    const done = (err, response) => (err ? reject(err) : resolve(response));
    if (plainBearer) registry[method](request, plainBearer.clone(), options, done);
    else registry[method](request, options, done);
  });
}

// -- renewals: one KeepAlive stream, one answer per request, in order ------------------

let keepAlive = null; // { stream, waiting: [{ resolve, reject }] } while a stream is open
let keepAliveUnsupported = false; // the registry answered UNIMPLEMENTED: unary from then on

function failWaiting(state, err) {
  if (keepAlive === state) keepAlive = null;
  for (const waiter of state.waiting.splice(0)) waiter.reject(err);
}

function openKeepAlive() {
  const stream = plainBearer ? registry.KeepAlive(plainBearer.clone()) : registry.KeepAlive();
  const state = { stream, waiting: [] };
  stream.on('data', (response) => {
    const waiter = state.waiting.shift();
    if (waiter) waiter.resolve(response);
  });
  stream.on('error', (err) => failWaiting(state, err));
  stream.on('end', () => {
    const err = new Error('the registry ended the KeepAlive stream');
    err.code = grpc.status.UNAVAILABLE;
    failWaiting(state, err);
  });
  keepAlive = state;
  return state;
}

function closeKeepAlive() {
  const state = keepAlive;
  keepAlive = null;
  if (state) state.stream.cancel(); // its 'error' (CANCELLED) fails what still waits
}

function renewOverStream(id) {
  const state = keepAlive || openKeepAlive();
  return new Promise((resolve, reject) => {
    const timeout = setTimeout(() => {
      const err = new Error(`no KeepAlive answer within ${CALL_TIMEOUT_MS} ms`);
      err.code = grpc.status.DEADLINE_EXCEEDED;
      reject(err);
      if (keepAlive === state) closeKeepAlive(); // broken: the next renewal opens another
    }, CALL_TIMEOUT_MS);
    state.waiting.push({
      resolve: (response) => { clearTimeout(timeout); resolve(response); },
      reject: (err) => { clearTimeout(timeout); reject(err); },
    });
    state.stream.write({ plugin_id: id });
  });
}

// One renewal: over the stream, or unary Heartbeat against a registry without KeepAlive.
async function renew(id) {
  if (!keepAliveUnsupported) {
    try {
      return await renewOverStream(id);
    } catch (err) {
      if (err.code !== grpc.status.UNIMPLEMENTED) throw err;
      keepAliveUnsupported = true;
      log('the registry does not serve KeepAlive (an older one); heartbeating instead');
    }
  }
  return call('Heartbeat', { plugin_id: id });
}

let address = '';
let pluginId = null;
let stopping = false;
let timer = null;
let wake = null;

function sleep(ms) {
  return new Promise((resolve) => {
    wake = resolve;
    timer = setTimeout(resolve, ms);
  });
}

function* backoff() {
  let delay = BACKOFF_INITIAL_MS;
  for (;;) {
    yield delay * (0.5 + Math.random() * 0.5); // jitter: restarted plugins spread out
    delay = Math.min(BACKOFF_MAX_MS, delay * 2);
  }
}

class Refused extends Error {}

// Register, retrying with backoff until accepted. INVALID_ARGUMENT is final.
async function register() {
  const delays = backoff();
  for (let failures = 0; !stopping; failures += 1) {
    let problem;
    try {
      const response = await call('Register', {
        info: INFO,
        address,
        lease_ttl_seconds: config.leaseTtl,
        labels: {},
      });
      if (response.accepted) return response;
      problem = response.message || 'not accepted';
    } catch (err) {
      if (err.code === grpc.status.INVALID_ARGUMENT) throw new Refused(err.details);
      if (err.code === grpc.status.UNAVAILABLE) resetRegistryClient();
      problem = err.details || err.message;
    }
    if (failures === 0) log(`cannot register with ${config.registry} (${problem}); retrying`);
    await sleep(delays.next().value);
  }
  return null;
}

// Register, renew until the registry forgets this instance, and again.
async function keepRegistered() {
  while (!stopping) {
    const response = await register();
    if (!response) return;
    pluginId = response.plugin_id; // kept even when stopping: shutdown unregisters it
    if (stopping) return;
    console.log(`registered ${pluginId}`);
    let interval = (response.heartbeat_interval_seconds || 10) * 1000;
    // The interval is whole seconds: a 1 s lease is granted 1 s; renew thrice a TTL.
    if (response.lease_ttl_seconds) interval = Math.min(interval, (response.lease_ttl_seconds * 1000) / 3);
    let delay = interval;
    let delays = backoff();
    let failing = false;
    for (;;) {
      await sleep(delay);
      if (stopping) return;
      try {
        const beat = await renew(pluginId);
        if (!beat.acknowledged) {
          log(`registry no longer knows ${pluginId} (restarted or expired); registering again`);
          pluginId = null;
          break;
        }
        if (failing) log(`heartbeat of ${pluginId} acknowledged again`);
        delay = interval;
        delays = backoff();
        failing = false;
      } catch (err) {
        if (!failing) log(`heartbeat of ${pluginId} failed (${err.details || err.message}); retrying`);
        if (err.code === grpc.status.UNAVAILABLE) resetRegistryClient();
        delay = Math.min(interval, delays.next().value);
        failing = true;
      }
    }
  }
}

// -- lifecycle ---------------------------------------------------------------------------

let registration = null;
let shuttingDown = false;

// Unregister first, so the gateway stops routing here, then let calls in flight finish.
async function shutdown(exitCode) {
  if (shuttingDown) return;
  shuttingDown = true;
  stopping = true;
  clearTimeout(timer);
  if (wake) wake();
  if (registration) await registration.catch(() => {});
  if (pluginId) {
    try {
      await call('Unregister', { plugin_id: pluginId }, 2000);
      log(`unregistered ${pluginId}`);
    } catch (err) {
      log(`cannot unregister ${pluginId} (its lease will lapse): ${err.details || err.message}`);
    }
  }
  closeKeepAlive();
  registry.close();
  const force = setTimeout(() => server.forceShutdown(), GRACE_MS);
  server.tryShutdown(() => {
    clearTimeout(force);
    process.exit(exitCode);
  });
}

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    log(`${signal}: stopping`);
    shutdown(0);
  });
}

function advertisedAddress(port) {
  if (config.advertise) return config.advertise;
  const host = config.listen.slice(0, config.listen.lastIndexOf(':'));
  const wildcard = ['', '0.0.0.0', '[::]', '::'].includes(host);
  return `${wildcard ? os.hostname() : host}:${port}`;
}

server.bindAsync(config.listen, grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) {
    log(`cannot listen on ${config.listen}: ${err.message}`);
    process.exit(1);
  }
  address = advertisedAddress(port);
  console.log(`listening on ${address}`);
  registration = keepRegistered().catch((error) => {
    log(`registry refused plugin ${INFO.name}: ${error.message}`);
    shutdown(1);
  });
});
