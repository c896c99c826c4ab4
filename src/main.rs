//! The `presence` binary: parses the command line and hands over to the library.
use std::io::BufRead;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// mimalloc rather than glibc malloc: cheaper for the many small, short-lived allocations of
/// stream set-up, and it returns memory after a wave of devices leaves.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use presence::domain::UserId;
use presence::server::{Application, open_store};
use presence::settings::Settings;
use presence::telemetry::{self, LogFormat};

/// gRPC presence service: who is online, away, busy or offline, pushed to those allowed to know.
///
/// Exit codes: 0 success (health: SERVING); 1 runtime failure (health: not serving or
/// unreachable); 2 bad usage or settings.
#[derive(Parser)]
#[command(name = "presence", version)]
struct Cli {
    /// Log format on stderr (RUST_LOG sets the level, default info).
    #[arg(long, env = "PRESENCE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server (migrates the database first).
    ///
    /// Examples:
    ///   presence serve                                  # 127.0.0.1:50051, sqlite://presence.db
    ///   DATABASE_URL=mysql://root@127.0.0.1/test presence serve --listen 0.0.0.0:50051
    #[command(verbatim_doc_comment)]
    Serve(Box<Settings>),

    /// Create or upgrade the database schema, then exit.
    ///
    /// Example:
    ///   DATABASE_URL=mysql://root@127.0.0.1:3306/test presence migrate
    #[command(verbatim_doc_comment)]
    Migrate {
        #[arg(long, env = "DATABASE_URL", default_value = "sqlite://presence.db")]
        database_url: String,
    },

    /// Print a JWT signed with PRESENCE_JWT_SECRET (HS256).
    ///
    /// Examples:
    ///   presence token --user 42 --ttl 1h
    ///   presence token --service chat --ttl 24h
    #[command(verbatim_doc_comment)]
    Token {
        /// User id (the token's sub).
        #[arg(long, required_unless_present = "service")]
        user: Option<u64>,
        /// Service name: makes a service token (`role: service`).
        #[arg(long)]
        service: Option<String>,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        #[arg(long, env = "PRESENCE_JWT_SECRET", hide_env_values = true)]
        secret: String,
        #[arg(long, env = "PRESENCE_JWT_ISSUER")]
        issuer: Option<String>,
        #[arg(long, env = "PRESENCE_JWT_AUDIENCE")]
        audience: Option<String>,
    },

    /// Manage the contact graph offline.
    #[command(subcommand)]
    Contacts(ContactsCommand),

    /// Check a server's gRPC health; exit 0 when SERVING (for container health checks).
    ///
    /// Example:
    ///   presence health --addr 127.0.0.1:50051
    #[command(verbatim_doc_comment)]
    Health {
        #[arg(long, default_value = "127.0.0.1:50051")]
        addr: SocketAddr,
        /// Service to check; empty is the whole server.
        #[arg(long, default_value = "")]
        service: String,
        #[arg(long, default_value = "3s")]
        timeout: humantime::Duration,
    },
}

#[derive(Subcommand)]
enum ContactsCommand {
    /// Bulk-import `user_id,contact_id` lines (an optional header line; `-` reads stdin).
    /// Pairs are symmetric and idempotent. Run it before starting the server, or restart the
    /// server afterwards: running servers cache the contacts of connected users.
    ///
    /// Example:
    ///   presence contacts import pairs.csv
    #[command(verbatim_doc_comment)]
    Import {
        file: String,
        #[arg(long, env = "DATABASE_URL", default_value = "sqlite://presence.db")]
        database_url: String,
    },
}

fn main() -> ExitCode {
    if let Some(path) = config_file_arg() {
        // SAFETY: no other thread exists yet: the runtime is built below.
        if let Err(e) = unsafe { presence::settings::load_config_file(&path) } {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    let cli = Cli::parse();
    telemetry::init_logs(cli.log_format);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // A task woken by a running task normally runs right after it (the LIFO slot). Under
    // fan-out that made every HTTP/2 connection task run, and write, after each one of its
    // streams queued a frame: one writev per delivery, whatever the wake-up batching. Without
    // the slot, the connection tasks run after the batch's streams and write theirs together.
    #[cfg(tokio_unstable)]
    builder.disable_lifo_slot();
    let runtime = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async_main(cli))
}

/// The `--config FILE` (or `--config=FILE`, or PRESENCE_CONFIG) of `serve`, found before clap
/// parses, because the file's values must be in place as environment defaults by then.
fn config_file_arg() -> Option<std::path::PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("serve") {
        return None;
    }
    let mut it = args.iter().skip(2);
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(Into::into);
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.into());
        }
    }
    std::env::var_os("PRESENCE_CONFIG").map(Into::into)
}

async fn async_main(cli: Cli) -> ExitCode {
    match run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(settings) => serve(*settings).await,
        Command::Migrate { database_url } => {
            open_store(&database_url).await?;
            eprintln!("database is migrated");
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            user,
            service,
            ttl,
            secret,
            issuer,
            audience,
        } => {
            let subject = match (&service, user) {
                (Some(name), _) => name.clone(),
                (None, Some(u)) => UserId::parse(u).map_err(anyhow::Error::msg)?.to_string(),
                (None, None) => unreachable!("clap requires --user or --service"),
            };
            let token = presence::auth::mint(
                &secret,
                &subject,
                service.is_some(),
                ttl.into(),
                issuer.as_deref(),
                audience.as_deref(),
            )
            .map_err(anyhow::Error::msg)?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Contacts(ContactsCommand::Import { file, database_url }) => {
            import_contacts(&file, &database_url).await
        }
        Command::Health {
            addr,
            service,
            timeout,
        } => health(addr, service, timeout.into()).await,
    }
}

async fn serve(settings: Settings) -> anyhow::Result<ExitCode> {
    if let Some(addr) = settings.metrics_addr().map_err(anyhow::Error::msg)? {
        telemetry::install_metrics(addr)?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
    }
    let app = Application::build(settings).await?;
    // The one line on stdout: tools and tests read the bound port from it.
    println!("listening on {}", app.local_addr());
    app.run_until_stopped(shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler only fails outside a tokio runtime");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn import_contacts(file: &str, database_url: &str) -> anyhow::Result<ExitCode> {
    let store = open_store(database_url).await?;
    let reader: Box<dyn BufRead> = if file == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).map_err(|e| anyhow::anyhow!("cannot open {file}: {e}"))?,
        ))
    };
    let started = std::time::Instant::now();
    let mut batch = Vec::with_capacity(presence::store::MAX_ROWS_PER_STATEMENT);
    let mut total = 0u64;
    for (n, line) in reader.lines().enumerate() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match parse_pair(line) {
            Ok(pair) => batch.push(pair),
            Err(_) if n == 0 => continue, // a header line
            Err(e) => anyhow::bail!("{file}: line {}: {e}", n + 1),
        }
        if batch.len() == presence::store::MAX_ROWS_PER_STATEMENT {
            store.add_contacts(&batch).await?;
            total += batch.len() as u64;
            batch.clear();
        }
    }
    if !batch.is_empty() {
        store.add_contacts(&batch).await?;
        total += batch.len() as u64;
    }
    eprintln!(
        "imported {total} contact pairs in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

fn parse_pair(line: &str) -> Result<(UserId, UserId), String> {
    let (a, b) = line
        .split_once(',')
        .ok_or_else(|| format!("expected `user_id,contact_id`, got {line:?}"))?;
    let a = UserId::parse_str(a).map_err(|e| e.to_string())?;
    let b = UserId::parse_str(b).map_err(|e| e.to_string())?;
    if a == b {
        return Err(format!("a user cannot be their own contact ({a})"));
    }
    Ok((a, b))
}

async fn health(addr: SocketAddr, service: String, timeout: Duration) -> anyhow::Result<ExitCode> {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let check = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let reply = client.check(HealthCheckRequest { service }).await?;
        anyhow::Ok(reply.into_inner().status())
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(Ok(ServingStatus::Serving)) => {
            println!("SERVING");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Ok(status)) => {
            println!("{}", status.as_str_name());
            Ok(ExitCode::from(1))
        }
        Ok(Err(e)) => {
            println!("UNREACHABLE: {e}");
            Ok(ExitCode::from(1))
        }
        Err(_) => {
            println!("UNREACHABLE: no answer within {timeout:?}");
            Ok(ExitCode::from(1))
        }
    }
}
