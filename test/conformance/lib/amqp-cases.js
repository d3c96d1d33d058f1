'use strict';
// Cloud-to-device over AMQP (protocol-amqp.md §1-§3): Microsoft's service SDK (azure-iothub
// Client.send and getFeedbackReceiver, over amqps to hubsim's --amqp-addr) sending to a device
// connected with azure-iot-device over MQTT and over MqttWs (MQTT over WebSockets), with positive
// feedback after the device completes.

const crypto = require('node:crypto');
const { Client: ServiceClient } = require('azure-iothub');
const { Message } = require('azure-iot-common');

const { check, checkEqual, describeError, errName, withDeadline } = require('./util');
const { wsClient } = require('./ws-cases');

const OP_DEADLINE_MS = 20000;
const OBSERVE_DEADLINE_MS = 15000;

function log(msg) {
  process.stderr.write(`  ${msg}\n`);
}

async function c2dAmqpFeedback(ctx) {
  return c2dFeedbackVia(ctx, (id, key) => ctx.deviceClient(ctx.sasConnectionString(id, key)));
}

async function c2dAmqpFeedbackMqttWs(ctx) {
  return c2dFeedbackVia(ctx, (id, key) => wsClient(ctx, id, key));
}

// c2dFeedbackVia sends over AMQP to a device client that newDevice(id, key) builds.
async function c2dFeedbackVia(ctx, newDevice) {
  check(ctx.ep.amqpAddress, 'endpoints.json has no amqpAddress');
  const id = ctx.name.replace(/[^a-z0-9-]/g, '') + '-' + crypto.randomUUID().slice(0, 8);
  await ctx.createDevice(id);
  const key = await ctx.sasKeyOf(id);
  const device = newDevice(id, key);
  await ctx.openClient(device, 'C2D device');
  let onMessage;
  const received = new Promise((resolve) => { onMessage = resolve; });
  device.on('message', (m) => onMessage(m)); // the SDK subscribes; hubsim queues until then

  // The service client dials amqps://<HostName>, port 5671 (hubsim's default --amqp-addr).
  const svc = ServiceClient.fromConnectionString(ctx.ep.serviceConnectionString);
  ctx.defer('close service client', async () => { await withDeadline(svc.close(), 5000, 'Client.close').catch(() => {}); });
  await withDeadline(svc.open(), OP_DEADLINE_MS, 'Client.open (AMQP connect and put-token)');
  const fr = await withDeadline(svc.getFeedbackReceiver(), OP_DEADLINE_MS, 'getFeedbackReceiver');
  const receiver = fr.result || fr; // the promise form resolves to {result, message}
  const records = [];
  let onFeedback;
  const feedback = new Promise((resolve) => { onFeedback = resolve; });
  receiver.on('message', (m) => {
    let batch;
    try {
      batch = JSON.parse(Buffer.from(m.data).toString('utf8'));
    } catch (err) {
      log(`[${ctx.name}] feedback body is not JSON: ${describeError(err)}`);
      return;
    }
    records.push(...batch);
    if (records.some((r) => r.originalMessageId === sent.messageId)) onFeedback();
  });
  receiver.on('errorReceived', (err) => log(`[${ctx.name}] feedback receiver error: ${describeError(err)}`));

  const sent = new Message('hello over amqp ' + crypto.randomUUID());
  sent.messageId = 'amqp-mid-' + crypto.randomUUID();
  sent.correlationId = 'amqp-cid-1';
  sent.ack = 'positive';
  sent.properties.add('k', 'v');
  const r = await withDeadline(svc.send(id, sent), OP_DEADLINE_MS, 'Client.send');
  // the promise form resolves to {result, message}; result is common-core's MessageEnqueued
  checkEqual(r && r.result && r.result.constructor && r.result.constructor.name, 'MessageEnqueued', 'Client.send result');

  const m = await withDeadline(received, OBSERVE_DEADLINE_MS, 'the C2D message on the device');
  checkEqual(Buffer.from(m.data).toString('utf8'), sent.data, 'msg.data');
  checkEqual(m.messageId, sent.messageId, 'msg.messageId');
  checkEqual(m.correlationId, sent.correlationId, 'msg.correlationId');
  checkEqual(m.properties.getValue('k'), 'v', "msg.properties.getValue('k')");
  checkEqual(m.properties.getValue('iothub-ack'), 'positive', "msg.properties.getValue('iothub-ack')");
  await withDeadline(device.complete(m), OP_DEADLINE_MS, 'client.complete(msg)');

  await withDeadline(feedback, OBSERVE_DEADLINE_MS, 'feedback for the completed message');
  const rec = records.find((x) => x.originalMessageId === sent.messageId);
  checkEqual(rec.statusCode, 'Success', 'feedback statusCode');
  checkEqual(rec.description, 'Success', 'feedback description');
  checkEqual(rec.deviceId, id, 'feedback deviceId');
  check(!Number.isNaN(Date.parse(rec.enqueuedTimeUtc)), `feedback enqueuedTimeUtc ${rec.enqueuedTimeUtc}`);

  // Azure's refusals arrive as the SDK's typed errors.
  let err;
  try {
    await withDeadline(svc.send('no-such-device-' + crypto.randomUUID().slice(0, 8), new Message('x')), OP_DEADLINE_MS, 'Client.send to nobody');
  } catch (e) {
    err = e;
  }
  check(err && err.name !== 'DeadlineError', `send to an unknown device: ${err ? describeError(err) : 'succeeded'}`);
  checkEqual(errName(err), 'DeviceNotFoundError', `send to an unknown device (${describeError(err)})`);
}

module.exports = { c2dAmqpFeedback, c2dAmqpFeedbackMqttWs };
