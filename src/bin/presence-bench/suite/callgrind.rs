//! The server's instructions per delivery, counted by valgrind's callgrind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use super::SERVER_STOP_LIMIT;
use super::process::{Server, run_bench};
use super::specs::num;
use super::summary::Callgrind;

/// The server's instructions per delivery on a fixed tiny churn under callgrind: 2,000 users,
/// all online, 50 contacts each, 200 changes at 50/s. Counted between the bench's phase hooks:
/// from just before the first change to after the last delivery was received.
pub(super) fn callgrind(server: &Path, work: &Path) -> anyhow::Result<Callgrind> {
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
pub(super) fn top_functions(listing: &str, n: usize) -> Vec<String> {
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

#[cfg(test)]
mod tests {
    use super::top_functions;

    #[test]
    fn the_running_frames_are_left_out_of_the_top_functions() {
        let listing = "\
--------------------------------------------------------------------------------
Ir                    file:function
--------------------------------------------------------------------------------
126,041,385 (100.0%)  clone.S:clone [libc.so.6]
114,659,845 (90.97%)  worker.rs:tokio::runtime::scheduler::multi_thread::worker::run
  7,209,815 ( 5.72%)  memmove.S:__memcpy_avx_unaligned_erms [libc.so.6]
  2,063,919 ( 1.64%)  varint.rs:prost::encoding::varint::encode_varint

--------------------------------------------------------------------------------
The following files chosen for auto-annotation could not be found:
";
        let top = top_functions(listing, 15);
        assert_eq!(top.len(), 2, "{top:?}");
        assert!(top[0].contains("__memcpy_avx_unaligned_erms"));
        assert!(top[1].contains("encode_varint"));
    }
}
