//! A `presence serve` process of the test's own: started from the built binary (or
//! `PRESENCE_TEST_BIN`) on port 0 with a clean environment, its bound address read from its
//! `listening on` line, its log kept for failure messages, killed when dropped. Shared by the
//! fault and cluster suites (`#[path]`-included).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A `presence serve` process: the only way to test kill -9 for real.
pub struct ServerProcess {
    child: Child,
    /// The bound address, once the process printed `listening on ADDR`.
    pub addr: Option<SocketAddr>,
    /// Everything the process wrote on stderr (its logs) so far.
    stderr: Arc<Mutex<String>>,
}

impl ServerProcess {
    /// Starts `presence serve --listen 127.0.0.1:0` on the database with the given extra
    /// environment, and waits for its `listening on` line.
    pub async fn serve(database_url: &str, env: &[(&str, &str)]) -> ServerProcess {
        let (mut process, addr_rx) = Self::spawn(database_url, env);
        let addr = match tokio::time::timeout(Duration::from_secs(20), addr_rx).await {
            Ok(Ok(addr)) => addr,
            _ => panic!(
                "the server process printed no `listening on` line within 20 s; stderr:\n{}",
                process.stderr()
            ),
        };
        process.addr = Some(addr);
        process
    }

    /// Starts the process without waiting for it to bind (for a database that is down).
    pub fn start(database_url: &str, env: &[(&str, &str)]) -> ServerProcess {
        Self::spawn(database_url, env).0
    }

    fn spawn(
        database_url: &str,
        env: &[(&str, &str)],
    ) -> (ServerProcess, oneshot::Receiver<SocketAddr>) {
        let log_filter = std::env::var("TEST_NODE_LOG").unwrap_or_else(|_| "info".into());
        // PRESENCE_TEST_BIN runs the suite against another build (an older one, to show a test
        // fails there).
        let bin = std::env::var("PRESENCE_TEST_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_presence").to_string());
        let mut command = Command::new(bin);
        command.args(["serve", "--listen", "127.0.0.1:0"]);
        // The test's own environment must not leak settings into the server.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("PRESENCE_")
                || ["DATABASE_URL", "REDIS_URL", "RUST_LOG"].contains(&key.as_ref())
            {
                command.env_remove(key.as_ref());
            }
        }
        command
            .env("DATABASE_URL", database_url)
            .env("PRESENCE_METRICS_LISTEN", "")
            .env("RUST_LOG", log_filter)
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("the presence binary starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (addr_tx, addr_rx) = oneshot::channel();
        // Plain threads: reading a pipe blocks, and the pipes must be drained so the server
        // never blocks on a full one.
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ")
                    && let Ok(addr) = addr.trim().parse::<SocketAddr>()
                    && let Some(tx) = addr_tx.take()
                {
                    let _ = tx.send(addr);
                }
            }
        });
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut log = sink.lock().expect("the stderr log lock is never poisoned");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let process = ServerProcess {
            child,
            addr: None,
            stderr: log,
        };
        (process, addr_rx)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
            .expect("the process was started with `serve`, which waits for its address")
    }

    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .expect("the stderr log lock is never poisoned")
            .clone()
    }

    /// The process id, for reading its memory from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory, in bytes (VmRSS).
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the server process has a /proc entry");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS is in /proc/PID/status");
        kib * 1024
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the process wrote `needle` on stderr, at most `within`.
    pub async fn wait_for_log(&mut self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "the server process did not log {needle:?} within {within:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) on the pid of our own child, not yet reaped (we reap only in kill9
        // and Drop, which take &mut self).
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "signal {signal} can be sent to our own child");
    }

    /// SIGSTOP: the process freezes (a long stall), its sockets stay open.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT: the frozen process runs again.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// kill -9: no flush, no clean-shutdown mark, sockets closed by the kernel.
    pub fn kill9(&mut self) {
        self.child
            .kill()
            .expect("SIGKILL can be sent to our own child");
        self.child.wait().expect("the killed child can be reaped");
    }

    /// SIGTERM, then waits for a clean exit, at most `within`.
    pub async fn terminate(&mut self, within: Duration) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("the child can be polled") {
                assert!(
                    status.success(),
                    "the server exits cleanly on SIGTERM: {status}; stderr:\n{}",
                    self.stderr()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not exit within {within:?} of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // A failed test must not leave a server running (SIGKILL also ends a stopped one).
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
