'use strict';
// DPS TPM attestation over HTTPS with Microsoft's Node SDK as the device and swtpm as its TPM
// (protocol-device.md §3.1, §4; protocol-service.md §4.6 recipe 2).
//
// The case starts its own swtpm (TCP, on free ports, a fresh state dir), reads the EK and the
// default registration ID through azure-iot-security-tpm's TpmSecurityClient, enrolls the EK
// with azure-iot-provisioning-service, provisions with azure-iot-provisioning-device over
// azure-iot-provisioning-device-http (401 challenge, activation in the TPM, SAS signed in the
// TPM, final blob imported), then connects to the assigned hub with azure-iot-device
// authenticated by the TPM (TpmAuthenticationProvider: every hub SAS token is an HMAC computed
// in the TPM with the key of the final blob) and reads its twin and sends telemetry.
//
// swtpm is required: without it the case FAILS (CI installs it). SWTPM_BIN overrides the
// binary (default "swtpm" on PATH).

const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');

const { Client: DeviceClient, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Http: ProvHttp } = require('azure-iot-provisioning-device-http');
const { TpmSecurityClient, TpmAuthenticationProvider } = require('azure-iot-security-tpm');
const { Tpm, TpmTcpDevice } = require('tss.js');

const {
  AssertionError, check, checkEqual, delay, deleteLater, describeError, poll, truncate, uniqueId,
  withDeadline,
} = require('./util');

const SWTPM_START_DEADLINE_MS = 10000;
const SWTPM_STOP_DEADLINE_MS = 5000;
const TPM_DEADLINE_MS = 20000; // one TPM call (the first creates the EK and SRK: RSA key generation)
const REGISTER_DEADLINE_MS = 30000; // the whole TPM registration: two PUTs, polls, two activations
const OPEN_DEADLINE_MS = 20000;
const OP_DEADLINE_MS = 15000;
const CLEANUP_DEADLINE_MS = 9000;

function log(msg) {
  process.stderr.write(`  ${msg}\n`);
}

// cb turns a Node callback-style call into a promise with a deadline.
function cb(fn, what, ms = TPM_DEADLINE_MS) {
  return withDeadline(new Promise((resolve, reject) => fn((err, res) => (err ? reject(err) : resolve(res)))), ms, what);
}

// freePort asks the kernel for a free TCP port on 127.0.0.1.
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

// accepts resolves true once something accepts a TCP connection on 127.0.0.1:port, false on
// refusal or after a second.
function accepts(port) {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    const done = (ok) => { s.destroy(); resolve(ok); };
    s.setTimeout(1000, () => done(false));
    s.once('connect', () => done(true));
    s.once('error', () => done(false));
  });
}

// startSwtpm runs `swtpm socket --tpm2` on free ports with a fresh state dir and waits until its
// TPM port accepts connections. Its stop (SIGTERM, then SIGKILL) and the removal of the state
// dir are deferred on ctx.
async function startSwtpm(ctx) {
  const bin = process.env.SWTPM_BIN || 'swtpm';
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'conf-swtpm-'));
  ctx.defer('remove swtpm state dir', async () => fs.rmSync(dir, { recursive: true, force: true }));
  const port = await freePort();
  let ctrlPort = await freePort();
  while (ctrlPort === port) ctrlPort = await freePort();
  // not-need-init: no TPM_Init over the control channel; startup-clear: swtpm runs
  // TPM2_Startup itself, since tss.js's linuxTrm mode (used below) never sends it.
  const args = ['socket', '--tpm2',
    '--server', `type=tcp,port=${port},bindaddr=127.0.0.1`,
    '--ctrl', `type=tcp,port=${ctrlPort},bindaddr=127.0.0.1`,
    '--tpmstate', `dir=${dir}`,
    '--flags', 'not-need-init,startup-clear'];
  log(`[${ctx.name}] starting ${bin} ${args.join(' ')}`);
  const proc = { exited: false, code: null, signal: null, spawnError: null, stderr: '' };
  const child = spawn(bin, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  child.stderr.on('data', (c) => { proc.stderr = (proc.stderr + c.toString('utf8')).slice(-2000); });
  proc.exit = new Promise((resolve) => {
    child.on('error', (err) => { proc.spawnError = err; proc.exited = true; resolve(); });
    child.on('exit', (code, signal) => { proc.exited = true; proc.code = code; proc.signal = signal; resolve(); });
  });
  ctx.defer('stop swtpm', async () => {
    if (proc.exited) return;
    child.kill('SIGTERM');
    const stopped = await Promise.race([proc.exit.then(() => true), delay(SWTPM_STOP_DEADLINE_MS).then(() => false)]);
    if (!stopped) {
      log(`[${ctx.name}] swtpm did not exit within ${SWTPM_STOP_DEADLINE_MS} ms of SIGTERM; sending SIGKILL`);
      child.kill('SIGKILL');
      await proc.exit;
    }
  });
  await poll(async () => {
    if (proc.exited) {
      if (proc.spawnError && proc.spawnError.code === 'ENOENT') {
        throw new AssertionError(`swtpm is not installed ("${bin}" not found; Debian/Ubuntu: apt-get install swtpm): ` +
          'the dps-tpm-http case needs it as the device\'s TPM');
      }
      const why = proc.spawnError ? proc.spawnError.message : `exit code ${proc.code}, signal ${proc.signal}`;
      throw new AssertionError(`swtpm exited before accepting connections (${why}): ${truncate(proc.stderr.trim(), 500)}`);
    }
    return accepts(port);
  }, { ms: SWTPM_START_DEADLINE_MS, what: `swtpm to accept connections on 127.0.0.1:${port}` });
  return port;
}


async function dpsTpmHttp(ctx) {
  const startedAt = Date.now();
  check(ctx.ep.dpsConnectionString, 'endpoints.json has no dpsConnectionString');
  const port = await startSwtpm(ctx);

  // protocol-service.md §4.6 recipe 2: tss.js's TCP device in linuxTrm mode speaks plain
  // SendCommand framing, which swtpm's data port accepts (its MS-simulator handshake does not).
  const tpm = new Tpm(true);
  tpm.device = new TpmTcpDevice('127.0.0.1', port, true);
  ctx.defer('close the TPM connection', async () => { if (tpm.device) tpm.close(); });
  const sc = new TpmSecurityClient(undefined, tpm);
  const ek = await cb((f) => sc.getEndorsementKey(f), 'TpmSecurityClient.getEndorsementKey');
  const regId = await cb((f) => sc.getRegistrationId(f), 'TpmSecurityClient.getRegistrationId');
  log(`[${ctx.name}] EK: ${ek.length} bytes (${ek.subarray(0, 4).toString('hex')}…); registration ID ${regId}`);
  check(Buffer.isBuffer(ek) && ek.length > 2 && ek.readUInt16BE(0) === ek.length - 2, 'EK is not a TPM2B_PUBLIC');
  check(/^[a-z2-7]{52}$/.test(regId), `registration ID ${regId} is not the 52-character base32 of SHA-256(EK)`);

  const ps = ProvisioningServiceClient.fromConnectionString(ctx.ep.dpsConnectionString);
  const deviceId = uniqueId('tpm');
  const ekB64 = ek.toString('base64');
  await withDeadline(ps.createOrUpdateIndividualEnrollment({
    registrationId: regId, deviceId, provisioningStatus: 'enabled',
    attestation: { type: 'tpm', tpm: { endorsementKey: ekB64 } },
    initialTwin: { tags: { attested: 'tpm' }, properties: { desired: { interval: 23 } } },
  }), OP_DEADLINE_MS, 'createOrUpdateIndividualEnrollment (TPM)');
  deleteLater(ctx, `delete enrollment ${regId}`, () => ps.deleteIndividualEnrollment(regId));
  const enr = (await withDeadline(ps.getIndividualEnrollment(regId), OP_DEADLINE_MS, 'getIndividualEnrollment')).responseBody;
  checkEqual(enr.attestation && enr.attestation.type, 'tpm', 'enrollment attestation.type');
  checkEqual(enr.attestation.tpm && enr.attestation.tpm.endorsementKey, ekB64, 'enrollment attestation.tpm.endorsementKey');

  // DPS over HTTPS cannot take a port (protocol-service.md §4.1): hubsim serves it on 443.
  const pdc = ProvisioningDeviceClient.create(ctx.ep.hubHostName, ctx.ep.idScope, new ProvHttp(), sc);
  deleteLater(ctx, `delete registration ${regId}`, () => ps.deleteDeviceRegistrationState(regId));
  deleteLater(ctx, `delete hub device ${deviceId}`, () => ctx.registry.delete(deviceId));
  const result = await withDeadline(pdc.register(), REGISTER_DEADLINE_MS, 'ProvisioningDeviceClient.register (TPM over HTTPS)');
  // TpmRegistration resolves with the whole operation status, not just registrationState.
  const rs = (result && result.registrationState) || result;
  log(`[${ctx.name}] registration result: ${truncate(JSON.stringify({ ...rs, tpm: rs && rs.tpm ? '(blob)' : rs && rs.tpm }), 600)}`);
  checkEqual(rs.status, 'assigned', 'registration status');
  checkEqual(rs.registrationId, regId, 'registrationId');
  checkEqual(rs.deviceId, deviceId, 'deviceId (the enrollment\'s)');
  checkEqual(rs.substatus, 'initialAssignment', 'substatus');
  check(typeof rs.assignedHub === 'string' && rs.assignedHub.length > 0, `no assignedHub in ${truncate(JSON.stringify(rs), 300)}`);
  check(rs.tpm && typeof rs.tpm.authenticationKey === 'string', 'no registrationState.tpm.authenticationKey');

  const st = (await withDeadline(ps.getDeviceRegistrationState(regId), OP_DEADLINE_MS, 'getDeviceRegistrationState')).responseBody;
  checkEqual(st.status, 'assigned', 'service view: registration state status');
  checkEqual(st.deviceId, deviceId, 'service view: deviceId');
  const dev = (await withDeadline(ctx.registry.get(deviceId), OP_DEADLINE_MS, 'Registry.get')).responseBody;
  checkEqual(dev.authentication && dev.authentication.type, 'sas', 'hub device authentication.type');

  // The device on its hub: every SAS token is signed in the TPM with the key of the final blob.
  const provider = TpmAuthenticationProvider.fromTpmSecurityClient(deviceId, rs.assignedHub, sc);
  const client = DeviceClient.fromAuthenticationProvider(provider, Mqtt);
  client.on('error', (err) => log(`[${ctx.name}] device client 'error': ${describeError(err)}`));
  ctx.defer('close TPM device client', async () => {
    try {
      await withDeadline(client.close(), CLEANUP_DEADLINE_MS - 1000, 'client.close()');
    } finally {
      provider.stop(); // its renewal timer would keep the process alive
      // Private fields, as in cases.js: a half-closed TLS socket would keep the process alive.
      const mc = client._transport && client._transport._mqtt && client._transport._mqtt._mqttClient;
      if (mc && mc.stream && !mc.stream.destroyed) mc.stream.destroy();
    }
  });
  await withDeadline(client.open(), OPEN_DEADLINE_MS, 'TPM device: client.open()');
  const twin = await withDeadline(client.getTwin(), OP_DEADLINE_MS, 'client.getTwin');
  checkEqual(twin.properties.desired.interval, 23, 'twin desired.interval from the enrollment\'s initialTwin');

  const body = JSON.stringify({ attestedBy: 'tpm', n: crypto.randomInt(1e9) });
  const msg = new Message(body);
  msg.messageId = 'mid-' + crypto.randomUUID();
  await withDeadline(client.sendEvent(msg), OP_DEADLINE_MS, 'client.sendEvent');
  const msgs = await ctx.waitForEvents(deviceId, 1);
  checkEqual(msgs.length, 1, 'recorded message count');
  const rec = msgs[0];
  checkEqual(Buffer.from(rec.body || '', 'base64').toString('utf8'), body, 'recorded body (base64-decoded)');
  const sys = rec.systemProperties || {};
  checkEqual(sys['message-id'], msg.messageId, 'systemProperties["message-id"]');
  checkEqual(sys['iothub-connection-device-id'], deviceId, 'systemProperties["iothub-connection-device-id"]');
  let am;
  try { am = JSON.parse(sys['iothub-connection-auth-method']); } catch (_) { am = undefined; }
  checkEqual(am && am.type, 'sas', 'iothub-connection-auth-method.type (TPM-signed SAS)');
  check(Date.parse(sys['iothub-enqueuedtime']) >= startedAt - 5000, `iothub-enqueuedtime ${sys['iothub-enqueuedtime']} before the case began`);
}

module.exports = { dpsTpmHttp };
