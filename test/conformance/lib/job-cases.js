'use strict';
// Jobs and query conformance cases: Microsoft's service SDK (azure-iothub JobClient
// scheduleTwinUpdate / scheduleDeviceMethod / getJob / cancelJob / createQuery, and
// Registry.createQuery paged with nextAsTwin and next) against hubsim, with our agent and
// Microsoft's device SDK as the devices.

const { JobClient } = require('azure-iothub');

const { check, checkEqual, describeError, poll, uniqueId, withDeadline } = require('./util');
const { startAgent } = require('./twin-cases');

const OP_DEADLINE_MS = 15000;
const JOB_DEADLINE_MS = 30000;
const OBSERVE_DEADLINE_MS = 15000;

// tagDevices creates n devices tagged {group} and returns their ids.
async function tagDevices(ctx, prefix, n, tags) {
  const ids = [];
  for (let i = 0; i < n; i++) {
    const id = uniqueId(`${prefix}${i}`);
    await ctx.createDevice(id);
    if (tags) {
      await withDeadline(ctx.registry.updateTwin(id, { tags }, '*'), OP_DEADLINE_MS, `Registry.updateTwin(${id})`);
    }
    ids.push(id);
  }
  return ids;
}

// Registry.createQuery with a page size: pages end exactly when x-ms-continuation stops.
async function serviceQueryPaging(ctx) {
  const group = uniqueId('qg');
  const ids = await tagDevices(ctx, 'q', 7, { confGroup: group, kind: 'sensor' });
  await tagDevices(ctx, 'qx', 1, { confGroup: `${group}-other` });

  const q = ctx.registry.createQuery(`SELECT * FROM devices WHERE tags.confGroup = '${group}'`, 3);
  const pages = [];
  const seen = [];
  while (q.hasMoreResults) {
    check(pages.length < 10, 'query did not stop paging');
    const r = await withDeadline(q.nextAsTwin(), OP_DEADLINE_MS, 'Query.nextAsTwin');
    pages.push(r.result.length);
    for (const twin of r.result) {
      checkEqual(twin.tags.confGroup, group, `twin ${twin.deviceId} tag`);
      seen.push(twin.deviceId);
    }
  }
  checkEqual(JSON.stringify(pages), '[3,3,1]', 'page sizes');
  checkEqual(JSON.stringify(seen.slice().sort()), JSON.stringify(ids.slice().sort()), 'devices returned');

  const agg = ctx.registry.createQuery(
    `SELECT tags.kind AS kind, COUNT() AS n FROM devices WHERE tags.confGroup = '${group}' GROUP BY tags.kind`);
  const a = await withDeadline(agg.next(), OP_DEADLINE_MS, 'Query.next (aggregate)');
  checkEqual(JSON.stringify(a.result), '[{"kind":"sensor","n":7}]', 'COUNT() GROUP BY');
  check(!agg.hasMoreResults, 'a single-page aggregate says it has more results');

  const proj = ctx.registry.createQuery(`SELECT deviceId FROM devices WHERE tags.confGroup = '${group}' AND deviceId = '${ids[0]}'`);
  const p = await withDeadline(proj.next(), OP_DEADLINE_MS, 'Query.next (projection)');
  checkEqual(JSON.stringify(p.result), JSON.stringify([{ deviceId: ids[0] }]), 'projection');

  let err;
  try {
    await withDeadline(ctx.registry.createQuery('SELECT * FROM devices WHERE tags.a ==').next(), OP_DEADLINE_MS, 'bad query');
  } catch (e) {
    err = e;
  }
  check(err && err.name !== 'DeadlineError', `a query that does not parse was accepted: ${describeError(err)}`);
  checkEqual(err.response && err.response.statusCode, 400, `bad query: HTTP status (${describeError(err)})`);
}

async function waitJob(jobs, id) {
  return poll(async () => {
    const r = await withDeadline(jobs.getJob(id), OP_DEADLINE_MS, `JobClient.getJob(${id})`);
    const s = r.jobStatus;
    return ['completed', 'failed', 'cancelled'].includes(s.status) ? s : undefined;
  }, { ms: JOB_DEADLINE_MS, intervalMs: 200, what: `job ${id} to finish` });
}

// JobClient twin-update and method jobs over a tag condition; devices: our agent and a device
// SDK client (in the group) and a device SDK client outside it.
async function jobClientWithDevices(ctx) {
  const group = uniqueId('jg');
  const [agentId] = await tagDevices(ctx, 'ja', 1, { confJobGroup: group });
  const [sdkId] = await tagDevices(ctx, 'js', 1, { confJobGroup: group });
  const [outId] = await tagDevices(ctx, 'jo', 1, { confJobGroup: `${group}-no` });

  const agent = startAgent(ctx, agentId, await ctx.sasKeyOf(agentId), ['methods:', '  echo:', '    echo: true']);
  const clients = {};
  const desired = {};
  for (const id of [sdkId, outId]) {
    const client = ctx.deviceClient(ctx.sasConnectionString(id, await ctx.sasKeyOf(id)));
    await ctx.openClient(client, `device ${id}`);
    client.onDeviceMethod('echo', (req, res) => res.send(200, { from: id, got: req.payload }, () => {}));
    const twin = await withDeadline(client.getTwin(), OP_DEADLINE_MS, `getTwin(${id})`);
    desired[id] = [];
    twin.on('properties.desired', (d) => desired[id].push(d));
    clients[id] = client;
  }
  await agent.waitLog('twin synced', (l) => l.msg === 'twin synced');
  await poll(async () => {
    const subs = (await ctx.admin.connections()).filter((c) => c && [sdkId, outId].includes(c.deviceId) &&
      (c.subscriptions || []).includes('$iothub/methods/POST/#') &&
      (c.subscriptions || []).includes('$iothub/twin/PATCH/properties/desired/#'));
    return subs.length === 2 ? true : undefined;
  }, { ms: OBSERVE_DEADLINE_MS, what: 'method and desired subscriptions of the SDK devices' });

  const jobs = JobClient.fromConnectionString(ctx.ep.serviceConnectionString);
  const cond = `tags.confJobGroup = '${group}'`;

  // twin update: etag '*' as IoT Hub requires
  const twinJobId = uniqueId('twinjob');
  const mark = Date.now();
  const sched = await withDeadline(jobs.scheduleTwinUpdate(twinJobId, cond, { etag: '*', properties: { desired: { confMark: mark } } }),
    OP_DEADLINE_MS, 'JobClient.scheduleTwinUpdate');
  checkEqual(sched.jobStatus.jobId, twinJobId, 'scheduled job id');
  checkEqual(sched.jobStatus.type, 'scheduleUpdateTwin', 'scheduled job type');
  let done = await waitJob(jobs, twinJobId);
  checkEqual(done.status, 'completed', 'twin job status');
  checkEqual(JSON.stringify(done.deviceJobStatistics),
    JSON.stringify({ deviceCount: 2, failedCount: 0, succeededCount: 2, runningCount: 0, pendingCount: 0 }), 'twin job statistics');
  for (const [id, want] of [[agentId, mark], [sdkId, mark], [outId, undefined]]) {
    const t = (await withDeadline(ctx.registry.getTwin(id), OP_DEADLINE_MS, `getTwin(${id})`)).responseBody;
    checkEqual(t.properties.desired.confMark, want, `desired.confMark of ${id}`);
  }
  await poll(async () => (desired[sdkId].some((d) => d.confMark === mark) ? true : undefined),
    { ms: OBSERVE_DEADLINE_MS, what: 'the SDK device to receive the job\'s desired patch' });
  check(!desired[outId].some((d) => d.confMark === mark), 'the device outside the condition received the patch');

  // direct method over the same devices, plus the per-device outcomes through devices.jobs
  const methodJobId = uniqueId('methjob');
  await withDeadline(jobs.scheduleDeviceMethod(methodJobId, cond, { methodName: 'echo', payload: { n: 1 }, responseTimeoutInSeconds: 10 }),
    OP_DEADLINE_MS, 'JobClient.scheduleDeviceMethod');
  done = await waitJob(jobs, methodJobId);
  checkEqual(done.status, 'completed', 'method job status');
  checkEqual(done.deviceJobStatistics.succeededCount, 2, 'method job succeededCount');
  const rows = (await withDeadline(ctx.registry.createQuery(
    `SELECT * FROM devices.jobs WHERE devices.jobs.jobId = '${methodJobId}'`).next(), OP_DEADLINE_MS, 'devices.jobs query')).result;
  checkEqual(rows.length, 2, 'devices.jobs rows');
  for (const row of rows) {
    check([agentId, sdkId].includes(row.deviceId), `unexpected device ${row.deviceId}`);
    checkEqual(row.status, 'completed', `${row.deviceId} device job status`);
    const resp = row.outcome && row.outcome.deviceMethodResponse;
    checkEqual(resp && resp.status, 200, `${row.deviceId} method status`);
    if (row.deviceId === sdkId) checkEqual(JSON.stringify(resp.payload), JSON.stringify({ from: sdkId, got: { n: 1 } }), 'SDK device payload');
    else checkEqual(JSON.stringify(resp.payload), '{"n":1}', 'agent echo payload');
  }

  // a job that starts later can be cancelled before it runs
  const laterId = uniqueId('laterjob');
  const later = await withDeadline(jobs.scheduleTwinUpdate(laterId, '*', { etag: '*', tags: { never: true } },
    new Date(Date.now() + 3600 * 1000), 600), OP_DEADLINE_MS, 'scheduleTwinUpdate (later)');
  checkEqual(later.jobStatus.status, 'scheduled', 'future job status');
  const cancelled = await withDeadline(jobs.cancelJob(laterId), OP_DEADLINE_MS, 'JobClient.cancelJob');
  checkEqual(cancelled.jobStatus.status, 'cancelled', 'cancelled job status');

  const listed = await withDeadline(jobs.createQuery('scheduleUpdateTwin', 'cancelled').next(), OP_DEADLINE_MS, 'JobClient.createQuery');
  check(listed.result.some((j) => j.jobId === laterId), `job query lacks ${laterId}`);
  check(!listed.result.some((j) => j.jobId === twinJobId), 'job query ignored jobStatus');

  let err;
  try {
    await withDeadline(jobs.getJob(uniqueId('nojob')), OP_DEADLINE_MS, 'getJob (unknown)');
  } catch (e) {
    err = e;
  }
  checkEqual(err && err.response && err.response.statusCode, 404, `unknown job (${describeError(err)})`);
}

// Registry.addDevices / updateDevices / removeDevices: the bulk registry operation (POST /devices)
// with the capitalised import modes the Node SDK sends, and per-device errors on a failed row.
async function bulkRegistry(ctx) {
  const ids = [uniqueId('bulk0'), uniqueId('bulk1'), uniqueId('bulk2')];
  for (const id of ids) {
    ctx.defer(`delete device ${id}`, async () => { try { await ctx.registry.delete(id); } catch (_) { /* gone */ } });
  }
  const add = await withDeadline(ctx.registry.addDevices(ids.map((deviceId) => ({ deviceId }))), OP_DEADLINE_MS, 'Registry.addDevices');
  checkEqual(add.responseBody.isSuccessful, true, `addDevices isSuccessful (${JSON.stringify(add.responseBody)})`);
  checkEqual(add.responseBody.errors.length, 0, 'addDevices errors');
  const dev = (await withDeadline(ctx.registry.get(ids[0]), OP_DEADLINE_MS, 'Registry.get')).responseBody;
  check(/^[A-Za-z0-9+/]{43}=$/.test(dev.authentication.symmetricKey.primaryKey), `generated key ${dev.authentication.symmetricKey.primaryKey}`);

  // updateDevices(force=true) sends importMode "Update"
  const upd = await withDeadline(ctx.registry.updateDevices([{ deviceId: ids[1], status: 'disabled' }], true),
    OP_DEADLINE_MS, 'Registry.updateDevices');
  checkEqual(upd.responseBody.isSuccessful, true, 'updateDevices isSuccessful');
  checkEqual((await ctx.registry.get(ids[1])).responseBody.status, 'disabled', 'status after bulk update');

  // an existing device in addDevices: the row fails (DeviceAlreadyExists), the others succeed
  const fresh = uniqueId('bulk3');
  ctx.defer(`delete device ${fresh}`, async () => { try { await ctx.registry.delete(fresh); } catch (_) { /* gone */ } });
  let err;
  try {
    await withDeadline(ctx.registry.addDevices([{ deviceId: ids[0] }, { deviceId: fresh }]), OP_DEADLINE_MS, 'addDevices (one exists)');
  } catch (e) {
    err = e;
  }
  check(err && err.name !== 'DeadlineError', `addDevices with an existing device: ${err ? describeError(err) : 'resolved'}`);
  checkEqual(err.response && err.response.statusCode, 400, `partly failed batch status (${describeError(err)})`);
  const body = JSON.parse(err.responseBody);
  checkEqual(body.isSuccessful, false, 'isSuccessful of a partly failed batch');
  checkEqual(JSON.stringify(body.errors.map((e) => [e.deviceId, e.errorCode])), JSON.stringify([[ids[0], 'DeviceAlreadyExists']]), 'row errors');
  checkEqual((await ctx.registry.get(fresh)).responseBody.deviceId, fresh, 'the good row of a partly failed batch');

  // removeDevices(force=true) sends importMode "Delete"
  const rm = await withDeadline(ctx.registry.removeDevices(ids.map((deviceId) => ({ deviceId })), true), OP_DEADLINE_MS, 'Registry.removeDevices');
  checkEqual(rm.responseBody.isSuccessful, true, 'removeDevices isSuccessful');
  let gone;
  try {
    await ctx.registry.get(ids[2]);
  } catch (e) {
    gone = e;
  }
  checkEqual(gone && gone.response && gone.response.statusCode, 404, 'get after bulk remove');
}

module.exports = { serviceQueryPaging, jobClientWithDevices, bulkRegistry };
