//! `presence-bench suite`: the standard scenarios, each run several times on a fresh server,
//! summarised as min / median / max with the machine, the commit, the date and the other load
//! during each run, judged against the bars of issues 18 and 15.
//!
//! Every run is two child processes: a fresh `presence serve` (the binary given with
//! `--server`) on a fresh copy of one SQLite database that holds the contact graph (created
//! once, at the start, by the bench's own setup; no run sees another's rows), and this binary
//! running one scenario against it with `--server-pid` and `--json`. Before each run
//! the suite waits for the machine to be quiet; a run during which other processes used more
//! than `--max-other` cores (machine busy − server − bench, as the bench samples it) is marked
//! invalid and run once more; invalid runs are left out of the figures. Then, unless
//! `--no-callgrind`, the server's instructions per delivery on a fixed tiny churn, counted by
//! valgrind's callgrind (this machine's VM exposes no hardware counters to `perf stat`).
//!
//! The summary goes to stdout and to `--out` as `<date>-<commit>.md` and `.json`; each run's
//! own report and log stay in the work directory (printed at the start).
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use crate::sysinfo::{machine_cores, machine_ticks};

/// The graph every run uses (the bench's defaults).
const USERS: &str = "100000";
const CONTACTS: &str = "50";
/// Longest a server may take to print `listening on` (a cold start on a large database).
const SERVER_START_LIMIT: Duration = Duration::from_secs(180);
/// Longest a server may take to stop after SIGTERM before it is killed.
const SERVER_STOP_LIMIT: Duration = Duration::from_secs(30);
/// Longest one bench run may take.
const RUN_LIMIT: Duration = Duration::from_secs(15 * 60);
/// The machine is sampled this long to decide whether it is quiet.
const QUIET_SAMPLE: Duration = Duration::from_secs(3);

#[derive(Args, Debug, Clone)]
pub struct SuiteArgs {
    /// The server binary to run, fresh for every run (e.g. target/release/presence).
    #[arg(long)]
    pub server: PathBuf,
    /// The SQLite database holding the graph (N = 100,000, K = 50), created once, at the start,
    /// when it is not there yet; every run starts on a fresh copy of it.
    #[arg(long, default_value = "/tmp/presence-suite.db")]
    pub db: PathBuf,
    /// Where the summary goes (<date>-<commit>.md and .json).
    #[arg(long, default_value = "bench/suite/results")]
    pub out: PathBuf,
    /// Where each run's report and log go [default: a new directory under /tmp].
    #[arg(long)]
    pub work: Option<PathBuf>,
    /// Runs per scenario.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    pub runs: u64,
    /// Only these scenarios (comma-separated ids; `--list` shows them).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    pub list: bool,
    /// A run during which other processes used more cores than this is invalid (re-run once).
    #[arg(long, default_value_t = 0.2)]
    pub max_other: f64,
    /// How long to wait, before each run, for the machine to be quiet (busy at most
    /// --max-other cores with nothing of ours running), in seconds; then it runs anyway.
    #[arg(long, default_value_t = 1800)]
    pub quiet_wait: u64,
    /// Skip the instruction count under callgrind.
    #[arg(long)]
    pub no_callgrind: bool,
    /// Only the instruction count under callgrind (no scenario runs).
    #[arg(long, conflicts_with = "no_callgrind")]
    pub callgrind_only: bool,
}

/// One figure of a scenario, read from its `--json` report.
struct Fig {
    key: &'static str,
    label: &'static str,
    /// Digits after the point in the table.
    digits: usize,
    get: fn(&Value) -> Option<f64>,
    bar: Option<Bar>,
}

/// A bar of issue 18 or 15, judged on the median of the valid runs.
#[derive(Clone, Copy)]
struct Bar {
    text: &'static str,
    met: fn(f64) -> bool,
}

struct Spec {
    id: &'static str,
    title: &'static str,
    args: &'static [&'static str],
    figs: Vec<Fig>,
}

fn num(v: &Value, path: &str) -> Option<f64> {
    v.pointer(path).and_then(Value::as_f64)
}

macro_rules! fig {
    ($key:literal, $label:literal, $digits:literal, $path:literal) => {
        Fig {
            key: $key,
            label: $label,
            digits: $digits,
            get: |v| num(v, $path),
            bar: None,
        }
    };
    ($key:literal, $label:literal, $digits:literal, $path:literal, $bar:literal, $met:expr) => {
        Fig {
            key: $key,
            label: $label,
            digits: $digits,
            get: |v| num(v, $path),
            bar: Some(Bar {
                text: $bar,
                met: $met,
            }),
        }
    };
}

fn churn_figs(p99_bar: Option<Bar>) -> Vec<Fig> {
    let mut p99 = fig!(
        "p99_ms",
        "p99 change to delivery (ms)",
        1,
        "/churn/latency/p99_ms"
    );
    p99.bar = p99_bar;
    vec![
        fig!(
            "changes_per_s",
            "changes/s achieved",
            0,
            "/churn/changes_per_s"
        ),
        fig!(
            "deliveries_per_s",
            "deliveries/s",
            0,
            "/churn/deliveries_per_s"
        ),
        fig!(
            "p50_ms",
            "p50 change to delivery (ms)",
            1,
            "/churn/latency/p50_ms"
        ),
        p99,
        fig!(
            "max_ms",
            "max change to delivery (ms)",
            0,
            "/churn/latency/max_ms"
        ),
        fig!("lost", "lost", 0, "/checks/lost", "0", |x| x == 0.0),
        fig!(
            "server_cores",
            "server CPU (cores)",
            2,
            "/phase/server_process/cpu_cores"
        ),
        fig!(
            "bench_cores",
            "bench CPU (cores)",
            2,
            "/phase/bench_process/cpu_cores"
        ),
        fig!(
            "server_us_per_delivery",
            "server CPU per delivery (µs)",
            2,
            "/phase/server_cpu_us_per_delivery",
            "≤ 1.7 µs (issue 18 item 2)",
            |x| x <= 1.7
        ),
        fig!(
            "server_us_per_change",
            "server CPU per change (µs)",
            0,
            "/phase/server_cpu_us_per_change"
        ),
        fig!(
            "bench_us_per_delivery",
            "bench CPU per delivery (µs)",
            2,
            "/phase/bench_cpu_us_per_delivery"
        ),
        fig!(
            "db_statements_per_change",
            "database statements per change",
            4,
            "/phase/db_statements_per_change",
            "≤ 0.01",
            |x| x <= 0.01
        ),
    ]
}

fn connect_figs(rss_bar: Option<Bar>) -> Vec<Fig> {
    let mut rss = fig!(
        "rss_per_stream_kib",
        "server RSS per idle stream (KiB)",
        2,
        "/connect/server_rss_per_stream_kib"
    );
    rss.bar = rss_bar;
    vec![
        fig!(
            "connects_per_s",
            "connects/s",
            0,
            "/connect/connects_per_s",
            "≥ 25,000/s",
            |x| x >= 25_000.0
        ),
        fig!(
            "welcome_p99_ms",
            "p99 time to welcome (ms)",
            1,
            "/connect/welcome/p99_ms"
        ),
        rss,
        Fig {
            key: "server_rss_mib",
            label: "server RSS at end (MiB)",
            digits: 0,
            get: |v| num(v, "/phase/server_process/rss_end_kib").map(|k| k / 1024.0),
            bar: None,
        },
        fig!("errors", "connect errors", 0, "/connect/errors"),
    ]
}

fn specs() -> Vec<Spec> {
    let p99_50 = Bar {
        text: "≤ 50 ms (300k deliveries/s)",
        met: |x| x <= 50.0,
    };
    let p99_100 = Bar {
        text: "≤ 100 ms (500k deliveries/s)",
        met: |x| x <= 100.0,
    };
    let rss_6 = Bar {
        text: "≤ 6 KiB",
        met: |x| x <= 6.0,
    };
    vec![
        Spec {
            id: "churn-2k",
            title: "churn 2,000 changes/s (100k deliveries/s)",
            args: &["churn", "--rate", "2000", "--duration", "20"],
            figs: churn_figs(None),
        },
        Spec {
            id: "churn-4k",
            title: "churn 4,000 changes/s (200k deliveries/s)",
            args: &["churn", "--rate", "4000", "--duration", "20"],
            figs: churn_figs(None),
        },
        Spec {
            id: "churn-6k",
            title: "churn 6,000 changes/s (300k deliveries/s)",
            args: &["churn", "--rate", "6000", "--duration", "20"],
            figs: churn_figs(Some(p99_50)),
        },
        Spec {
            id: "churn-10k",
            title: "churn 10,000 changes/s (500k deliveries/s)",
            args: &["churn", "--rate", "10000", "--duration", "20"],
            figs: churn_figs(Some(p99_100)),
        },
        Spec {
            id: "connect-20k",
            title: "connect 20,000 streams",
            args: &["connect"],
            figs: connect_figs(None),
        },
        Spec {
            id: "connect-100k",
            title: "connect 100,000 streams over 1,000 connections",
            args: &["connect", "--online", "100000", "--conns", "1000"],
            figs: connect_figs(Some(rss_6)),
        },
        Spec {
            id: "query",
            title: "GetPresence, 4 workers, 100 random ids per call",
            args: &["query", "--workers", "4", "--duration", "20"],
            figs: vec![
                fig!(
                    "ids_per_s",
                    "ids/s",
                    0,
                    "/query/ids_per_s",
                    "≥ 300,000/s",
                    |x| x >= 300_000.0
                ),
                fig!(
                    "p99_ms",
                    "p99 latency (ms)",
                    2,
                    "/query/latency/p99_ms",
                    "≤ 5 ms",
                    |x| x <= 5.0
                ),
                fig!(
                    "server_cores",
                    "server CPU (cores)",
                    2,
                    "/phase/server_process/cpu_cores"
                ),
                fig!("errors", "errors", 0, "/query/errors"),
            ],
        },
        Spec {
            id: "flap",
            title: "flap 1,000/s (offline grace 5 s)",
            args: &["flap", "--rate", "1000", "--duration", "20"],
            figs: vec![
                fig!(
                    "reconnects_per_s",
                    "reconnects/s",
                    0,
                    "/flap/connects_per_s"
                ),
                fig!(
                    "reconnect_p99_ms",
                    "p99 reconnect to welcome (ms)",
                    1,
                    "/flap/reconnect/p99_ms"
                ),
                fig!(
                    "deliveries_per_flap",
                    "server deliveries per flap",
                    2,
                    "/flap/server_deliveries_per_flap"
                ),
                fig!(
                    "server_cores",
                    "server CPU (cores)",
                    2,
                    "/phase/server_process/cpu_cores"
                ),
            ],
        },
        Spec {
            id: "mixed",
            title: "mixed 3,000 changes/s (+ 300 flaps/s, 600 queries/s)",
            args: &["mixed", "--rate", "3000", "--duration", "20"],
            figs: vec![
                fig!("churn_p99_ms", "churn p99 (ms)", 1, "/churn/latency/p99_ms"),
                fig!(
                    "reconnect_p99_ms",
                    "reconnect p99 (ms)",
                    1,
                    "/flap/reconnect/p99_ms"
                ),
                fig!(
                    "query_p99_ms",
                    "GetPresence p99 (ms)",
                    1,
                    "/query/latency/p99_ms"
                ),
                fig!("lost", "lost", 0, "/checks/lost", "0", |x| x == 0.0),
                fig!(
                    "server_cores",
                    "server CPU (cores)",
                    2,
                    "/phase/server_process/cpu_cores"
                ),
            ],
        },
        Spec {
            id: "passive-80",
            title: "churn 6,000 changes/s with 80 % of devices passive, then a wake of 10,000",
            args: &[
                "passive",
                "--passive",
                "80",
                "--rate",
                "6000",
                "--duration",
                "20",
                "--wake",
                "10000",
            ],
            figs: vec![
                fig!(
                    "changes_per_s",
                    "changes/s achieved",
                    0,
                    "/churn/changes_per_s"
                ),
                fig!(
                    "p99_ms",
                    "p99 change to delivery (ms)",
                    1,
                    "/churn/latency/p99_ms"
                ),
                fig!(
                    "server_cores",
                    "server CPU (cores)",
                    2,
                    "/phase/server_process/cpu_cores"
                ),
                fig!(
                    "server_us_per_change",
                    "server CPU per change (µs)",
                    1,
                    "/phase/server_cpu_us_per_change"
                ),
                fig!(
                    "deliveries_sent",
                    "deliveries sent",
                    0,
                    "/passive/deliveries_sent"
                ),
                fig!(
                    "deliveries_skipped",
                    "deliveries skipped (passive)",
                    0,
                    "/passive/deliveries_skipped"
                ),
                fig!(
                    "wake_p50_ms",
                    "wake to resync p50 (ms)",
                    0,
                    "/passive/wake_to_resync/p50_ms"
                ),
                fig!(
                    "wake_p99_ms",
                    "wake to resync p99 (ms)",
                    0,
                    "/passive/wake_to_resync/p99_ms",
                    "≤ 2,000 ms (issue 15)",
                    |x| x <= 2000.0
                ),
                fig!(
                    "wake_max_ms",
                    "wake to resync max (ms)",
                    0,
                    "/passive/wake_to_resync/max_ms"
                ),
                fig!(
                    "wave_complete_ms",
                    "wave of 10,000 complete (ms)",
                    0,
                    "/passive/waves/0/complete_ms"
                ),
                fig!(
                    "resync_mean",
                    "resync entries, mean",
                    1,
                    "/passive/resync_entries/mean"
                ),
                fig!(
                    "resync_max",
                    "resync entries, max",
                    0,
                    "/passive/resync_entries/max"
                ),
                fig!(
                    "resyncs_missing",
                    "resyncs missing",
                    0,
                    "/passive/resyncs_missing",
                    "0",
                    |x| x == 0.0
                ),
            ],
        },
    ]
}

/// One run of one scenario, as the summary keeps it.
#[derive(Debug, Serialize)]
struct RunRecord {
    scenario: &'static str,
    /// 1-based slot; `attempt` 2 is the re-run of a busy first attempt.
    slot: u64,
    attempt: u64,
    valid: bool,
    /// Why not valid (other load, no report…).
    invalid_reason: Option<String>,
    /// Cores used by other processes during the measured phase(s): machine busy − server −
    /// bench, the largest over the run's phases.
    other_cores: Option<f64>,
    /// The machine before the run, with nothing of ours running.
    busy_before: Option<f64>,
    checks_ok: bool,
    figures: BTreeMap<&'static str, f64>,
    report: PathBuf,
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct Stat {
    min: f64,
    median: f64,
    max: f64,
}

#[derive(Debug, Serialize)]
struct FigSummary {
    key: &'static str,
    label: &'static str,
    /// Over the valid runs.
    stat: Option<Stat>,
    bar: Option<&'static str>,
    met: Option<bool>,
}

#[derive(Debug, Serialize)]
struct ScenarioSummary {
    id: &'static str,
    title: &'static str,
    command: String,
    valid_runs: usize,
    runs: usize,
    checks_ok_runs: usize,
    other_cores: Vec<Option<f64>>,
    figures: Vec<FigSummary>,
}

#[derive(Debug, Default, Serialize)]
struct Machine {
    cpu_model: String,
    cores: usize,
    memory_gib: f64,
    kernel: String,
    virtualised: bool,
}

#[derive(Debug, Serialize)]
struct Callgrind {
    /// What is counted (see the README).
    what: String,
    command: String,
    instructions: u64,
    changes: u64,
    deliveries: u64,
    instructions_per_delivery: f64,
    instructions_per_change: f64,
    /// The dump and callgrind_annotate's listing of it.
    dump: PathBuf,
    annotate: Option<PathBuf>,
    top: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Summary {
    date: String,
    commit: String,
    commit_subject: String,
    source_dirty: bool,
    server: String,
    server_version: String,
    server_built: String,
    machine: Machine,
    runs_per_scenario: u64,
    max_other_cores: f64,
    database: String,
    scenarios: Vec<ScenarioSummary>,
    derived_bars: Vec<FigSummary>,
    callgrind: Option<Callgrind>,
    callgrind_error: Option<String>,
    runs: Vec<RunRecord>,
    wall_minutes: f64,
}

/// A `presence serve` child, stopped (SIGTERM, then SIGKILL) when dropped.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(program: &Path, args: &[&str], db: &Path, log: &Path) -> anyhow::Result<Server> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let mut child = Command::new(program)
            .args(args)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("DATABASE_URL", format!("sqlite://{}", db.display()))
            .env("PRESENCE_RATE_STATUS_PER_MIN", "1000000")
            .env("PRESENCE_RATE_IDS_PER_MIN", "100000000")
            .env("PRESENCE_METRICS_LISTEN", "")
            .env("RUST_LOG", "warn")
            .env_remove("PRESENCE_CONFIG")
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Read to the end, so that the server never writes into a closed pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(SERVER_START_LIMIT) {
            Ok(addr) => Ok(Server { child, addr }),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not print `listening on ADDR` within {SERVER_START_LIMIT:?} (log: {})",
                    program.display(),
                    log.display()
                )
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (the server flushes and stops), then SIGKILL after `limit`.
    fn stop(mut self, limit: Duration) {
        self.stop_in_place(limit);
    }

    fn stop_in_place(&mut self, limit: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("suite: the server did not stop within {limit:?}; killing it");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_in_place(SERVER_STOP_LIMIT);
    }
}

/// Runs this binary with `args`, output appended to `log`; kills it after `limit`. Returns
/// whether it exited 0.
fn run_bench(args: &[String], log: &Path, limit: Duration) -> anyhow::Result<bool> {
    let me = std::env::current_exe().context("finding presence-bench itself")?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut child = Command::new(me)
        .args(args)
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting presence-bench")?;
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.success());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "presence-bench {} ran longer than {limit:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Cores the machine is busy over `QUIET_SAMPLE`.
fn busy_now() -> Option<f64> {
    let a = machine_ticks()?;
    let t = Instant::now();
    std::thread::sleep(QUIET_SAMPLE);
    let b = machine_ticks()?;
    Some(machine_cores(a, b, t.elapsed().as_secs_f64()))
}

/// Waits until the machine is quiet (at most `limit`); returns the last reading.
fn wait_quiet(max: f64, limit: Duration) -> Option<f64> {
    let started = Instant::now();
    let mut said = false;
    loop {
        let busy = busy_now();
        match busy {
            Some(b) if b > max && started.elapsed() < limit => {
                if !said || started.elapsed().as_secs() % 60 < QUIET_SAMPLE.as_secs() {
                    eprintln!(
                        "suite: the machine is busy ({b:.2} cores with nothing of ours running); waiting for it to be quiet (≤ {max} cores), {:.0} s so far",
                        started.elapsed().as_secs_f64()
                    );
                    said = true;
                }
            }
            _ => return busy,
        }
    }
}

fn median(mut v: Vec<f64>) -> Option<Stat> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stat {
        min: v[0],
        median,
        max: v[n - 1],
    })
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let virtualised = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.contains(" hypervisor"));
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    Machine {
        cpu_model,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        memory_gib,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        virtualised,
    }
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn server_facts(server: &Path) -> (String, String) {
    let version = Command::new(server)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let built = std::fs::metadata(server)
        .and_then(|m| m.modified())
        .map(|t| {
            chrono::DateTime::<chrono::Utc>::from(t)
                .format("%Y-%m-%d %H:%M UTC")
                .to_string()
        })
        .unwrap_or_default();
    (version, built)
}

/// The largest other load over a report's phases.
fn other_load(v: &Value) -> Option<f64> {
    [
        "/phase/other_processes_cores",
        "/passive/wave_phase/other_processes_cores",
    ]
    .iter()
    .filter_map(|p| num(v, p))
    .reduce(f64::max)
}

pub fn run(args: SuiteArgs) -> anyhow::Result<bool> {
    let all = specs();
    if args.list {
        for s in &all {
            println!(
                "{:<14} {}: presence-bench {}",
                s.id,
                s.title,
                s.args.join(" ")
            );
        }
        return Ok(true);
    }
    for id in &args.only {
        if !all.iter().any(|s| s.id == id) {
            bail!("--only {id}: no such scenario (presence-bench suite --list)");
        }
    }
    let chosen: Vec<&Spec> = all
        .iter()
        .filter(|s| args.only.is_empty() || args.only.iter().any(|o| o == s.id))
        .filter(|_| !args.callgrind_only)
        .collect();
    let server = std::fs::canonicalize(&args.server)
        .with_context(|| format!("--server {}", args.server.display()))?;
    let started = Instant::now();
    let now = chrono::Utc::now();
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let short = commit.chars().take(7).collect::<String>();
    let stamp = format!("{}-{short}", now.format("%Y%m%d-%H%M"));
    let work = args
        .work
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("presence-suite-{stamp}")));
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let (server_version, server_built) = server_facts(&server);
    eprintln!(
        "suite: server {} ({server_version}, built {server_built}), commit {short}, work directory {}",
        server.display(),
        work.display()
    );

    let mut runs: Vec<RunRecord> = Vec::new();
    if !chosen.is_empty() {
        ensure_graph(&server, &args.db, &work)?;
    }
    // Round by round, so that a slow drift of the machine spreads over every scenario.
    for slot in 1..=args.runs {
        for spec in &chosen {
            for attempt in 1..=2 {
                let r = one_run(&args, &server, &work, spec, slot, attempt)?;
                let retry = !r.valid && attempt == 1;
                eprintln!(
                    "suite: {} run {slot}{}: {} (other load {}){}",
                    spec.id,
                    if attempt > 1 { " (again)" } else { "" },
                    if r.valid { "valid" } else { "INVALID" },
                    r.other_cores
                        .map_or("n/a".into(), |o| format!("{o:.2} cores")),
                    r.invalid_reason
                        .as_ref()
                        .map_or(String::new(), |w| format!(": {w}"))
                );
                runs.push(r);
                if !retry {
                    break;
                }
            }
        }
    }

    let scenarios: Vec<ScenarioSummary> = chosen.iter().map(|s| summarise(s, &runs)).collect();
    let derived_bars = derived(&scenarios);
    let (callgrind, callgrind_error) = if args.no_callgrind {
        (None, None)
    } else {
        match callgrind(&server, &work) {
            Ok(c) => (Some(c), None),
            Err(e) => {
                eprintln!("suite: callgrind: {e:#}");
                (None, Some(format!("{e:#}")))
            }
        }
    };
    let source_dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "proto",
        "migrations",
    ])
    .is_some_and(|s| !s.is_empty());
    let summary = Summary {
        date: now.format("%Y-%m-%d %H:%M UTC").to_string(),
        commit,
        commit_subject: git(&["log", "-1", "--format=%s"])
            .unwrap_or_default()
            .chars()
            .take(100)
            .collect(),
        source_dirty,
        server: server.display().to_string(),
        server_version,
        server_built,
        machine: machine(),
        runs_per_scenario: args.runs,
        max_other_cores: args.max_other,
        database: args.db.display().to_string(),
        scenarios,
        derived_bars,
        callgrind,
        callgrind_error,
        runs,
        wall_minutes: started.elapsed().as_secs_f64() / 60.0,
    };
    let md = markdown(&summary);
    print!("{md}");
    let base = args.out.join(&stamp);
    let md_path = base.with_extension("md");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    let json_path = base.with_extension("json");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&summary).expect("plain data") + "\n",
    )
    .with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!(
        "suite: wrote {} and {}",
        md_path.display(),
        json_path.display()
    );
    let all_valid = summary.runs.iter().all(|r| r.valid || r.attempt == 1);
    Ok(all_valid && summary.runs.iter().all(|r| r.checks_ok || !r.valid))
}

/// Starts a server on the suite's database and lets the bench's setup create the graph if it
/// is not there (it checks three users' contact lists and skips when they match).
fn ensure_graph(server: &Path, db: &Path, work: &Path) -> anyhow::Result<()> {
    let log = work.join("setup.log");
    eprintln!(
        "suite: making sure {} holds the graph (N = {USERS}, K = {CONTACTS}); log {}",
        db.display(),
        log.display()
    );
    let s = Server::start(server, &[], db, &work.join("setup-server.log"))?;
    let args: Vec<String> = [
        "connect",
        "--target",
        &s.addr,
        "--users",
        USERS,
        "--contacts",
        CONTACTS,
        "--online",
        "1",
        "--duration",
        "1",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let ok = run_bench(&args, &log, Duration::from_secs(3600))?;
    s.stop(SERVER_STOP_LIMIT);
    if !ok {
        bail!("creating the graph failed: see {}", log.display());
    }
    Ok(())
}

/// Copies the suite's database (its server stopped) to `to`, replacing it and its WAL files.
fn fresh_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", to.display()));
    }
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    // A WAL its server left behind holds committed pages: it goes along (the -shm index is
    // rebuilt from it).
    let wal = PathBuf::from(format!("{}-wal", from.display()));
    if wal.exists() {
        std::fs::copy(&wal, format!("{}-wal", to.display()))
            .with_context(|| format!("copying {}", wal.display()))?;
    }
    Ok(())
}

fn one_run(
    args: &SuiteArgs,
    server: &Path,
    work: &Path,
    spec: &Spec,
    slot: u64,
    attempt: u64,
) -> anyhow::Result<RunRecord> {
    let name = format!("{}-{slot}-{attempt}", spec.id);
    let json = work.join(format!("{name}.json"));
    let log = work.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&json);
    let busy_before = wait_quiet(args.max_other, Duration::from_secs(args.quiet_wait));
    eprintln!(
        "suite: {} run {slot}: presence-bench {} (machine before: {} cores busy)",
        spec.id,
        spec.args.join(" "),
        busy_before.map_or("n/a".into(), |b| format!("{b:.2}"))
    );
    let started = Instant::now();
    // Every run starts from the same database: a run writes rows (who came online, statuses),
    // and a later scenario reading them (GetPresence of users with a row is a store read,
    // without one it is not) would depend on the order of the scenarios.
    let db = work.join("run.db");
    fresh_copy(&args.db, &db)?;
    let s = Server::start(server, &[], &db, &work.join(format!("{name}-server.log")))?;
    let pid = s.pid().to_string();
    let mut bench_args: Vec<String> = spec.args.iter().map(|a| a.to_string()).collect();
    bench_args.extend(
        [
            "--target",
            &s.addr,
            "--users",
            USERS,
            "--contacts",
            CONTACTS,
            "--no-setup",
            "--server-pid",
            &pid,
            "--json",
            json.to_str().context("the work directory is not UTF-8")?,
        ]
        .iter()
        .map(|a| a.to_string()),
    );
    let outcome = run_bench(&bench_args, &log, RUN_LIMIT);
    s.stop(SERVER_STOP_LIMIT);
    let seconds = started.elapsed().as_secs_f64();
    let report: Option<Value> = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let mut r = RunRecord {
        scenario: spec.id,
        slot,
        attempt,
        valid: false,
        invalid_reason: None,
        other_cores: None,
        busy_before,
        checks_ok: false,
        figures: BTreeMap::new(),
        report: json.clone(),
        seconds,
    };
    let Some(v) = report else {
        r.invalid_reason = Some(match outcome {
            Err(e) => format!("{e:#}"),
            Ok(_) => format!("no report (log: {})", log.display()),
        });
        return Ok(r);
    };
    r.checks_ok = v.pointer("/checks/ok") == Some(&Value::Bool(true));
    r.other_cores = other_load(&v);
    for f in &spec.figs {
        if let Some(x) = (f.get)(&v) {
            r.figures.insert(f.key, x);
        }
    }
    match r.other_cores {
        Some(o) if o > args.max_other => {
            r.invalid_reason = Some(format!(
                "other processes used {o:.2} cores (limit {})",
                args.max_other
            ));
        }
        None => r.invalid_reason = Some("the machine's load could not be read".into()),
        Some(_) => r.valid = true,
    }
    Ok(r)
}

fn summarise(spec: &Spec, runs: &[RunRecord]) -> ScenarioSummary {
    let mine: Vec<&RunRecord> = runs.iter().filter(|r| r.scenario == spec.id).collect();
    let valid: Vec<&RunRecord> = mine.iter().copied().filter(|r| r.valid).collect();
    let figures = spec
        .figs
        .iter()
        .map(|f| {
            let stat = median(
                valid
                    .iter()
                    .filter_map(|r| r.figures.get(f.key).copied())
                    .collect(),
            );
            FigSummary {
                key: f.key,
                label: f.label,
                met: match (&stat, f.bar) {
                    (Some(s), Some(b)) => Some((b.met)(s.median)),
                    _ => None,
                },
                bar: f.bar.map(|b| b.text),
                stat,
            }
        })
        .collect();
    ScenarioSummary {
        id: spec.id,
        title: spec.title,
        command: format!("presence-bench {}", spec.args.join(" ")),
        valid_runs: valid.len(),
        runs: mine.len(),
        checks_ok_runs: valid.iter().filter(|r| r.checks_ok).count(),
        other_cores: mine.iter().map(|r| r.other_cores).collect(),
        figures,
    }
}

fn figure<'a>(s: &'a [ScenarioSummary], id: &str, key: &str) -> Option<&'a Stat> {
    s.iter()
        .find(|x| x.id == id)?
        .figures
        .iter()
        .find(|f| f.key == key)?
        .stat
        .as_ref()
}

/// Bars that compare two scenarios: issue 15's CPU per change at 80 % passive against 0 %.
fn derived(s: &[ScenarioSummary]) -> Vec<FigSummary> {
    let mut out = Vec::new();
    if let (Some(zero), Some(eighty)) = (
        figure(s, "churn-6k", "server_us_per_change"),
        figure(s, "passive-80", "server_us_per_change"),
    ) {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
        let median = ratio(zero.median, eighty.median);
        out.push(FigSummary {
            key: "passive_cpu_per_change_ratio",
            label: "server CPU per change, 0 % passive (churn-6k) ÷ 80 % passive (passive-80)",
            // The extremes pair the best of one with the worst of the other.
            stat: Some(Stat {
                min: ratio(zero.min, eighty.max),
                median,
                max: ratio(zero.max, eighty.min),
            }),
            bar: Some("≥ 4× (issue 15)"),
            met: Some(median >= 4.0),
        });
    }
    out
}

/// The server's instructions per delivery on a fixed tiny churn under callgrind: 2,000 users,
/// all online, 50 contacts each, 200 changes at 50/s. Counted between the bench's phase hooks:
/// from just before the first change to after the last delivery was received.
fn callgrind(server: &Path, work: &Path) -> anyhow::Result<Callgrind> {
    for tool in ["valgrind", "callgrind_control"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            bail!("{tool} is not installed (apt-get install valgrind)");
        }
    }
    let dir = work.join("callgrind");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("tiny.db");
    let graph = ["--users", "2000", "--contacts", "50"];
    // The graph, made by a normal server (under valgrind it would take minutes).
    {
        let s = Server::start(server, &[], &db, &dir.join("setup-server.log"))?;
        let mut a = vec![
            "connect",
            "--target",
            &s.addr,
            "--online",
            "1",
            "--duration",
            "1",
        ];
        a.extend(graph);
        let a: Vec<String> = a.iter().map(|x| x.to_string()).collect();
        let ok = run_bench(&a, &dir.join("setup.log"), Duration::from_secs(300))?;
        s.stop(SERVER_STOP_LIMIT);
        if !ok {
            bail!(
                "creating the tiny graph failed (see {})",
                dir.join("setup.log").display()
            );
        }
    }
    eprintln!("suite: callgrind: the server under valgrind, a churn of 200 changes");
    let out_base = dir.join("callgrind.out");
    let cg_args = [
        "--tool=callgrind".to_string(),
        format!("--callgrind-out-file={}.%p", out_base.display()),
        server.display().to_string(),
    ];
    let valgrind = PathBuf::from("valgrind");
    let cg_refs: Vec<&str> = cg_args.iter().map(String::as_str).collect();
    let s = Server::start(&valgrind, &cg_refs, &db, &dir.join("server.log"))?;
    let pid = s.pid();
    let json = dir.join("churn.json");
    let zero = format!("callgrind_control --zero {pid} >/dev/null");
    let dump = format!("callgrind_control --dump=churn {pid} >/dev/null");
    let mut a = vec![
        "churn",
        "--target",
        &s.addr,
        "--online",
        "2000",
        "--conns",
        "20",
        "--rate",
        "50",
        "--duration",
        "4",
        "--no-setup",
        "--on-phase-start",
        &zero,
        "--on-phase-end",
        &dump,
    ];
    a.extend(graph);
    let pid_s = pid.to_string();
    a.extend(["--server-pid", &pid_s]);
    let json_s = json.display().to_string();
    a.extend(["--json", &json_s]);
    let a: Vec<String> = a.iter().map(|x| x.to_string()).collect();
    let command = format!(
        "valgrind {} serve; presence-bench {}",
        cg_args.join(" "),
        a.join(" ")
    );
    let ok = run_bench(&a, &dir.join("churn.log"), Duration::from_secs(900));
    s.stop(Duration::from_secs(120));
    let ok = ok?;
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(&json).context("the callgrind churn wrote no report")?,
    )?;
    if !ok {
        eprintln!(
            "suite: callgrind: the churn's checks failed (see {})",
            dir.join("churn.log").display()
        );
    }
    let dump_path = PathBuf::from(format!("{}.{pid}.1", out_base.display()));
    let text = std::fs::read_to_string(&dump_path)
        .with_context(|| format!("reading the dump {}", dump_path.display()))?;
    let instructions = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|n| n.split_whitespace().next()?.parse::<u64>().ok())
        .context("no summary line in the callgrind dump")?;
    let deliveries = num(&v, "/phase/server_delta/deliveries").unwrap_or(0.0) as u64;
    let changes = num(&v, "/phase/server_delta/changes").unwrap_or(0.0) as u64;
    if deliveries == 0 {
        bail!("the callgrind churn delivered nothing");
    }
    // Every function, by self cost: the default threshold (99 %) stops after the threads'
    // start-up frames, which a dump taken while they run lists at their inclusive cost.
    let (annotate, top) = match Command::new("callgrind_annotate")
        .arg("--threshold=100")
        .arg(&dump_path)
        .output()
    {
        Ok(o) if o.status.success() => {
            let listing = String::from_utf8_lossy(&o.stdout).to_string();
            let path = dir.join("annotate.txt");
            std::fs::write(&path, &listing)?;
            (Some(path), top_functions(&listing, 15))
        }
        _ => (None, Vec::new()),
    };
    Ok(Callgrind {
        what: "instructions (valgrind Ir) executed in user space by every server thread from just before the first change to just after the last delivery was received (the bench's measured phase: 200 status changes at 50/s, each to ~50 online contacts, plus one GetStats call); kernel work (system calls, loopback TCP) is not counted".into(),
        command,
        instructions,
        changes,
        deliveries,
        instructions_per_delivery: instructions as f64 / deliveries as f64,
        instructions_per_change: instructions as f64 / changes.max(1) as f64,
        dump: dump_path,
        annotate,
        top,
    })
}

/// The first `n` function lines of a callgrind_annotate listing (self cost, descending),
/// leaving out the frames that were running when the dump was taken (thread start, the
/// runtime's worker loop): callgrind charges them everything below them, and no function's
/// own cost comes near half of the total.
fn top_functions(listing: &str, n: usize) -> Vec<String> {
    let share = |l: &str| -> Option<f64> {
        let open = l.find('(')?;
        let close = l[open..].find("%)")?;
        l[open + 1..open + close].trim().parse().ok()
    };
    listing
        .lines()
        .skip_while(|l| !l.contains("file:function"))
        .skip(1)
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("--"))
        .take_while(|l| !l.starts_with("The following files"))
        .filter(|l| share(l).is_some_and(|p| p < 50.0))
        .take(n)
        .map(|l| l.chars().take(200).collect())
        .collect()
}

fn fmt(x: f64, digits: usize) -> String {
    if !x.is_finite() {
        return "∞".into();
    }
    let s = format!("{x:.digits$}");
    // Thousands separators for large integers.
    if digits == 0 && x.abs() >= 10_000.0 {
        crate::report::thousands(x.round() as u64)
    } else {
        s
    }
}

fn markdown(s: &Summary) -> String {
    let mut o = String::new();
    let m = &s.machine;
    let _ = writeln!(o, "# presence-bench suite, {}\n", s.date);
    let _ = writeln!(
        o,
        "- **commit** `{}`{} — {}",
        s.commit,
        if s.source_dirty {
            " (with uncommitted changes to the source)"
        } else {
            ""
        },
        s.commit_subject
    );
    let _ = writeln!(
        o,
        "- **server** `{}` ({}, built {})",
        s.server, s.server_version, s.server_built
    );
    let _ = writeln!(
        o,
        "- **machine** {}, {} cores{}, {:.0} GiB, Linux {}",
        m.cpu_model,
        m.cores,
        if m.virtualised {
            " (virtual machine)"
        } else {
            ""
        },
        m.memory_gib,
        m.kernel
    );
    let _ = writeln!(
        o,
        "- **method** {} runs per scenario, each on a fresh server and the database `{}` (N = 100,000 users, K = 50 contacts, SQLite); server and bench share the machine; a run during which other processes used more than {} cores is invalid and run once more; figures are min / median / max of the valid runs; bars are judged on the median. {:.0} minutes in all.\n",
        s.runs_per_scenario, s.database, s.max_other_cores, s.wall_minutes
    );
    let _ = writeln!(
        o,
        "| scenario | figure | min | median | max | bar | met |\n|---|---|---|---|---|---|---|"
    );
    for sc in &s.scenarios {
        let loads: Vec<String> = sc
            .other_cores
            .iter()
            .map(|x| x.map_or("n/a".into(), |v| format!("{v:.2}")))
            .collect();
        let head = format!(
            "**{}** `{}` — valid runs {}/{}, checks OK {}/{}, other load {} cores",
            sc.id,
            sc.command.trim_start_matches("presence-bench "),
            sc.valid_runs,
            sc.runs,
            sc.checks_ok_runs,
            sc.valid_runs,
            loads.join(" / ")
        );
        let _ = writeln!(o, "| {head} | | | | | | |");
        let digits = |key: &str| {
            specs()
                .into_iter()
                .find(|x| x.id == sc.id)
                .and_then(|x| x.figs.into_iter().find(|f| f.key == key))
                .map_or(2, |f| f.digits)
        };
        for f in &sc.figures {
            let d = digits(f.key);
            let (mn, md, mx) = f
                .stat
                .as_ref()
                .map_or(("—".into(), "—".into(), "—".into()), |st| {
                    (fmt(st.min, d), fmt(st.median, d), fmt(st.max, d))
                });
            let _ = writeln!(
                o,
                "| | {} | {mn} | {md} | {mx} | {} | {} |",
                f.label,
                f.bar.unwrap_or(""),
                match f.met {
                    Some(true) => "**pass**",
                    Some(false) => "**FAIL**",
                    None => "",
                }
            );
        }
    }
    for f in &s.derived_bars {
        let st = f.stat.as_ref().expect("derived bars always have figures");
        let _ = writeln!(
            o,
            "| **derived** | {} | {:.2}× | {:.2}× | {:.2}× | {} | {} |",
            f.label,
            st.min,
            st.median,
            st.max,
            f.bar.unwrap_or(""),
            if f.met == Some(true) {
                "**pass**"
            } else {
                "**FAIL**"
            }
        );
    }
    let _ = writeln!(o);
    if let Some(c) = &s.callgrind {
        let _ = writeln!(
            o,
            "**Instructions per delivery (callgrind):** {} per delivery, {} per change ({} instructions, {} changes, {} deliveries).\nCounted: {}.\n",
            fmt(c.instructions_per_delivery, 0),
            fmt(c.instructions_per_change, 0),
            crate::report::thousands(c.instructions),
            c.changes,
            c.deliveries,
            c.what
        );
        if !c.top.is_empty() {
            let _ = writeln!(
                o,
                "Top functions by own instructions (callgrind_annotate):\n\n```"
            );
            for l in &c.top {
                let _ = writeln!(o, "{l}");
            }
            let _ = writeln!(o, "```\n");
        }
    } else if let Some(e) = &s.callgrind_error {
        let _ = writeln!(o, "Instructions per delivery: not measured ({e}).\n");
    }
    let _ = writeln!(
        o,
        "Runs (other load = machine busy − server − bench, over the measured phase; invalid runs are not in the figures):\n\n| run | valid | other load (cores) | machine before (cores) | checks | seconds |\n|---|---|---|---|---|---|"
    );
    for r in &s.runs {
        let _ = writeln!(
            o,
            "| {} #{}{} | {} | {} | {} | {} | {:.0} |",
            r.scenario,
            r.slot,
            if r.attempt > 1 { " (re-run)" } else { "" },
            if r.valid {
                "yes".to_string()
            } else {
                format!("no: {}", r.invalid_reason.as_deref().unwrap_or("?"))
            },
            r.other_cores.map_or("n/a".into(), |v| format!("{v:.2}")),
            r.busy_before.map_or("n/a".into(), |v| format!("{v:.2}")),
            if r.checks_ok { "OK" } else { "FAILED" },
            r.seconds
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = median(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        let s = median(vec![4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert!(median(Vec::new()).is_none());
    }

    #[test]
    fn every_scenario_id_is_unique_and_its_figures_too() {
        let all = specs();
        let mut ids: Vec<_> = all.iter().map(|s| s.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all.len());
        for s in &all {
            let mut keys: Vec<_> = s.figs.iter().map(|f| f.key).collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), s.figs.len(), "{}", s.id);
        }
    }

    #[test]
    fn figures_are_read_from_a_report() {
        let v: Value = serde_json::json!({
            "churn": {"latency": {"p99_ms": 12.5}},
            "phase": {"other_processes_cores": 0.05},
            "passive": {"wave_phase": {"other_processes_cores": 0.3}}
        });
        let churn = specs().into_iter().find(|s| s.id == "churn-6k").unwrap();
        let p99 = churn.figs.iter().find(|f| f.key == "p99_ms").unwrap();
        assert_eq!((p99.get)(&v), Some(12.5));
        assert!((p99.bar.unwrap().met)(12.5));
        assert_eq!(other_load(&v), Some(0.3), "the worst phase counts");
    }
}
