//! What the operating system tells about a process: resident memory and CPU time from /proc
//! (the server's, with `--server-pid`, and the bench's own), and the open-file limit.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Raises this process's RLIMIT_NOFILE soft limit to its hard limit. Each HTTP/2 connection is
/// one descriptor, so the default of one connection per 100 users needs 1,000 of them for
/// 100,000 streams, more than the usual soft limit of 1,024. Returns (before, after).
pub fn raise_open_file_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let before = lim.rlim_cur;
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok((before, lim.rlim_cur))
    }
}

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub rss_kib: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub at: Instant,
}

/// Reads /proc/PID/status (VmRSS) and /proc/PID/stat (utime, stime). None once the process is
/// gone.
pub fn sample(pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count fields after its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Sample {
        rss_kib,
        cpu_ticks: utime + stime,
        at: Instant::now(),
    })
}

/// The whole machine's CPU time from /proc/stat: (busy, total), in clock ticks. Other processes
/// (a build, say) share the two cores with the server and the bench; the report shows how much
/// they took, since figures measured next to them are not clean.
pub fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Cores of CPU time between two `machine_ticks` readings, over `wall` seconds.
pub fn machine_cores(a: (u64, u64), b: (u64, u64), wall: f64) -> f64 {
    b.0.saturating_sub(a.0) as f64 / ticks_per_second() / wall.max(1e-9)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// A process sampled in the background, so that a phase can report its peak memory.
pub struct Watched {
    pid: u32,
    /// Highest VmRSS seen since the last [`Watched::start`], in KiB.
    peak_kib: Arc<AtomicU64>,
    /// The latest background sample, for the progress line.
    latest: Arc<Mutex<Option<Sample>>>,
    sampler: tokio::task::JoinHandle<()>,
}

/// A process's figures over one phase.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct ProcFigures {
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    pub rss_peak_kib: u64,
    /// CPU time over wall time: 1.0 is one core busy the whole phase.
    pub cpu_cores: f64,
}

impl Watched {
    /// Starts sampling `pid` every 100 ms.
    pub fn new(pid: u32) -> Watched {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let latest = Arc::new(Mutex::new(None));
        let sampler = {
            let (peak_kib, latest) = (peak_kib.clone(), latest.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tick.tick().await;
                    let Some(s) = sample(pid) else { return };
                    peak_kib.fetch_max(s.rss_kib, Ordering::Relaxed);
                    *latest.lock().expect("sample lock poisoned") = Some(s);
                }
            })
        };
        Watched {
            pid,
            peak_kib,
            latest,
            sampler,
        }
    }

    /// Whether the process can be read at all.
    pub fn readable(&self) -> bool {
        sample(self.pid).is_some()
    }

    /// Begins a phase: a fresh sample, and the peak restarts from it.
    pub fn start(&self) -> Option<Sample> {
        let s = sample(self.pid)?;
        self.peak_kib.store(s.rss_kib, Ordering::Relaxed);
        Some(s)
    }

    /// Ends a phase begun with `start`.
    pub fn finish(&self, start: Option<Sample>) -> Option<ProcFigures> {
        let (start, end) = (start?, sample(self.pid)?);
        let wall = end.at.duration_since(start.at).as_secs_f64().max(1e-9);
        let cpu = end.cpu_ticks.saturating_sub(start.cpu_ticks) as f64 / ticks_per_second();
        Some(ProcFigures {
            rss_start_kib: start.rss_kib,
            rss_end_kib: end.rss_kib,
            rss_peak_kib: self
                .peak_kib
                .load(Ordering::Relaxed)
                .max(start.rss_kib)
                .max(end.rss_kib),
            cpu_cores: cpu / wall,
        })
    }

    /// The latest background sample.
    pub fn latest(&self) -> Option<Sample> {
        *self.latest.lock().expect("sample lock poisoned")
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}

/// CPU cores used between two samples.
pub fn cores_between(a: &Sample, b: &Sample) -> f64 {
    let wall = b.at.duration_since(a.at).as_secs_f64().max(1e-9);
    b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 / ticks_per_second() / wall
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(std::process::id()).expect("/proc/self is readable on Linux");
        assert!(s.rss_kib > 0, "a running process has resident memory");
    }
}
