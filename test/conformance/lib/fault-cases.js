'use strict';
// Fault injection, IoT Hub's way (shared/reference/protocol-amqp.md §6): azure-iot-device, over
// MQTT, sends a telemetry message carrying AzIoTHub_FaultOperationType=KillTcp as Microsoft's
// Node e2e tests do (e2etests/test/d2c_disconnect.js: numbers for the delay, free text for the
// reason). hubsim PUBACKs it, resets the TCP connection after the delay, logs the fault under
// GET /hubsim/faults, and the client reconnects on its next send.

const crypto = require('node:crypto');

const { Message } = require('azure-iot-device');

const { check, checkEqual, describeError, poll, truncate, uniqueId, withDeadline } = require('./util');

function log(msg) {
  process.stderr.write(`  ${msg}\n`);
}

const OP_DEADLINE_MS = 15000;
const OBSERVE_DEADLINE_MS = 15000;

async function deviceKillTcp(ctx) {
  const id = uniqueId('killtcp');
  await ctx.createDevice(id);
  const key = await ctx.sasKeyOf(id);
  const client = ctx.deviceClient(ctx.sasConnectionString(id, key));
  await ctx.openClient(client, 'KillTcp device');

  const disconnected = new Promise((resolve) => client.once('disconnect', resolve));

  const fault = new Message('');
  fault.messageId = 'fault-' + crypto.randomUUID();
  fault.properties.add('AzIoTHub_FaultOperationType', 'KillTcp');
  fault.properties.add('AzIoTHub_FaultOperationCloseReason', ' severs the TCP connection ');
  fault.properties.add('AzIoTHub_FaultOperationDelayInSecs', 1);
  // The fault message is acknowledged before the fault starts: sendEvent resolves.
  await withDeadline(client.sendEvent(fault), OP_DEADLINE_MS, 'client.sendEvent(KillTcp fault message)');

  const d = await withDeadline(disconnected, OBSERVE_DEADLINE_MS, "the client's 'disconnect' event after KillTcp");
  log(`[${ctx.name}] disconnect event: ${describeError(d && d.transportError ? d.transportError : d)}`);

  let faults;
  await poll(async () => {
    const r = await ctx.admin.request('GET', '/hubsim/faults');
    checkEqual(r.status, 200, `GET /hubsim/faults status (${truncate(r.text, 200)})`);
    faults = r.json;
    return (faults.log || []).some((f) => f.deviceId === id && f.type === 'KillTcp' && f.action === 'tcp-reset') ? true : undefined;
  }, { ms: OBSERVE_DEADLINE_MS, what: `a KillTcp tcp-reset record for ${id} in GET /hubsim/faults` }).catch((e) => {
    e.lastObservation = faults;
    throw e;
  });
  const rec = faults.log.find((f) => f.deviceId === id && f.type === 'KillTcp');
  checkEqual(rec.reason, ' severs the TCP connection ', 'close reason in the fault log');

  // The client reconnects for the next send, and the message arrives.
  const after = new Message(JSON.stringify({ after: 'KillTcp' }));
  after.messageId = 'after-' + crypto.randomUUID();
  await withDeadline(client.sendEvent(after), OP_DEADLINE_MS + 10000, 'client.sendEvent after KillTcp (reconnect)');
  const msgs = await ctx.waitForEvents(id, 2);
  const mids = msgs.map((m) => (m.systemProperties || {})['message-id']);
  check(mids.includes(fault.messageId), `the fault message was not recorded: ${JSON.stringify(mids)}`);
  check(mids.includes(after.messageId), `the message after the reconnect was not recorded: ${JSON.stringify(mids)}`);
  const conns = (await ctx.admin.connections()).filter((c) => c && c.deviceId === id);
  checkEqual(conns.length, 1, `connections of ${id} after the reconnect (${truncate(JSON.stringify(conns), 300)})`);
}

module.exports = { deviceKillTcp };
