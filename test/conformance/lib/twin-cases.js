'use strict';
// Twin conformance cases: Microsoft's service SDK (azure-iothub Registry.getTwin, Twin.update,
// Registry.updateTwin) against hubsim with our agent acknowledging desired properties, and
// Microsoft's device SDK reading and patching its own twin and receiving desired patches.
//
// The agent binary is AGENT_BIN, or "agent" next to HUBSIM_BIN (make conformance builds both).

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const { check, checkEqual, errName, describeError, poll, truncate, uniqueId, withDeadline } = require('./util');

const OP_DEADLINE_MS = 15000;
const OBSERVE_DEADLINE_MS = 15000;

function log(msg) {
  process.stderr.write(`  ${msg}\n`);
}

function agentBin() {
  if (process.env.AGENT_BIN) return path.resolve(process.env.AGENT_BIN);
  if (process.env.HUBSIM_BIN) return path.join(path.dirname(path.resolve(process.env.HUBSIM_BIN)), 'agent');
  throw new Error('set AGENT_BIN (path to the agent binary) or HUBSIM_BIN');
}

// startAgent runs our agent for a device with JSON logs; waitLog(pred) resolves with the first
// log line (parsed) that satisfies pred. extra are more lines of agent YAML.
function startAgent(ctx, deviceId, key, extra = []) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'conf-agent-'));
  const csFile = path.join(dir, 'cs');
  fs.writeFileSync(csFile, ctx.sasConnectionString(deviceId, key), { mode: 0o600 });
  const cfgFile = path.join(dir, 'agent.yaml');
  fs.writeFileSync(cfgFile, [
    `connectionStringFile: ${JSON.stringify(csFile)}`,
    `stateDir: ${JSON.stringify(path.join(dir, 'state'))}`,
    `tls:\n  caFile: ${JSON.stringify(ctx.ep.caFile)}`,
    'telemetry:\n  interval: 0s',
    'log:\n  format: json\n  level: info',
    'twin:\n  firmwareVersion: conformance\n  properties:\n    locked:\n      action: reject\n      description: read-only',
    ...extra,
    '',
  ].join('\n'), { mode: 0o600 });
  const child = spawn(agentBin(), ['run', '--config', cfgFile], { stdio: ['ignore', 'ignore', 'pipe'] });
  const lines = [];
  const waiters = [];
  let exited = null;
  let buf = '';
  child.stderr.on('data', (chunk) => {
    buf += chunk.toString('utf8');
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const raw = buf.slice(0, i);
      buf = buf.slice(i + 1);
      let line;
      try { line = JSON.parse(raw); } catch (_) { line = { msg: raw }; }
      lines.push(line);
      for (const w of waiters.slice()) {
        if (w.pred(line)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(line); }
      }
    }
  });
  const exit = new Promise((resolve) => child.on('exit', (code, signal) => {
    exited = { code, signal };
    for (const w of waiters.splice(0)) w.reject(new Error(`agent exited (${code}/${signal}) before: ${w.what}`));
    resolve();
  }));
  ctx.defer('stop agent', async () => {
    if (!exited) child.kill('SIGTERM');
    await withDeadline(exit, 8000, 'agent exit after SIGTERM').catch((e) => { child.kill('SIGKILL'); throw e; });
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const waitLog = (what, pred, from = 0) => {
    const hit = lines.slice(from).find(pred);
    if (hit) return Promise.resolve(hit);
    if (exited) return Promise.reject(new Error(`agent exited (${exited.code}) before: ${what}`));
    return withDeadline(new Promise((resolve, reject) => waiters.push({ pred, resolve, reject, what })),
      OBSERVE_DEADLINE_MS, `agent log: ${what}`).catch((e) => {
      e.lastObservation = lines.slice(-5);
      throw e;
    });
  };
  return { waitLog, lines };
}

// The service side as azure-iothub drives it, with our agent as the device.
async function serviceTwinWithAgent(ctx) {
  const id = uniqueId('twin');
  await ctx.createDevice(id);
  const key = await ctx.sasKeyOf(id);
  const agent = startAgent(ctx, id, key);
  await agent.waitLog('twin synced', (l) => l.msg === 'twin synced');
  // the agent's facts change reported (and so the etag); read the twin once they are in
  await agent.waitLog('facts confirmed', (l) => l.msg === 'reported properties confirmed');

  const twin = (await withDeadline(ctx.registry.getTwin(id), OP_DEADLINE_MS, 'Registry.getTwin')).responseBody;
  checkEqual(twin.deviceId, id, 'twin.deviceId');
  check(typeof twin.etag === 'string' && twin.etag !== '', `twin.etag: ${twin.etag}`);
  check(twin.properties && twin.properties.desired && twin.properties.desired.$metadata,
    `service twin has no properties.desired.$metadata: ${truncate(JSON.stringify(twin.properties), 300)}`);
  const v0 = twin.properties.desired.$version;

  // Twin.update sends the twin's etag quoted in If-Match and copies the result back
  await withDeadline(twin.update({ tags: { site: 'conformance' }, properties: { desired: { interval: 7, locked: 'x' } } }),
    OP_DEADLINE_MS, 'Twin.update');
  checkEqual(twin.tags.site, 'conformance', 'twin.tags.site after update');
  checkEqual(twin.properties.desired.interval, 7, 'twin.properties.desired.interval after update');
  const v1 = twin.properties.desired.$version;
  checkEqual(v1, v0 + 1, 'desired $version after update');

  // the agent acknowledges the Plug and Play way: accepted with av = desired $version, rejected with 400
  const acked = await poll(async () => {
    const t = (await ctx.registry.getTwin(id)).responseBody;
    const r = t.properties.reported;
    return r.interval && r.interval.av === v1 && r.locked ? r : undefined;
  }, { ms: OBSERVE_DEADLINE_MS, what: 'the agent\'s acks in reported' });
  checkEqual(acked.interval.ac, 200, 'interval ack ac');
  checkEqual(acked.interval.value, 7, 'interval ack value');
  checkEqual(acked.locked.ac, 400, 'locked ack ac');
  checkEqual(acked.locked.ad, 'read-only', 'locked ack ad');
  checkEqual(acked.firmwareVersion, 'conformance', 'agent fact firmwareVersion');

  // Registry.updateTwin with a stale etag: 412, PreconditionFailedError; with the fresh one: applied
  let err;
  try {
    await withDeadline(ctx.registry.updateTwin(id, { properties: { desired: { interval: 8 } } }, 'AAAAAAAAAAA='), OP_DEADLINE_MS, 'updateTwin (stale)');
  } catch (e) {
    err = e;
  }
  check(err, 'updateTwin with a stale etag resolved');
  checkEqual(err.response && err.response.statusCode, 412, `stale etag: HTTP status (${describeError(err)})`);
  checkEqual(errName(err), 'InvalidEtagError', 'stale etag: error class (azure-iothub maps 412 to it)');
  const fresh = (await ctx.registry.getTwin(id)).responseBody;
  const upd = (await withDeadline(ctx.registry.updateTwin(id, { properties: { desired: { interval: 9, locked: null } } }, fresh.etag),
    OP_DEADLINE_MS, 'updateTwin')).responseBody;
  const v2 = upd.properties.desired.$version;
  check(v2 > v1, `desired $version ${v2} after updateTwin, want > ${v1}`);
  check(!('locked' in upd.properties.desired), 'null did not delete desired.locked');
  await poll(async () => {
    const r = (await ctx.registry.getTwin(id)).responseBody.properties.reported;
    return r.interval && r.interval.av === v2 && r.interval.value === 9 && !('locked' in r) ? true : undefined;
  }, { ms: OBSERVE_DEADLINE_MS, what: `interval acked at av ${v2} and the locked ack removed` });

  // a limit violation is 400 with Azure's error shape
  err = undefined;
  try {
    await withDeadline(ctx.registry.updateTwin(id, { properties: { desired: { 'bad.key': 1 } } }, '*'), OP_DEADLINE_MS, 'updateTwin (bad key)');
  } catch (e) {
    err = e;
  }
  check(err, 'updateTwin with a key containing "." resolved');
  checkEqual(err.response && err.response.statusCode, 400, `bad key: HTTP status (${describeError(err)})`);
  checkEqual(errName(err), 'ArgumentError', `bad key: error class (${describeError(err)})`);
}

// Microsoft's device SDK against hubsim: get, reported patch, desired notifications.
async function deviceTwinSdk(ctx) {
  const id = uniqueId('dtwin');
  await ctx.createDevice(id);
  const key = await ctx.sasKeyOf(id);
  const client = ctx.deviceClient(ctx.sasConnectionString(id, key));
  await ctx.openClient(client, 'twin device');
  const twin = await withDeadline(client.getTwin(), OP_DEADLINE_MS, 'client.getTwin()');
  checkEqual(twin.properties.desired.$version, 1, 'new twin desired $version');
  checkEqual(twin.properties.reported.$version, 1, 'new twin reported $version');
  check(!('$metadata' in twin.properties.desired), 'device view carries $metadata');

  await withDeadline(new Promise((resolve, reject) => twin.properties.reported.update({ fw: { v: '1.0', ok: true }, temp: 21 },
    (e) => (e ? reject(e) : resolve()))), OP_DEADLINE_MS, 'properties.reported.update');
  await withDeadline(new Promise((resolve, reject) => twin.properties.reported.update({ fw: { ok: null }, temp: null },
    (e) => (e ? reject(e) : resolve()))), OP_DEADLINE_MS, 'properties.reported.update (null deletes)');
  const svc = (await ctx.registry.getTwin(id)).responseBody;
  checkEqual(svc.properties.reported.fw.v, '1.0', 'service view reported.fw.v');
  check(!('ok' in svc.properties.reported.fw) && !('temp' in svc.properties.reported), `null deletes: ${JSON.stringify(svc.properties.reported)}`);
  checkEqual(svc.properties.reported.$version, 3, 'reported $version after two patches');

  // a reported patch that breaks a limit fails with the hub's error
  let err;
  try {
    await withDeadline(new Promise((resolve, reject) => twin.properties.reported.update({ s: 'x'.repeat(5000) },
      (e) => (e ? reject(e) : resolve()))), OP_DEADLINE_MS, 'oversized reported update');
  } catch (e) {
    err = e;
  }
  check(err && err.name !== 'DeadlineError', `oversized string: ${err ? describeError(err) : 'accepted'}`);
  log(`[device-twin-sdk] oversized reported update: ${describeError(err)}`);

  // desired notifications, once subscribed
  const seen = [];
  let onDesired;
  const got = new Promise((resolve) => { onDesired = resolve; });
  twin.on('properties.desired', (d) => {
    seen.push(d.$version);
    if (d.color === 'blue') onDesired(d);
  });
  await poll(async () => {
    const mine = (await ctx.admin.connections()).filter((c) => c && c.deviceId === id);
    return mine.some((c) => (c.subscriptions || []).includes('$iothub/twin/PATCH/properties/desired/#')) ? true : undefined;
  }, { ms: OBSERVE_DEADLINE_MS, what: 'the desired subscription in /hubsim/connections' });
  const upd = (await withDeadline(ctx.registry.updateTwin(id, { properties: { desired: { color: 'blue' } } }, '*'),
    OP_DEADLINE_MS, 'updateTwin')).responseBody;
  const d = await withDeadline(got, OBSERVE_DEADLINE_MS, 'the desired patch on the device');
  checkEqual(d.$version, upd.properties.desired.$version, 'desired $version on the device');
}

module.exports = { serviceTwinWithAgent, deviceTwinSdk, startAgent };
