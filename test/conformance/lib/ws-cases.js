'use strict';
// MQTT over WebSockets: Microsoft's device SDK with azure-iot-device-mqtt's MqttWs transport,
// unmodified, against hubsim's wss://<host>:443/$iothub/websocket (shared/reference/
// protocol-amqp.md §5). MqttWs always dials port 443 (mqtt_ws.js _getBaseTransportConfig), so
// the connection string carries no GatewayHostName and the device reaches hubsim's HTTPS port.

const crypto = require('node:crypto');

const { Client: DeviceClient, Message } = require('azure-iot-device');
const { MqttWs } = require('azure-iot-device-mqtt');

const { check, checkEqual, describeError, errName, poll, truncate, uniqueId, withDeadline } = require('./util');

const OPEN_DEADLINE_MS = 20000;
const OP_DEADLINE_MS = 15000;
const OBSERVE_DEADLINE_MS = 10000;

function log(msg) {
  process.stderr.write(`  ${msg}\n`);
}

// wsClient builds a MqttWs device client and schedules its close.
function wsClient(ctx, deviceId, key) {
  const cs = `HostName=${ctx.ep.hubHostName};DeviceId=${deviceId};SharedAccessKey=${key}`;
  const client = DeviceClient.fromConnectionString(cs, MqttWs);
  client.on('error', (err) => log(`[${ctx.name}] device client 'error': ${describeError(err)}`));
  ctx.defer('close MqttWs device client', async () => {
    client.removeAllListeners('message');
    try {
      await withDeadline(client.close(), 8000, 'client.close()');
    } finally {
      // As in cases.js: a half-closed socket must not keep the process alive.
      // Private fields: azure-iot-device-mqtt Mqtt._mqtt (MqttBase) → _mqttClient (mqtt.js).
      const mc = client._transport && client._transport._mqtt && client._transport._mqtt._mqttClient;
      if (mc && mc.stream && !mc.stream.destroyed) mc.stream.destroy();
    }
  });
  return client;
}

// A device on MqttWs: hubsim lists its connection as mqtt-ws, records its telemetry with the
// hub's stamps, and delivers a cloud-to-device message that the device completes.
async function deviceMqttWs(ctx) {
  const id = uniqueId('mqttws');
  await ctx.createDevice(id);
  const key = await ctx.sasKeyOf(id);
  const client = wsClient(ctx, id, key);
  await withDeadline(client.open(), OPEN_DEADLINE_MS, 'MqttWs client.open()');

  let onMessage;
  const received = new Promise((resolve) => { onMessage = resolve; });
  client.on('message', (m) => onMessage(m)); // 'newListener' makes the SDK subscribe

  const topic = `devices/${id}/messages/devicebound/#`;
  let mine;
  await poll(async () => {
    mine = (await ctx.admin.connections()).filter((c) => c && c.deviceId === id);
    return mine.some((c) => Array.isArray(c.subscriptions) && c.subscriptions.includes(topic)) ? true : undefined;
  }, { ms: OBSERVE_DEADLINE_MS, what: `subscription ${topic} in /hubsim/connections` }).catch((e) => {
    e.lastObservation = mine;
    throw e;
  });
  checkEqual(mine[0].transport, 'mqtt-ws', `transport of the connection in /hubsim/connections (${truncate(JSON.stringify(mine), 300)})`);

  const body = JSON.stringify({ over: 'websocket', n: 1 });
  const msg = new Message(body);
  msg.messageId = 'ws-mid-' + crypto.randomUUID();
  msg.contentType = 'application/json';
  msg.contentEncoding = 'utf-8';
  msg.properties.add('via', 'MqttWs');
  await withDeadline(client.sendEvent(msg), OP_DEADLINE_MS, 'client.sendEvent');
  const msgs = await ctx.waitForEvents(id, 1);
  const rec = msgs[0];
  checkEqual(Buffer.from(rec.body || '', 'base64').toString('utf8'), body, 'recorded body');
  checkEqual((rec.properties || {}).via, 'MqttWs', 'properties.via');
  const sys = rec.systemProperties || {};
  checkEqual(sys['message-id'], msg.messageId, 'systemProperties["message-id"]');
  checkEqual(sys['iothub-connection-device-id'], id, 'systemProperties["iothub-connection-device-id"]');

  const sent = { body: 'to the websocket ' + crypto.randomUUID(), messageId: 'ws-c2d-' + crypto.randomUUID(), properties: { k: 'v' } };
  const r = await ctx.admin.sendC2D(id, sent);
  checkEqual(r.status, 202, `POST devicebound status (body ${truncate(r.text, 200)})`);
  const m = await withDeadline(received, OBSERVE_DEADLINE_MS, 'the C2D message on the MqttWs device');
  checkEqual(Buffer.from(m.data).toString('utf8'), sent.body, 'msg.data');
  checkEqual(m.messageId, sent.messageId, 'msg.messageId');
  checkEqual(m.properties.getValue('k'), 'v', "msg.properties.getValue('k')");
  await withDeadline(client.complete(m), OP_DEADLINE_MS, 'client.complete(msg)');
  await poll(async () => {
    const dev = (await ctx.registry.get(id)).responseBody;
    return dev.cloudToDeviceMessageCount === 0 ? true : undefined;
  }, { ms: OBSERVE_DEADLINE_MS, what: 'cloudToDeviceMessageCount back to 0 after complete' });
}

// A wrong key over MqttWs is refused as over MQTT/TLS (CONNACK 5 → UnauthorizedError).
async function deviceMqttWsWrongKey(ctx) {
  const id = uniqueId('mqttws-bad');
  await ctx.createDevice(id);
  const client = wsClient(ctx, id, crypto.randomBytes(32).toString('base64'));
  let err;
  try {
    await withDeadline(client.open(), OPEN_DEADLINE_MS, 'MqttWs client.open() with a wrong key');
  } catch (e) { err = e; }
  check(err, 'open with a wrong key succeeded');
  check(err.name !== 'DeadlineError', `open with a wrong key did not settle: ${err.message}`);
  checkEqual(errName(err), 'UnauthorizedError', `error class (${describeError(err)})`);
  // The SDK maps any failed connect to UnauthorizedError; require the CONNACK refusal itself.
  check(/Connection refused: (Not authorized|Bad username or password)/.test(err.message),
    `not a CONNACK refusal: ${describeError(err)}`);
}

module.exports = { deviceMqttWs, deviceMqttWsWrongKey, wsClient };
