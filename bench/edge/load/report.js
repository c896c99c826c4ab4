'use strict';
// The table the generator and the side-by-side runner print: one row per target and rate.

function fmt(v, digits = 1) {
  if (v === null || v === undefined || Number.isNaN(v)) return '-';
  return v.toFixed(digits);
}

/** "edge 1.02 · presence 0.31" over the target groups (not the generator). */
function perGroup(obj, digits, names) {
  return names.map((n) => `${n} ${fmt(obj[n], digits)}`).join(' · ');
}

function pad(rows) {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => String(r[c]).length)));
  const line = (r) => `| ${r.map((v, c) => String(v).padEnd(widths[c])).join(' | ')} |`;
  const sep = `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`;
  return [line(rows[0]), sep, ...rows.slice(1).map(line)].join('\n');
}

/** Markdown table of one or more generator results (load/index.js `run`). */
function formatTable(results) {
  const rows = [
    [
      'target',
      'changes/s',
      'deliveries/s',
      'p50 ms',
      'p99 ms',
      'max ms',
      'lost',
      'ooo/dup/unasked',
      'target CPU (cores)',
      'CPU µs/delivery',
      'RSS peak MB',
      'idle KB/socket',
      'load cores',
      'irq / other cores',
      'load lag p99 ms',
    ],
  ];
  for (const r of results) {
    const names = Object.keys(r.config.pids);
    const idle = perGroup(
      Object.fromEntries(names.map((n) => [n, r.idleMemory[n] && r.idleMemory[n].kbPerSocket])),
      1,
      names,
    );
    for (const p of r.phases) {
      rows.push([
        r.label,
        p.rate,
        Math.round(p.deliveriesPerSecond),
        fmt(p.latencyMs.p50),
        fmt(p.latencyMs.p99),
        fmt(p.latencyMs.max, 0),
        p.expected ? `${p.lost} (${fmt((100 * p.lost) / p.expected, 2)}%)` : '-',
        `${p.outOfOrder}/${p.duplicates}/${p.unexpected}`,
        perGroup(p.cpu.cores, 2, names),
        perGroup(p.cpu.usPerDelivery, 1, names),
        perGroup(p.rssPeakMb, 0, names),
        idle,
        fmt(p.cpu.cores.load, 2),
        `${fmt(p.cpu.irqCores, 2)} / ${fmt(p.cpu.otherCores, 2)}${p.cpu.otherCores >= r.config.busyAbove ? ' BUSY' : ''}`,
        fmt(Math.max(p.loadLoopDelayMs.p99 ?? 0, p.sendLagMs.p99 ?? 0), 1),
      ]);
    }
  }
  const busy = results.some((r) => r.phases.some((p) => p.cpu.otherCores >= r.config.busyAbove));
  const note = busy ? '\nBUSY: something else on the machine used that many cores during the row: its figures are not clean.' : '';
  return pad(rows) + note;
}

module.exports = { formatTable };
