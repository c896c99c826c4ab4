//! The five scenarios, each built from the same steps: create the graph, bring the online users
//! up, read the server's counters and the processes' usage, drive the load on its timetable,
//! wait for what is still in flight, read everything again, and fill the report.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tonic::Request;

use presence::pb;

use crate::Common;
use crate::client::{Auth, Pool, ServerStats, loopback_targets};
use crate::device::{Cmd, Fleet, Shared};
use crate::graph::{self, Ring, SetupMode};
use crate::plan::{Plan, Schedule};
use crate::recorder::{Counters, Hist, Quantiles, Recorder};
use crate::report::{
    ChurnFigures, ConnectFigures, FlapFigures, Params, PassiveFigures, PhaseFigures, QueryFigures,
    Report, WaveFigures, thousands,
};
use crate::sysinfo::{Sample, Watched, cores_between, machine_cores, machine_ticks};

/// How long after the last scheduled change a receipt may still arrive before it counts as lost.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);
/// How long to wait for the server to confirm that devices went to the background.
const BACKGROUND_LIMIT: Duration = Duration::from_secs(30);
/// How long a wave may take, from its first wake to its last resync, before the devices still
/// waiting count as missing a resync.
const WAVE_LIMIT: Duration = Duration::from_secs(30);
/// How long to wait for flapping devices to finish reconnecting.
const RECONNECT_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for the server to go quiet after a burst (connections, flaps).
const SETTLE_LIMIT: Duration = Duration::from_secs(15);
/// Open-loop GetPresence calls in flight at most (beyond it a call is skipped and counted).
const OPEN_LOOP_QUERIES_IN_FLIGHT: usize = 256;
/// One GetPresence may take this long before it counts as an error.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// In `mixed`, one online user in this many flaps instead of changing status.
const MIXED_FLAPPER_EVERY: u64 = 10;
/// In `mixed`, per status change: flaps (reconnects) and GetPresence calls. Per 100 changes,
/// 10 reconnects and 20 queries: a session that changes status ~10 times (auto-away and back,
/// busy in a call) opens the app once and lists presence twice (contact list, a chat's members).
const MIXED_FLAPS_PER_CHANGE: f64 = 0.1;
const MIXED_QUERIES_PER_CHANGE: f64 = 0.2;

/// One run: the connections, the shared device state, the process watchers and the report
/// being filled.
struct Bench {
    common: Common,
    ring: Ring,
    pool: Pool,
    auth: Auth,
    recorder: Arc<Recorder>,
    shared: Arc<Shared>,
    server: Option<Arc<Watched>>,
    me: Arc<Watched>,
    rng: SmallRng,
    report: Report,
}

/// The start of a measured phase.
struct Phase {
    started: Instant,
    machine: Option<(u64, u64)>,
    counters: Counters,
    stats: ServerStats,
    server: Option<Sample>,
    me: Option<Sample>,
}

impl Bench {
    async fn new(common: &Common, scenario: &'static str) -> anyhow::Result<Bench> {
        let addrs = loopback_targets(&common.target)?;
        let ring = Ring::new(common.users, common.contacts)?;
        if common.online > common.users {
            bail!(
                "--online {} is more than --users {}",
                common.online,
                common.users
            );
        }
        if !(common.duration.is_finite() && common.duration > 0.0 && common.duration <= 3600.0) {
            bail!("--duration must be between 0 and 3600 seconds");
        }
        let conns = common
            .conns
            .unwrap_or(common.online.div_ceil(100) as usize)
            .max(1);
        let server = match common.server_pid {
            Some(pid) => {
                let w = Watched::new(pid);
                if !w.readable() {
                    bail!("--server-pid {pid}: cannot read /proc/{pid}/status and stat");
                }
                Some(Arc::new(w))
            }
            None => None,
        };
        let pool = Pool::connect(&addrs, conns).await?;
        let raw = match common.device_client {
            crate::DeviceClient::Raw => Some(crate::h2raw::RawPool::connect(&addrs, conns).await?),
            crate::DeviceClient::Tonic => None,
        };
        let auth = Auth::new(common.token_secret.clone())?;
        let recorder = Arc::new(Recorder::default());
        let shared = Arc::new(Shared::new(
            pool.clone(),
            raw,
            auth.clone(),
            recorder.clone(),
            common.users,
        ));
        let report = Report {
            scenario,
            params: Params {
                target: addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                users: common.users,
                online: common.online,
                contacts: ring.degree(),
                connections: pool.len(),
                duration_s: common.duration,
                auth: auth.describe(),
                connect_concurrency: common.concurrency as usize,
                ..Params::default()
            },
            ..Report::default()
        };
        Ok(Bench {
            common: common.clone(),
            ring,
            pool,
            auth,
            recorder,
            shared,
            server,
            me: Arc::new(Watched::new(std::process::id())),
            rng: SmallRng::seed_from_u64(common.seed),
            report,
        })
    }

    fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.common.duration)
    }

    async fn setup(&mut self) -> anyhow::Result<()> {
        let mode = match (self.common.setup, self.common.no_setup) {
            (true, _) => SetupMode::Always,
            (_, true) => SetupMode::Never,
            _ => SetupMode::Auto,
        };
        self.report.setup = graph::ensure(self.ring, &self.pool, &self.auth, mode).await?;
        Ok(())
    }

    /// Opens a stream for each online user `1..=C`, fills the report's connect figures, and
    /// waits for the server to go quiet.
    async fn bring_online(&mut self, tracked: impl Fn(u64) -> bool) -> Fleet {
        let c = self.common.online;
        eprintln!(
            "connect: opening {} Authenticate streams over {} connections, {} at a time",
            thousands(c),
            self.pool.len(),
            self.common.concurrency
        );
        let mut fleet = Fleet::new(self.shared.clone(), self.common.users);
        let started = Instant::now();
        {
            let _p = self.progress("connect");
            fleet
                .connect(1..=c, tracked, self.common.concurrency as usize)
                .await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let k = self.recorder.counters();
        self.report.connect = Some(ConnectFigures {
            streams: k.connects,
            errors: k.connect_errors,
            seconds,
            connects_per_s: k.connects as f64 / seconds.max(1e-9),
            retries: k.open_retries,
            welcome: self.recorder.quantiles(Hist::Welcome),
            server_rss_per_stream_kib: None,
        });
        self.settle().await;
        fleet
    }

    /// Online users that got their welcome and pass `keep`, shuffled.
    fn online_shuffled(&mut self, keep: impl Fn(u64) -> bool) -> Vec<u64> {
        let mut users: Vec<u64> = (1..=self.common.online)
            .filter(|&u| keep(u) && self.shared.connected(u))
            .collect();
        users.shuffle(&mut self.rng);
        users
    }

    /// Waits until neither the server's counters nor the devices' receipts move for half a
    /// second: the burst of a connect phase or of flaps is over.
    async fn settle(&self) {
        let deadline = Instant::now() + SETTLE_LIMIT;
        let mut previous = None;
        let mut quiet = 0;
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let server = ServerStats::read(&self.pool, &self.auth)
                .await
                .ok()
                .map(|s| (s.changes, s.deliveries));
            let c = self.recorder.counters();
            let now = (server, received(&c));
            if previous == Some(now) {
                quiet += 1;
                if quiet >= 2 {
                    return;
                }
            } else {
                quiet = 0;
            }
            previous = Some(now);
        }
        eprintln!("warning: the server was still busy {SETTLE_LIMIT:?} after the burst");
    }

    async fn begin(&self) -> anyhow::Result<Phase> {
        let stats = ServerStats::read(&self.pool, &self.auth).await?;
        hook(&self.common.on_phase_start).await;
        Ok(Phase {
            stats,
            counters: self.recorder.counters(),
            server: self.server.as_ref().and_then(|w| w.start()),
            me: self.me.start(),
            machine: machine_ticks(),
            started: Instant::now(),
        })
    }

    async fn end(&self, phase: Phase) -> anyhow::Result<PhaseFigures> {
        let seconds = phase.started.elapsed().as_secs_f64();
        hook(&self.common.on_phase_end).await;
        let after = ServerStats::read(&self.pool, &self.auth).await?;
        let delta = after.since(&phase.stats);
        let per_change = |x: u64| (delta.changes > 0).then(|| x as f64 / delta.changes as f64);
        let server_process = self.server.as_ref().and_then(|w| w.finish(phase.server));
        let bench_process = self.me.finish(phase.me);
        let machine_cores = match (phase.machine, machine_ticks()) {
            (Some(a), Some(b)) => Some(machine_cores(a, b, seconds)),
            _ => None,
        };
        let bench_received = received(&self.recorder.counters()) - received(&phase.counters);
        // CPU seconds over the phase, in microseconds per event.
        let micros_per = |p: Option<crate::sysinfo::ProcFigures>, n: u64| {
            p.filter(|_| n > 0)
                .map(|p| p.cpu_cores * seconds * 1e6 / n as f64)
        };
        Ok(PhaseFigures {
            seconds,
            server_before: phase.stats,
            server_after: after,
            server_delta: delta,
            db_statements_per_change: per_change(delta.db_statements),
            db_rows_per_change: per_change(delta.db_rows),
            deliveries_per_change: per_change(delta.deliveries),
            server_deliveries_per_s: delta.deliveries as f64 / seconds.max(1e-9),
            server_cpu_us_per_change: micros_per(server_process, delta.changes),
            server_cpu_us_per_delivery: micros_per(server_process, delta.deliveries),
            bench_received,
            bench_cpu_us_per_delivery: micros_per(bench_process, bench_received),
            machine_cores,
            other_processes_cores: machine_cores.map(|m| {
                let mine = server_process.map_or(0.0, |p| p.cpu_cores)
                    + bench_process.map_or(0.0, |p| p.cpu_cores);
                (m - mine).max(0.0)
            }),
            server_process,
            bench_process,
        })
    }

    /// Prints a progress line on stderr every second until dropped.
    fn progress(&self, label: &'static str) -> Progress {
        let recorder = self.recorder.clone();
        let server = self.server.clone();
        Progress(tokio::spawn(async move {
            // The one-second distributions start from now, not from the last progress line.
            for hist in [Hist::Delivery, Hist::SendLag, Hist::Query, Hist::Wake] {
                recorder.take_recent(hist);
            }
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let mut prev = recorder.counters();
            let mut prev_sample = server.as_ref().and_then(|w| w.latest());
            let mut prev_machine = machine_ticks();
            let mut prev_at = Instant::now();
            loop {
                tick.tick().await;
                let c = recorder.counters();
                let mut line = format!("[{label} {:>3.0}s]", started.elapsed().as_secs_f64());
                let fields: [(&str, Field); 9] = [
                    ("connects", |c| c.connects),
                    ("backgrounded", |c| c.backgrounded),
                    ("changes", |c| c.changes_sent),
                    ("deliveries", |c| c.churn_received),
                    ("other updates", |c| c.other_received),
                    ("resyncs", |c| c.resyncs),
                    ("reconnects", |c| c.reconnects),
                    ("queries", |c| c.queries),
                    ("errors", errors),
                ];
                for (name, get) in fields {
                    let (now, before) = (get(&c), get(&prev));
                    // Only what moved this second, and errors whenever there are any.
                    if now > before || (name == "errors" && now > 0) {
                        line += &format!(
                            " | {name} {} (+{}/s)",
                            thousands(now),
                            thousands(now - before)
                        );
                    }
                }
                for (name, hist) in [
                    ("latency", Hist::Delivery),
                    ("send lag", Hist::SendLag),
                    ("query", Hist::Query),
                    ("wake to resync", Hist::Wake),
                ] {
                    let q = recorder.take_recent(hist);
                    if q.count > 0 {
                        line += &format!(
                            " | {name} p50 {:.1} p99 {:.1} max {:.1} ms",
                            q.p50_ms, q.p99_ms, q.max_ms
                        );
                    }
                }
                if let Some(w) = &server {
                    let s = w.latest();
                    if let (Some(a), Some(b)) = (prev_sample, s) {
                        line += &format!(
                            " | server {:.0} MiB, {:.2} cores",
                            b.rss_kib as f64 / 1024.0,
                            cores_between(&a, &b)
                        );
                    }
                    prev_sample = s;
                }
                let machine = machine_ticks();
                if let (Some(a), Some(b)) = (prev_machine, machine) {
                    line += &format!(
                        " | machine {:.2} cores",
                        machine_cores(a, b, prev_at.elapsed().as_secs_f64())
                    );
                }
                (prev_machine, prev_at) = (machine, Instant::now());
                eprintln!("{line}");
                prev = c;
            }
        }))
    }

    /// Installs the churn plan over `churners`, starting a few milliseconds from now.
    fn install_plan(&self, rate: u64, churners: Vec<u64>) -> anyhow::Result<&Plan> {
        if churners.is_empty() {
            bail!("no online user to change status: is the server reachable, --online > 0?");
        }
        let schedule = Schedule::new(
            Instant::now() + Duration::from_millis(10),
            rate,
            self.duration(),
        );
        let shared = &self.shared;
        let plan = Plan::new(schedule, churners, self.common.users, |u| {
            shared.own_state(u)
        });
        if self.shared.plan.set(plan).is_err() {
            bail!("a run has one churn plan");
        }
        Ok(self.shared.plan.get().expect("just set"))
    }

    /// Sends every change of the plan on its timetable; returns when the last was sent.
    async fn drive_churn(&self, fleet: &Fleet) -> Instant {
        let plan = self.shared.plan.get().expect("install_plan runs first");
        let recorder = &self.recorder;
        plan.schedule
            .run(|i, scheduled, now| {
                let (user, status) = plan.take(i);
                let sent = fleet.send(user, Cmd::Status(status));
                recorder.with(|t| {
                    t.counters.changes_sent += 1;
                    if !sent {
                        t.counters.dead_commands += 1;
                    }
                    t.record(Hist::SendLag, now.saturating_duration_since(scheduled));
                });
            })
            .await;
        Instant::now()
    }

    /// Waits until every receipt the graph implies is in (received or superseded), at most
    /// DRAIN_LIMIT; returns the churn figures but for `lost`, known once devices close.
    /// `sent` is when the driver sent the last change.
    async fn drain_churn(&self, sent: Instant, tracked: impl Fn(u64) -> bool) -> ChurnFigures {
        let plan = self.shared.plan.get().expect("install_plan runs first");
        let last_scheduled = plan.schedule.at(plan.schedule.total.saturating_sub(1));
        let sending = sent.duration_since(plan.schedule.t0);
        let expected = self.implied_receipts(tracked);
        let deadline = Instant::now() + DRAIN_LIMIT;
        loop {
            let c = self.recorder.counters();
            if c.churn_received + c.superseded >= expected || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let c = self.recorder.counters();
        let seconds = sending.as_secs_f64().max(1e-9);
        ChurnFigures {
            target_rate: plan.schedule.rate,
            seconds,
            changes: c.changes_sent,
            changes_per_s: c.changes_sent as f64 / seconds,
            deliveries: c.churn_received,
            deliveries_per_s: c.churn_received as f64 / seconds,
            expected,
            superseded: c.superseded,
            lost: 0,
            drain_ms: Instant::now()
                .saturating_duration_since(last_scheduled)
                .as_secs_f64()
                * 1000.0,
            latency: self.recorder.quantiles(Hist::Delivery),
            send_lag: self.recorder.quantiles(Hist::SendLag),
        }
    }

    /// Sends `percent` % of the connected online devices, chosen at random, to the background
    /// and waits until the server confirmed each (and until the auto-away changes that follow
    /// have been delivered). Returns the passive users, ascending, and the figures so far.
    async fn go_passive(&mut self, fleet: &Fleet, percent: u64) -> (Vec<u64>, PassiveFigures) {
        let mut figures = PassiveFigures {
            percent,
            ..PassiveFigures::default()
        };
        if percent == 0 {
            return (Vec::new(), figures);
        }
        let mut users = self.online_shuffled(|_| true);
        users.truncate(((users.len() as u64 * percent + 50) / 100) as usize);
        users.sort_unstable();
        eprintln!(
            "passive: sending {} of {} online devices ({percent} %) to the background",
            thousands(users.len() as u64),
            thousands(self.common.online)
        );
        let before = self.recorder.counters().backgrounded;
        let started = Instant::now();
        let asked = users.iter().filter(|&&u| fleet.background(u)).count() as u64;
        {
            let _p = self.progress("background");
            let deadline = started + BACKGROUND_LIMIT;
            while self.recorder.counters().backgrounded - before < asked
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        figures.devices = users.len() as u64;
        figures.confirmed = self.recorder.counters().backgrounded - before;
        figures.background_seconds = started.elapsed().as_secs_f64();
        if figures.confirmed < asked {
            self.recorder.error(format!(
                "only {} of {asked} devices confirmed the background within {BACKGROUND_LIMIT:?}",
                figures.confirmed
            ));
            self.recorder
                .with(|t| t.counters.stream_errors += asked - figures.confirmed);
        }
        // A user whose only device went to the background turns auto-away: let those
        // deliveries pass before anything is measured.
        self.settle().await;
        (users, figures)
    }

    /// Deliveries the churn's changes should have skipped: each change sent times the sender's
    /// connected contacts in the background.
    fn implied_skipped(&self, passive: &[bool]) -> u64 {
        self.implied_receipts(|r| passive[r as usize])
    }

    /// What the graph implies for the churn's changes: each change sent times the sender's
    /// connected ring contacts that `keep` picks.
    fn implied_receipts(&self, keep: impl Fn(u64) -> bool) -> u64 {
        let Some(plan) = self.shared.plan.get() else {
            return 0;
        };
        plan.churners()
            .iter()
            .map(|&u| {
                let receivers = self
                    .ring
                    .contacts(u)
                    .into_iter()
                    .filter(|&r| self.shared.connected(r) && keep(r))
                    .count() as u64;
                plan.sent(u) * receivers
            })
            .sum()
    }

    /// Wakes `users` at once (set_activity ACTIVE on each device, as fast as the driver can
    /// send them) and waits until each has its whole resync, at most WAVE_LIMIT.
    async fn wave(&self, fleet: &Fleet, users: &[u64]) -> WaveFigures {
        let before = self.recorder.counters().resyncs;
        let hist_before = self.recorder.histogram(Hist::Wake);
        let started = Instant::now();
        let woken = users.iter().filter(|&&u| fleet.wake(u)).count() as u64;
        let send_ms = started.elapsed().as_secs_f64() * 1000.0;
        let deadline = started + WAVE_LIMIT;
        while self.recorder.counters().resyncs - before < woken && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let resyncs = self.recorder.counters().resyncs - before;
        let missing = woken.saturating_sub(resyncs);
        if missing > 0 {
            self.recorder
                .with(|t| t.counters.resyncs_missing += missing);
            self.recorder.error(format!(
                "{missing} of {woken} woken devices had no whole resync {WAVE_LIMIT:?} after the wave began"
            ));
        }
        let mut this_wave = self.recorder.histogram(Hist::Wake);
        if this_wave.subtract(&hist_before).is_err() {
            this_wave = self.recorder.histogram(Hist::Wake);
        }
        WaveFigures {
            devices: users.len() as u64,
            woken,
            resyncs,
            send_ms,
            complete_ms: (missing == 0)
                .then(|| self.shared.last_resync())
                .flatten()
                .map(|at| at.saturating_duration_since(started).as_secs_f64() * 1000.0),
            wake_to_resync: Quantiles::of(&this_wave),
        }
    }

    /// Flaps `flappers` in turn on `schedule`, then waits for the reconnections.
    async fn drive_flaps(&self, fleet: &Fleet, schedule: Schedule, flappers: &[u64]) {
        if flappers.is_empty() {
            return;
        }
        let recorder = &self.recorder;
        schedule
            .run(|i, _, _| {
                let user = flappers[(i % flappers.len() as u64) as usize];
                if fleet.send(user, Cmd::Flap) {
                    recorder.with(|t| t.counters.flaps += 1);
                }
            })
            .await;
        let deadline = Instant::now() + RECONNECT_LIMIT;
        while Instant::now() < deadline {
            let c = self.recorder.counters();
            if c.reconnects + c.reconnect_errors >= c.flaps {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!("warning: reconnections still pending {RECONNECT_LIMIT:?} after the last flap");
    }

    fn flap_figures(
        &self,
        schedule: &Schedule,
        since: &Counters,
        ph: &PhaseFigures,
    ) -> FlapFigures {
        let c = self.recorder.counters();
        let flaps = c.flaps - since.flaps;
        let reconnects = c.reconnects - since.reconnects;
        let bench_deliveries = c.other_received - since.other_received;
        let seconds = schedule_seconds(schedule);
        let per_flap = |x: u64| (flaps > 0).then(|| x as f64 / flaps as f64);
        FlapFigures {
            target_rate: schedule.rate,
            flaps,
            reconnects,
            errors: c.reconnect_errors - since.reconnect_errors,
            retries: c.open_retries - since.open_retries,
            seconds,
            connects_per_s: reconnects as f64 / seconds,
            reconnect: self.recorder.quantiles(Hist::Reconnect),
            bench_deliveries,
            bench_deliveries_per_flap: per_flap(bench_deliveries).unwrap_or(0.0),
            server_deliveries_per_flap: per_flap(ph.server_delta.deliveries),
            server_changes_per_flap: per_flap(ph.server_delta.changes),
        }
    }

    /// Who asks GetPresence: online users (their contacts are cached), or the service.
    fn callers(&self) -> Arc<Vec<u64>> {
        Arc::new(
            (1..=self.common.online)
                .filter(|&u| self.shared.connected(u))
                .collect(),
        )
    }

    /// W workers, each asking again as soon as answered, for the run's duration.
    async fn query_closed_loop(&self, workers: usize, ids: usize) -> QueryFigures {
        let callers = self.callers();
        let deadline = Instant::now() + self.duration();
        let started = Instant::now();
        let tasks: Vec<_> = (0..workers.max(1))
            .map(|w| {
                let asker = Asker::new(self, callers.clone(), ids, w as u64);
                tokio::spawn(async move {
                    let mut asker = asker;
                    while Instant::now() < deadline {
                        asker.ask(Instant::now()).await;
                    }
                })
            })
            .collect();
        futures::future::join_all(tasks).await;
        self.query_figures(
            format!("closed loop, {} workers", workers.max(1)),
            ids,
            started.elapsed().as_secs_f64(),
        )
    }

    /// GetPresence calls on a timetable, latency measured from each call's scheduled time.
    async fn query_open_loop(&self, schedule: Schedule, ids: usize) {
        let callers = self.callers();
        let gate = Arc::new(Semaphore::new(OPEN_LOOP_QUERIES_IN_FLIGHT));
        let recorder = &self.recorder;
        let mut asker = Asker::new(self, callers, ids, u64::MAX);
        schedule
            .run(|_, scheduled, _| match gate.clone().try_acquire_owned() {
                Ok(permit) => {
                    let mut a = asker.fork();
                    tokio::spawn(async move {
                        a.ask(scheduled).await;
                        drop(permit);
                    });
                }
                Err(_) => recorder.with(|t| t.counters.query_skipped += 1),
            })
            .await;
        let _all = gate
            .acquire_many(OPEN_LOOP_QUERIES_IN_FLIGHT as u32)
            .await
            .expect("the semaphore is never closed");
    }

    fn query_figures(&self, mode: String, ids: usize, seconds: f64) -> QueryFigures {
        let c = self.recorder.counters();
        let seconds = seconds.max(1e-9);
        QueryFigures {
            mode,
            ids_per_call: ids,
            seconds,
            calls: c.queries,
            calls_per_s: c.queries as f64 / seconds,
            ids: c.query_ids,
            ids_per_s: c.query_ids as f64 / seconds,
            errors: c.query_errors,
            skipped: c.query_skipped,
            latency: self.recorder.quantiles(Hist::Query),
        }
    }

    fn finish(mut self) -> Report {
        let c = self.recorder.counters();
        if let Some(ch) = self.report.churn.as_mut() {
            ch.lost = c.lost;
        }
        if let Some(p) = self.report.passive.as_mut() {
            p.received_while_passive = c.passive_received;
            p.resyncs = c.resyncs;
            p.resync_stale = c.resync_stale;
            p.resync_duplicates = c.resync_duplicates;
            p.resyncs_missing = c.resyncs_missing;
            p.wake_to_resync = self.recorder.quantiles(Hist::Wake);
            p.resync_entries = self.recorder.sizes(Hist::ResyncSize);
        }
        self.report.checks = crate::report::Checks::from(&c);
        if let Some(ch) = &self.report.churn {
            self.report.checks.undelivered_from(ch);
        }
        self.report.counters = c;
        self.report.errors = self.recorder.errors();
        self.report
    }
}

/// Runs `--on-phase-start` / `--on-phase-end` with `sh -c` and waits for it; a failure is
/// reported, not fatal.
async fn hook(command: &Option<String>) {
    let Some(command) = command.clone() else {
        return;
    };
    let outcome = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .status()
            .map(|s| (command, s))
    })
    .await;
    match outcome {
        Ok(Ok((_, status))) if status.success() => {}
        Ok(Ok((command, status))) => eprintln!("warning: {command:?} exited with {status}"),
        Ok(Err(e)) => eprintln!("warning: a phase hook could not run: {e}"),
        Err(e) => eprintln!("warning: a phase hook panicked: {e}"),
    }
}

/// Reads one counter, for the progress line.
type Field = fn(&Counters) -> u64;

/// Every presence_updated a device has taken in.
fn received(c: &Counters) -> u64 {
    c.churn_received
        + c.churn_untracked
        + c.other_received
        + c.echoes
        + c.out_of_order
        + c.unexpected
        + c.passive_received
}

fn errors(c: &Counters) -> u64 {
    c.connect_errors + c.reconnect_errors + c.stream_errors + c.query_errors + c.dead_commands
}

fn schedule_seconds(s: &Schedule) -> f64 {
    s.at(s.total).duration_since(s.t0).as_secs_f64().max(1e-9)
}

/// Stops the progress line when dropped.
struct Progress(tokio::task::JoinHandle<()>);

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Makes GetPresence calls of random ids, as a random online user (or as the service when no
/// user is online), and records them.
struct Asker {
    pool: Pool,
    auth: Auth,
    recorder: Arc<Recorder>,
    callers: Arc<Vec<u64>>,
    users: u64,
    ids: usize,
    rng: SmallRng,
}

impl Asker {
    fn new(b: &Bench, callers: Arc<Vec<u64>>, ids: usize, stream: u64) -> Asker {
        Asker {
            pool: b.pool.clone(),
            auth: b.auth.clone(),
            recorder: b.recorder.clone(),
            callers,
            users: b.common.users,
            ids,
            rng: SmallRng::seed_from_u64(
                b.common.seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
        }
    }

    /// Another asker with its own random stream.
    fn fork(&mut self) -> Asker {
        Asker {
            pool: self.pool.clone(),
            auth: self.auth.clone(),
            recorder: self.recorder.clone(),
            callers: self.callers.clone(),
            users: self.users,
            ids: self.ids,
            rng: SmallRng::seed_from_u64(self.rng.random()),
        }
    }

    /// One call; its latency counts from `since` (its scheduled time in open loop).
    async fn ask(&mut self, since: Instant) {
        let user_ids: Vec<u64> = (0..self.ids)
            .map(|_| self.rng.random_range(1..=self.users))
            .collect();
        let mut req = Request::new(pb::GetPresenceRequest { user_ids });
        req.set_timeout(QUERY_TIMEOUT);
        let caller = if self.callers.is_empty() {
            self.auth.as_service(&mut req);
            self.rng.random_range(1..=self.users)
        } else {
            let u = self.callers[self.rng.random_range(0..self.callers.len())];
            if let Err(e) = self.auth.as_user(&mut req, u) {
                self.recorder.error(format!("{e:#}"));
            }
            u
        };
        let answer = self
            .pool
            .presence(caller)
            .get_presence(req)
            .await
            .context("GetPresence");
        let took = since.elapsed();
        match answer {
            Ok(r) => {
                let n = r.get_ref().users.len() as u64;
                self.recorder.with(|t| {
                    t.counters.queries += 1;
                    t.counters.query_ids += n;
                    t.record(Hist::Query, took);
                });
            }
            Err(e) => {
                self.recorder.with(|t| t.counters.query_errors += 1);
                self.recorder.error(format!("{e:#}"));
            }
        }
    }
}

/// `connect`: C streams opened; connects/s, time to welcome, server RSS per idle stream.
pub async fn connect(common: &Common) -> anyhow::Result<Report> {
    let mut b = Bench::new(common, "connect").await?;
    b.setup().await?;
    let phase = b.begin().await?;
    let fleet = b.bring_online(|_| true).await;
    // bring_online waited for the server to go quiet: every stream is idle now.
    let ph = b.end(phase).await?;
    if let (Some(c), Some(sp)) = (b.report.connect.as_mut(), ph.server_process)
        && c.streams > 0
    {
        c.server_rss_per_stream_kib =
            Some((sp.rss_end_kib as f64 - sp.rss_start_kib as f64) / c.streams as f64);
    }
    b.report.phase = Some(ph);
    fleet.close().await;
    Ok(b.finish())
}

/// `churn`: C online, status changes at `rate` per second on an open-loop timetable, every
/// change matched to every online contact's receipt. With `passive` > 0, that share of the
/// online devices go to the background first: they change nothing and receive nothing (the
/// server skips them, and counts it), and the others churn.
pub async fn churn(common: &Common, rate: u64, passive: u64) -> anyhow::Result<Report> {
    let mut b = Bench::new(common, "churn").await?;
    b.report.params.rate = Some(rate);
    b.report.params.passive_percent = Some(passive);
    b.setup().await?;
    let fleet = b.bring_online(|_| true).await;
    let (_, figures, _) = passive_churn(&mut b, &fleet, rate, passive).await?;
    if passive > 0 {
        b.report.passive = Some(figures);
    }
    fleet.close().await;
    Ok(b.finish())
}

/// The common part of `churn` and `passive`: background, then churn by the active devices.
/// Returns the passive users (ascending), their figures so far, and passiveness by user id.
async fn passive_churn(
    b: &mut Bench,
    fleet: &Fleet,
    rate: u64,
    percent: u64,
) -> anyhow::Result<(Vec<u64>, PassiveFigures, Vec<bool>)> {
    let (passive_users, mut figures) = b.go_passive(fleet, percent).await;
    let mut is_passive = vec![false; b.common.users as usize + 1];
    for &u in &passive_users {
        is_passive[u as usize] = true;
    }
    let churners = {
        let p = &is_passive;
        b.online_shuffled(|u| !p[u as usize])
    };
    let phase = b.begin().await?;
    b.install_plan(rate, churners)?;
    let churn = {
        let _p = b.progress("churn");
        let sent = b.drive_churn(fleet).await;
        let p = &is_passive;
        b.drain_churn(sent, |u| !p[u as usize]).await
    };
    let ph = b.end(phase).await?;
    figures.deliveries_sent = ph.server_delta.deliveries;
    figures.deliveries_skipped = ph.server_delta.passive_skipped;
    figures.skipped_implied = b.implied_skipped(&is_passive);
    b.report.churn = Some(churn);
    b.report.phase = Some(ph);
    Ok((passive_users, figures, is_passive))
}

/// `passive`: C online, `percent` % of them in the background; the others churn at `rate`
/// for the duration (server CPU per change, deliveries sent and skipped); then `waves` waves
/// each wake `wake` passive devices at once: wake-to-resync latency, resync sizes, and every
/// resync entry checked (newer than what the device had, one per user).
pub async fn passive(
    common: &Common,
    rate: u64,
    percent: u64,
    wake: u64,
    waves: u64,
) -> anyhow::Result<Report> {
    let mut b = Bench::new(common, "passive").await?;
    b.report.params.rate = Some(rate);
    b.report.params.passive_percent = Some(percent);
    b.report.params.wake = Some(wake);
    b.report.params.waves = Some(waves);
    b.setup().await?;
    let fleet = b.bring_online(|_| true).await;
    let (mut passive_users, mut figures, _) = passive_churn(&mut b, &fleet, rate, percent).await?;
    let needed = wake.saturating_mul(waves);
    if needed > passive_users.len() as u64 {
        b.recorder.error(format!(
            "{waves} waves of {wake} need {needed} passive devices, there are {}: fewer waves run",
            passive_users.len()
        ));
    }
    if waves == 0 {
        // No wave phase at all: one measured over a few milliseconds read whole cores from a
        // single clock tick (the suite saw "other load 1027.85 cores").
        b.report.passive = Some(figures);
        fleet.close().await;
        return Ok(b.finish());
    }
    passive_users.shuffle(&mut b.rng);
    b.settle().await;
    let phase = b.begin().await?;
    {
        let _p = b.progress("waves");
        for (i, group) in passive_users
            .chunks(wake.max(1) as usize)
            .filter(|g| g.len() as u64 == wake)
            .take(waves as usize)
            .enumerate()
        {
            eprintln!(
                "wave {}: waking {} devices at once",
                i + 1,
                thousands(group.len() as u64)
            );
            let w = b.wave(&fleet, group).await;
            eprintln!(
                "wave {}: {} resyncs, complete in {} ms; wake to resync {}",
                i + 1,
                thousands(w.resyncs),
                w.complete_ms.map_or("n/a".into(), |ms| format!("{ms:.0}")),
                w.wake_to_resync.line()
            );
            figures.waves.push(w);
            // The woken users' auto-away ends: their contacts hear of it. Let that pass.
            b.settle().await;
        }
    }
    figures.wave_phase = Some(b.end(phase).await?);
    b.report.passive = Some(figures);
    fleet.close().await;
    Ok(b.finish())
}

/// `flap`: online devices disconnect and reconnect at `rate` per second.
pub async fn flap(common: &Common, rate: u64) -> anyhow::Result<Report> {
    let mut b = Bench::new(common, "flap").await?;
    b.report.params.rate = Some(rate);
    b.setup().await?;
    let fleet = b.bring_online(|_| false).await;
    let flappers = b.online_shuffled(|_| true);
    if flappers.is_empty() {
        bail!("no online device to flap: is the server reachable, --online > 0?");
    }
    let phase = b.begin().await?;
    let since = b.recorder.counters();
    let schedule = Schedule::new(
        Instant::now() + Duration::from_millis(10),
        rate,
        b.duration(),
    );
    {
        let _p = b.progress("flap");
        b.drive_flaps(&fleet, schedule, &flappers).await;
        b.settle().await;
    }
    let ph = b.end(phase).await?;
    b.report.flap = Some(b.flap_figures(&schedule, &since, &ph));
    b.report.phase = Some(ph);
    fleet.close().await;
    Ok(b.finish())
}

/// `query`: GetPresence of `ids` random ids, closed loop with `workers` workers.
pub async fn query(common: &Common, workers: usize, ids: usize) -> anyhow::Result<Report> {
    let mut b = Bench::new(common, "query").await?;
    b.report.params.workers = Some(workers);
    b.report.params.ids_per_call = Some(ids);
    b.setup().await?;
    let fleet = b.bring_online(|_| true).await;
    let phase = b.begin().await?;
    let figures = {
        let _p = b.progress("query");
        b.query_closed_loop(workers, ids).await
    };
    b.report.query = Some(figures);
    b.report.phase = Some(b.end(phase).await?);
    fleet.close().await;
    Ok(b.finish())
}

/// `mixed`: churn at `rate`, while one online user in ten flaps (at rate/10 per second) and
/// GetPresence calls arrive at rate/5 per second (open loop).
pub async fn mixed(common: &Common, rate: u64, ids: usize) -> anyhow::Result<Report> {
    let mut b = Bench::new(common, "mixed").await?;
    b.report.params.rate = Some(rate);
    b.report.params.ids_per_call = Some(ids);
    b.setup().await?;
    let flapper = |u: u64| u.is_multiple_of(MIXED_FLAPPER_EVERY);
    let fleet = b.bring_online(|u| !flapper(u)).await;
    let churners = b.online_shuffled(|u| !flapper(u));
    let flappers = b.online_shuffled(flapper);
    let phase = b.begin().await?;
    let since = b.recorder.counters();
    let t0 = b.install_plan(rate, churners)?.schedule.t0;
    let duration = b.duration();
    let derived = |per_change: f64| ((rate as f64 * per_change).round() as u64).max(1);
    let flaps = Schedule::new(t0, derived(MIXED_FLAPS_PER_CHANGE), duration);
    let queries = Schedule::new(t0, derived(MIXED_QUERIES_PER_CHANGE), duration);
    let churn = {
        let _p = b.progress("mixed");
        let (sent, (), ()) = tokio::join!(
            b.drive_churn(&fleet),
            b.drive_flaps(&fleet, flaps, &flappers),
            b.query_open_loop(queries, ids),
        );
        b.drain_churn(sent, |u| !flapper(u)).await
    };
    let query_seconds = schedule_seconds(&queries);
    let ph = b.end(phase).await?;
    b.report.churn = Some(churn);
    b.report.flap = Some(b.flap_figures(&flaps, &since, &ph));
    b.report.query =
        Some(b.query_figures(format!("open loop, {}/s", queries.rate), ids, query_seconds));
    b.report.phase = Some(ph);
    fleet.close().await;
    Ok(b.finish())
}
