'use strict';
// Direct-method conformance cases: Microsoft's service SDK (azure-iothub Client.invokeDeviceMethod)
// calling our agent's handlers through hubsim (success, unknown method, timeout, device offline),
// and Microsoft's device SDK (onDeviceMethod) answering the calls hubsim delivers.

const { Client: ServiceClient } = require('azure-iothub');

const { check, checkEqual, errName, describeError, poll, uniqueId, withDeadline } = require('./util');
const { startAgent } = require('./twin-cases');

const OP_DEADLINE_MS = 20000;
const OBSERVE_DEADLINE_MS = 15000;

function serviceClient(ctx) {
  const svc = ServiceClient.fromConnectionString(ctx.ep.serviceConnectionString);
  ctx.defer('close service client', async () => { await withDeadline(svc.close(), 5000, 'Client.close').catch(() => {}); });
  return svc;
}

// invoke resolves with the device's result, or with {err} when the call rejects.
async function invoke(svc, id, params, what) {
  try {
    const r = await withDeadline(svc.invokeDeviceMethod(id, params), OP_DEADLINE_MS, what);
    return { result: r.result };
  } catch (err) {
    check(err.name !== 'DeadlineError', `${what}: did not settle`);
    return { err };
  }
}

function bodyOf(err) {
  const b = err && err.responseBody;
  return typeof b === 'string' ? b : JSON.stringify(b);
}

// Our agent as the device, with scripted methods; Microsoft's service SDK as the caller.
async function serviceMethodWithAgent(ctx) {
  const id = uniqueId('meth');
  await ctx.createDevice(id);
  const key = await ctx.sasKeyOf(id);
  const agent = startAgent(ctx, id, key, [
    'methods:',
    '  echo:',
    '    echo: true',
    '  busy:',
    '    status: 503',
    '    payload: {reason: busy}',
    '  hang:',
    '    delay: 1h',
    'methodTimeout: 20s',
  ]);
  // the agent subscribes to methods before its first twin GET
  await agent.waitLog('twin synced', (l) => l.msg === 'twin synced');
  const svc = serviceClient(ctx);

  let r = await invoke(svc, id, { methodName: 'echo', payload: { a: 1, b: ['x', null] }, responseTimeoutInSeconds: 10 }, 'invoke echo');
  check(r.result, `echo rejected: ${describeError(r.err)}`);
  checkEqual(r.result.status, 200, 'echo status');
  checkEqual(JSON.stringify(r.result.payload), '{"a":1,"b":["x",null]}', 'echo payload');

  r = await invoke(svc, id, { methodName: 'busy', responseTimeoutInSeconds: 10 }, 'invoke busy');
  check(r.result, `busy rejected: ${describeError(r.err)}`);
  checkEqual(r.result.status, 503, 'scripted status');
  checkEqual(r.result.payload && r.result.payload.reason, 'busy', 'scripted payload');

  // an unknown method is the device's 501, which the SDK resolves as a result
  r = await invoke(svc, id, { methodName: 'noSuchMethod', payload: {}, responseTimeoutInSeconds: 10 }, 'invoke unknown');
  check(r.result, `unknown method rejected: ${describeError(r.err)}`);
  checkEqual(r.result.status, 501, 'unknown method status');

  // a handler that does not answer in time: 504, GatewayTimeoutError, 504101
  r = await invoke(svc, id, { methodName: 'hang', responseTimeoutInSeconds: 5 }, 'invoke hang');
  check(r.err, `hang resolved: ${JSON.stringify(r.result)}`);
  checkEqual(r.err.response && r.err.response.statusCode, 504, `hang: HTTP status (${describeError(r.err)})`);
  checkEqual(errName(r.err), 'GatewayTimeoutError', `hang: error class (${describeError(r.err)})`);
  check(bodyOf(r.err).includes('504101'), `hang: body has no 504101: ${bodyOf(r.err)}`);

  // a device that is not connected: 404 with 404103 in the nested Message
  const off = uniqueId('methoff');
  await ctx.createDevice(off);
  r = await invoke(svc, off, { methodName: 'echo', payload: null, responseTimeoutInSeconds: 5, connectTimeoutInSeconds: 0 }, 'invoke offline');
  check(r.err, `offline device resolved: ${JSON.stringify(r.result)}`);
  checkEqual(r.err.response && r.err.response.statusCode, 404, `offline: HTTP status (${describeError(r.err)})`);
  check(bodyOf(r.err).includes('404103'), `offline: body has no 404103: ${bodyOf(r.err)}`);
}

// Microsoft's device SDK answering calls that hubsim delivers.
async function deviceMethodSdk(ctx) {
  const id = uniqueId('dmeth');
  await ctx.createDevice(id);
  const key = await ctx.sasKeyOf(id);
  const client = ctx.deviceClient(ctx.sasConnectionString(id, key));
  await ctx.openClient(client, 'method device');
  const seen = [];
  client.onDeviceMethod('reboot', (req, res) => {
    seen.push(req.requestId);
    res.send(200, { ok: true, got: req.payload, method: req.methodName }, () => {});
  });
  client.onDeviceMethod('refuse', (req, res) => res.send(409, 'not now', () => {}));
  await poll(async () => {
    const mine = (await ctx.admin.connections()).filter((c) => c && c.deviceId === id);
    return mine.some((c) => (c.subscriptions || []).includes('$iothub/methods/POST/#')) ? true : undefined;
  }, { ms: OBSERVE_DEADLINE_MS, what: 'the methods subscription in /hubsim/connections' });
  const svc = serviceClient(ctx);

  let r = await invoke(svc, id, { methodName: 'reboot', payload: { a: 1 }, responseTimeoutInSeconds: 10 }, 'invoke reboot');
  check(r.result, `reboot rejected: ${describeError(r.err)}`);
  checkEqual(r.result.status, 200, 'device SDK status');
  checkEqual(JSON.stringify(r.result.payload), '{"ok":true,"got":{"a":1},"method":"reboot"}', 'device SDK payload');
  checkEqual(seen.length, 1, 'handler calls');
  check(typeof seen[0] === 'string' && seen[0] !== '', `requestId ${seen[0]}`);

  r = await invoke(svc, id, { methodName: 'refuse', responseTimeoutInSeconds: 10 }, 'invoke refuse');
  check(r.result, `refuse rejected: ${describeError(r.err)}`);
  checkEqual(r.result.status, 409, 'device SDK error status');
  checkEqual(r.result.payload, 'not now', 'device SDK string payload');
}

module.exports = { serviceMethodWithAgent, deviceMethodSdk };
