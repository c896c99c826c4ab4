//! The `presence` command line: its subcommands, and the settings of `serve` layered with the
//! optional TOML file.
mod contacts;
mod health;

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::domain::UserId;
use crate::server::{Application, open_store_within};

/// How long one-shot commands (`migrate`, `contacts import`) wait for the database.
const ONE_SHOT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);
use crate::settings::{Secret, SecretUrl, Settings, SettingsError, file};
use crate::telemetry::{self, LogFormat};

/// gRPC presence service: who is online, away, busy or offline, pushed to those allowed to know.
///
/// Exit codes: 0 success (health: SERVING); 1 runtime failure (health: not serving or
/// unreachable); 2 bad usage or settings.
#[derive(Parser)]
#[command(name = "presence", version)]
pub struct Cli {
    /// Log format on stderr (RUST_LOG sets the level, default info).
    #[arg(long, env = "PRESENCE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty, global = true)]
    pub log_format: LogFormat,

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
    ///   presence serve --config presence.toml           # keys as the flags, with underscores
    #[command(verbatim_doc_comment)]
    Serve(Box<Settings>),

    /// Create or upgrade the database schema, then exit.
    ///
    /// Example:
    ///   DATABASE_URL=mysql://root@127.0.0.1:3306/test presence migrate
    #[command(verbatim_doc_comment)]
    Migrate {
        #[arg(long, env = "DATABASE_URL", default_value = "sqlite://presence.db")]
        database_url: SecretUrl,
    },

    /// Print a JWT signed with PRESENCE_JWT_SECRET (HS256).
    ///
    /// Examples:
    ///   presence token --user 42 --ttl 1h
    ///   presence token --service chat --ttl 24h
    #[command(verbatim_doc_comment)]
    Token {
        /// User id (the token's sub).
        #[arg(long, required_unless_present = "service", conflicts_with = "service")]
        user: Option<u64>,
        /// Service name: makes a service token (`role: service`).
        #[arg(long)]
        service: Option<String>,
        /// Lifetime, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        #[arg(long, env = "PRESENCE_JWT_SECRET", hide_env_values = true)]
        secret: Secret,
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
        database_url: SecretUrl,
    },
}

/// Parses the command line; `serve --config FILE` (or PRESENCE_CONFIG) parses it again with the
/// file's values as defaults. Usage and settings errors print and exit 2.
pub fn parse() -> Cli {
    let cli = Cli::parse();
    let Command::Serve(settings) = &cli.command else {
        return cli;
    };
    let Some(path) = &settings.config else {
        return cli;
    };
    let mut cmd = Cli::command();
    let serve = cmd
        .find_subcommand_mut("serve")
        .expect("serve is a subcommand");
    let values = match file::read(path, serve) {
        Ok(values) => values,
        Err(e) => exit_on_settings(&e),
    };
    let cmd = cmd.mut_subcommand("serve", |serve| file::apply(serve, &values));
    let matches = cmd.get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn exit_on_settings(e: &SettingsError) -> ! {
    eprintln!("error: {e}");
    std::process::exit(2)
}

/// Runs the subcommand: 0 done, 1 failed at run time, 2 settings that cannot work.
pub async fn run(cli: Cli) -> ExitCode {
    match run_command(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<SettingsError>() {
                Some(_) => ExitCode::from(2),
                None => ExitCode::from(1),
            }
        }
    }
}

async fn run_command(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(settings) => serve(*settings).await,
        Command::Migrate { database_url } => {
            open_store_within(&database_url, Some(ONE_SHOT_PATIENCE)).await?;
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
                (_, Some(u)) => UserId::parse(u)
                    .map_err(|e| SettingsError::new("--user", e.to_string()))?
                    .to_string(),
                (None, None) => unreachable!("clap requires --user or --service"),
            };
            let token = crate::auth::mint(
                secret.expose(),
                &subject,
                service.is_some(),
                ttl.into(),
                issuer.as_deref(),
                audience.as_deref(),
            )
            .map_err(|e| SettingsError::new("PRESENCE_JWT_SECRET", e))?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Contacts(ContactsCommand::Import { file, database_url }) => {
            contacts::import(&file, &database_url).await
        }
        Command::Health {
            addr,
            service,
            timeout,
        } => health::check(addr, service, timeout.into()).await,
    }
}

async fn serve(settings: Settings) -> anyhow::Result<ExitCode> {
    // Checked before anything listens (the build checks again: it is cheap).
    settings.check()?;
    if let Some(addr) = settings.metrics_addr() {
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
