'use strict';
// hubsim's IoT Hub tier throttles (docs/hubsim.md "Scale and throttling"): with hubsim throttling
// as one S1 unit (switched on at run time through POST /hubsim/throttle, so the other cases run
// unthrottled), Microsoft's service SDK (azure-iothub Registry) gets HTTP 429 for registry calls
// over 100 a minute and turns it into its ThrottlingError, as it does for IoT Hub
// (azure-iot-http-base rest_api_client.js translateError); hubsim counts the refusals.

const { check, checkEqual, describeError, errName, truncate, withDeadline } = require('./util');

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

module.exports = { serviceThrottled429 };
