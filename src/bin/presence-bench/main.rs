//! `presence-bench`: the load generator of the presence service.
//!
//! It creates N users with a ring contact graph of K contacts each (through Contacts/AddContacts,
//! batched), brings C of them online (one Authenticate stream each, many users multiplexed over
//! each HTTP/2 connection, as an edge would), and runs one bounded scenario against a server on
//! this machine. Progress goes to stderr every second, a table to stdout at the end, and with
//! `--json FILE` the same figures as JSON. The exit code is 0 when every check passed (no lost
//! or out-of-order delivery, no error), 1 when one failed or the run could not be made, 2 for
//! bad usage.
//!
//! The modules, from the wire up: [`client`] (loopback target, connection pool, identity),
//! [`graph`] (the ring and its creation), [`device`] (streams and what each receives),
//! [`plan`] (open-loop timetables, and how a delivery maps back to its change), [`recorder`]
//! (per-thread counters and histograms), [`sysinfo`] (/proc and the open-file limit),
//! [`scenario`] (the five scenarios) and [`report`] (JSON and the table).
mod client;
mod device;
mod graph;
mod h2raw;
mod plan;
mod recorder;
mod report;
mod scenario;
mod suite;
mod sysinfo;
mod wire;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

/// The same allocator as the server, so the bench's own cost stays low and comparable.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for the presence service (loopback targets only).
///
/// Start the server with limits fit for a bench, for example:
///   PRESENCE_RATE_STATUS_PER_MIN=1000000 PRESENCE_RATE_IDS_PER_MIN=100000000 \
///   PRESENCE_METRICS_LISTEN= DATABASE_URL=sqlite:///tmp/bench.db presence serve
/// (the default of 30 status changes per user per minute ends the streams of a churn run).
///
/// The bench raises its open-file soft limit to the hard limit (one descriptor per HTTP/2
/// connection); for 100,000 streams also raise the server's (`ulimit -n` before starting it).
#[derive(Parser)]
#[command(name = "presence-bench", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Open C Authenticate streams: connects/s, time to welcome, server RSS per idle stream.
    ///
    /// Example:
    ///   presence-bench connect --online 100000 --server-pid $(pgrep -n presence)
    #[command(verbatim_doc_comment)]
    Connect {
        #[command(flatten)]
        common: Common,
    },
    /// With C online, change statuses at --rate per second (open loop) and match every change
    /// to every online contact's receipt: changes/s, deliveries/s, latency, lost, out of order.
    ///
    /// Example:
    ///   presence-bench churn --rate 6000 --duration 20 --json churn.json
    #[command(verbatim_doc_comment)]
    Churn {
        #[command(flatten)]
        common: Common,
        /// Status changes per second, spread over the online users.
        #[arg(long, default_value_t = 6000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        rate: u64,
        /// Send this share of the online devices (in percent, chosen at random) to the
        /// background first (set_activity ACTIVITY_BACKGROUND): they receive nothing (the
        /// server skips them; sent vs skipped is reported) and the others churn.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=99))]
        passive: u64,
    },
    /// With C online and --passive % of them in the background, the others churn at --rate for
    /// --duration (server CPU per change, deliveries sent vs skipped); then --waves waves each
    /// wake --wake passive devices at once (set_activity ACTIVITY_ACTIVE): wake-to-resync
    /// latency (to the resync's last page), resync sizes, and every resync entry checked
    /// (newer than what the device had, at most one per user).
    ///
    /// Example (issue 15's target: a wave of 10,000 complete within 2 s at p99):
    ///   presence-bench passive --passive 80 --rate 6000 --duration 20 --wake 10000
    #[command(verbatim_doc_comment)]
    Passive {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 6000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        rate: u64,
        /// Share of the online devices in the background, in percent.
        #[arg(long, default_value_t = 80, value_parser = clap::value_parser!(u64).range(0..=99))]
        passive: u64,
        /// Devices woken at once per wave.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        wake: u64,
        /// Waves, each of different passive devices (waves x wake must not exceed them).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=1000))]
        waves: u64,
    },
    /// The standard scenarios, each --runs times on a fresh server (the binary given with
    /// --server), summarised as min / median / max with the machine, the commit, the date and
    /// the other load of each run, judged against the bars; then the server's instructions per
    /// delivery under callgrind. Writes <date>-<commit>.md and .json to --out.
    ///
    /// Example:
    ///   cargo build --release --bins
    ///   ulimit -n $(ulimit -Hn)
    ///   target/release/presence-bench suite --server target/release/presence
    #[command(verbatim_doc_comment)]
    Suite(suite::SuiteArgs),
    /// With C online, devices disconnect and reconnect at --rate per second: reconnects/s and
    /// deliveries per flap (compare PRESENCE_OFFLINE_GRACE_MS=0 with a grace).
    Flap {
        #[command(flatten)]
        common: Common,
        /// Flaps (disconnect, then reconnect at once) per second.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        rate: u64,
    },
    /// With C online, GetPresence of --ids random ids by --workers closed-loop workers, each
    /// call made as a random online user: calls/s, ids/s, latency.
    Query {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        workers: u64,
        /// Ids per GetPresence call (at most the server's PRESENCE_MAX_IDS).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        ids: u64,
    },
    /// Churn at --rate, while one online user in ten flaps at rate/10 per second and
    /// GetPresence calls arrive at rate/5 per second (open loop): per 100 status changes,
    /// 10 reconnects and 20 presence queries.
    Mixed {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        rate: u64,
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        ids: u64,
    },
}

/// Options every scenario takes.
#[derive(Args, Debug, Clone)]
pub struct Common {
    /// The server, or several nodes of a cluster comma-separated (connections are spread over
    /// them; server-side counters are read from the first); refused unless loopback.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub target: String,
    /// Users in the contact graph: ids 1..=N.
    #[arg(long, default_value_t = 100_000)]
    pub users: u64,
    /// Users online during the run, one Authenticate stream each: ids 1..=C.
    #[arg(long, default_value_t = 20_000)]
    pub online: u64,
    /// Contacts per user (K, rounded down to even): user i is linked to i+1..=i+K/2 (mod N).
    #[arg(long, default_value_t = 50)]
    pub contacts: u64,
    /// HTTP/2 connections the users are spread over, round robin [default: one per 100
    /// online users].
    #[arg(long)]
    pub conns: Option<usize>,
    /// Length of the measured phase, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The server's process id: report its RSS (VmRSS) and CPU (utime + stime) from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Create the contact graph even if the server seems to have it already.
    #[arg(long, conflicts_with = "no_setup")]
    pub setup: bool,
    /// Do not create the contact graph (by default it is created unless already there).
    #[arg(long)]
    pub no_setup: bool,
    /// Sign HS256 JWTs with this secret (the server's PRESENCE_JWT_SECRET) instead of sending
    /// development-mode identity metadata.
    #[arg(long)]
    pub token_secret: Option<String>,
    /// Authenticate streams being opened at once.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub concurrency: u64,
    /// Seed of the shuffles and of the random ids.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// A shell command run (and waited for) as the measured phase begins, after the server's
    /// counters are read; e.g. `callgrind_control --zero PID` (the suite's instruction count).
    #[arg(long)]
    pub on_phase_start: Option<String>,
    /// A shell command run as the measured phase ends, before the server's counters are read.
    #[arg(long)]
    pub on_phase_end: Option<String>,
    /// How steady devices speak to the server: `raw` (HTTP/2 by hand, one task per
    /// connection: the light instrument) or `tonic` (the generated client, as before
    /// 2026-12-07). Devices that flap always use tonic.
    #[arg(long, value_enum, default_value_t = DeviceClient::Raw)]
    pub device_client: DeviceClient,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceClient {
    Raw,
    Tonic,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // No tracing subscriber means tracing falls back to the `log` crate on every span that h2
    // enters and leaves (several per frame): 7% of the bench's instructions per delivery under
    // callgrind. A global subscriber that wants nothing turns each into one cached check.
    let _ = tracing::subscriber::set_global_default(tracing::subscriber::NoSubscriber::new());
    match sysinfo::raise_open_file_limit() {
        Ok((before, after)) if after > before => {
            eprintln!("open-file limit raised from {before} to {after} (the hard limit)")
        }
        Ok(_) => {}
        Err(e) => eprintln!("warning: cannot raise the open-file limit: {e}"),
    }
    if let Scenario::Suite(args) = cli.scenario {
        // The suite only starts processes and waits for them.
        return match tokio::task::spawn_blocking(move || suite::run(args)).await {
            Ok(Ok(true)) => ExitCode::SUCCESS,
            Ok(Ok(false)) => ExitCode::from(1),
            Ok(Err(e)) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
            Err(e) => {
                eprintln!("error: the suite panicked: {e}");
                ExitCode::from(1)
            }
        };
    }
    match run(cli.scenario).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs the scenario, prints the table and writes the JSON; returns whether every check passed.
async fn run(scenario: Scenario) -> anyhow::Result<bool> {
    let (report, json) = match scenario {
        Scenario::Connect { common } => (scenario::connect(&common).await?, common.json),
        Scenario::Churn {
            common,
            rate,
            passive,
        } => (scenario::churn(&common, rate, passive).await?, common.json),
        Scenario::Passive {
            common,
            rate,
            passive,
            wake,
            waves,
        } => (
            scenario::passive(&common, rate, passive, wake, waves).await?,
            common.json,
        ),
        Scenario::Flap { common, rate } => (scenario::flap(&common, rate).await?, common.json),
        Scenario::Query {
            common,
            workers,
            ids,
        } => (
            scenario::query(&common, workers as usize, ids as usize).await?,
            common.json,
        ),
        Scenario::Mixed { common, rate, ids } => (
            scenario::mixed(&common, rate, ids as usize).await?,
            common.json,
        ),
        Scenario::Suite(_) => unreachable!("main runs the suite"),
    };
    print!("{}", report.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report).expect("the report is plain data");
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing --json {}", path.display()))?;
    }
    Ok(report.checks.ok)
}
