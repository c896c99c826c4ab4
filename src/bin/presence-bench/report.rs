//! The results of a run: one struct for `--json`, and the human table printed at the end.
use std::fmt::Write as _;

use serde::Serialize;

use crate::client::ServerStats;
use crate::graph::SetupFigures;
use crate::recorder::{Counters, Quantiles};
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
    /// The server and the processes over the measured phase.
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
    pub out_of_order: u64,
    pub wrong_status: u64,
    pub unexpected: u64,
    pub stream_errors: u64,
    pub connect_errors: u64,
    pub reconnect_errors: u64,
    pub query_errors: u64,
    /// Every check above is zero.
    pub ok: bool,
}

impl Checks {
    pub fn from(c: &Counters) -> Checks {
        let mut k = Checks {
            lost: c.lost,
            out_of_order: c.out_of_order,
            wrong_status: c.wrong_status,
            unexpected: c.unexpected,
            stream_errors: c.stream_errors,
            connect_errors: c.connect_errors,
            reconnect_errors: c.reconnect_errors,
            query_errors: c.query_errors,
            ok: false,
        };
        k.ok = [
            k.lost,
            k.out_of_order,
            k.wrong_status,
            k.unexpected,
            k.stream_errors,
            k.connect_errors,
            k.reconnect_errors,
            k.query_errors,
        ]
        .iter()
        .all(|&n| n == 0);
        k
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
            let d = &ph.server_delta;
            row(
                "server (GetStats)",
                format!(
                    "changes {}, deliveries {} = {}/s, coalesced {}",
                    thousands(d.changes),
                    thousands(d.deliveries),
                    rate(ph.server_deliveries_per_s),
                    thousands(d.coalesced)
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
                        name,
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
        }
        if let Some(ph) = &self.phase
            && let Some(m) = ph.machine_cores
        {
            row(
                "machine",
                format!(
                    "{m:.2} cores busy, of which not server or bench {}",
                    opt(ph.other_processes_cores, 2)
                ),
            );
        }
        let k = &self.checks;
        row(
            "checks",
            format!(
                "{}: lost {}, out of order {}, wrong status {}, unexpected {}, stream errors {}, connect errors {}, reconnect errors {}, query errors {}",
                if k.ok { "OK" } else { "FAILED" },
                k.lost,
                k.out_of_order,
                k.wrong_status,
                k.unexpected,
                k.stream_errors,
                k.connect_errors,
                k.reconnect_errors,
                k.query_errors
            ),
        );
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
}
