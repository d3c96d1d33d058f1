'use strict';
// Holds N Microsoft Node device SDK clients (azure-iot-device + azure-iot-device-mqtt) connected
// to one hubsim in this one process, for test/bench's fleet-memory comparison. Modules resolve
// from test/conformance/node_modules (NODE_PATH); NODE_EXTRA_CA_CERTS must name hubsim's CA.
//
// Input: argv[2] is a JSON file {host, mqttAddress, devices: [{id, key}], parallel,
// telemetryMs}. Protocol on stdout: "BASE" once the SDK is loaded and nothing is connected,
// "HELD <connected>" once every client is open (telemetry then runs every telemetryMs), and the
// process exits when stdin closes. Errors go to stderr; any failed open exits 1.
const fs = require('fs');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');

const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const clients = [];
const timers = [];

async function openOne(d) {
  const cs = `HostName=${spec.host};DeviceId=${d.id};SharedAccessKey=${d.key};GatewayHostName=${spec.mqttAddress}`;
  const c = Client.fromConnectionString(cs, Mqtt);
  c.on('error', (err) => process.stderr.write(`node fleet: ${d.id}: ${err && err.message}\n`));
  await c.open();
  // The same subscriptions a device session holds: C2D, twin (responses + desired), methods.
  c.on('message', (m) => c.complete(m, () => {}));
  await c.getTwin();
  c.onDeviceMethod('bench', (req, res) => res.send(200, {}, () => {}));
  clients.push(c);
  if (spec.telemetryMs > 0) {
    let seq = 0;
    const t = setInterval(() => {
      seq++;
      const body = JSON.stringify({ deviceId: d.id, seq, time: new Date().toISOString(), temperature: 25 });
      c.sendEvent(new Message(body), () => {});
    }, spec.telemetryMs);
    timers.push(t);
  }
}

async function main() {
  process.stdout.write('BASE\n');
  let next = 0;
  const workers = [];
  for (let w = 0; w < (spec.parallel || 32); w++) {
    workers.push((async () => {
      while (next < spec.devices.length) {
        const d = spec.devices[next++];
        await openOne(d);
      }
    })());
  }
  await Promise.all(workers);
  if (global.gc) global.gc();
  process.stdout.write(`HELD ${clients.length}\n`);
}

process.stdin.on('end', () => {
  for (const t of timers) clearInterval(t);
  Promise.allSettled(clients.map((c) => c.close())).then(() => process.exit(0));
  setTimeout(() => process.exit(0), 10000).unref();
});
process.stdin.resume();
main().catch((err) => {
  process.stderr.write(`node fleet: ${err && err.stack || err}\n`);
  process.exit(1);
});
