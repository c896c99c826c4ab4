//! The results of a run: one struct for `--json`, and the human table printed at the end.
use std::fmt::Write as _;

use serde::Serialize;

use crate::client::ServerStats;
use crate::graph::SetupFigures;
use crate::recorder::{Counters, Quantiles, Sizes};
use crate::sysinfo::ProcFigures;

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub scenario: &'static str,
    pub params: Params,
    pub setup: SetupFigures,
    /// Opening the online users' streams (the whole scenario for `connect`, the warm-up of the
    /// others).
    pub connect: Option<ConnectFigures>,
    pub churn: Option<ChurnFigures>,
    pub flap: Option<FlapFigures>,
    pub query: Option<QueryFigures>,
    /// Background (passive) devices: `churn --passive`, and the `passive` scenario's waves.
    pub passive: Option<PassiveFigures>,
    /// The server and the processes over the measured phase (the churn, for `passive`).
    pub phase: Option<PhaseFigures>,
    pub checks: Checks,
    /// Every bench counter, for whoever wants more than the figures above.
    pub counters: Counters,
    /// The first error messages seen.
    pub errors: Vec<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Params {
    pub target: String,
    pub users: u64,
    pub online: u64,
    /// Contacts per user (K rounded down to even).
    pub contacts: u64,
    pub connections: usize,
    pub duration_s: f64,
    pub auth: &'static str,
    pub connect_concurrency: usize,
    pub rate: Option<u64>,
    pub workers: Option<usize>,
    pub ids_per_call: Option<usize>,
    /// Share of the online devices sent to the background before the churn, in percent.
    pub passive_percent: Option<u64>,
    /// `passive`: devices woken at once per wave, and waves.
    pub wake: Option<u64>,
    pub waves: Option<u64>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ConnectFigures {
    pub streams: u64,
    pub errors: u64,
    pub seconds: f64,
    pub connects_per_s: f64,
    /// Attempts refused with UNAVAILABLE (the server shedding load) and retried.
    pub retries: u64,
    /// Authenticate call (first attempt) to welcome.
    pub welcome: Quantiles,
    /// (server RSS once all streams are idle - RSS before) / streams, in KiB.
    pub server_rss_per_stream_kib: Option<f64>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct ChurnFigures {
    /// Changes per second asked for.
    pub target_rate: u64,
    pub seconds: f64,
    pub changes: u64,
    pub changes_per_s: f64,
    /// Changes received by tracked contacts, each matched to its change.
    pub deliveries: u64,
    pub deliveries_per_s: f64,
    /// Receipts the graph implies: deliveries + superseded + lost.
    pub expected: u64,
    /// Skipped over by a newer version of the same user (server-side coalescing).
    pub superseded: u64,
    /// Never received, nor anything newer, within 5 s after the last change.
    pub lost: u64,
    /// From the last scheduled change until every expected receipt was in.
    pub drain_ms: f64,
    /// Scheduled time of a change to its receipt at a contact.
    pub latency: Quantiles,
    /// How late the bench handed changes to their streams (its own lag, part of `latency`).
    pub send_lag: Quantiles,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct FlapFigures {
    pub target_rate: u64,
    pub flaps: u64,
    pub reconnects: u64,
    pub errors: u64,
    /// Attempts refused with UNAVAILABLE and retried.
    pub retries: u64,
    pub seconds: f64,
    pub connects_per_s: f64,
    /// The new Authenticate call to its welcome (the old stream is dropped just before).
    pub reconnect: Quantiles,
    /// presence_updated received by devices about users other than the churners.
    pub bench_deliveries: u64,
    pub bench_deliveries_per_flap: f64,
    /// From GetStats: deliveries and changes during the phase, per flap. In `mixed` the
    /// server's figures include the churn's.
    pub server_deliveries_per_flap: Option<f64>,
    pub server_changes_per_flap: Option<f64>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct QueryFigures {
    /// "closed loop, W workers" or "open loop, R calls/s".
    pub mode: String,
    pub ids_per_call: usize,
    pub seconds: f64,
    pub calls: u64,
    pub calls_per_s: f64,
    pub ids: u64,
    pub ids_per_s: f64,
    pub errors: u64,
    /// Open loop only: calls not made because 256 were already in flight.
    pub skipped: u64,
    pub latency: Quantiles,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct PassiveFigures {
    /// Share of the online devices in the background, in percent.
    pub percent: u64,
    /// Devices sent to the background, and those the server confirmed (the pong of a ping
    /// sent right after set_activity).
    pub devices: u64,
    pub confirmed: u64,
    pub background_seconds: f64,
    /// During the churn, from GetStats: presence_updated queued to receivers, and deliveries
    /// not sent because the receiver was in the background.
    pub deliveries_sent: u64,
    pub deliveries_skipped: u64,
    /// The skips the graph implies: each change sent times the sender's passive online
    /// contacts (equal to `deliveries_skipped` when nothing else changed).
    pub skipped_implied: u64,
    /// presence_updated that reached a device in the background (must be 0).
    pub received_while_passive: u64,
    pub waves: Vec<WaveFigures>,
    /// Over every wave: set_activity ACTIVE sent to the resync's last page received.
    pub wake_to_resync: Quantiles,
    /// Entries per resync.
    pub resync_entries: Sizes,
    pub resyncs: u64,
    /// Entries not newer than what the device had of that user (or of a stranger); users
    /// repeated within one resync; woken devices that never got their whole resync. All 0.
    pub resync_stale: u64,
    pub resync_duplicates: u64,
    pub resyncs_missing: u64,
    /// The server and the processes over the waves.
    pub wave_phase: Option<PhaseFigures>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct WaveFigures {
    /// Devices in the wave, and those asked to wake (a live stream).
    pub devices: u64,
    pub woken: u64,
    /// Whole resyncs received within the wave's time limit.
    pub resyncs: u64,
    /// How long the driver took to send every wake.
    pub send_ms: f64,
    /// From the first wake sent to the last resync received (None if some never came).
    pub complete_ms: Option<f64>,
    pub wake_to_resync: Quantiles,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct PhaseFigures {
    pub seconds: f64,
    pub server_before: ServerStats,
    pub server_after: ServerStats,
    /// Counters grown during the phase (gauges as at its end).
    pub server_delta: ServerStats,
    /// Write amplification: database statements per change of presence.
    pub db_statements_per_change: Option<f64>,
    pub db_rows_per_change: Option<f64>,
    pub deliveries_per_change: Option<f64>,
    pub server_deliveries_per_s: f64,
    /// Server CPU time (utime + stime) over the phase, per change and per delivery (GetStats
    /// counts), in microseconds. Needs --server-pid.
    pub server_cpu_us_per_change: Option<f64>,
    pub server_cpu_us_per_delivery: Option<f64>,
    /// presence_updated messages the bench's devices took in during the phase, and the bench's
    /// own CPU time per each, in microseconds (the instrument's cost).
    pub bench_received: u64,
    pub bench_cpu_us_per_delivery: Option<f64>,
    pub server_process: Option<ProcFigures>,
    pub bench_process: Option<ProcFigures>,
    /// CPU cores the whole machine used during the phase (of 2 here).
    pub machine_cores: Option<f64>,
    /// CPU not charged to the server or the bench (needs --server-pid): other processes, and
    /// the kernel's loopback networking (softirq) when the cores are not saturated. A large
    /// value with a build or test running alongside means the figures are not clean.
    pub other_processes_cores: Option<f64>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Checks {
    pub lost: u64,
    /// Receipts the graph implies (churn: each change × the churner's connected, tracked ring
    /// contacts) that neither arrived nor were superseded by the end of the drain. `lost` is
    /// counted per device over the contacts its welcome listed; this catches a server whose
    /// graph lacks contacts (a welcome listing nobody loses nothing).
    pub undelivered: u64,
    pub out_of_order: u64,
    pub wrong_status: u64,
    pub unexpected: u64,
    pub stream_errors: u64,
    pub connect_errors: u64,
    pub reconnect_errors: u64,
    pub query_errors: u64,
    /// Background devices: updates received while passive, resync entries not newer than
    /// what the device had, users repeated in a resync, resyncs unexpected or never received.
    pub passive_received: u64,
    pub resync_stale: u64,
    pub resync_duplicates: u64,
    pub resync_unexpected: u64,
    pub resyncs_missing: u64,
    /// Every check above is zero.
    pub ok: bool,
}

impl Checks {
    pub fn from(c: &Counters) -> Checks {
        let mut k = Checks {
            lost: c.lost,
            undelivered: 0,
            out_of_order: c.out_of_order,
            wrong_status: c.wrong_status,
            unexpected: c.unexpected,
            stream_errors: c.stream_errors,
            connect_errors: c.connect_errors,
            reconnect_errors: c.reconnect_errors,
            query_errors: c.query_errors,
            passive_received: c.passive_received,
            resync_stale: c.resync_stale,
            resync_duplicates: c.resync_duplicates,
            resync_unexpected: c.resync_unexpected,
            resyncs_missing: c.resyncs_missing,
            ok: false,
        };
        k.ok = [
            k.lost,
            k.undelivered,
            k.out_of_order,
            k.wrong_status,
            k.unexpected,
            k.stream_errors,
            k.connect_errors,
            k.reconnect_errors,
            k.query_errors,
            k.passive_received,
            k.resync_stale,
            k.resync_duplicates,
            k.resync_unexpected,
            k.resyncs_missing,
        ]
        .iter()
        .all(|&n| n == 0);
        k
    }
}

impl Checks {
    /// Adds the churn's receipts that the graph implies but that never came.
    pub fn undelivered_from(&mut self, churn: &ChurnFigures) {
        self.undelivered = churn
            .expected
            .saturating_sub(churn.deliveries + churn.superseded);
        if self.undelivered > 0 {
            self.ok = false;
        }
    }
}

/// Thousands separators: 1234567 → "1,234,567".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn rate(x: f64) -> String {
    thousands(x.round() as u64)
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

fn opt(x: Option<f64>, digits: usize) -> String {
    x.map_or("n/a".into(), |v| format!("{v:.digits$}"))
}

impl Report {
    /// The human table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
        let p = &self.params;
        row(
            "run",
            format!(
                "{} against {} ({}): N={} C={} K={}, {} HTTP/2 connections, {} s",
                self.scenario,
                p.target,
                p.auth,
                thousands(p.users),
                thousands(p.online),
                p.contacts,
                p.connections,
                p.duration_s
            ),
        );
        let s = &self.setup;
        row(
            "setup",
            if s.created {
                format!(
                    "created {} pairs in {} AddContacts calls, {:.1} s",
                    thousands(s.pairs),
                    s.calls,
                    s.seconds
                )
            } else {
                "graph already present or skipped".into()
            },
        );
        if let Some(c) = &self.connect {
            row(
                "connect",
                format!(
                    "{} streams in {:.2} s = {}/s, {} errors, {} retries",
                    thousands(c.streams),
                    c.seconds,
                    rate(c.connects_per_s),
                    c.errors,
                    c.retries
                ),
            );
            row("  time to welcome", c.welcome.line());
            if let Some(kib) = c.server_rss_per_stream_kib {
                row("  server RSS per stream", format!("{kib:.1} KiB"));
            }
        }
        if let Some(c) = &self.churn {
            row(
                "churn",
                format!(
                    "target {}/s: {} changes in {:.1} s = {}/s",
                    thousands(c.target_rate),
                    thousands(c.changes),
                    c.seconds,
                    rate(c.changes_per_s)
                ),
            );
            row(
                "  deliveries",
                format!(
                    "{} = {}/s (expected {}, superseded {}, lost {}, drained in {:.0} ms)",
                    thousands(c.deliveries),
                    rate(c.deliveries_per_s),
                    thousands(c.expected),
                    thousands(c.superseded),
                    thousands(c.lost),
                    c.drain_ms
                ),
            );
            row("  change to delivery", c.latency.line());
            row("  bench send lag", c.send_lag.line());
        }
        if let Some(f) = &self.flap {
            row(
                "flap",
                format!(
                    "target {}/s: {} flaps, {} reconnects in {:.1} s = {}/s, {} errors, {} retries",
                    thousands(f.target_rate),
                    thousands(f.flaps),
                    thousands(f.reconnects),
                    f.seconds,
                    rate(f.connects_per_s),
                    f.errors,
                    f.retries
                ),
            );
            row("  reconnect to welcome", f.reconnect.line());
            row(
                "  deliveries per flap",
                format!(
                    "bench {:.2}, server {} (changes per flap {}){}",
                    f.bench_deliveries_per_flap,
                    opt(f.server_deliveries_per_flap, 2),
                    opt(f.server_changes_per_flap, 2),
                    // The server's counters cannot tell a flap's deliveries from the churn's.
                    if self.churn.is_some() {
                        "; the server's figures include the churn"
                    } else {
                        ""
                    }
                ),
            );
        }
        if let Some(q) = &self.query {
            row(
                "query",
                format!(
                    "{}, {} ids per call: {} calls in {:.1} s = {}/s",
                    q.mode,
                    q.ids_per_call,
                    thousands(q.calls),
                    q.seconds,
                    rate(q.calls_per_s)
                ),
            );
            row(
                "  ids",
                format!(
                    "{} = {}/s, {} errors, {} skipped",
                    thousands(q.ids),
                    rate(q.ids_per_s),
                    q.errors,
                    q.skipped
                ),
            );
            row("  latency", q.latency.line());
        }
        if let Some(ph) = &self.phase {
            phase_rows(&mut row, "", ph);
        }
        if let Some(pf) = &self.passive {
            passive_rows(&mut row, pf);
        }
        let k = &self.checks;
        row(
            "checks",
            format!(
                "{}: lost {}, undelivered {}, out of order {}, wrong status {}, unexpected {}, stream errors {}, connect errors {}, reconnect errors {}, query errors {}",
                if k.ok { "OK" } else { "FAILED" },
                k.lost,
                k.undelivered,
                k.out_of_order,
                k.wrong_status,
                k.unexpected,
                k.stream_errors,
                k.connect_errors,
                k.reconnect_errors,
                k.query_errors
            ),
        );
        if self.passive.is_some() {
            row(
                "  background checks",
                format!(
                    "received while passive {}, stale resync entries {}, repeated {}, unexpected resyncs {}, missing {}",
                    k.passive_received,
                    k.resync_stale,
                    k.resync_duplicates,
                    k.resync_unexpected,
                    k.resyncs_missing
                ),
            );
        }
        for e in self.errors.iter().take(5) {
            row("  error", e.clone());
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<width$}  {v}");
        }
        out
    }
}

/// The server's counters and the processes' usage over one phase; `label` names the phase
/// (empty: the main one).
fn phase_rows(row: &mut impl FnMut(&str, String), label: &str, ph: &PhaseFigures) {
    let d = &ph.server_delta;
    row(
        &format!("server (GetStats){label}"),
        format!(
            "changes {}, deliveries {} = {}/s, coalesced {}, skipped (passive) {}",
            thousands(d.changes),
            thousands(d.deliveries),
            rate(ph.server_deliveries_per_s),
            thousands(d.coalesced),
            thousands(d.passive_skipped)
        ),
    );
    row(
        "  database",
        format!(
            "{} statements, {} rows: {} statements and {} rows per change",
            thousands(d.db_statements),
            thousands(d.db_rows),
            opt(ph.db_statements_per_change, 4),
            opt(ph.db_rows_per_change, 3)
        ),
    );
    row(
        "  gauges at end",
        format!(
            "online users {}, connections {}, watchers {}",
            thousands(d.online_users),
            thousands(d.connections),
            thousands(d.watchers)
        ),
    );
    for (name, proc_) in [
        ("server process", &ph.server_process),
        ("bench process", &ph.bench_process),
    ] {
        if let Some(pr) = proc_ {
            row(
                &format!("{name}{label}"),
                format!(
                    "RSS {} -> {} (peak {}), CPU {:.2} cores",
                    mib(pr.rss_start_kib),
                    mib(pr.rss_end_kib),
                    mib(pr.rss_peak_kib),
                    pr.cpu_cores
                ),
            );
        }
    }
    if ph.server_cpu_us_per_change.is_some() || ph.bench_cpu_us_per_delivery.is_some() {
        row(
            "  CPU per event",
            format!(
                "server {} µs per change, {} µs per delivery; bench {} µs per delivery received ({})",
                opt(ph.server_cpu_us_per_change, 1),
                opt(ph.server_cpu_us_per_delivery, 2),
                opt(ph.bench_cpu_us_per_delivery, 2),
                thousands(ph.bench_received)
            ),
        );
    }
    if let Some(m) = ph.machine_cores {
        row(
            &format!("machine{label}"),
            format!(
                "{m:.2} cores busy, of which not server or bench {}",
                opt(ph.other_processes_cores, 2)
            ),
        );
    }
}

fn passive_rows(row: &mut impl FnMut(&str, String), p: &PassiveFigures) {
    row(
        "passive",
        format!(
            "{} % of online devices: {} sent to the background, {} confirmed in {:.1} s",
            p.percent,
            thousands(p.devices),
            thousands(p.confirmed),
            p.background_seconds
        ),
    );
    row(
        "  churn deliveries",
        format!(
            "sent {}, skipped {} (the graph implies {}), received while passive {}",
            thousands(p.deliveries_sent),
            thousands(p.deliveries_skipped),
            thousands(p.skipped_implied),
            thousands(p.received_while_passive)
        ),
    );
    for (i, w) in p.waves.iter().enumerate() {
        row(
            &format!("  wave {}", i + 1),
            format!(
                "{} woken (sent in {:.0} ms), {} resyncs, complete in {}; {}",
                thousands(w.woken),
                w.send_ms,
                thousands(w.resyncs),
                w.complete_ms
                    .map_or("n/a (some missing)".into(), |ms| format!("{ms:.0} ms")),
                w.wake_to_resync.line()
            ),
        );
    }
    if !p.waves.is_empty() {
        row("  wake to resync", p.wake_to_resync.line());
        let s = &p.resync_entries;
        row(
            "  resync entries",
            format!(
                "{} resyncs: mean {:.1}, p50 {}, p99 {}, max {}",
                thousands(s.count),
                s.mean,
                s.p50,
                s.p99,
                s.max
            ),
        );
    }
    if let Some(ph) = &p.wave_phase {
        phase_rows(row, " (waves)", ph);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }

    #[test]
    fn any_failed_check_fails_the_run() {
        let mut c = Counters::default();
        assert!(Checks::from(&c).ok, "nothing counted is a pass");
        c.lost = 1;
        assert!(!Checks::from(&c).ok, "a lost delivery fails the run");
    }

    #[test]
    fn receipts_the_graph_implies_but_never_came_fail_the_run() {
        let churn = ChurnFigures {
            expected: 10,
            deliveries: 7,
            superseded: 2,
            ..ChurnFigures::default()
        };
        let mut k = Checks::from(&Counters::default());
        k.undelivered_from(&churn);
        assert_eq!(k.undelivered, 1);
        assert!(!k.ok);
        let churn = ChurnFigures {
            expected: 10,
            deliveries: 8,
            superseded: 2,
            ..ChurnFigures::default()
        };
        let mut k = Checks::from(&Counters::default());
        k.undelivered_from(&churn);
        assert!(k.ok);
    }
}
