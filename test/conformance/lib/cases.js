'use strict';
// The conformance cases. Run by run.js in a child process that already has
// NODE_EXTRA_CA_CERTS pointing at hubsim's CA (Node reads it only at start-up).
//
//   HUBSIM_ENDPOINTS=<state>/endpoints.json node lib/cases.js
//
// Prints one "PASS <name>" or "FAIL <name>: <reason>" line per case, then
// "N passed, M failed"; exits 1 if any case failed. Diagnostics go to stderr.

const { execFile } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { promisify } = require('node:util');

const { Registry } = require('azure-iothub');
const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt: ProvMqtt } = require('azure-iot-provisioning-device-mqtt');
const { Http: ProvHttp } = require('azure-iot-provisioning-device-http');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { X509Security } = require('azure-iot-security-x509');

const {
  AssertionError, HubsimAdmin, check, checkEqual, deleteLater, describeError, errName, loadEndpoints,
  poll, truncate, uniqueId, withDeadline,
} = require('./util');
const twinCases = require('./twin-cases');
const methodCases = require('./method-cases');
const tpmCases = require('./tpm-cases');
const wsCases = require('./ws-cases');
const ehCases = require('./eventhubs-cases');
const amqpCases = require('./amqp-cases');
const jobCases = require('./job-cases');
const faultCases = require('./fault-cases');
const throttleCases = require('./throttle-cases');

const CASE_DEADLINE_MS = 60000; // whole case, including its own cleanup budget below
const OPEN_DEADLINE_MS = 20000; // device client open()
const OP_DEADLINE_MS = 15000; // one SDK call (registry op, sendEvent, complete)
const OBSERVE_DEADLINE_MS = 10000; // hubsim reflecting something we did
const CLEANUP_DEADLINE_MS = 10000; // per cleanup step

const B64_KEY_44 = /^[A-Za-z0-9+/]{43}=$/;

function log(msg) {
  process.stderr.write(`  ${msg}\n`);
}

// ---------------------------------------------------------------------------------------------
// Context given to each case: endpoints, SDK service client, admin client and a cleanup stack
// that always runs (success, failure or case timeout).

class Ctx {
  constructor(name, ep, admin, registry) {
    this.name = name;
    this.ep = ep;
    this.admin = admin;
    this.registry = registry;
    this._cleanups = [];
  }

  defer(what, fn) {
    this._cleanups.push({ what, fn });
  }

  async cleanup() {
    while (this._cleanups.length) {
      const { what, fn } = this._cleanups.pop();
      try {
        await withDeadline(fn(), CLEANUP_DEADLINE_MS, `cleanup: ${what}`);
      } catch (err) {
        log(`[${this.name}] cleanup "${what}" failed: ${describeError(err)}`);
      }
    }
  }

  // createDevice registers a device through the SDK and schedules its deletion.
  async createDevice(deviceId, extra = {}) {
    const res = await withDeadline(this.registry.create({ deviceId, ...extra }), OP_DEADLINE_MS,
      `Registry.create(${deviceId})`);
    this.defer(`delete device ${deviceId}`, async () => {
      try {
        await this.registry.delete(deviceId);
      } catch (err) {
        if (errName(err) !== 'DeviceNotFoundError') throw err;
      }
    });
    return res.responseBody;
  }

  async sasKeyOf(deviceId) {
    const dev = (await withDeadline(this.registry.get(deviceId), OP_DEADLINE_MS, `Registry.get(${deviceId})`)).responseBody;
    const key = dev && dev.authentication && dev.authentication.symmetricKey && dev.authentication.symmetricKey.primaryKey;
    check(typeof key === 'string' && key.length > 0, `device ${deviceId} has no primaryKey: ${truncate(JSON.stringify(dev), 300)}`);
    return key;
  }

  // deviceClient builds a device client and schedules its close.
  deviceClient(connectionString) {
    const client = DeviceClient.fromConnectionString(connectionString, Mqtt);
    // An 'error' emitted without a listener would crash the process.
    client.on('error', (err) => log(`[${this.name}] device client 'error': ${describeError(err)}`));
    this.defer('close device client', async () => {
      client.removeAllListeners('message');
      try {
        await withDeadline(client.close(), CLEANUP_DEADLINE_MS - 1000, 'client.close()');
      } finally {
        // If the hub never answered CONNECT, close() ends mqtt.js's client but only half-closes
        // its TLS socket, which then keeps the process alive. Destroy that socket.
        // Private fields: azure-iot-device-mqtt Mqtt._mqtt (MqttBase) → _mqttClient (mqtt.js).
        const mc = client._transport && client._transport._mqtt && client._transport._mqtt._mqttClient;
        if (mc && mc.stream && !mc.stream.destroyed) mc.stream.destroy();
      }
    });
    return client;
  }

  // A SAS device connection string whose MQTT target rides in GatewayHostName.
  sasConnectionString(deviceId, key) {
    // azure-iot-device-mqtt dist/mqtt.js _getBaseTransportConfig: uri = 'mqtts://' +
    // (credentials.gatewayHostName || credentials.host) while username/sr use credentials.host,
    // and azure-iot-device dist/sak_authentication_provider.js passes cs.GatewayHostName through.
    return `HostName=${this.ep.hubHostName};DeviceId=${deviceId};SharedAccessKey=${key};GatewayHostName=${this.ep.mqttAddress}`;
  }

  async openClient(client, what) {
    await withDeadline(client.open(), OPEN_DEADLINE_MS, `${what}: client.open()`);
  }

  async waitForEvents(deviceId, n) {
    return poll(async () => {
      const msgs = await this.admin.events(deviceId);
      return msgs.length >= n ? msgs : undefined;
    }, { ms: OBSERVE_DEADLINE_MS, what: `${n} recorded D2C message(s) for ${deviceId} at /hubsim/devices/{id}/messages/events` });
  }
}

function parseAuthMethod(sys, what) {
  const raw = sys['iothub-connection-auth-method'];
  check(typeof raw === 'string', `${what}: systemProperties["iothub-connection-auth-method"] missing or not a string: ${JSON.stringify(raw)}`);
  let am;
  try {
    am = JSON.parse(raw);
  } catch (err) {
    throw new AssertionError(`${what}: iothub-connection-auth-method is not JSON: ${JSON.stringify(raw)}`);
  }
  check(am && typeof am === 'object', `${what}: iothub-connection-auth-method is not an object: ${raw}`);
  return am;
}

function checkEnqueuedTime(sys, startedAt, what) {
  const t = sys['iothub-enqueuedtime'];
  check(typeof t === 'string' && !Number.isNaN(Date.parse(t)), `${what}: iothub-enqueuedtime not a date: ${JSON.stringify(t)}`);
  // Allow for clock granularity; the message cannot have been enqueued long before the case began.
  check(Date.parse(t) >= startedAt - 5000 && Date.parse(t) <= Date.now() + 5000,
    `${what}: iothub-enqueuedtime ${t} outside the case's run window`);
}

// ---------------------------------------------------------------------------------------------
// Cases

async function registryCrud(ctx) {
  const { registry } = ctx;
  const id = uniqueId('crud');

  // create with no keys: the SDK sends symmetricKey {primaryKey:"", secondaryKey:""}
  const created = await ctx.createDevice(id);
  checkEqual(created && created.deviceId, id, 'create: responseBody.deviceId');

  const got = (await withDeadline(registry.get(id), OP_DEADLINE_MS, 'Registry.get')).responseBody;
  checkEqual(got.deviceId, id, 'get: deviceId');
  checkEqual(got.status, 'enabled', 'get: status of a new device');
  check(got.authentication, `get: no authentication in ${truncate(JSON.stringify(got), 300)}`);
  checkEqual(got.authentication.type, 'sas', 'get: authentication.type');
  const keys = got.authentication.symmetricKey || {};
  for (const k of ['primaryKey', 'secondaryKey']) {
    check(B64_KEY_44.test(keys[k] || ''), `get: ${k} ${JSON.stringify(keys[k])} is not 44-char base64`);
    checkEqual(Buffer.from(keys[k], 'base64').length, 32, `get: decoded ${k} length`);
  }
  check(keys.primaryKey !== keys.secondaryKey, 'get: primaryKey and secondaryKey are equal');

  const listed = (await withDeadline(registry.list(), OP_DEADLINE_MS, 'Registry.list')).responseBody;
  check(Array.isArray(listed), `list: responseBody is not an array: ${truncate(JSON.stringify(listed), 200)}`);
  check(listed.some((d) => d && d.deviceId === id), `list: ${id} not among ${listed.length} devices`);

  // update sends the full device with If-Match: "*"; send back what get returned.
  for (const status of ['disabled', 'enabled']) {
    const cur = (await withDeadline(registry.get(id), OP_DEADLINE_MS, 'Registry.get')).responseBody;
    cur.status = status;
    const upd = (await withDeadline(registry.update(cur), OP_DEADLINE_MS, `Registry.update(status=${status})`)).responseBody;
    checkEqual(upd.status, status, `update(status=${status}): responseBody.status`);
    const after = (await withDeadline(registry.get(id), OP_DEADLINE_MS, 'Registry.get')).responseBody;
    checkEqual(after.status, status, `get after update(status=${status}): status`);
    checkEqual(after.authentication.symmetricKey.primaryKey, keys.primaryKey, `get after update(status=${status}): primaryKey kept`);
  }

  await withDeadline(registry.delete(id), OP_DEADLINE_MS, 'Registry.delete');
  let err;
  try {
    await withDeadline(registry.get(id), OP_DEADLINE_MS, 'Registry.get after delete');
  } catch (e) {
    err = e;
  }
  check(err, 'get after delete: resolved, want DeviceNotFoundError');
  checkEqual(errName(err), 'DeviceNotFoundError', `get after delete: error class (${describeError(err)})`);
  checkEqual(err.response && err.response.statusCode, 404, 'get after delete: HTTP status');

  // duplicate create → 409 DeviceAlreadyExists
  const dup = uniqueId('dup');
  await ctx.createDevice(dup);
  err = undefined;
  try {
    await withDeadline(registry.create({ deviceId: dup }), OP_DEADLINE_MS, 'second Registry.create');
  } catch (e) {
    err = e;
  }
  check(err, 'second create of the same id: resolved, want DeviceAlreadyExistsError');
  checkEqual(errName(err), 'DeviceAlreadyExistsError', `second create: error class (${describeError(err)})`);
  checkEqual(err.response && err.response.statusCode, 409, 'second create: HTTP status');
}

async function deviceSasTelemetry(ctx) {
  const startedAt = Date.now();
  const id = uniqueId('sas');
  await ctx.createDevice(id);
  const key = await ctx.sasKeyOf(id);

  const client = ctx.deviceClient(ctx.sasConnectionString(id, key));
  await ctx.openClient(client, 'SAS device');

  const body = JSON.stringify({ temperature: 21.5, humidity: 40, note: 'conformance' });
  const msg = new Message(body);
  msg.messageId = 'mid-' + crypto.randomUUID();
  msg.correlationId = 'cid-' + crypto.randomUUID();
  msg.contentType = 'application/json';
  msg.contentEncoding = 'utf-8';
  msg.properties.add('alert', 'high');
  msg.properties.add('path', 'a b/c&d=e'); // needs URL-encoding in the MQTT topic property bag
  await withDeadline(client.sendEvent(msg), OP_DEADLINE_MS, 'client.sendEvent');

  const msgs = await ctx.waitForEvents(id, 1);
  checkEqual(msgs.length, 1, 'recorded message count');
  const rec = msgs[0];
  log(`[device-sas-telemetry] hubsim recorded: ${truncate(JSON.stringify(rec), 1200)}`);
  checkEqual(Buffer.from(rec.body || '', 'base64').toString('utf8'), body, 'recorded body (base64-decoded)');
  const props = rec.properties || {};
  checkEqual(props.alert, 'high', 'properties.alert');
  checkEqual(props.path, 'a b/c&d=e', 'properties.path');
  const sys = rec.systemProperties || {};
  checkEqual(sys['message-id'], msg.messageId, 'systemProperties["message-id"]');
  checkEqual(sys['correlation-id'], msg.correlationId, 'systemProperties["correlation-id"]');
  checkEqual(sys['content-type'], 'application/json', 'systemProperties["content-type"]');
  checkEqual(sys['content-encoding'], 'utf-8', 'systemProperties["content-encoding"]');
  checkEqual(sys['iothub-connection-device-id'], id, 'systemProperties["iothub-connection-device-id"]');
  const dev = (await withDeadline(ctx.registry.get(id), OP_DEADLINE_MS, 'Registry.get')).responseBody;
  check(typeof dev.generationId === 'string' && dev.generationId !== '', `get: no generationId in ${truncate(JSON.stringify(dev), 300)}`);
  checkEqual(sys['iothub-connection-auth-generation-id'], dev.generationId,
    'systemProperties["iothub-connection-auth-generation-id"] vs the registry generationId');
  const am = parseAuthMethod(sys, 'SAS message');
  checkEqual(am.type, 'sas', 'iothub-connection-auth-method.type');
  checkEqual(am.scope, 'device', 'iothub-connection-auth-method.scope');
  checkEqual(am.issuer, 'iothub', 'iothub-connection-auth-method.issuer');
  checkEnqueuedTime(sys, startedAt, 'SAS message');
  // Anti-spoofing: these must come from the hub, never from the application property bag.
  for (const k of Object.keys(props)) {
    check(!k.startsWith('iothub-connection-'), `application property ${k} should be a system property`);
  }
}

function openssl(args, cwd) {
  return withDeadline(promisify(execFile)('openssl', args, { cwd }), 20000, `openssl ${args[0]}`);
}

async function deviceX509Telemetry(ctx) {
  const startedAt = Date.now();
  const id = uniqueId('x509');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'conf-x509-'));
  ctx.defer('remove x509 temp dir', async () => fs.rmSync(dir, { recursive: true, force: true }));
  await openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes',
    '-subj', `/CN=${id}`, '-days', '2', '-keyout', 'k.pem', '-out', 'c.pem'], dir);
  const cert = fs.readFileSync(path.join(dir, 'c.pem'), 'utf8');
  const key = fs.readFileSync(path.join(dir, 'k.pem'), 'utf8');
  // SHA-256 of the DER, upper-case hex without colons (what the portal shows).
  const thumb = new crypto.X509Certificate(cert).fingerprint256.replace(/:/g, '');

  await ctx.createDevice(id, {
    authentication: { type: 'selfSigned', x509Thumbprint: { primaryThumbprint: thumb } },
  });
  const got = (await withDeadline(ctx.registry.get(id), OP_DEADLINE_MS, 'Registry.get')).responseBody;
  checkEqual(got.authentication && got.authentication.type, 'selfSigned', 'get: authentication.type');
  checkEqual(String(got.authentication.x509Thumbprint && got.authentication.x509Thumbprint.primaryThumbprint).toUpperCase(),
    thumb, 'get: x509Thumbprint.primaryThumbprint');

  // The x509 path of Client.fromConnectionString (azure-iot-device dist/device_client.js)
  // builds X509AuthenticationProvider({host: cn.HostName, deviceId}) and drops GatewayHostName,
  // so the MQTT port has to ride in HostName; hubsim accepts "<hubHostName>:<port>".
  const cs = `HostName=${ctx.ep.hubHostName}:${ctx.ep.mqtt.port};DeviceId=${id};x509=true`;
  const client = ctx.deviceClient(cs);
  await withDeadline(client.setOptions({ cert, key }), OP_DEADLINE_MS, 'client.setOptions({cert,key})');
  await ctx.openClient(client, 'X.509 device');

  const body = 'x509 telemetry ' + crypto.randomUUID();
  const msg = new Message(body);
  msg.messageId = 'mid-' + crypto.randomUUID();
  await withDeadline(client.sendEvent(msg), OP_DEADLINE_MS, 'client.sendEvent');

  const msgs = await ctx.waitForEvents(id, 1);
  const rec = msgs[0];
  checkEqual(Buffer.from(rec.body || '', 'base64').toString('utf8'), body, 'recorded body');
  const sys = rec.systemProperties || {};
  checkEqual(sys['message-id'], msg.messageId, 'systemProperties["message-id"]');
  checkEqual(sys['iothub-connection-device-id'], id, 'systemProperties["iothub-connection-device-id"]');
  const am = parseAuthMethod(sys, 'X.509 message');
  log(`[device-x509-telemetry] hubsim auth-method: ${sys['iothub-connection-auth-method']}`);
  check(typeof am.type === 'string' && /x509|selfsigned/i.test(am.type),
    `iothub-connection-auth-method.type ${JSON.stringify(am.type)} does not name X.509`);
  check(am.type !== 'sas', 'iothub-connection-auth-method.type is "sas" for an X.509 connection');
  checkEqual(am.scope, 'device', 'iothub-connection-auth-method.scope');
  checkEnqueuedTime(sys, startedAt, 'X.509 message');
}

async function deviceWrongKey(ctx) {
  const id = uniqueId('badkey');
  await ctx.createDevice(id);
  const real = await ctx.sasKeyOf(id);
  let wrong;
  do { wrong = crypto.randomBytes(32).toString('base64'); } while (wrong === real);

  const client = ctx.deviceClient(ctx.sasConnectionString(id, wrong));
  let err;
  try {
    await ctx.openClient(client, 'device with a wrong key');
  } catch (e) {
    err = e;
  }
  check(err, 'open() with a wrong key succeeded');
  check(err.name !== 'DeadlineError', `open() with a wrong key did not settle: ${err.message}`);
  checkEqual(errName(err), 'UnauthorizedError', `error class (${describeError(err)})`);
  // azure-iot-device-mqtt dist/mqtt.js wraps EVERY first-connection failure as
  // "Failure on first connection (Not authorized): <mqtt.js message>", which translateError
  // turns into UnauthorizedError, even for a dropped socket. Require a real CONNACK refusal:
  // mqtt.js lib/client.js _handleConnack emits "Connection refused: Not authorized" (rc 5) or
  // "Connection refused: Bad username or password" (rc 4).
  check(/Connection refused: (Not authorized|Bad username or password)/.test(err.message),
    `the hub did not refuse with CONNACK 4/5; SDK error: ${err.message}`);
  log(`[device-wrong-key] SDK error: ${describeError(err)}`);
}

async function c2dWithProperties(ctx) {
  const id = uniqueId('c2d');
  await ctx.createDevice(id);
  const key = await ctx.sasKeyOf(id);
  const client = ctx.deviceClient(ctx.sasConnectionString(id, key));
  await ctx.openClient(client, 'C2D device');

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

  const sent = {
    body: 'hello device ' + crypto.randomUUID(),
    messageId: 'c2d-mid-' + crypto.randomUUID(),
    correlationId: 'c2d-cid-' + crypto.randomUUID(),
    contentType: 'text/plain',
    contentEncoding: 'utf-8',
    // C2D property names and values are limited to ASCII letters, digits and !#$%&'*+-.^_`|~
    // (IoT Hub message docs); hubsim answers 400 ArgumentInvalid otherwise, as it should.
    properties: { k: 'v', k2: 'value-2.two' },
  };
  const r = await ctx.admin.sendC2D(id, sent);
  checkEqual(r.status, 202, `POST devicebound status (body ${truncate(r.text, 200)})`);
  checkEqual(r.json && r.json.messageId, sent.messageId, 'POST devicebound response messageId');

  const m = await withDeadline(received, OBSERVE_DEADLINE_MS, 'the C2D message on the device');
  checkEqual(Buffer.from(m.data).toString('utf8'), sent.body, 'msg.data');
  checkEqual(m.messageId, sent.messageId, 'msg.messageId');
  checkEqual(m.correlationId, sent.correlationId, 'msg.correlationId');
  checkEqual(m.contentType, sent.contentType, 'msg.contentType');
  checkEqual(m.contentEncoding, sent.contentEncoding, 'msg.contentEncoding');
  checkEqual(m.properties.getValue('k'), 'v', "msg.properties.getValue('k')");
  checkEqual(m.properties.getValue('k2'), 'value-2.two', "msg.properties.getValue('k2')");
  await withDeadline(client.complete(m), OP_DEADLINE_MS, 'client.complete(msg)');
}


// ---------------------------------------------------------------------------------------------
// Device Provisioning Service (protocol-service.md §3, §4.7(c); protocol-device.md §2, §3)

function dpsService(ctx) {
  check(ctx.ep.dpsConnectionString, 'endpoints.json has no dpsConnectionString');
  return ProvisioningServiceClient.fromConnectionString(ctx.ep.dpsConnectionString);
}

// MQTT: the SDK dials mqtts://<host:port> (port honoured); HTTPS: it cannot take a port, so
// hubsim serves HTTPS on 443 and the host is the bare hub host name.
function provisioningHost(ctx, transport) {
  return transport === 'mqtt' ? `${ctx.ep.hubHostName}:${ctx.ep.mqtt.port}` : ctx.ep.hubHostName;
}

function deriveKey(groupKey, regId) {
  return crypto.createHmac('sha256', Buffer.from(groupKey, 'base64')).update(regId, 'utf8').digest('base64');
}

async function provision(ctx, transport, regId, security, payload) {
  const t = transport === 'mqtt' ? new ProvMqtt() : new ProvHttp();
  const pdc = ProvisioningDeviceClient.create(provisioningHost(ctx, transport), ctx.ep.idScope, t, security);
  if (payload) pdc.setProvisioningPayload(payload);
  const res = await withDeadline(pdc.register(), OPEN_DEADLINE_MS, `ProvisioningDeviceClient.register (${transport})`);
  log(`[${ctx.name}] registration result: ${truncate(JSON.stringify(res), 600)}`);
  checkEqual(res.status, 'assigned', 'registration status');
  check(typeof res.assignedHub === 'string' && res.assignedHub.length > 0, `no assignedHub in ${JSON.stringify(res)}`);
  return res;
}


// The provisioned device connects to the assigned hub with Microsoft's device client and reads
// the initial twin's desired properties.
async function connectAndCheckTwin(ctx, res, creds, wantDesired) {
  const cs = creds.key
    ? `HostName=${res.assignedHub};DeviceId=${res.deviceId};SharedAccessKey=${creds.key}`
    : `HostName=${res.assignedHub};DeviceId=${res.deviceId};x509=true`;
  const client = ctx.deviceClient(cs);
  if (creds.cert) await withDeadline(client.setOptions({ cert: creds.cert, key: creds.certKey }), OP_DEADLINE_MS, 'setOptions');
  await ctx.openClient(client, `provisioned device ${res.deviceId}`);
  deleteLater(ctx, `delete hub device ${res.deviceId}`, () => ctx.registry.delete(res.deviceId));
  if (wantDesired) {
    const twin = await withDeadline(client.getTwin(), OP_DEADLINE_MS, 'client.getTwin');
    for (const [k, v] of Object.entries(wantDesired)) {
      checkEqual(twin.properties.desired[k], v, `twin desired.${k} from the enrollment's initialTwin`);
    }
  }
}

async function dpsServiceCrud(ctx) {
  const ps = dpsService(ctx);
  const id = uniqueId('enr');
  const created = (await withDeadline(ps.createOrUpdateIndividualEnrollment({
    registrationId: id, attestation: { type: 'symmetricKey', symmetricKey: { primaryKey: '', secondaryKey: '' } },
    provisioningStatus: 'enabled',
  }), OP_DEADLINE_MS, 'createOrUpdateIndividualEnrollment')).responseBody;
  deleteLater(ctx, `delete enrollment ${id}`, () => ps.deleteIndividualEnrollment(id));
  checkEqual(created.registrationId, id, 'created registrationId');
  check(created.etag, 'created enrollment has no etag');
  check(B64_KEY_44.test(created.attestation.symmetricKey.primaryKey) || created.attestation.symmetricKey.primaryKey.length > 40,
    `no generated primaryKey: ${truncate(JSON.stringify(created.attestation), 200)}`);

  const got = (await withDeadline(ps.getIndividualEnrollment(id), OP_DEADLINE_MS, 'getIndividualEnrollment')).responseBody;
  checkEqual(got.etag, created.etag, 'get: etag');
  got.provisioningStatus = 'disabled';
  const upd = (await withDeadline(ps.createOrUpdateIndividualEnrollment(got), OP_DEADLINE_MS, 'update with etag')).responseBody;
  checkEqual(upd.provisioningStatus, 'disabled', 'update: provisioningStatus');
  check(upd.etag !== got.etag, 'update: etag unchanged');
  let err;
  try {
    got.provisioningStatus = 'enabled'; // stale etag
    await withDeadline(ps.createOrUpdateIndividualEnrollment(got), OP_DEADLINE_MS, 'update with a stale etag');
  } catch (e) { err = e; }
  checkEqual(err && err.response && err.response.statusCode, 412, `stale etag: HTTP status (${describeError(err)})`);

  const am = (await withDeadline(ps.getIndividualEnrollmentAttestationMechanism(id), OP_DEADLINE_MS, 'getIndividualEnrollmentAttestationMechanism')).responseBody;
  checkEqual(am.type, 'symmetricKey', 'attestation mechanism type');

  const q = ps.createIndividualEnrollmentQuery({ query: '*' }, 1);
  const seen = [];
  for (let i = 0; i < 1000; i++) {
    const page = await withDeadline(q.next(), OP_DEADLINE_MS, 'query.next');
    // httpCallbackToPromise resolves { responseBody, httpResponse }.
    const rows = page.responseBody;
    check(Array.isArray(rows), `query page is not an array: ${truncate(JSON.stringify(page && Object.keys(page)), 200)}`);
    check(rows.length <= 1, `page size 1 gave ${rows.length} rows`);
    for (const e of rows) seen.push(e.registrationId);
    if (!q.hasMoreResults) break;
  }
  check(seen.includes(id), `query did not list ${id}: ${seen.join(',')}`);

  // Bulk: the promise form never settles in 1.11.2; use the callback form.
  const b1 = uniqueId('bulk'); const b2 = uniqueId('bulk');
  const bulk = (ops) => withDeadline(new Promise((resolve, reject) => ps.runBulkEnrollmentOperation(ops,
    (e, result) => (e ? reject(e) : resolve(result)))), OP_DEADLINE_MS, 'runBulkEnrollmentOperation');
  const mk = (rid) => ({ registrationId: rid, attestation: { type: 'symmetricKey', symmetricKey: {} } });
  let r = await bulk({ mode: 'create', enrollments: [mk(b1), mk(b2)] });
  checkEqual(r.isSuccessful, true, `bulk create isSuccessful (${JSON.stringify(r)})`);
  r = await bulk({ mode: 'create', enrollments: [mk(b1)] });
  checkEqual(r.isSuccessful, false, 'bulk create of an existing enrollment isSuccessful');
  checkEqual(r.errors[0].registrationId, b1, 'bulk error registrationId');
  r = await bulk({ mode: 'delete', enrollments: [mk(b1), mk(b2)] });
  checkEqual(r.isSuccessful, true, 'bulk delete isSuccessful');

  const gid = uniqueId('grp');
  const g = (await withDeadline(ps.createOrUpdateEnrollmentGroup({ enrollmentGroupId: gid,
    attestation: { type: 'symmetricKey', symmetricKey: {} } }), OP_DEADLINE_MS, 'createOrUpdateEnrollmentGroup')).responseBody;
  deleteLater(ctx, `delete group ${gid}`, () => ps.deleteEnrollmentGroup(gid));
  checkEqual(g.enrollmentGroupId, gid, 'group id');
  const gam = (await withDeadline(ps.getEnrollmentGroupAttestationMechanism(gid), OP_DEADLINE_MS,
    'getEnrollmentGroupAttestationMechanism (lower-case enrollmentgroups path)')).responseBody;
  checkEqual(gam.type, 'symmetricKey', 'group attestation mechanism type');
  await withDeadline(ps.deleteEnrollmentGroup(gid), OP_DEADLINE_MS, 'deleteEnrollmentGroup');
  await withDeadline(ps.deleteIndividualEnrollment(id), OP_DEADLINE_MS, 'deleteIndividualEnrollment');
  err = undefined;
  try {
    await withDeadline(ps.getIndividualEnrollment(id), OP_DEADLINE_MS, 'get after delete');
  } catch (e) { err = e; }
  checkEqual(err && err.response && err.response.statusCode, 404, 'get after delete: HTTP status');
}

function symkeyCase(transport, group) {
  return async (ctx) => {
    const ps = dpsService(ctx);
    const regId = uniqueId(group ? 'dpsg' : 'dpsi');
    const initialTwin = { tags: { site: 'conf' }, properties: { desired: { interval: 17 } } };
    let key;
    if (group) {
      const gid = uniqueId('g');
      const gk = crypto.randomBytes(64).toString('base64');
      await withDeadline(ps.createOrUpdateEnrollmentGroup({ enrollmentGroupId: gid, initialTwin,
        attestation: { type: 'symmetricKey', symmetricKey: { primaryKey: gk, secondaryKey: gk } } }), OP_DEADLINE_MS, 'create group');
      deleteLater(ctx, `delete group ${gid}`, () => ps.deleteEnrollmentGroup(gid));
      key = deriveKey(gk, regId);
    } else {
      key = crypto.randomBytes(32).toString('base64');
      await withDeadline(ps.createOrUpdateIndividualEnrollment({ registrationId: regId, deviceId: regId, initialTwin,
        attestation: { type: 'symmetricKey', symmetricKey: { primaryKey: key, secondaryKey: crypto.randomBytes(32).toString('base64') } } }),
      OP_DEADLINE_MS, 'create enrollment');
      deleteLater(ctx, `delete enrollment ${regId}`, () => ps.deleteIndividualEnrollment(regId));
    }
    const payload = { modelId: 'dtmi:iothubby:conformance;1' };
    const res = await provision(ctx, transport, regId, new SymmetricKeySecurityClient(regId, key), payload);
    checkEqual(res.deviceId, regId, 'deviceId');
    checkEqual(res.substatus, 'initialAssignment', 'substatus');
    checkEqual(res.payload && res.payload.modelId, payload.modelId, 'payload echoed');
    const st = (await withDeadline(ps.getDeviceRegistrationState(regId), OP_DEADLINE_MS, 'getDeviceRegistrationState')).responseBody;
    checkEqual(st.status, 'assigned', 'registration state status');
    deleteLater(ctx, `delete registration ${regId}`, () => ps.deleteDeviceRegistrationState(regId));
    await connectAndCheckTwin(ctx, res, { key }, { interval: 17 });
  };
}

function x509Case(transport, group) {
  return async (ctx) => {
    const ps = dpsService(ctx);
    const regId = uniqueId(group ? 'x509g' : 'x509i');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'conf-dps-'));
    ctx.defer('remove temp dir', async () => fs.rmSync(dir, { recursive: true, force: true }));
    let cert; let certKey;
    if (group) {
      await openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', `/CN=root-${regId}`,
        '-days', '2', '-keyout', 'ca.key', '-out', 'ca.pem', '-addext', 'basicConstraints=critical,CA:TRUE',
        '-addext', 'keyUsage=critical,keyCertSign,digitalSignature'], dir);
      await openssl(['req', '-new', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', `/CN=${regId}`,
        '-keyout', 'leaf.key', '-out', 'leaf.csr'], dir);
      fs.writeFileSync(path.join(dir, 'leaf.ext'), 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n');
      await openssl(['x509', '-req', '-in', 'leaf.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-days', '2',
        '-extfile', 'leaf.ext', '-out', 'leaf.pem'], dir);
      const gid = uniqueId('xg');
      await withDeadline(ps.createOrUpdateEnrollmentGroup({ enrollmentGroupId: gid, attestation: { type: 'x509',
        x509: { signingCertificates: { primary: { certificate: fs.readFileSync(path.join(dir, 'ca.pem'), 'utf8') } } } } }),
      OP_DEADLINE_MS, 'create X.509 group');
      deleteLater(ctx, `delete group ${gid}`, () => ps.deleteEnrollmentGroup(gid));
    } else {
      await openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-subj', `/CN=${regId}`,
        '-days', '2', '-keyout', 'leaf.key', '-out', 'leaf.pem'], dir);
      await withDeadline(ps.createOrUpdateIndividualEnrollment({ registrationId: regId, attestation: { type: 'x509',
        x509: { clientCertificates: { primary: { certificate: fs.readFileSync(path.join(dir, 'leaf.pem'), 'utf8') } } } } }),
      OP_DEADLINE_MS, 'create X.509 enrollment');
      deleteLater(ctx, `delete enrollment ${regId}`, () => ps.deleteIndividualEnrollment(regId));
    }
    cert = fs.readFileSync(path.join(dir, 'leaf.pem'), 'utf8');
    certKey = fs.readFileSync(path.join(dir, 'leaf.key'), 'utf8');
    const res = await provision(ctx, transport, regId, new X509Security(regId, { cert, key: certKey }));
    checkEqual(res.deviceId, regId, 'deviceId');
    const dev = (await withDeadline(ctx.registry.get(regId), OP_DEADLINE_MS, 'Registry.get')).responseBody;
    checkEqual(dev.authentication.type, 'selfSigned', 'hub device authentication.type');
    await connectAndCheckTwin(ctx, res, { cert, certKey });
  };
}

async function dpsWrongKey(ctx) {
  const ps = dpsService(ctx);
  const regId = uniqueId('dpsbad');
  await withDeadline(ps.createOrUpdateIndividualEnrollment({ registrationId: regId,
    attestation: { type: 'symmetricKey', symmetricKey: {} } }), OP_DEADLINE_MS, 'create enrollment');
  deleteLater(ctx, `delete enrollment ${regId}`, () => ps.deleteIndividualEnrollment(regId));
  let err;
  try {
    await provision(ctx, 'http', regId, new SymmetricKeySecurityClient(regId, crypto.randomBytes(32).toString('base64')));
  } catch (e) { err = e; }
  check(err, 'registration with a wrong key succeeded');
  check(err.name !== 'DeadlineError', `registration with a wrong key did not settle: ${err.message}`);
  log(`[dps-wrong-key] SDK error: ${describeError(err)}`);
  checkEqual(err.response && err.response.statusCode, 401, `HTTP status (${describeError(err)})`);
}

const CASES = [
  ['registry-crud', registryCrud],
  ['device-sas-telemetry', deviceSasTelemetry],
  ['device-x509-telemetry', deviceX509Telemetry],
  ['device-wrong-key', deviceWrongKey],
  ['c2d-with-properties', c2dWithProperties],
  ['c2d-amqp-feedback', amqpCases.c2dAmqpFeedback],
  ['c2d-amqp-feedback-mqttws', amqpCases.c2dAmqpFeedbackMqttWs],
  ['service-twin-with-agent', twinCases.serviceTwinWithAgent],
  ['device-twin-sdk', twinCases.deviceTwinSdk],
  ['service-method-with-agent', methodCases.serviceMethodWithAgent],
  ['device-method-sdk', methodCases.deviceMethodSdk],
  ['dps-service-crud', dpsServiceCrud],
  ['dps-symkey-individual-mqtt', symkeyCase('mqtt', false)],
  ['dps-symkey-group-mqtt', symkeyCase('mqtt', true)],
  ['dps-symkey-individual-http', symkeyCase('http', false)],
  ['dps-symkey-group-http', symkeyCase('http', true)],
  ['dps-x509-individual-mqtt', x509Case('mqtt', false)],
  ['dps-x509-group-http', x509Case('http', true)],
  ['dps-wrong-key', dpsWrongKey],
  ['dps-tpm-http', tpmCases.dpsTpmHttp],
  ['device-mqtt-ws', wsCases.deviceMqttWs],
  ['device-mqtt-ws-wrong-key', wsCases.deviceMqttWsWrongKey],
  ['service-query-paging', jobCases.serviceQueryPaging],
  ['job-client-twin-and-method', jobCases.jobClientWithDevices],
  ['service-bulk-registry', jobCases.bulkRegistry],
  ['eventhubs-read-agent-telemetry', ehCases.eventHubsReadAgentTelemetry],
  ['eventhubs-properties', ehCases.eventHubsProperties],
  ['device-fault-killtcp', faultCases.deviceKillTcp],
  ['service-throttled-429', throttleCases.serviceThrottled429],
  ['device-connack3-retried', throttleCases.deviceConnack3Retried],
];

// ---------------------------------------------------------------------------------------------

async function runCase(name, fn, env) {
  const ctx = new Ctx(name, env.ep, env.admin, env.registry);
  let failure;
  try {
    await withDeadline(fn(ctx), CASE_DEADLINE_MS, `case ${name}`);
  } catch (err) {
    failure = err;
  }
  await ctx.cleanup();
  if (failure) {
    const reason = failure instanceof AssertionError ? failure.message : describeError(failure);
    console.log(`FAIL ${name}: ${reason.replace(/\s*\n\s*/g, ' ')}`);
    return false;
  }
  console.log(`PASS ${name}`);
  return true;
}

async function main() {
  const file = process.env.HUBSIM_ENDPOINTS;
  if (!file) throw new Error('HUBSIM_ENDPOINTS is not set (run run.js, not this file)');
  const ep = loadEndpoints(file);
  log(`hub ${ep.hubHostName}, https ${ep.httpsAddress}, mqtt ${ep.mqttAddress}, CA ${ep.caFile}`);
  const env = { ep, admin: new HubsimAdmin(ep), registry: Registry.fromConnectionString(ep.serviceConnectionString) };

  const only = (process.env.CONFORMANCE_CASES || '').split(',').map((s) => s.trim()).filter(Boolean);
  const unknown = only.filter((n) => !CASES.some(([c]) => c === n));
  if (unknown.length) throw new Error(`unknown case(s) in CONFORMANCE_CASES: ${unknown.join(', ')}`);
  let passed = 0;
  let failed = 0;
  for (const [name, fn] of CASES) {
    if (only.length && !only.includes(name)) continue;
    if (await runCase(name, fn, env)) passed++; else failed++;
  }
  console.log(`${passed} passed, ${failed} failed`);
  return failed === 0 ? 0 : 1;
}

// Last-resort guards: a stray rejection or exception from SDK internals is reported, not fatal.
process.on('unhandledRejection', (err) => log(`unhandled rejection: ${describeError(err)}`));

main().then((code) => {
  process.exitCode = code;
  // Everything was closed; if some SDK handle still holds the loop, do not hang the run.
  setTimeout(() => {
    log('warning: handles still open 5 s after the run ended; forcing exit');
    process.exit(code);
  }, 5000).unref();
}, (err) => {
  console.log(`FAIL harness: ${describeError(err)}`);
  console.log('0 passed, 1 failed');
  process.exit(1);
});
