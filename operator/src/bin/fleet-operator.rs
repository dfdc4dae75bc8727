//! The `fleet-operator` binary: parses flags and runs [`fleet_operator::run`].

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use clap::Parser;

/// Fleet control plane: fans Deployments out to devices over NATS and serves the API.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "FLEET_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Address of the HTTP API, status page and /metrics.
    #[arg(long, env = "FLEET_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Seconds between fan-out checks when nothing changed.
    #[arg(long, default_value_t = 10)]
    resync_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    fleet_operator::init_logging();
    let config = fleet_operator::Config {
        nats_url: args.nats_url,
        listen: args.listen,
        resync: Duration::from_secs(args.resync_secs.max(1)),
    };
    match fleet_operator::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
