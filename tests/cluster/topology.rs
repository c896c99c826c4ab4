//! Redis Cluster (3 masters + 3 replicas) and Sentinel (master + replica + 3 sentinels)
//! deployments of the test's own, started with `.ci/redis-topology` in a temporary directory
//! and stopped (every process killed) when dropped. Without `redis-server` the tests fail
//! (see `harness::unavailable`).
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use crate::harness::unavailable;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Cluster,
    Sentinel,
}

pub struct RedisTopology {
    pub kind: Kind,
    dir: PathBuf,
    /// Kept so the directory's parent lives as long as the topology.
    _parent: tempfile::TempDir,
    env: HashMap<String, String>,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".ci/redis-topology")
}

impl RedisTopology {
    /// Starts one; fails the test when it cannot start.
    pub fn start(kind: Kind) -> RedisTopology {
        let parent = tempfile::tempdir().expect("a temporary directory");
        let dir = parent.path().join("redis");
        let name = match kind {
            Kind::Cluster => "cluster",
            Kind::Sentinel => "sentinel",
        };
        let out = match Command::new(script())
            .args(["start", name])
            .arg(&dir)
            .output()
        {
            Ok(out) => out,
            Err(e) => unavailable(&format!(".ci/redis-topology does not run: {e}")),
        };
        if !out.status.success() {
            let _ = Command::new(script()).arg("stop").arg(&dir).output();
            unavailable(&format!(
                "the Redis {name} did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let text =
            std::fs::read_to_string(dir.join("env")).expect("the topology wrote its env file");
        let env = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RedisTopology {
            kind,
            dir,
            _parent: parent,
            env,
        }
    }

    fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("the topology's env has {key}"))
    }

    /// The REDIS_URL the presence nodes use.
    pub fn url(&self) -> String {
        match self.kind {
            Kind::Cluster => self.var("PRESENCE_TEST_REDIS_CLUSTER_URL").to_string(),
            Kind::Sentinel => self.var("PRESENCE_TEST_REDIS_SENTINEL_URL").to_string(),
        }
    }

    /// The pid of the master that owns slot 0 (cluster) or of the master (Sentinel), as at
    /// start.
    fn master_pid(&self) -> libc::pid_t {
        let pidfile = match self.kind {
            Kind::Cluster => {
                let port = self
                    .var("REDIS_CLUSTER_MASTERS")
                    .split(',')
                    .next()
                    .expect("three masters");
                self.dir.join(format!("redis-{port}.pid"))
            }
            Kind::Sentinel => PathBuf::from(self.var("REDIS_SENTINEL_MASTER_PIDFILE")),
        };
        std::fs::read_to_string(&pidfile)
            .unwrap_or_else(|e| panic!("{} is readable: {e}", pidfile.display()))
            .trim()
            .parse()
            .expect("a pid")
    }

    fn signal_master(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on the pid of a redis-server this topology started.
        let sent = unsafe { libc::kill(self.master_pid(), signal) };
        assert_eq!(sent, 0, "signal {signal} reaches the master");
    }

    /// kill -9 of the master (of slot 0): its replica takes over.
    pub fn kill_master(&self) {
        self.signal_master(libc::SIGKILL);
    }

    /// SIGSTOP of the master: it freezes with its connections open.
    pub fn pause_master(&self) {
        self.signal_master(libc::SIGSTOP);
    }

    pub fn resume_master(&self) {
        self.signal_master(libc::SIGCONT);
    }
}

impl Drop for RedisTopology {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).output();
    }
}
