//! The `fleet-operator` binary: parses flags and runs [`fleet_operator::run`], or writes the
//! fleet's NATS identity (`init-identity`) before nats-server first starts.
#![allow(clippy::print_stdout)] // init-identity prints where it wrote.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

/// Fleet control plane: fans Deployments out to devices over NATS and serves the API.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// NATS server URL(s), comma-separated.
    #[arg(long, env = "FLEET_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The folder with the fleet's NATS keys and the operator's credentials.
    #[arg(
        long,
        env = "FLEET_IDENTITY",
        default_value = "/var/lib/fleet-operator/identity"
    )]
    identity: PathBuf,
    /// Address of the HTTP API, status page and /metrics.
    #[arg(long, env = "FLEET_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Seconds between fan-out checks when nothing changed.
    #[arg(long, default_value_t = 10)]
    resync_secs: u64,
    /// How long the NATS credentials minted for devices are valid, in seconds (agents renew
    /// them once two thirds have passed).
    #[arg(long, default_value_t = fleet_operator::enroll::DEVICE_JWT_TTL.as_secs())]
    device_jwt_ttl_secs: u64,
    /// This operator's name in the leadership lease; unique per running operator. Default:
    /// `<hostname>-<pid>`.
    #[arg(long, env = "FLEET_INSTANCE")]
    instance: Option<String>,
    /// Lease time in milliseconds: a standby takes over this long after the leader's last
    /// renewal (at once when the leader shuts down cleanly).
    #[arg(long, default_value_t = 6000)]
    lease_ms: u64,
    /// Replicas of each KV bucket: 3 on a 3-node NATS cluster (each bucket survives a node).
    #[arg(long, default_value_t = 1)]
    kv_replicas: usize,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the fleet's NATS keys and TLS certificates (if missing) and write
    /// `nats-auth.conf` (for nats-server's config: operator, accounts, resolver, TLS),
    /// `operator.creds` and `sys.creds` into --identity. Idempotent: what exists is kept.
    InitIdentity {
        /// A name or IP address devices use to reach NATS, for the server certificate;
        /// repeat for more.
        #[arg(long = "tls-host", default_values = ["127.0.0.1", "localhost"])]
        tls_hosts: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    fleet_operator::init_logging();
    if let Some(Command::InitIdentity { tls_hosts }) = &args.command {
        let written = fleet_operator::identity::Identity::init_or_load(&args.identity)
            .and_then(|id| id.write_files(tls_hosts));
        return match written {
            Ok(()) => {
                println!("{}/nats-auth.conf", args.identity.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = fleet_operator::Config {
        nats_url: args.nats_url,
        identity_dir: args.identity,
        listen: args.listen,
        resync: Duration::from_secs(args.resync_secs.max(1)),
        device_jwt_ttl: Duration::from_secs(args.device_jwt_ttl_secs.max(2)),
        instance: args
            .instance
            .unwrap_or_else(fleet_operator::default_instance),
        lease_ttl: Duration::from_millis(args.lease_ms.max(300)),
        kv_replicas: args.kv_replicas.clamp(1, 5),
    };
    match fleet_operator::run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
