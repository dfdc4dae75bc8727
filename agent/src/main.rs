//! The `fleet-agent` binary: parses arguments, loads and validates the config, starts logging
//! and hands over to [`fleet_agent::run`] (or, for `check-in`, to [`fleet_agent::checkin::run`]).
//!
//! Exit codes: 0 after a clean shutdown, 2 for a bad config or arguments, 1 for anything else.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use fleet_agent::config::Config;

/// Fleet device agent: converges this device to the state declared for it in NATS.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Path of the agent's TOML config file.
    #[arg(
        long,
        short,
        env = "FLEET_AGENT_CONFIG",
        default_value = "/etc/fleet/agent.toml"
    )]
    config: PathBuf,
    /// Check the config file and exit.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Check in an upgraded system (fleet-checkin.service, every boot): commit the pending OS
    /// upgrade once the agent reached the operator and its workloads are Ready, or roll it
    /// back and reboot at the deadline. Ends at once when no upgrade is pending.
    CheckIn,
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    if args.check_config {
        tracing::info!(path = %args.config.display(), "config is valid");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(Command::CheckIn) = args.command {
        let runner = fleet_agent::runner::TokioRunner;
        return match runtime.block_on(fleet_agent::checkin::run(&config, &runner)) {
            Ok(outcome) => {
                tracing::info!(?outcome, "check-in done");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("check-in: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match runtime.block_on(fleet_agent::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// One level variable, `FLEET_LOG` (`info` by default, `fleet_agent=debug` and so on).
/// Under systemd (JOURNAL_STREAM set) journald adds timestamps, so the agent does not.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().with_ansi(false).init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}
