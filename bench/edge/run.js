#!/usr/bin/env node
'use strict';
// Side by side, in one session: the seed system (seed/server.js + MariaDB) and presence + edge
// (trust-client), the same graph and the same socket.io load (load/index.js) at each rate.
//
//   node bench/edge/run.js --presence-bin ./target/release/presence --rates 500,2000,4000
//
// For each target it sets the graph up, starts the target, runs the generator (connect N
// sockets, idle memory, then every rate), stops the target, and at the end prints one table.
// Everything it starts is stopped when it ends (or on Ctrl-C).
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { spawn, execFileSync } = require('node:child_process');
const { parseArgs } = require('node:util');
const { setup: setupSeed } = require('./seed/setup');
const { setupPresence } = require('./load/setup-presence');
const { formatTable } = require('./load/report');
const { machineTicks, ticksPerSecond } = require('./lib/procstat');

const DEFAULT_EDGE_DIR = path.resolve(__dirname, '..', '..', 'edge');

const USAGE = `usage: node bench/edge/run.js [options]
  --targets LIST         seed,edge (default: both; edge needs --presence-bin)
  --presence-bin PATH    the presence binary (a release build for real figures)
  --edge-dir DIR         the edge to run (default: this checkout's edge/); another version, e.g.
                         git archive REV edge proto | tar -x -C /tmp/edge-REV; (cd /tmp/edge-REV/edge && npm ci)
  --users N --contacts K --rates R1,R2 --duration S --warmup S --drain S --workers W --client KIND
  --busy-above CORES --retry-busy N
                         passed to the generator (defaults 10000, 20, 500,2000,4000, 15, 3, 10, auto, lean,
                         0.25, 1)
  --seed-db-url URL      default mysql://root@127.0.0.1:3306/seed_bench (database name must start with seed_)
  --mariadb-pid PID      sampled with the seed (default: pidof mariadbd / mysqld)
  --presence-env K=V     extra environment for the presence service (repeatable)
  --edge-env K=V         extra environment for the edge (repeatable)
  --quiet-below CORES    before each target, wait until the machine's other load is below this
                         (busy cores over 3 s; default 0.3; 0 = do not wait)
  --quiet-wait S         wait at most this long for it (default 600), then run anyway
  --json FILE            every figure of both targets as JSON
  --keep DIR             keep logs and per-target JSON in DIR (default: a temporary directory, removed)`;

function parseCli(argv) {
  const { values } = parseArgs({
    args: argv,
    options: {
      targets: { type: 'string' },
      'presence-bin': { type: 'string' },
      'edge-dir': { type: 'string', default: DEFAULT_EDGE_DIR },
      users: { type: 'string', default: '10000' },
      contacts: { type: 'string', default: '20' },
      rates: { type: 'string', default: '500,2000,4000' },
      duration: { type: 'string', default: '15' },
      warmup: { type: 'string', default: '3' },
      drain: { type: 'string', default: '10' },
      workers: { type: 'string' },
      client: { type: 'string', default: 'lean' },
      'busy-above': { type: 'string', default: '0.25' },
      'retry-busy': { type: 'string', default: '1' },
      'seed-db-url': { type: 'string', default: process.env.SEED_DATABASE_URL || 'mysql://root@127.0.0.1:3306/seed_bench' },
      'mariadb-pid': { type: 'string' },
      'presence-env': { type: 'string', multiple: true, default: [] },
      'edge-env': { type: 'string', multiple: true, default: [] },
      json: { type: 'string' },
      keep: { type: 'string' },
      'quiet-below': { type: 'string', default: '0.3' },
      'quiet-wait': { type: 'string', default: '600' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    process.exit(0);
  }
  const targets = (values.targets || (values['presence-bin'] ? 'seed,edge' : 'seed')).split(',');
  for (const t of targets) {
    if (t !== 'seed' && t !== 'edge') fail(`unknown target ${t}`);
  }
  if (targets.includes('edge') && !values['presence-bin']) fail('the edge target needs --presence-bin');
  const envPairs = (list, flag) =>
    Object.fromEntries(
      list.map((kv) => {
        const i = kv.indexOf('=');
        if (i < 1) fail(`${flag} wants KEY=VALUE, got ${kv}`);
        return [kv.slice(0, i), kv.slice(i + 1)];
      }),
    );
  return {
    ...values,
    targets,
    presenceEnv: envPairs(values['presence-env'], '--presence-env'),
    edgeEnv: envPairs(values['edge-env'], '--edge-env'),
  };
}

function fail(message) {
  process.stderr.write(`run: ${message}\n`);
  process.exit(2);
}

const log = (msg) => process.stderr.write(`run: ${msg}\n`);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Children this script started, stopped on exit whatever happens. */
const started = new Set();

function stopAll() {
  for (const child of started) {
    try {
      process.kill(child.pid, 'SIGKILL');
    } catch {
      // already gone
    }
  }
}
process.on('exit', stopAll);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    stopAll();
    process.exit(130);
  });
}

/** Spawns a long-running process; resolves with { child, match } once a stdout line matches `ready`. */
function startProcess(name, cmd, args, { env, cwd, ready, logDir, timeoutMs = 60000 }) {
  const logFile = path.join(logDir, `${name}.log`);
  const logStream = fs.createWriteStream(logFile);
  const child = spawn(cmd, args, { env: { ...process.env, ...env }, cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  started.add(child);
  child.on('exit', () => started.delete(child));
  child.stderr.pipe(logStream);
  return new Promise((resolve, reject) => {
    let buffered = '';
    const timer = setTimeout(() => reject(new Error(`${name} did not start within ${timeoutMs} ms (see ${logFile})`)), timeoutMs);
    child.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${name} exited with ${code} before it was ready (see ${logFile})`));
    });
    child.stdout.on('data', (chunk) => {
      logStream.write(chunk);
      buffered += chunk.toString();
      const m = ready.exec(buffered);
      if (m) {
        clearTimeout(timer);
        child.removeAllListeners('exit');
        child.on('exit', () => started.delete(child));
        resolve({ child, match: m });
      }
    });
  });
}

async function stopProcess(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), 10000);
  await exited;
  clearTimeout(timer);
}

/** Runs the generator against `url` and returns its JSON result. */
function runLoad(cfg, { url, label, pids, jsonFile }) {
  const args = [
    path.join(__dirname, 'load', 'index.js'),
    '--url', url,
    '--label', cfg.client === 'lean' ? label : `${label} [${cfg.client}]`,
    '--users', cfg.users,
    '--contacts', cfg.contacts,
    '--rates', cfg.rates,
    '--duration', cfg.duration,
    '--warmup', cfg.warmup,
    '--drain', cfg.drain,
    '--client', cfg.client,
    '--busy-above', cfg['busy-above'],
    '--retry-busy', cfg['retry-busy'],
    '--json', jsonFile,
    ...Object.entries(pids).flatMap(([name, pid]) => ['--pid', `${name}=${pid}`]),
  ];
  if (cfg.workers) args.push('--workers', cfg.workers);
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'inherit'] });
    started.add(child);
    child.on('exit', (code) => {
      started.delete(child);
      if (code !== 0) reject(new Error(`the generator exited with ${code}`));
      else resolve(JSON.parse(fs.readFileSync(jsonFile, 'utf8')));
    });
  });
}

/** The machine's CPU use (cores) over `ms`: what else runs here before a target starts. */
async function machineLoad(ms = 3000) {
  const a = machineTicks();
  await sleep(ms);
  const b = machineTicks();
  return (b.busy - a.busy) / ticksPerSecond() / (ms / 1000);
}

/**
 * Others share this machine (builds, tests): waits until it is quiet enough, at most --quiet-wait
 * seconds. Returns the last load measured (reported with the target's figures).
 */
async function waitQuietMachine(cfg) {
  const below = Number(cfg['quiet-below']);
  const deadline = Date.now() + Number(cfg['quiet-wait']) * 1000;
  let load = await machineLoad();
  let said = false;
  while (below > 0 && load >= below && Date.now() < deadline) {
    if (!said) log(`the machine is busy (${load.toFixed(2)} cores); waiting for it to fall below ${below}`);
    said = true;
    await sleep(5000);
    load = await machineLoad();
  }
  if (below > 0 && load >= below) log(`still ${load.toFixed(2)} busy cores; running anyway`);
  return load;
}

function pidOf(names) {
  for (const n of names) {
    try {
      const out = execFileSync('pidof', [n], { encoding: 'utf8' }).trim();
      if (out) return out.split(/\s+/)[0];
    } catch {
      // not running under that name
    }
  }
  return null;
}

async function runSeed(cfg, dir) {
  const users = Number(cfg.users);
  const r = await setupSeed({ users, contacts: Number(cfg.contacts), url: cfg['seed-db-url'] });
  log(`seed: database ${r.database}: ${users} users, ${r.contactsPerUser} contacts each`);
  const mariadb = cfg['mariadb-pid'] || pidOf(['mariadbd', 'mysqld']);
  if (!mariadb) log('seed: no mariadbd/mysqld pid found (--mariadb-pid); the database is not sampled');
  const before = await waitQuietMachine(cfg);
  const { child, match } = await startProcess('seed', process.execPath, [path.join(__dirname, 'seed', 'server.js')], {
    env: { SEED_PORT: '0', SEED_HOST: '127.0.0.1', SEED_DATABASE_URL: cfg['seed-db-url'] },
    ready: /seed listening on (\d+)/,
    logDir: dir,
  });
  try {
    const pids = { seed: child.pid };
    if (mariadb) pids.mariadb = mariadb;
    const result = await runLoad(cfg, {
      url: `http://127.0.0.1:${match[1]}`,
      label: 'seed (node+socket.io+mariadb)',
      pids,
      jsonFile: path.join(dir, 'seed.json'),
    });
    return { ...result, machineBefore: before };
  } finally {
    await stopProcess(child);
  }
}

async function runEdge(cfg, dir) {
  const bin = path.resolve(cfg['presence-bin']);
  const edgeDir = path.resolve(cfg['edge-dir']);
  if (!fs.existsSync(path.join(edgeDir, 'node_modules'))) fail(`run npm ci in ${edgeDir} first`);
  const before = await waitQuietMachine(cfg);
  const presenceEnv = {
    PRESENCE_LISTEN: '127.0.0.1:0',
    DATABASE_URL: `sqlite://${path.join(dir, 'presence.db')}`,
    // The bench's users change status far more often than people do; the abuse limits would
    // end their streams (the same settings presence-bench runs with, see the root README).
    PRESENCE_RATE_STATUS_PER_MIN: '1000000',
    PRESENCE_RATE_IDS_PER_MIN: '100000000',
    PRESENCE_METRICS_LISTEN: '',
    RUST_LOG: 'warn',
    ...cfg.presenceEnv,
  };
  const presence = await startProcess('presence', bin, ['serve'], {
    env: presenceEnv,
    ready: /listening on (\S+)/,
    logDir: dir,
  });
  let edge = null;
  try {
    const target = presence.match[1];
    const r = await setupPresence({ target, users: Number(cfg.users), contacts: Number(cfg.contacts) });
    log(`presence: ${target}: ${r.pairs} pairs through AddContacts (${r.contactsPerUser} contacts per user)`);
    edge = await startProcess('edge', process.execPath, [path.join(edgeDir, 'src', 'index.js')], {
      env: {
        EDGE_IDENTITY: 'trust-client',
        EDGE_PORT: '0',
        EDGE_HOST: '127.0.0.1',
        PRESENCE_TARGET: target,
        EDGE_LOG_LEVEL: 'warn',
        ...cfg.edgeEnv,
      },
      cwd: edgeDir,
      ready: /edge listening on (\d+)/,
      logDir: dir,
    });
    const result = await runLoad(cfg, {
      url: `http://127.0.0.1:${edge.match[1]}`,
      label: 'presence+edge (trust-client)',
      pids: { edge: edge.child.pid, presence: presence.child.pid },
      jsonFile: path.join(dir, 'edge.json'),
    });
    if (result.phases.some((p) => p.delivered === 0)) {
      // Nothing delivered is a broken setup (an edge and a service that do not speak the same
      // API, say), not a slow one: show why.
      for (const name of ['edge', 'presence']) {
        const lines = fs.readFileSync(path.join(dir, `${name}.log`), 'utf8').trim().split('\n');
        log(`nothing delivered; the end of the ${name} log:\n${lines.slice(-5).join('\n')}`);
      }
    }
    return { ...result, machineBefore: before, presenceBin: bin, presenceEnv, edgeDir, edgeEnv: cfg.edgeEnv };
  } finally {
    if (edge) await stopProcess(edge.child);
    await stopProcess(presence.child);
  }
}

/** The bars, checked on the edge target's figures. */
function bars(result) {
  const lines = [];
  for (const p of result.phases) {
    const ok = p.latencyMs.p99 !== null && p.latencyMs.p99 <= 100 && p.lost === 0;
    lines.push(
      `  ${p.rate}/s (${Math.round(p.deliveriesPerSecond)} deliveries/s): p99 ${p.latencyMs.p99?.toFixed(1)} ms, lost ${p.lost} → ${ok ? 'meets' : 'misses'} "p99 ≤ 100 ms, nothing lost"`,
    );
  }
  const idle = result.idleMemory.edge && result.idleMemory.edge.kbPerSocket;
  if (idle !== null && idle !== undefined) {
    lines.push(`  idle edge RSS ${idle.toFixed(1)} KB per socket → ${idle <= 30 ? 'meets' : 'misses'} "≤ 30 KB"`);
  }
  return lines.join('\n');
}

async function main() {
  const cfg = parseCli(process.argv.slice(2));
  const dir = cfg.keep ? path.resolve(cfg.keep) : fs.mkdtempSync(path.join(os.tmpdir(), 'edge-bench-'));
  fs.mkdirSync(dir, { recursive: true });
  const results = [];
  const startedAt = new Date().toISOString();
  try {
    for (const t of cfg.targets) {
      log(`=== ${t} ===`);
      results.push(t === 'seed' ? await runSeed(cfg, dir) : await runEdge(cfg, dir));
    }
  } catch (err) {
    log(`${err && err.message}; logs in ${dir}`);
    cfg.keep = dir;
    process.exitCode = 1;
  }
  if (results.length) {
    const out = [];
    out.push(
      `N=${cfg.users} K=${cfg.contacts}, ${cfg.duration} s per rate after ${cfg.warmup} s warm-up; ` +
        `${os.cpus().length} cores; started ${startedAt}`,
    );
    out.push(formatTable(results));
    for (const r of results) {
      const idle = Object.entries(r.idleMemory)
        .map(([k, v]) => `${k} ${v.beforeMb.toFixed(0)} → ${v.afterMb.toFixed(0)} MB`)
        .join(', ');
      out.push(
        `${r.label}: connected ${r.connect.sockets} sockets in ${r.connect.seconds.toFixed(1)} s (${r.connect.failed} failed), ` +
          `quiet after ${r.connect.settleSeconds.toFixed(1)} s; idle RSS ${idle}; machine busy before start ${r.machineBefore.toFixed(2)} cores`,
      );
      if (r.presenceBin) out.push(`  presence binary: ${r.presenceBin}; edge: ${r.edgeDir}`);
    }
    const edge = results.find((r) => r.presenceBin);
    if (edge) out.push(`bars (edge):\n${bars(edge)}`);
    process.stdout.write(`${out.join('\n')}\n`);
    if (cfg.json) fs.writeFileSync(cfg.json, `${JSON.stringify({ startedAt, config: cfg, results }, null, 2)}\n`);
  }
  if (!cfg.keep) fs.rmSync(dir, { recursive: true, force: true });
  else log(`logs and JSON kept in ${dir}`);
}

main().catch((err) => {
  log(err && err.stack);
  process.exit(1);
});
