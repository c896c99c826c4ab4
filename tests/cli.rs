//! The `presence` command line as operators use it: the settings file layered under the
//! environment and the flags, and every settings error exiting 2 with the setting named.
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn presence() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_presence"));
    for (key, _) in std::env::vars() {
        if key.starts_with("PRESENCE_") || key == "DATABASE_URL" || key == "REDIS_URL" {
            cmd.env_remove(key);
        }
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Starts `serve` and returns the address of its `listening on` line; the process is killed.
fn listening_on(mut cmd: Command) -> String {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let output = child.wait_with_output().expect("the child is reaped");
    let line = line.unwrap_or_else(|_| {
        panic!(
            "no `listening on` line within 20 s; stderr:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("the first line says where it listens: {line:?}"))
        .to_string()
}

/// Runs a command expected to stop by itself; returns (exit code, stderr).
fn refused(mut cmd: Command) -> (Option<i32>, String) {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    loop {
        if let Some(_status) = child.try_wait().expect("waiting works") {
            let out = child.wait_with_output().expect("the child is reaped");
            return (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if started.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the command did not stop within 20 s: it should have refused its settings");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().expect("a temp dir"))
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.0.path().join(name);
        std::fs::write(&path, text).expect("the file is written");
        path.display().to_string()
    }

    fn db(&self) -> String {
        format!("sqlite://{}", self.0.path().join("p.db").display())
    }
}

fn serve(dir: &Dir) -> Command {
    let mut cmd = presence();
    cmd.env("DATABASE_URL", dir.db())
        .env("PRESENCE_METRICS_LISTEN", "");
    cmd
}

#[test]
fn the_settings_file_sits_under_the_environment_which_sits_under_the_flags() {
    let dir = Dir::new();
    let [from_file, from_env, from_flag] = [free_port(), free_port(), free_port()];
    let config = dir.file(
        "p.toml",
        &format!("listen = \"127.0.0.1:{from_file}\"\nmax_ids = 50\n"),
    );

    // A global flag before the subcommand does not hide the file.
    let mut cmd = serve(&dir);
    cmd.args(["--log-format", "json", "serve", "--config", &config]);
    assert_eq!(
        listening_on(cmd),
        format!("127.0.0.1:{from_file}"),
        "the file's listen"
    );

    let mut cmd = serve(&dir);
    cmd.env("PRESENCE_CONFIG", &config).arg("serve");
    assert_eq!(
        listening_on(cmd),
        format!("127.0.0.1:{from_file}"),
        "PRESENCE_CONFIG names it"
    );

    let mut cmd = serve(&dir);
    cmd.env("PRESENCE_CONFIG", &config)
        .env("PRESENCE_LISTEN", format!("127.0.0.1:{from_env}"))
        .arg("serve");
    assert_eq!(
        listening_on(cmd),
        format!("127.0.0.1:{from_env}"),
        "the environment wins"
    );

    let mut cmd = serve(&dir);
    cmd.env("PRESENCE_LISTEN", format!("127.0.0.1:{from_env}"))
        .args(["serve", "--config", &config, "--listen"])
        .arg(format!("127.0.0.1:{from_flag}"));
    assert_eq!(
        listening_on(cmd),
        format!("127.0.0.1:{from_flag}"),
        "the flag wins"
    );
}

#[test]
fn every_settings_error_exits_2_naming_the_setting_and_starts_nothing() {
    let dir = Dir::new();
    let unknown = dir.file("unknown.toml", "listen = \"127.0.0.1:0\"\nmax_idz = 5\n");
    let bad_value = dir.file("bad.toml", "max_ids = 0\n");
    let not_toml = dir.file("broken.toml", "listen = \n");
    let missing = dir.0.path().join("absent.toml").display().to_string();
    let secret = "a-long-enough-secret-with-many-different-chars";
    // (what, environment, flags after `serve`, what the error must name)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<String>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "unknown key",
            vec![],
            vec!["--config".into(), unknown],
            "max_idz",
        ),
        (
            "bad value in the file",
            vec![],
            vec!["--config".into(), bad_value],
            "max_ids",
        ),
        (
            "not TOML",
            vec![],
            vec!["--config".into(), not_toml],
            "not valid TOML",
        ),
        (
            "no such file",
            vec![("PRESENCE_CONFIG", missing)],
            vec![],
            "PRESENCE_CONFIG",
        ),
        (
            "weak secret",
            vec![("PRESENCE_JWT_SECRET", "short".into())],
            vec![],
            "PRESENCE_JWT_SECRET",
        ),
        (
            "unknown database",
            vec![("DATABASE_URL", "postgres://u:hunter2@db/p".into())],
            vec![],
            "DATABASE_URL",
        ),
        (
            "unknown redis",
            vec![("REDIS_URL", "http://127.0.0.1:6379".into())],
            vec![],
            "REDIS_URL",
        ),
        (
            "development mode off loopback",
            vec![("PRESENCE_LISTEN", "0.0.0.0:0".into())],
            vec![],
            "PRESENCE_LISTEN",
        ),
        (
            "metrics address",
            vec![("PRESENCE_METRICS_LISTEN", "nowhere".into())],
            vec![],
            "metrics-listen",
        ),
        (
            "public key file",
            vec![("PRESENCE_JWT_PUBLIC_KEY", "/nonexistent/key.pem".into())],
            vec![],
            "PRESENCE_JWT_PUBLIC_KEY",
        ),
        (
            "flag value",
            vec![("PRESENCE_JWT_SECRET", secret.into())],
            vec!["--max-ids=0".into()],
            "max-ids",
        ),
    ];
    for (what, env, args, named) in cases {
        let mut cmd = serve(&dir);
        cmd.env("PRESENCE_LISTEN", "127.0.0.1:0");
        for (k, v) in &env {
            cmd.env(k, v);
        }
        cmd.arg("serve").args(&args);
        let (code, stderr) = refused(cmd);
        assert_eq!(code, Some(2), "{what}: exit 2; stderr:\n{stderr}");
        assert!(
            stderr.contains(named),
            "{what}: the error names {named}; stderr:\n{stderr}"
        );
        assert!(
            !stderr.contains("hunter2"),
            "{what}: no password in the error: {stderr}"
        );
        assert!(!stderr.contains("listening on"), "{what}: nothing started");
    }
}
