//! The processes of a run (a server, the bench) and the machine they run on.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::summary::Machine;
use super::{QUIET_SAMPLE, SERVER_START_LIMIT, SERVER_STOP_LIMIT};
use crate::sysinfo::{machine_cores, machine_ticks};

/// A `presence serve` child, stopped (SIGTERM, then SIGKILL) when dropped.
pub(super) struct Server {
    pub(super) child: Child,
    pub(super) addr: String,
}

impl Server {
    pub(super) fn start(
        program: &Path,
        args: &[&str],
        db: &Path,
        log: &Path,
    ) -> anyhow::Result<Server> {
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

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM (the server flushes and stops), then SIGKILL after `limit`.
    pub(super) fn stop(mut self, limit: Duration) {
        self.stop_in_place(limit);
    }

    pub(super) fn stop_in_place(&mut self, limit: Duration) {
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
pub(super) fn run_bench(args: &[String], log: &Path, limit: Duration) -> anyhow::Result<bool> {
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
pub(super) fn busy_now() -> Option<f64> {
    let a = machine_ticks()?;
    let t = Instant::now();
    std::thread::sleep(QUIET_SAMPLE);
    let b = machine_ticks()?;
    Some(machine_cores(a, b, t.elapsed().as_secs_f64()))
}

/// Waits until the machine is quiet (at most `limit`); returns the last reading.
pub(super) fn wait_quiet(max: f64, limit: Duration) -> Option<f64> {
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

pub(super) fn machine() -> Machine {
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

pub(super) fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub(super) fn server_facts(server: &Path) -> (String, String) {
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
