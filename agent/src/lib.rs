//! `fleet-agent`: runs on each device and converges it to the state declared for it, driving
//! podman.
//!
//! The flow: [`sync`] gets this device's whole desired state from the operator over core NATS
//! (at start, when told it changed, and periodically) and hands it to the
//! [`reconcile::Reconciler`], which runs the pure [`plan`] against [`podman`] (each action on
//! its own task, one at a time per deployment) and reports each deployment's phase back
//! through the [`sync::Outbox`]; a heartbeat goes out on a timer. Each answer first goes
//! through [`store`]: only the store the device's desired state came from may remove a
//! workload; another store's answer changes nothing until an admin adopts the device. The
//! desired state is cached on disk ([`cache`]) so a reboot without network still brings the
//! workloads back. [`probe`] decides readiness; [`serve`] answers the operator's logs and exec
//! requests. Before its first connection the agent enrolls ([`identity`]): it generates
//! its own key and trades a one-time token for NATS credentials confined to its own subjects.
//! An OS upgrade the operator asks for (`_os` in the desired state) is driven on its own task
//! by [`osupgrade`]; the upgraded system's check-in ([`checkin`]) is a separate process, run
//! by its own systemd unit on every boot. Under systemd the agent says when it is ready and
//! pings the service watchdog from its main loop.
//!
//! The agent never writes desired state and never reads another device's keys, and uses no
//! JetStream at all: its NATS permissions (from the fleet account, see
//! `operator/src/identity`) reach only its own request subjects and inbox.

pub mod cache;
pub mod checkin;
pub mod clock;
pub mod config;
pub mod identity;
pub mod osupgrade;
pub mod plan;
pub mod podman;
pub mod probe;
pub mod reconcile;
pub mod runner;
pub mod serve;
pub mod storage;
pub mod store;
pub mod sync;

use std::{sync::Arc, time::Duration};

use fleet_contracts::{
    SCHEMA_VERSION, names,
    state::{HealthFlag, Heartbeat},
};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    config::Config, podman::Podman, reconcile::Reconciler, runner::TokioRunner, sync::Outbox,
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot set up the NATS client for {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(
        "the device is not enrolled and its config has no enrollment_token: create one with `fleetctl enroll-token create` and put it in the agent's config"
    )]
    NoToken,
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<(), RunError> {
    let started = clock::now();
    std::fs::create_dir_all(&config.state_dir).map_err(|source| RunError::StateDir {
        path: config.state_dir.clone(),
        source,
    })?;

    let podman = Podman::new(TokioRunner, &config.podman);
    let (mut reconciler, mut work_rx) = Reconciler::new(config.device_id.clone(), podman);
    let mut cache_error = None;
    let mut stores = store::StoreState::default();
    match cache::load(&config.state_dir, &config.device_id) {
        Ok(Some(cached)) => {
            info!(
                deployments = cached.deployments.len(),
                held = cached.held.len(),
                store = ?cached.store,
                "starting from the cached desired state"
            );
            reconciler.load_cached(cached.deployments);
            stores.store = cached.store;
            stores.held = cached.held;
        }
        Ok(None) => info!("no cached desired state; waiting for NATS before touching containers"),
        Err(e) => {
            error!(error = %e, "the desired-state cache is unusable");
            cache_error = Some(e.to_string());
        }
    }

    let key = identity::load_or_create_key(&config.state_dir)?;
    let public_key = key.public_key();
    if !identity::is_enrolled(&config.state_dir) && config.enrollment_token()?.is_none() {
        return Err(RunError::NoToken);
    }
    let (client_tx, client_rx) = tokio::sync::oneshot::channel();
    let mut outbox: Outbox = sync::outbox(client_rx, config.device_id.clone());
    let (desired_tx, mut desired_rx) = mpsc::channel(64);
    let (fatal_tx, mut fatal_rx) = mpsc::channel::<RunError>(1);
    // NATS comes up in the background (enrolling first if needed): the cached workloads must
    // come back even while NATS is unreachable.
    // Counts what arrived on the device's request subjects that was not an operator request.
    let dropped = Arc::new(std::sync::atomic::AtomicU64::new(0));
    tokio::spawn(start_nats(
        config.clone(),
        key,
        client_tx,
        desired_tx,
        fatal_tx,
        dropped.clone(),
    ));

    let mut resync = tokio::time::interval(config.resync_interval());
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shutdown = std::pin::pin!(shutdown_signal());
    // The heartbeat has its own task: a long reconcile action (a 30 s stop grace, a slow init
    // container) must not make a working device look stale. It reports what the loop last
    // published; a reconcile time that stands still shows a stuck loop.
    let (vitals_tx, vitals) = tokio::sync::watch::channel(Vitals {
        cache_error: cache_error.clone(),
        store_flags: stores.health_flags(),
        ..Default::default()
    });
    tokio::spawn(heartbeat(
        config.clone(),
        outbox.clone(),
        vitals,
        started,
        dropped,
        public_key,
    ));

    // The OS upgrade driver has its own task: apt and a reboot must not hold up the
    // workloads' reconcile loop.
    let (os_tx, os_rx) = tokio::sync::watch::channel(None);
    let os_outbox = outbox.clone();
    let os_key = names::os_key(&config.device_id);
    tokio::spawn(osupgrade::drive(
        osupgrade::Driver::new(&config, TokioRunner),
        os_rx,
        move |report| {
            let bytes = serde_json::to_vec(report).expect("an OS report serializes");
            os_outbox.put(os_key.clone(), bytes);
        },
    ));
    let mut evidence = checkin::Evidence::new(checkin::boot_id());

    info!(device = %config.device_id, version = VERSION, nats = %config.nats_url, "agent started");
    // Under systemd (Type=notify, WatchdogSec=): ready now, and a ping from this loop at half
    // the watchdog's period, so a loop that hangs gets the agent restarted.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut watchdog_usec = 0;
    let watchdog_every = if sd_notify::watchdog_enabled(false, &mut watchdog_usec) {
        Duration::from_micros(watchdog_usec / 2)
    } else {
        Duration::from_secs(3600)
    };
    let mut watchdog = tokio::time::interval(watchdog_every);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = watchdog.tick() => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                continue;
            }
            Some(e) = fatal_rx.recv() => return Err(e),
            Some(snapshot) = desired_rx.recv() => {
                let before = stores.clone();
                let mut changed = take(&mut reconciler, &mut stores, &snapshot);
                let mut os = snapshot.os.clone();
                // Take every queued change before acting, so a burst costs one pass.
                while let Ok(snapshot) = desired_rx.try_recv() {
                    changed |= take(&mut reconciler, &mut stores, &snapshot);
                    os = snapshot.os.clone();
                }
                evidence.synced = true;
                // An upgrade only from the store the device's desired state comes from.
                if stores.holding.is_none() {
                    let os = os.and_then(|v| v.map_err(|e| warn!(error = %e, "ignoring the desired OS upgrade")).ok()).map(|b| *b);
                    os_tx.send_if_modified(|current| {
                        let changed = *current != os;
                        *current = os;
                        changed
                    });
                }
                if (changed || stores.store != before.store || stores.held != before.held)
                    && let Some(deployments) = reconciler.desired_for_cache() {
                        let cached = cache::Cached {
                            deployments,
                            store: stores.store.clone(),
                            held: stores.held.clone(),
                        };
                        cache_error = cache::save(&config.state_dir, &config.device_id, &cached)
                            .map_err(|e| { error!(error = %e, "cannot cache the desired state"); e.to_string() })
                            .err();
                    }
                reconciler.pass(&mut outbox, now_ms()).await;
            }
            Some(work) = work_rx.recv() => {
                let mut again = reconciler.finish(work, &mut outbox, now_ms());
                while let Ok(work) = work_rx.try_recv() {
                    again |= reconciler.finish(work, &mut outbox, now_ms());
                }
                if again {
                    reconciler.pass(&mut outbox, now_ms()).await;
                }
            }
            _ = resync.tick() => reconciler.pass(&mut outbox, now_ms()).await,
        }
        evidence.not_ready = reconciler.not_ready();
        evidence.save(&config.state_dir);
        vitals_tx.send_replace(Vitals {
            podman_error: reconciler.podman_error.clone(),
            cache_error: cache_error.clone(),
            store_flags: stores.health_flags(),
            deployments: reconciler.deployment_count() as u32,
            last_reconcile_ms: reconciler.last_pass_ms,
        });
    }
    if reconciler.busy() {
        info!("shutting down mid-action; the next start picks up where this one stopped");
    }
    info!("shutting down; containers keep running");
    Ok(())
}

/// Hands one answer to [`store::StoreState`] and what it decides to run to the reconciler.
/// Returns whether the desired state changed.
fn take<R: runner::CommandRunner + 'static>(
    reconciler: &mut Reconciler<R>,
    stores: &mut store::StoreState,
    snapshot: &sync::DesiredSnapshot,
) -> bool {
    let was_holding = stores.holding.clone();
    match stores.take(snapshot, reconciler.desired()) {
        Some(desired) => reconciler.apply(desired),
        None => {
            if was_holding != stores.holding {
                let (cached, found) = stores.holding.clone().expect("holding");
                warn!(%cached, %found, "store changed: holding; the operator answers from another store than this device's desired state came from, so nothing is changed until an admin adopts the device (`fleetctl device adopt`)");
            }
            false
        }
    }
}

/// What the heartbeat reports about the reconcile loop.
#[derive(Debug, Clone, Default)]
struct Vitals {
    podman_error: Option<String>,
    cache_error: Option<String>,
    store_flags: Vec<HealthFlag>,
    deployments: u32,
    last_reconcile_ms: Option<u64>,
}

/// Sends a heartbeat every interval, whatever the reconcile loop is doing.
async fn heartbeat(
    config: Config,
    outbox: Outbox,
    vitals: tokio::sync::watch::Receiver<Vitals>,
    started: tokio::time::Instant,
    dropped: Arc<std::sync::atomic::AtomicU64>,
    public_key: String,
) {
    let os = os_name();
    let mut tick = tokio::time::interval(config.heartbeat_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let v = vitals.borrow().clone();
        let mut health_flags = Vec::new();
        if let Some(message) = v.podman_error {
            health_flags.push(HealthFlag::PodmanUnavailable { message });
        }
        if let Some(message) = v.cache_error {
            health_flags.push(HealthFlag::CacheWriteFailed { message });
        }
        health_flags.extend(v.store_flags);
        let hb = Heartbeat {
            schema: SCHEMA_VERSION,
            device: config.device_id.clone(),
            agent_version: VERSION.to_owned(),
            os: os.clone(),
            uptime_secs: started.elapsed().as_secs(),
            sent_at_ms: now_ms(),
            interval_ms: config.heartbeat_interval().as_millis() as u64,
            health_flags,
            deployments: v.deployments,
            last_reconcile_ms: v.last_reconcile_ms,
            storage: storage::read(&config.boot_dir),
            dropped_requests: dropped.load(std::sync::atomic::Ordering::Relaxed),
            public_key: public_key.clone(),
        };
        let bytes = serde_json::to_vec(&hb).expect("a heartbeat serializes");
        outbox.put(names::info_key(&config.device_id), bytes);
    }
}

/// Enrolls if needed, connects, and starts following the desired state.
async fn start_nats(
    config: Config,
    key: nkeys::KeyPair,
    client_tx: tokio::sync::oneshot::Sender<async_nats::Client>,
    desired_tx: mpsc::Sender<sync::DesiredSnapshot>,
    fatal: mpsc::Sender<RunError>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut backoff = Duration::from_secs(1);
    while !identity::is_enrolled(&config.state_dir) {
        let token = match config.enrollment_token() {
            Ok(Some(t)) => t,
            Ok(None) => return drop(fatal.send(RunError::NoToken).await),
            Err(e) => return drop(fatal.send(e.into()).await),
        };
        info!(device = %config.device_id, "enrolling with the operator");
        let result = identity::enroll(
            &config.nats_url,
            &config.nats_ca_file,
            &config.device_id,
            &key,
            &token,
        )
        .await;
        match result.and_then(|jwt| identity::save_jwt(&config.state_dir, &jwt)) {
            Ok(()) => info!(device = %config.device_id, "enrolled"),
            Err(e) if e.is_transient() => {
                warn!(error = %e, retry_in = ?backoff, "enrollment not answered; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
            Err(e) => return drop(fatal.send(e.into()).await),
        }
    }
    let options = identity::connect_options(&config.state_dir, key);
    let (client, connections) = match sync::connect(
        options,
        &config.nats_url,
        &config.nats_ca_file,
        &config.device_id,
    )
    .await
    {
        Ok(c) => c,
        Err(source) => {
            let url = config.nats_url.clone();
            return drop(fatal.send(RunError::Connect { url, source }).await);
        }
    };
    let _ = client_tx.send(client.clone());
    let requests = Arc::new(Podman::new(TokioRunner, &config.podman));
    tokio::spawn(serve::serve(
        client.clone(),
        config.device_id.clone(),
        requests,
        dropped,
    ));
    tokio::spawn(identity::renew_forever(
        client.clone(),
        config.state_dir.clone(),
        config.device_id.clone(),
    ));
    sync::follow_desired(
        client,
        config.device_id.clone(),
        desired_tx,
        connections,
        config.desired_sync_interval(),
    )
    .await;
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

fn now_ms() -> u64 {
    clock::unix_ms()
}

/// `PRETTY_NAME` from os-release, or "unknown".
fn os_name() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}
