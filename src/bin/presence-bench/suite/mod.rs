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

mod callgrind;
mod process;
mod specs;
mod summary;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::Value;

use callgrind::callgrind;
use process::*;
use specs::*;
use summary::*;

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
    let mut args = vec!["connect".to_string()];
    args.extend(graph_args(&s.addr));
    args.extend(
        ["--online", "1", "--duration", "1"]
            .iter()
            .map(|a| a.to_string()),
    );
    let ok = run_bench(&args, &log, Duration::from_secs(3600))?;
    s.stop(SERVER_STOP_LIMIT);
    if !ok {
        bail!("creating the graph failed: see {}", log.display());
    }
    Ok(())
}

/// The bench's options naming the server and the suite's graph.
fn graph_args(addr: &str) -> Vec<String> {
    ["--target", addr, "--users", USERS, "--contacts", CONTACTS]
        .iter()
        .map(|a| a.to_string())
        .collect()
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
    bench_args.extend(graph_args(&s.addr));
    bench_args.extend(
        [
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
