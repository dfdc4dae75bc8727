//! `fleet-operator`: the Fleet control plane.
//!
//! The operator keeps no database: it rebuilds its whole view from NATS KV at start
//! ([`controller`]) and, while it holds the leadership lease ([`lease`]; others stand by with
//! a warm view), fans each Deployment out to the desired keys of the devices its selector
//! matches, aggregates what devices report ([`fleet`]), and serves the HTTP API, a status page
//! and Prometheus metrics ([`api`]); `fleetctl` (its own crate) talks to that API only. It is also
//! the fleet's identity authority: it holds the NATS account keys ([`identity`]), enrolls
//! devices ([`enroll`]) and blacklists them ([`blacklist`]). It is also the devices' only way
//! to the fleet's state ([`gateway`]): devices use no JetStream, they ask the operator for
//! their desired state and hand it their reports, over core NATS requests answered only on
//! the asker's own inbox ([`respond`]). It backs the store up and restores it, and adopts
//! devices that hold workloads from another store ([`store`]; docs/store-loss.md). OS upgrade
//! campaigns ([`campaign`]) say which device makes which upgrade next, a wave at a time; the
//! devices do the rest themselves (ADR-0012).
//!
//! The operator writes resources and desired state; it writes a device's reported keys only
//! with what that device sent, under that device's keys.

pub mod api;
pub mod blacklist;
pub mod campaign;
pub mod clock;
pub mod controller;
pub mod enroll;
pub mod fleet;
pub mod gateway;
pub mod identity;
pub mod lease;
pub mod respond;
pub mod store;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tracing::info;

#[derive(Debug, Clone)]
pub struct Config {
    pub nats_url: String,
    /// The folder `fleet-operator init-identity` wrote: keys, the CA.
    pub identity_dir: PathBuf,
    pub listen: SocketAddr,
    /// How often fan-out re-checks the desired bucket even without a change.
    pub resync: Duration,
    /// How long minted device JWTs are valid.
    pub device_jwt_ttl: Duration,
    /// This operator's name in the leadership lease.
    pub instance: String,
    pub lease_ttl: Duration,
    /// Replicas of each KV bucket (3 on a 3-node NATS cluster).
    pub kv_replicas: usize,
}

/// `nats://a:4222,nats://b:4222` -> each server of a cluster; the client fails over between them.
pub fn servers(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).collect()
}

/// `<hostname>-<pid>`: unique among the operators of one fleet.
pub fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "operator".into());
    format!("{host}-{}", std::process::id())
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("cannot load the fleet identity: {0}")]
    Identity(#[from] identity::IdentityError),
    #[error("the NATS credentials minted from the fleet identity are unusable: {0}")]
    MintedCreds(std::io::Error),
    #[error(
        "{0} holds no fleet identity (no nats-auth.conf): run `fleet-operator init-identity` first"
    )]
    NoIdentity(PathBuf),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// How often the fleet account is pushed to the servers even without a change.
const ACCOUNT_REPUSH: Duration = Duration::from_secs(60);

/// A started operator: its connections made, its buckets open, its tasks (watches, fan-out,
/// lease, responders) running on the current tokio runtime; what is left is to serve
/// [`Started::router`], which [`run`] does on a TCP listener and the API's component tests do
/// without one.
#[derive(Debug)]
pub struct Started {
    pub operator: Arc<controller::Operator>,
    pub router: axum::Router,
}

/// Runs the operator until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), RunError> {
    let Started { operator, router } = start(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(config.listen);
    info!(%addr, nats = %config.nats_url, instance = %config.instance, "operator listening: status page at http://{addr}/");
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(RunError::Serve);
    lease::release(&operator.buckets.lease, &operator.leadership).await;
    served
}

/// Connects, opens the buckets and starts every task of the operator; see [`Started`].
pub async fn start(config: &Config) -> Result<Started, RunError> {
    if !config.identity_dir.join("nats-auth.conf").exists() {
        return Err(RunError::NoIdentity(config.identity_dir.clone()));
    }
    let identity = Arc::new(identity::Identity::init_or_load(&config.identity_dir)?);
    // Each connection's credentials are minted here from the fleet's keys, at every start, so
    // an upgrade's narrower permissions apply at once (the `*.creds` files init-identity
    // writes are for tools).
    let (connected, connections) = tokio::sync::watch::channel(0u64);
    let client = connection(config, &identity.service_creds()?, "fleet-operator")?
        .max_reconnects(None)
        .event_callback(move |event| {
            if matches!(event, async_nats::Event::Connected) {
                connected.send_modify(|n| *n += 1);
            }
            async move { tracing::warn!(event = %event, "NATS event") }
        })
        .connect(servers(&config.nats_url))
        .await
        .map_err(|source| RunError::Connect {
            url: config.nats_url.clone(),
            source,
        })?;
    // The responder hears enrollment and renewal requests on a connection of its own, which
    // can publish to nothing but enrollment and device inboxes.
    let responder = connection(
        config,
        &identity.responder_creds()?,
        "fleet-operator (responder)",
    )?
    .max_reconnects(None)
    .connect(servers(&config.nats_url))
    .await
    .map_err(|source| RunError::Connect {
        url: config.nats_url.clone(),
        source,
    })?;
    let js = async_nats::jetstream::new(client.clone());
    // JetStream may not be ready yet (a cluster still electing its meta leader): wait for it.
    let mut backoff = Duration::from_millis(250);
    let buckets = loop {
        match controller::open_buckets(&js, config.kv_replicas).await {
            Ok(b) => break b,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "JetStream is not ready");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    // Every (re)connect of the system-account connection re-pushes the fleet account, so the
    // server's revocations always match the operator's record, whatever failed in between.
    let reconnected = Arc::new(tokio::sync::Notify::new());
    let notify = reconnected.clone();
    let sys = connection(
        config,
        &identity.sys_creds()?,
        "fleet-operator (system account)",
    )?
    .event_callback(move |event| {
        let notify = notify.clone();
        async move {
            if matches!(event, async_nats::Event::Connected) {
                notify.notify_one();
            }
        }
    })
    .connect(servers(&config.nats_url))
    .await
    .map_err(|source| RunError::Connect {
        url: config.nats_url.clone(),
        source,
    })?;
    let leadership = Arc::new(lease::Leadership::new(
        config.instance.clone(),
        config.lease_ttl,
    ));
    let shared = controller::Operator::new(
        buckets,
        identity.clone(),
        sys,
        client.clone(),
        config.device_jwt_ttl,
        leadership.clone(),
        connections,
    );
    tokio::spawn(lease::run(shared.buckets.lease.clone(), leadership));
    let pusher = shared.clone();
    reconnected.notify_one(); // And once at start.
    tokio::spawn(async move {
        loop {
            // Also every minute: a cluster node that was down when an update was pushed
            // serves the old account (and lets a blacklisted device in) until it hears again.
            tokio::select! {
                _ = reconnected.notified() => {}
                _ = tokio::time::sleep(ACCOUNT_REPUSH) => {}
            }
            if let Err(e) = blacklist::push_account(&pusher).await {
                tracing::warn!(error = %e, "cannot push the fleet account; retrying at the next reconnect");
            }
        }
    });
    controller::spawn(shared.clone(), config.resync);
    tokio::spawn(enroll::serve(responder.clone(), shared.clone(), identity));
    tokio::spawn(enroll::serve_renewals(responder.clone(), shared.clone()));
    tokio::spawn(gateway::serve_sync(responder.clone(), shared.clone()));
    tokio::spawn(gateway::serve_reports(responder, shared.clone()));
    Ok(Started {
        router: api::router(shared.clone()),
        operator: shared,
    })
}

/// Options for a connection with `creds`: TLS to a server the fleet's own CA signed (pinned,
/// never optional), the operator's inbox prefix, retries from the start.
fn connection(
    config: &Config,
    creds: &str,
    name: &str,
) -> Result<async_nats::ConnectOptions, RunError> {
    Ok(async_nats::ConnectOptions::with_credentials(creds)
        .map_err(RunError::MintedCreds)?
        .name(name)
        .custom_inbox_prefix(fleet_contracts::names::OPERATOR_INBOX)
        .add_root_certificates(identity::tls::ca_path(&config.identity_dir))
        .require_tls(true)
        .retry_on_initial_connect())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received"),
        _ = int.recv() => info!("SIGINT received"),
    }
}

/// One level variable, `FLEET_LOG` (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
