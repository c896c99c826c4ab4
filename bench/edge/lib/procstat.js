'use strict';
// What Linux tells about a process and the machine, from /proc: CPU time (utime + stime of
// /proc/PID/stat) and resident memory (VmRSS of /proc/PID/status), and the whole machine's busy
// time (/proc/stat). CPU figures are in clock ticks (USER_HZ, read once with `getconf CLK_TCK`).
const fs = require('node:fs');
const { execFileSync } = require('node:child_process');

let clkTck = null;

/** Clock ticks per second (USER_HZ): 100 on every usual Linux. */
function ticksPerSecond() {
  if (clkTck === null) {
    try {
      clkTck = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      clkTck = 100;
    }
  }
  return clkTck;
}

/** { cpuTicks, rssKb } of a process, or null once it is gone. */
function readProcess(pid) {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses: count fields after its end.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // utime and stime are fields 14 and 15 of stat(5); `fields` starts at field 3.
    const cpuTicks = Number(fields[11]) + Number(fields[12]);
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const m = /^VmRSS:\s+(\d+) kB/m.exec(status);
    return { cpuTicks, rssKb: m ? Number(m[1]) : 0 };
  } catch {
    return null;
  }
}

/**
 * The machine's CPU time (all cores), in clock ticks: `busy` (every process and the kernel) and,
 * within it, `irq` (hard and soft interrupts: on loopback, mostly the network stack carrying the
 * bench's own traffic, charged to no process); `steal`, apart, is time the hypervisor gave to
 * other guests, and `iowait` idle time with disk I/O outstanding (the seed's MariaDB commits
 * every UPDATE: other people's builds writing to the disk slow it down without using CPU).
 */
function machineTicks() {
  const line = fs.readFileSync('/proc/stat', 'utf8').split('\n', 1)[0];
  // cpu  user nice system idle iowait irq softirq steal (guest time is already in user)
  const v = line.trim().split(/\s+/).slice(1, 9).map(Number);
  return { busy: v[0] + v[1] + v[2] + v[5] + v[6], irq: v[5] + v[6], steal: v[7], iowait: v[4] };
}

/** PIDs of a process's children (from /proc/PID/task/TID/children), not recursive. */
function childPids(pid) {
  const out = [];
  try {
    for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
      const text = fs.readFileSync(`/proc/${pid}/task/${tid}/children`, 'utf8').trim();
      if (text) out.push(...text.split(/\s+/).map(Number));
    }
  } catch {
    // gone
  }
  return out;
}

/** A process and all its descendants (the edge runs cluster workers under its primary). */
function processTree(pid) {
  const out = [];
  const stack = [pid];
  while (stack.length) {
    const p = stack.pop();
    out.push(p);
    stack.push(...childPids(p));
  }
  return out;
}

/**
 * Samples named groups of processes every `intervalMs`: CPU ticks at any moment (for windows),
 * the highest RSS seen per group since the last `resetPeaks()`, and the machine's busy ticks.
 * groups: { name: [pid, ...] }; a group's figures are the sum over its processes and all their
 * descendants, each counted once (a child that exits takes its CPU ticks with it).
 */
class Sampler {
  constructor(groups, intervalMs = 500) {
    this.groups = groups;
    this.intervalMs = intervalMs;
    this.peaks = {};
    this.timer = null;
    this.resetPeaks();
  }

  /** { at, machine, groups: { name: { cpuTicks, rssKb } } } now. */
  snapshot() {
    const groups = {};
    for (const [name, pids] of Object.entries(this.groups)) {
      let cpuTicks = 0;
      let rssKb = 0;
      let alive = 0;
      for (const pid of new Set(pids.flatMap(processTree))) {
        const p = readProcess(pid);
        if (!p) continue;
        alive += 1;
        cpuTicks += p.cpuTicks;
        rssKb += p.rssKb;
      }
      groups[name] = { cpuTicks, rssKb, alive };
      if (rssKb > (this.peaks[name] || 0)) this.peaks[name] = rssKb;
    }
    return { at: performance.now(), machine: machineTicks(), groups };
  }

  resetPeaks() {
    this.peaks = {};
    for (const name of Object.keys(this.groups)) this.peaks[name] = 0;
  }

  start() {
    this.snapshot();
    this.timer = setInterval(() => this.snapshot(), this.intervalMs);
    this.timer.unref();
    return this;
  }

  stop() {
    clearInterval(this.timer);
  }
}

/**
 * CPU between two snapshots, in cores (1.0 = one core busy): per group; the machine's busy time;
 * its interrupt time (`irqCores`); and `otherCores`, the rest of the machine: every process not
 * in a group plus kernel time charged to none, interrupts excluded.
 */
function cpuBetween(a, b) {
  const seconds = (b.at - a.at) / 1000;
  const hz = ticksPerSecond();
  const cores = (ticks) => (seconds > 0 ? ticks / hz / seconds : 0);
  const groups = {};
  let measured = 0;
  for (const name of Object.keys(b.groups)) {
    const d = b.groups[name].cpuTicks - (a.groups[name] ? a.groups[name].cpuTicks : 0);
    groups[name] = { cores: cores(d), cpuSeconds: d / hz };
    measured += d;
  }
  const busy = b.machine.busy - a.machine.busy;
  const irq = b.machine.irq - a.machine.irq;
  return {
    seconds,
    groups,
    machineCores: cores(busy),
    irqCores: cores(irq),
    stealCores: cores(b.machine.steal - a.machine.steal),
    iowaitCores: cores(b.machine.iowait - a.machine.iowait),
    otherCores: cores(Math.max(0, busy - irq - measured)),
  };
}

module.exports = { readProcess, machineTicks, childPids, processTree, Sampler, cpuBetween, ticksPerSecond };
