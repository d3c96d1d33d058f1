#!/usr/bin/env node
'use strict';
// Conformance harness entry point: runs Microsoft's Node IoT SDKs, unmodified, against hubsim.
//
//   HUBSIM_BIN=bin/hubsim node test/conformance/run.js      start a fresh hubsim, run, stop it
//   HUBSIM_STATE=/path/to/state node test/conformance/run.js  use a hubsim that is already running
//
// Optional: HUBSIM_HTTPS_ADDR (default 127.0.0.1:443, only with HUBSIM_BIN),
// CONFORMANCE_CASES=a,b (run a subset), CONFORMANCE_STARTUP_TIMEOUT_MS (default 30000),
// CONFORMANCE_TIMEOUT_MS (whole case run, default 600000), CONFORMANCE_KEEP_STATE=1.
//
// The cases run in a child process (lib/cases.js) because Node reads NODE_EXTRA_CA_CERTS only
// at start-up, and hubsim's CA file exists only once hubsim has started.

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const STARTUP_TIMEOUT_MS = Number(process.env.CONFORMANCE_STARTUP_TIMEOUT_MS || 30000);
const RUN_TIMEOUT_MS = Number(process.env.CONFORMANCE_TIMEOUT_MS || 600000);
const STOP_TIMEOUT_MS = 10000;
const SUMMARY_RE = /^(\d+) passed, (\d+) failed$/;

function log(msg) {
  process.stderr.write(`conformance: ${msg}\n`);
}

const delay = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Final output when the case runner could not report for itself.
function finish(passed, failed, reason) {
  console.log(`FAIL harness: ${reason}`);
  console.log(`${passed} passed, ${failed + 1} failed`);
}

function tail(file, lines) {
  try {
    return fs.readFileSync(file, 'utf8').split('\n').slice(-lines).join('\n');
  } catch (err) {
    return `(cannot read ${file}: ${err.message})`;
  }
}

// startHubsim launches `HUBSIM_BIN serve` on a fresh state dir, logging to <state>/hubsim.log.
function startHubsim(bin, stateDir) {
  const httpsAddr = process.env.HUBSIM_HTTPS_ADDR || '127.0.0.1:443';
  // azure-iothub dials amqps://<HostName>:5671, so AMQP must be there (an explicit address fails
  // loudly when taken instead of moving to a free port).
  const amqpAddr = process.env.HUBSIM_AMQP_ADDR || '127.0.0.1:5671';
  const args = ['serve', '--state', stateDir, '--https-addr', httpsAddr, '--mqtt-addr', '127.0.0.1:0', '--amqp-addr', amqpAddr];
  const logFile = path.join(stateDir, 'hubsim.log');
  const fd = fs.openSync(logFile, 'a');
  log(`starting ${bin} ${args.join(' ')}`);
  const child = spawn(bin, args, { stdio: ['ignore', fd, fd] });
  fs.closeSync(fd);
  const proc = { child, logFile, exited: false, code: null, signal: null, spawnError: null };
  proc.exitPromise = new Promise((resolve) => {
    child.on('error', (err) => { proc.spawnError = err; proc.exited = true; resolve(); });
    child.on('exit', (code, signal) => { proc.exited = true; proc.code = code; proc.signal = signal; resolve(); });
  });
  return proc;
}

async function stopHubsim(proc) {
  if (!proc || proc.exited) return;
  proc.child.kill('SIGTERM');
  const stopped = await Promise.race([proc.exitPromise.then(() => true), delay(STOP_TIMEOUT_MS).then(() => false)]);
  if (!stopped) {
    log(`hubsim did not exit within ${STOP_TIMEOUT_MS} ms of SIGTERM; sending SIGKILL`);
    proc.child.kill('SIGKILL');
    await proc.exitPromise;
  } else if (proc.code !== 0) {
    log(`warning: hubsim exited with code ${proc.code} signal ${proc.signal} after SIGTERM (contract: exit 0)`);
  }
}

// waitForEndpoints polls for a complete endpoints.json whose CA file exists.
async function waitForEndpoints(stateDir, proc) {
  const file = path.join(stateDir, 'endpoints.json');
  const end = Date.now() + STARTUP_TIMEOUT_MS;
  let last = 'endpoints.json not present';
  for (;;) {
    if (proc && proc.exited) {
      const why = proc.spawnError ? proc.spawnError.message : `exit code ${proc.code} signal ${proc.signal}`;
      const err = new Error(`hubsim exited before writing endpoints.json (${why})`);
      err.logTail = tail(proc.logFile, 30);
      throw err;
    }
    try {
      const ep = JSON.parse(fs.readFileSync(file, 'utf8'));
      if (!ep.caFile) last = 'endpoints.json has no caFile';
      else if (!fs.existsSync(ep.caFile)) last = `caFile ${ep.caFile} does not exist`;
      else return { file, ep };
    } catch (err) {
      if (err.code !== 'ENOENT') last = `endpoints.json unreadable: ${err.message}`;
    }
    if (Date.now() >= end) {
      const err = new Error(`no usable ${file} after ${STARTUP_TIMEOUT_MS} ms (${last})`);
      if (proc) err.logTail = tail(proc.logFile, 30);
      throw err;
    }
    await delay(100);
  }
}

function processAlive(pid) {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return err.code === 'EPERM';
  }
}

// runCases runs lib/cases.js with the CA trusted, forwarding its stdout and watching for the
// summary line so a crash or timeout still ends with one.
function runCases(endpointsFile, caFile) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [path.join(__dirname, 'lib', 'cases.js')], {
      env: { ...process.env, NODE_EXTRA_CA_CERTS: caFile, HUBSIM_ENDPOINTS: endpointsFile },
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    const seen = { passed: 0, failed: 0, summary: false };
    let buf = '';
    child.stdout.on('data', (chunk) => {
      process.stdout.write(chunk);
      buf += chunk.toString('utf8');
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (line.startsWith('PASS ')) seen.passed++;
        else if (line.startsWith('FAIL ')) seen.failed++;
        else if (SUMMARY_RE.test(line)) seen.summary = true;
      }
    });
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      log(`case run exceeded ${RUN_TIMEOUT_MS} ms; killing it`);
      child.kill('SIGKILL');
    }, RUN_TIMEOUT_MS);
    runCases.child = child;
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      runCases.child = null;
      if (!seen.summary) {
        const why = timedOut ? `case run timed out after ${RUN_TIMEOUT_MS} ms` : `case runner exited (code ${code}, signal ${signal}) without a summary`;
        finish(seen.passed, seen.failed, why);
        resolve(1);
        return;
      }
      resolve(code === 0 && seen.failed === 0 ? 0 : 1);
    });
  });
}

async function main() {
  try {
    require.resolve('azure-iothub', { paths: [__dirname] });
  } catch (_) {
    finish(0, 0, `SDK packages missing: run "npm ci --ignore-scripts" in ${__dirname}`);
    return 1;
  }

  let stateDir;
  let proc = null;
  let ownState = false;
  if (process.env.HUBSIM_STATE) {
    stateDir = path.resolve(process.env.HUBSIM_STATE);
    if (process.env.HUBSIM_BIN) log('both HUBSIM_STATE and HUBSIM_BIN set; using the running hubsim in HUBSIM_STATE');
  } else if (process.env.HUBSIM_BIN) {
    stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'hubsim-conformance-'));
    ownState = true;
    proc = startHubsim(path.resolve(process.env.HUBSIM_BIN), stateDir);
  } else {
    finish(0, 0, 'set HUBSIM_BIN (path to the hubsim binary) or HUBSIM_STATE (state dir of a running hubsim)');
    return 1;
  }

  const onSignal = (sig) => {
    log(`received ${sig}; stopping`);
    if (runCases.child) runCases.child.kill('SIGKILL');
    stopHubsim(proc).finally(() => {
      if (ownState) log(`kept hubsim state dir ${stateDir}`);
      process.exit(130);
    });
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  let code = 1;
  try {
    let endpoints;
    try {
      endpoints = await waitForEndpoints(stateDir, proc);
    } catch (err) {
      finish(0, 0, err.message);
      if (err.logTail !== undefined) process.stderr.write(`conformance: hubsim log tail (${proc.logFile}):\n${err.logTail}\n`);
      return 1;
    }
    if (!proc && endpoints.ep.pid && !processAlive(endpoints.ep.pid)) {
      finish(0, 0, `${endpoints.file} names pid ${endpoints.ep.pid}, which is not running (stale file?)`);
      return 1;
    }
    code = await runCases(endpoints.file, endpoints.ep.caFile);
    if (code !== 0 && proc) {
      process.stderr.write(`conformance: hubsim log tail (${proc.logFile}):\n${tail(proc.logFile, 40)}\n`);
    }
    return code;
  } finally {
    await stopHubsim(proc);
    if (ownState) {
      if (code === 0 && !process.env.CONFORMANCE_KEEP_STATE) fs.rmSync(stateDir, { recursive: true, force: true });
      else log(`kept hubsim state dir ${stateDir}`);
    }
  }
}

main().then((code) => process.exit(code), (err) => {
  finish(0, 0, `harness error: ${err && err.stack ? err.stack : err}`);
  process.exit(1);
});
