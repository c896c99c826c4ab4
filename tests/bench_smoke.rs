//! presence-bench works end to end: each scenario, tiny (a few hundred users, two seconds),
//! against a real `presence serve` on 127.0.0.1:0 with its own SQLite database. The assertions
//! are about correctness (every change reaches every online contact, in order, nothing lost),
//! never about speed: timings belong to the README's Performance section, not to `cargo test`.
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Longest a tiny scenario may take, setup and connects included, on a loaded 2-core machine.
const BENCH_TIMEOUT: Duration = Duration::from_secs(120);

/// A `presence serve` child process, killed when dropped.
struct Server {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Server {
    /// Starts the server as a bench run needs it: no grace (offline at once), a status rate
    /// limit that churn cannot reach, no metrics listener.
    fn start() -> Server {
        Server::start_with(&[])
    }

    /// [`Server::start`] with extra environment.
    fn start_with(env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("a temporary directory for the database");
        let mut child = Command::new(env!("CARGO_BIN_EXE_presence"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env(
                "DATABASE_URL",
                format!("sqlite://{}/p.db", dir.path().display()),
            )
            .env("PRESENCE_METRICS_LISTEN", "")
            .env("PRESENCE_OFFLINE_GRACE_MS", "0")
            .env("PRESENCE_RATE_STATUS_PER_MIN", "100000")
            .env("RUST_LOG", "error")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the presence binary is built for integration tests");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep reading to the end so the server never writes into a closed pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not print `listening on ADDR` within 60 s");
            }
        };
        Server { child, addr, dir }
    }

    /// Runs one scenario, tiny, and returns its --json report.
    fn bench(&self, scenario: &str, extra: &[&str]) -> Value {
        let json: PathBuf = self.dir.path().join(format!("{scenario}.json"));
        let pid = self.child.id().to_string();
        let mut args = vec![
            scenario,
            "--target",
            &self.addr,
            "--users",
            "300",
            "--online",
            "200",
            "--contacts",
            "10",
            "--duration",
            "2",
            "--server-pid",
            &pid,
            "--json",
            json.to_str().expect("temporary paths are UTF-8"),
        ];
        args.extend_from_slice(extra);
        let out = run_bench(&args);
        assert!(
            out.status.success(),
            "presence-bench {} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(&json).expect("--json wrote the report");
        serde_json::from_str(&text).expect("the report is JSON")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs presence-bench, killing it if it outlives BENCH_TIMEOUT (it bounds itself; this only
/// turns a bug into a failure instead of a hung test).
fn run_bench(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_presence-bench"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the presence-bench binary is built for integration tests");
    // Drain both pipes on threads so a chatty run cannot block on a full pipe.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + BENCH_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting on presence-bench") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "presence-bench {} ran longer than {BENCH_TIMEOUT:?}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn u(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{path} is a number in the report: {v:#}"))
}

fn assert_clean(report: &Value) {
    assert_eq!(
        u(report, "/checks/lost"),
        0,
        "no change may be lost: {report:#}"
    );
    assert_eq!(
        u(report, "/checks/out_of_order"),
        0,
        "versions must arrive in order: {report:#}"
    );
    assert_eq!(
        report.pointer("/checks/ok"),
        Some(&Value::Bool(true)),
        "every check passes: {report:#}"
    );
}

#[test]
fn churn_matches_every_change_to_every_online_contact() {
    let server = Server::start();
    let r = server.bench("churn", &["--rate", "200"]);
    assert_clean(&r);
    assert_eq!(
        u(&r, "/connect/streams"),
        200,
        "every online user connected"
    );
    assert!(u(&r, "/churn/changes") > 0, "changes were sent: {r:#}");
    assert!(
        u(&r, "/churn/deliveries") > 0,
        "changes were delivered: {r:#}"
    );
    assert_eq!(
        u(&r, "/churn/expected"),
        u(&r, "/churn/deliveries") + u(&r, "/churn/superseded"),
        "every expected receipt is accounted for"
    );
    assert!(
        u(&r, "/phase/server_delta/changes") >= u(&r, "/churn/changes"),
        "the server counted every change"
    );
}

#[test]
fn churn_with_the_tonic_device_client_matches_every_change_too() {
    let server = Server::start();
    let r = server.bench("churn", &["--rate", "200", "--device-client", "tonic"]);
    assert_clean(&r);
    assert_eq!(u(&r, "/connect/streams"), 200);
    assert!(
        u(&r, "/churn/deliveries") > 0,
        "changes were delivered: {r:#}"
    );
}

#[test]
fn passive_devices_miss_updates_and_each_woken_one_gets_its_resync() {
    let server = Server::start();
    let r = server.bench(
        "passive",
        &["--passive", "80", "--rate", "100", "--wake", "100"],
    );
    assert_clean(&r);
    assert_eq!(u(&r, "/passive/confirmed"), 160, "80 % of 200 went passive");
    assert_eq!(u(&r, "/passive/received_while_passive"), 0);
    assert!(
        u(&r, "/passive/deliveries_skipped") > 0,
        "skips happened: {r:#}"
    );
    assert_eq!(u(&r, "/passive/resyncs_missing"), 0, "{r:#}");
    assert_eq!(
        u(&r, "/passive/waves/0/resyncs"),
        100,
        "every woken device resynced"
    );
}

#[test]
fn devices_refused_while_the_server_sheds_set_ups_retry_and_all_connect() {
    // One set-up at a time: most opens are answered UNAVAILABLE (trailers only), which the
    // raw device client must read from the HPACK block and retry, as a device would.
    let server = Server::start_with(&[("PRESENCE_MAX_PENDING_SETUPS", "1")]);
    let r = server.bench("connect", &["--concurrency", "100"]);
    assert_clean(&r);
    assert_eq!(u(&r, "/connect/streams"), 200, "every device got in: {r:#}");
    assert!(
        u(&r, "/connect/retries") > 0,
        "some were refused and retried: {r:#}"
    );
}

#[test]
fn connect_opens_every_stream_and_measures_the_server() {
    let server = Server::start();
    let r = server.bench("connect", &[]);
    assert_clean(&r);
    assert_eq!(
        u(&r, "/connect/streams"),
        200,
        "every online user connected"
    );
    assert!(
        r.pointer("/connect/server_rss_per_stream_kib")
            .is_some_and(Value::is_number),
        "with --server-pid the RSS per stream is reported: {r:#}"
    );
    assert_eq!(
        u(&r, "/phase/server_after/connections"),
        200,
        "the server sees every stream"
    );
}

#[test]
fn flap_reconnects_devices_and_counts_their_deliveries() {
    let server = Server::start();
    let r = server.bench("flap", &["--rate", "50"]);
    assert_clean(&r);
    let flaps = u(&r, "/flap/flaps");
    assert!(flaps > 0, "devices flapped: {r:#}");
    assert_eq!(u(&r, "/flap/reconnects"), flaps, "every flap reconnected");
    assert!(
        u(&r, "/flap/bench_deliveries") > 0,
        "without a grace, a flap is seen by online contacts: {r:#}"
    );
}

#[test]
fn query_answers_presence_of_random_ids() {
    let server = Server::start();
    let r = server.bench("query", &["--workers", "4"]);
    assert_clean(&r);
    assert!(u(&r, "/query/calls") > 0, "queries were answered: {r:#}");
    assert!(u(&r, "/query/ids") > 0, "ids were answered: {r:#}");
}

#[test]
fn mixed_runs_churn_flaps_and_queries_together() {
    let server = Server::start();
    let r = server.bench("mixed", &["--rate", "200"]);
    assert_clean(&r);
    assert!(
        u(&r, "/churn/deliveries") > 0,
        "changes were delivered: {r:#}"
    );
    assert!(u(&r, "/flap/reconnects") > 0, "devices flapped: {r:#}");
    assert!(u(&r, "/query/calls") > 0, "queries were answered: {r:#}");
}

#[test]
fn a_target_off_this_machine_is_refused() {
    let out = run_bench(&["churn", "--target", "10.1.2.3:50051", "--duration", "1"]);
    assert!(
        !out.status.success(),
        "a non-loopback target must be refused"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("loopback"),
        "the refusal says why: {stderr}"
    );
}
