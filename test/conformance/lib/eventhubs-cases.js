'use strict';
// The Event Hubs-compatible endpoint (shared/reference/protocol-amqp.md §4): Microsoft's
// @azure/event-hubs EventHubConsumerClient, unmodified, reading the telemetry our agent sends
// through hubsim, from the connection string hubsim puts in endpoints.json
// (eventHubsCompatibleConnectionString).

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const { EventHubConsumerClient, earliestEventPosition } = require('@azure/event-hubs');

const { check, checkEqual, describeError, truncate, uniqueId, withDeadline } = require('./util');

const OP_DEADLINE_MS = 20000;
const OBSERVE_DEADLINE_MS = 20000;

function log(msg) {
  process.stderr.write(`  ${msg}\n`);
}

function agentBin() {
  if (process.env.AGENT_BIN) return path.resolve(process.env.AGENT_BIN);
  if (process.env.HUBSIM_BIN) return path.join(path.dirname(path.resolve(process.env.HUBSIM_BIN)), 'agent');
  throw new Error('set AGENT_BIN (path to the agent binary) or HUBSIM_BIN');
}

// startTelemetryAgent runs our agent for a device, sending telemetry every 200 ms with a body
// that names the device and a sequence number.
function startTelemetryAgent(ctx, deviceId, key) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'conf-eh-agent-'));
  const csFile = path.join(dir, 'cs');
  fs.writeFileSync(csFile, ctx.sasConnectionString(deviceId, key), { mode: 0o600 });
  const cfgFile = path.join(dir, 'agent.yaml');
  fs.writeFileSync(cfgFile, [
    `connectionStringFile: ${JSON.stringify(csFile)}`,
    `tls:\n  caFile: ${JSON.stringify(ctx.ep.caFile)}`,
    'telemetry:',
    '  interval: 200ms',
    `  template: '{"deviceId":"{{.DeviceID}}","seq":{{.Seq}}}'`,
    '  properties:\n    source: conformance',
    'log:\n  format: json\n  level: info',
    '',
  ].join('\n'), { mode: 0o600 });
  const child = spawn(agentBin(), ['run', '--config', cfgFile], { stdio: ['ignore', 'ignore', 'pipe'] });
  let tail = '';
  child.stderr.on('data', (c) => { tail = (tail + c.toString('utf8')).slice(-2000); });
  let exited = null;
  const exit = new Promise((resolve) => child.on('exit', (code, signal) => { exited = { code, signal }; resolve(); }));
  ctx.defer('stop agent', async () => {
    if (!exited) child.kill('SIGTERM');
    await withDeadline(exit, 8000, 'agent exit after SIGTERM').catch((e) => { child.kill('SIGKILL'); throw e; });
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { tail: () => tail, exited: () => exited };
}

function consumer(ctx) {
  const cs = ctx.ep.eventHubsCompatibleConnectionString;
  check(typeof cs === 'string' && cs.startsWith('Endpoint=sb://'), `endpoints.json eventHubsCompatibleConnectionString: ${JSON.stringify(cs)}`);
  const client = new EventHubConsumerClient('$Default', cs);
  ctx.defer('close EventHubConsumerClient', () => client.close());
  return client;
}

// collect subscribes with options and resolves with the first `n` events from deviceId (events
// of other devices in the same partitions are skipped).
function collect(client, deviceId, n, options, what) {
  const got = [];
  let sub;
  const p = new Promise((resolve, reject) => {
    sub = client.subscribe({
      processEvents: async (events) => {
        for (const ev of events) {
          if (ev.systemProperties && ev.systemProperties['iothub-connection-device-id'] === deviceId) got.push(ev);
        }
        if (got.length >= n) resolve(got.slice(0, n));
      },
      processError: async (err) => {
        log(`[eventhubs] processError: ${describeError(err)}`);
        if (err && err.name === 'MessagingError' && err.retryable === false) reject(err);
      },
    }, { maxBatchSize: 10, maxWaitTimeInSeconds: 1, ...options });
  });
  return withDeadline(p, OBSERVE_DEADLINE_MS, what).finally(() => sub && sub.close());
}

function checkEvent(ev, deviceId, what) {
  check(ev.body && typeof ev.body === 'object', `${what}: body not JSON-parsed: ${truncate(JSON.stringify(ev.body), 200)}`);
  checkEqual(ev.body.deviceId, deviceId, `${what}: body.deviceId`);
  check(Number.isInteger(ev.body.seq), `${what}: body.seq ${ev.body.seq}`);
  checkEqual(ev.systemProperties['iothub-connection-device-id'], deviceId, `${what}: systemProperties["iothub-connection-device-id"]`);
  checkEqual(ev.systemProperties['iothub-message-source'], 'Telemetry', `${what}: systemProperties["iothub-message-source"]`);
  check(typeof ev.systemProperties['iothub-connection-auth-method'] === 'string', `${what}: no iothub-connection-auth-method`);
  check(typeof ev.systemProperties['iothub-enqueuedtime'] === 'number', `${what}: iothub-enqueuedtime ${ev.systemProperties['iothub-enqueuedtime']} is not a number (ms)`);
  check(ev.enqueuedTimeUtc instanceof Date && !Number.isNaN(ev.enqueuedTimeUtc.getTime()), `${what}: enqueuedTimeUtc ${ev.enqueuedTimeUtc}`);
  check(Number.isInteger(ev.sequenceNumber) && ev.sequenceNumber >= 0, `${what}: sequenceNumber ${ev.sequenceNumber}`);
  check(typeof ev.offset === 'string' || typeof ev.offset === 'number', `${what}: offset ${ev.offset}`);
  checkEqual(ev.properties && ev.properties.source, 'conformance', `${what}: properties.source`);
  checkEqual(ev.contentType, 'application/json', `${what}: contentType`);
}

// The agent sends telemetry; EventHubConsumerClient reads it from the earliest position (every
// event in order, contiguous sequence numbers, the device id annotation), then from an enqueued
// time (only later events).
async function eventHubsReadAgentTelemetry(ctx) {
  const id = uniqueId('eh');
  await ctx.createDevice(id);
  const key = await ctx.sasKeyOf(id);
  const agent = startTelemetryAgent(ctx, id, key);
  const client = consumer(ctx);

  const first = await collect(client, id, 3, { startPosition: earliestEventPosition }, 'three events from the earliest position')
    .catch((e) => { e.lastObservation = agent.tail(); throw e; });
  first.forEach((ev, i) => checkEvent(ev, id, `earliest event ${i}`));
  for (let i = 1; i < first.length; i++) {
    checkEqual(first[i].body.seq, first[i - 1].body.seq + 1, `event ${i} follows event ${i - 1} (body.seq)`);
    checkEqual(first[i].sequenceNumber, first[i - 1].sequenceNumber + 1, `event ${i}: sequenceNumber contiguous`);
    checkEqual(first[i].partitionKey, undefined, 'partitionKey (IoT Hub sets none)');
  }
  log(`[eventhubs-read-agent-telemetry] first event: ${truncate(JSON.stringify({ body: first[0].body, sys: first[0].systemProperties, seq: first[0].sequenceNumber, offset: first[0].offset }), 600)}`);

  const since = first[2].enqueuedTimeUtc;
  const later = await collect(client, id, 2, { startPosition: { enqueuedOn: since } }, 'two events after an enqueued time');
  later.forEach((ev, i) => checkEvent(ev, id, `event ${i} after the enqueued time`));
  check(later[0].enqueuedTimeUtc.getTime() > since.getTime(),
    `first event from enqueuedOn ${since.toISOString()} was enqueued at ${later[0].enqueuedTimeUtc.toISOString()} (not after)`);
  check(later[0].body.seq > first[2].body.seq, `events after the enqueued time start at seq ${later[0].body.seq}, not after ${first[2].body.seq}`);
}

// getEventHubProperties and getPartitionIds ($management), and getPartitionProperties.
async function eventHubsProperties(ctx) {
  const client = consumer(ctx);
  const props = await withDeadline(client.getEventHubProperties(), OP_DEADLINE_MS, 'getEventHubProperties');
  checkEqual(props.name, ctx.ep.eventHubsCompatibleName, 'getEventHubProperties().name');
  check(props.createdOn instanceof Date && !Number.isNaN(props.createdOn.getTime()), `createdOn ${props.createdOn}`);
  check(Array.isArray(props.partitionIds) && props.partitionIds.length >= 2, `partitionIds ${JSON.stringify(props.partitionIds)}`);
  const ids = await withDeadline(client.getPartitionIds(), OP_DEADLINE_MS, 'getPartitionIds');
  checkEqual(JSON.stringify(ids), JSON.stringify(props.partitionIds), 'getPartitionIds() vs partitionIds');
  checkEqual(JSON.stringify(ids), JSON.stringify(ids.map((_, i) => String(i))), 'partition ids are "0".."n-1"');
  const pp = await withDeadline(client.getPartitionProperties(ids[0]), OP_DEADLINE_MS, 'getPartitionProperties');
  checkEqual(pp.partitionId, ids[0], 'getPartitionProperties().partitionId');
  checkEqual(pp.eventHubName, props.name, 'getPartitionProperties().eventHubName');
  check(typeof pp.isEmpty === 'boolean', `isEmpty ${pp.isEmpty}`);
  check(Number.isInteger(pp.beginningSequenceNumber) && Number.isInteger(pp.lastEnqueuedSequenceNumber),
    `sequence numbers ${pp.beginningSequenceNumber} / ${pp.lastEnqueuedSequenceNumber}`);
  let err;
  try {
    await withDeadline(client.getPartitionProperties('99'), OP_DEADLINE_MS, 'getPartitionProperties(99)');
  } catch (e) { err = e; }
  check(err && err.name !== 'DeadlineError', `getPartitionProperties('99') did not fail cleanly: ${err && err.message}`);
}

module.exports = { eventHubsReadAgentTelemetry, eventHubsProperties };
