'use strict';
// Small helpers shared by the conformance cases: deadlines, polling, ids, the
// connection-string parser and a client for hubsim's /hubsim/ admin API.

const crypto = require('node:crypto');
const fs = require('node:fs');
const https = require('node:https');
const { SharedAccessSignature } = require('azure-iothub');

class DeadlineError extends Error {
  constructor(what, ms) {
    super(`timed out after ${ms} ms waiting for ${what}`);
    this.name = 'DeadlineError';
  }
}

// withDeadline resolves/rejects like `promise`, or rejects with a DeadlineError
// once `ms` have passed. The timer never keeps the process alive.
function withDeadline(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new DeadlineError(what, ms)), ms);
    timer.unref();
  });
  return Promise.race([Promise.resolve(promise), timeout]).finally(() => clearTimeout(timer));
}

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// poll calls `fn` until it returns a value other than undefined/false, every
// `intervalMs`, and rejects with a DeadlineError (plus the last observation) after `ms`.
async function poll(fn, { ms, intervalMs = 100, what }) {
  const end = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last !== undefined && last !== false && last !== null) return last;
    if (Date.now() >= end) {
      const err = new DeadlineError(what, ms);
      err.lastObservation = last;
      throw err;
    }
    await delay(intervalMs);
  }
}

// uniqueId makes a device id that does not clash across runs against a kept state dir.
function uniqueId(prefix) {
  return `conf-${prefix}-${Date.now().toString(36)}-${crypto.randomBytes(3).toString('hex')}`;
}

// parseConnectionString splits "K=V;K2=V2" (values may contain '=').
function parseConnectionString(cs) {
  const out = {};
  for (const part of cs.split(';')) {
    if (!part) continue;
    const i = part.indexOf('=');
    if (i < 0) continue;
    out[part.slice(0, i)] = part.slice(i + 1);
  }
  return out;
}

// splitHostPort("127.0.0.1:8883") → { host: '127.0.0.1', port: 8883 }; handles [::1]:p.
function splitHostPort(addr) {
  const m = /^\[?([^\]]*?)\]?:(\d+)$/.exec(addr);
  if (!m) throw new Error(`not a host:port address: ${JSON.stringify(addr)}`);
  return { host: m[1], port: Number(m[2]) };
}

function errName(err) {
  if (!err) return String(err);
  return err.name && err.name !== 'Error' ? err.name : (err.constructor && err.constructor.name) || 'Error';
}

function describeError(err) {
  if (!err) return String(err);
  let s = `${errName(err)}: ${err.message}`;
  if (err.response && err.response.statusCode) s += ` (HTTP ${err.response.statusCode})`;
  if (err.responseBody) s += ` body=${truncate(String(err.responseBody), 300)}`;
  if (err.lastObservation !== undefined) s += ` last=${truncate(JSON.stringify(err.lastObservation), 300)}`;
  return s;
}

function truncate(s, n) {
  return s.length > n ? s.slice(0, n) + '…' : s;
}

class AssertionError extends Error {
  constructor(message) {
    super(message);
    this.name = 'AssertionError';
  }
}

// deleteLater defers a service-side delete to the end of the case; a 404 (already gone) is
// fine.
function deleteLater(ctx, what, fn) {
  ctx.defer(what, async () => {
    try {
      await fn();
    } catch (err) {
      if (!(err && err.response && err.response.statusCode === 404)) throw err;
    }
  });
}

function check(cond, message) {
  if (!cond) throw new AssertionError(message);
}

function checkEqual(actual, expected, what) {
  if (actual !== expected) {
    throw new AssertionError(`${what}: got ${JSON.stringify(actual)}, want ${JSON.stringify(expected)}`);
  }
}

// loadEndpoints reads <state>/endpoints.json and derives what the cases need.
function loadEndpoints(file) {
  const ep = JSON.parse(fs.readFileSync(file, 'utf8'));
  for (const k of ['hubHostName', 'mqttAddress', 'httpsAddress', 'serviceConnectionString', 'caFile']) {
    if (typeof ep[k] !== 'string' || ep[k] === '') throw new Error(`${file}: missing or empty "${k}"`);
  }
  const cs = parseConnectionString(ep.serviceConnectionString);
  for (const k of ['HostName', 'SharedAccessKeyName', 'SharedAccessKey']) {
    if (!cs[k]) throw new Error(`${file}: serviceConnectionString lacks ${k}`);
  }
  return { ...ep, svc: cs, mqtt: splitHostPort(ep.mqttAddress), https: splitHostPort(ep.httpsAddress) };
}

// HubsimAdmin talks to the /hubsim/ additions over HTTPS with a service SAS token
// signed exactly as azure-iothub signs its own (sr = HostName verbatim, skn = policy).
class HubsimAdmin {
  constructor(ep) {
    this.ep = ep;
    // Keep-alive off: every request gets its own socket, so nothing lingers at exit.
    this.agent = new https.Agent({ keepAlive: false });
  }

  token() {
    const expiry = Math.ceil(Date.now() / 1000 + 3600);
    return SharedAccessSignature.create(this.ep.svc.HostName, this.ep.svc.SharedAccessKeyName,
      this.ep.svc.SharedAccessKey, expiry).toString();
  }

  // request resolves { status, headers, text, json } for any status; it rejects only on
  // transport errors or after `timeoutMs`.
  request(method, path, body, timeoutMs = 10000) {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    const headers = { authorization: this.token(), accept: 'application/json' };
    if (payload) {
      headers['content-type'] = 'application/json; charset=utf-8';
      headers['content-length'] = payload.length;
    }
    const p = new Promise((resolve, reject) => {
      const req = https.request({
        // Dial the advertised HTTPS address, but verify the certificate for the hub host
        // name, as the SDKs do when they dial https://<HostName>.
        host: this.ep.https.host,
        port: this.ep.https.port,
        servername: this.ep.hubHostName,
        method,
        path,
        headers: { ...headers, host: this.ep.hubHostName },
        agent: this.agent,
      }, (res) => {
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          let json;
          try { json = text ? JSON.parse(text) : undefined; } catch (_) { json = undefined; }
          resolve({ status: res.statusCode, headers: res.headers, text, json });
        });
        res.on('error', reject);
      });
      req.on('error', reject);
      req.setTimeout(timeoutMs, () => req.destroy(new DeadlineError(`${method} ${path}`, timeoutMs)));
      if (payload) req.write(payload);
      req.end();
    });
    return withDeadline(p, timeoutMs + 1000, `${method} ${path}`);
  }

  async events(deviceId) {
    const path = `/hubsim/devices/${encodeURIComponent(deviceId)}/messages/events`;
    const r = await this.request('GET', path);
    if (r.status !== 200) throw new AssertionError(`GET ${path}: HTTP ${r.status} ${truncate(r.text, 300)}`);
    check(r.json && Array.isArray(r.json.messages), `GET ${path}: no "messages" array in ${truncate(r.text, 300)}`);
    return r.json.messages;
  }

  async connections() {
    const r = await this.request('GET', '/hubsim/connections');
    if (r.status !== 200) throw new AssertionError(`GET /hubsim/connections: HTTP ${r.status} ${truncate(r.text, 300)}`);
    check(r.json && Array.isArray(r.json.connections), `GET /hubsim/connections: no "connections" array in ${truncate(r.text, 300)}`);
    return r.json.connections;
  }

  async sendC2D(deviceId, msg) {
    const path = `/hubsim/devices/${encodeURIComponent(deviceId)}/messages/devicebound`;
    return this.request('POST', path, msg);
  }
}

module.exports = {
  AssertionError,
  DeadlineError,
  HubsimAdmin,
  check,
  checkEqual,
  delay,
  deleteLater,
  describeError,
  errName,
  loadEndpoints,
  parseConnectionString,
  poll,
  splitHostPort,
  truncate,
  uniqueId,
  withDeadline,
};
