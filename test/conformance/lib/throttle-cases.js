'use strict';
// hubsim's IoT Hub tier throttles (docs/hubsim.md "Scale and throttling"): with hubsim throttling
// as one S1 unit (switched on at run time through POST /hubsim/throttle, so the other cases run
// unthrottled), Microsoft's service SDK (azure-iothub Registry) gets HTTP 429 for registry calls
// over 100 a minute and turns it into its ThrottlingError, as it does for IoT Hub
// (azure-iot-http-base rest_api_client.js translateError); hubsim counts the refusals. And on the
// device side: a CONNECT over the connect rate gets CONNACK 3, which azure-iot-device-mqtt turns
// into ServiceUnavailableError (mqtt_translate_error.js) and azure-iot-device retries
// (retry_error_filter.js), so open() succeeds once the bucket refills.

const { check, checkEqual, describeError, errName, poll, truncate, withDeadline } = require('./util');

const OP_DEADLINE_MS = 15000;
const PARALLEL = 6;

function log(msg) {
  process.stderr.write(`  ${msg}\n`);
}

async function serviceThrottled429(ctx) {
  const id = ctx.name + '-' + Date.now().toString(36);
  await ctx.createDevice(id);

  let r = await ctx.admin.request('POST', '/hubsim/throttle', { tier: 'S1', units: 1 });
  checkEqual(r.status, 200, `POST /hubsim/throttle status (${truncate(r.text, 200)})`);
  checkEqual(r.json.tier, 'S1', 'tier after POST /hubsim/throttle');
  ctx.defer('throttling off', async () => {
    const d = await ctx.admin.request('DELETE', '/hubsim/throttle');
    checkEqual(d.status, 200, 'DELETE /hubsim/throttle status');
  });

  // S1's registry bucket holds 1.67 calls and refills at 1.67/s: of six calls sent at once, at
  // most the first one or two (more only if the calls spread over seconds) can pass.
  const calls = [];
  for (let i = 0; i < PARALLEL; i++) {
    calls.push(withDeadline(ctx.registry.get(id), OP_DEADLINE_MS, `Registry.get #${i + 1}`));
  }
  const results = await Promise.allSettled(calls);
  const ok = results.filter((x) => x.status === 'fulfilled').length;
  const errs = results.filter((x) => x.status === 'rejected').map((x) => x.reason);
  log(`[${ctx.name}] ${ok} of ${PARALLEL} Registry.get calls passed; errors: ${errs.map(describeError).join(' | ')}`);
  check(ok >= 1, 'no Registry.get passed on a full S1 bucket');
  check(errs.length >= 1, `all ${PARALLEL} parallel Registry.get calls passed under S1 (100/min)`);
  for (const err of errs) {
    checkEqual(errName(err), 'ThrottlingError', `SDK error type (${describeError(err)})`);
    checkEqual(err.response && err.response.statusCode, 429, `HTTP status (${describeError(err)})`);
    check(String(err.responseBody || '').includes('ThrottlingException'), `response body lacks ThrottlingException: ${describeError(err)}`);
  }

  r = await ctx.admin.request('GET', '/hubsim/throttle');
  checkEqual(r.status, 200, 'GET /hubsim/throttle status');
  const reg = (r.json.operations || []).find((o) => o.op === 'registry');
  check(reg, `no registry row in ${truncate(r.text, 300)}`);
  checkEqual(reg.throttled, errs.length, 'registry calls hubsim counts as throttled');
  checkEqual(reg.allowed, ok, 'registry calls hubsim counts as allowed');
}

// deviceConnack3Retried: S1 with the connect rate lowered to one token per 1,000 s (a bucket of
// one): the first device takes the token; the second is refused with CONNACK 3, and the SDK keeps
// retrying. Once hubsim has counted a refusal, the tier is set again without the override (full
// buckets at S1's 100/s) and the second device's retry gets through. Nothing else connects.
async function deviceConnack3Retried(ctx) {
  const ids = [0, 1].map((i) => `${ctx.name}-${i}-${Date.now().toString(36)}`);
  const keys = [];
  for (const id of ids) {
    await ctx.createDevice(id);
    keys.push(await ctx.sasKeyOf(id)); // registry calls before throttling starts
  }
  const connectRow = async () => {
    const g = await ctx.admin.request('GET', '/hubsim/throttle');
    checkEqual(g.status, 200, 'GET /hubsim/throttle status');
    const row = (g.json.operations || []).find((o) => o.op === 'connect');
    check(row, `no connect row in ${truncate(g.text, 300)}`);
    return row;
  };
  let r = await ctx.admin.request('POST', '/hubsim/throttle', { tier: 'S1', units: 1, limits: { connect: 0.001 } });
  checkEqual(r.status, 200, `POST /hubsim/throttle status (${truncate(r.text, 200)})`);
  ctx.defer('throttling off', async () => {
    const d = await ctx.admin.request('DELETE', '/hubsim/throttle');
    checkEqual(d.status, 200, 'DELETE /hubsim/throttle status');
  });
  const clients = ids.map((id, i) => ctx.deviceClient(ctx.sasConnectionString(id, keys[i])));
  await ctx.openClient(clients[0], 'first device');
  let openErr;
  const second = clients[1].open().catch((e) => { openErr = e; });
  const refused = await poll(async () => {
    const row = await connectRow();
    check(!openErr, `the second device's open() failed instead of retrying: ${describeError(openErr)}`);
    return row.throttled >= 1 ? row : undefined;
  }, { ms: OP_DEADLINE_MS, what: 'a CONNECT refused (throttled) in GET /hubsim/throttle' });
  checkEqual(refused.allowed, 1, 'CONNECTs allowed on the one-token bucket');
  log(`[${ctx.name}] refused so far: ${refused.throttled}; lifting the override`);

  r = await ctx.admin.request('POST', '/hubsim/throttle', { tier: 'S1', units: 1 });
  checkEqual(r.status, 200, 'POST /hubsim/throttle (S1, no override)');
  await withDeadline(second, OP_DEADLINE_MS + 5000, "the second device's open() after the bucket refilled");
  check(!openErr, `the second device's open() failed: ${describeError(openErr)}`);
  const after = await connectRow();
  check(after.allowed >= 1, `no CONNECT allowed after the override was lifted: ${JSON.stringify(after)}`);

  r = await ctx.admin.request('GET', '/hubsim/connections');
  const connected = ((r.json && r.json.connections) || []).map((c) => c.deviceId);
  for (const id of ids) check(connected.includes(id), `${id} not in /hubsim/connections: ${JSON.stringify(connected)}`);
}

module.exports = { serviceThrottled429, deviceConnack3Retried };
