//! The operator's control loop: keeps the in-memory [`Fleet`] in step with NATS KV through
//! four watches (resources, reported, desired, device identities), each rebuilt from scratch
//! after a failure or a reconnect, and, while this operator holds the lease
//! ([`crate::lease`]), writes the desired bucket to match the resources (fan-out).
//!
//! Fan-out runs only once every watch has caught up with its bucket: acting on a partial view
//! would delete the desired keys of resources not read yet. `converged` adds that the leader's
//! last fan-out pass found nothing left to write.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use async_nats::jetstream::{
    self,
    kv::{self, Operation},
};
use fleet_contracts::{
    names::{
        AUDIT_BUCKET, DESIRED_BUCKET, ENROLLMENT_BUCKET, LEASE_BUCKET, REPORTED_BUCKET,
        RESOURCES_BUCKET, STORE_KEY,
    },
    resource::{Deployment, Device, OsUpgrade},
    state::{StoreIdentity, StoreRef},
};
use futures::StreamExt;
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::fleet::{Fleet, Stored};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot create or open KV bucket {bucket}: {source}")]
    Bucket {
        bucket: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The three buckets the operator works on.
#[derive(Debug, Clone)]
pub struct Buckets {
    pub resources: kv::Store,
    pub desired: kv::Store,
    pub reported: kv::Store,
    pub enrollment: kv::Store,
    pub audit: kv::Store,
    pub lease: kv::Store,
}

/// Creates the buckets if missing (idempotent; the replica count follows `replicas`) and
/// opens them.
pub async fn open_buckets(js: &jetstream::Context, replicas: usize) -> Result<Buckets, SetupError> {
    let open = |bucket: &'static str, history: i64| {
        let js = js.clone();
        async move {
            js.create_or_update_key_value(kv::Config {
                bucket: bucket.to_owned(),
                history,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| SetupError::Bucket {
                bucket,
                source: Box::new(e),
            })
        }
    };
    let resources = open(RESOURCES_BUCKET, 5).await?;
    ensure_store_identity(&resources).await?;
    Ok(Buckets {
        resources,
        desired: open(DESIRED_BUCKET, 5).await?,
        reported: open_device_written(js, REPORTED_BUCKET, replicas).await?,
        enrollment: open(ENROLLMENT_BUCKET, 5).await?,
        audit: open(AUDIT_BUCKET, 1).await?,
        lease: open(LEASE_BUCKET, 1).await?,
    })
}

/// Gives a store its identity the first time its buckets are created: a new random fleet id,
/// epoch 1. Idempotent and race-free between operators (a create, which only one wins).
async fn ensure_store_identity(resources: &kv::Store) -> Result<(), SetupError> {
    let failed = |e: Box<dyn std::error::Error + Send + Sync>| SetupError::Bucket {
        bucket: RESOURCES_BUCKET,
        source: e,
    };
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).map_err(|e| failed(Box::new(e)))?;
    let identity = StoreIdentity {
        schema: fleet_contracts::SCHEMA_VERSION,
        store: StoreRef {
            fleet_id: id.iter().map(|b| format!("{b:02x}")).collect(),
            epoch: 1,
        },
        restoring: false,
        created_ms: now_ms(),
    };
    let bytes = serde_json::to_vec(&identity).expect("serializes");
    match resources.create(STORE_KEY, bytes.into()).await {
        Ok(_) => {
            info!(store = %identity.store, "a new fleet store: gave it its identity");
            Ok(())
        }
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(failed(Box::new(e))),
    }
}

/// Opens a bucket devices write to, creating it if needed, with rollup headers refused: a
/// `Nats-Rollup: all` on a device's own key would otherwise purge every device's values. Once
/// the bucket exists its stream is only ever updated with rollups off (a KV create-or-update
/// would switch them on again, for a moment, at every start); nothing of the operator's or the
/// agent's purges in it (they delete).
async fn open_device_written(
    js: &jetstream::Context,
    bucket: &'static str,
    replicas: usize,
) -> Result<kv::Store, SetupError> {
    let failed =
        |e: Box<dyn std::error::Error + Send + Sync>| SetupError::Bucket { bucket, source: e };
    let stream = fleet_contracts::names::kv_stream(bucket);
    let existing = match js.get_stream(&stream).await {
        Ok(s) => Some(s.cached_info().config.clone()),
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            None
        }
        Err(e) => return Err(failed(Box::new(e))),
    };
    let mut config = match existing {
        Some(config) => config,
        None => {
            js.create_key_value(kv::Config {
                bucket: bucket.to_owned(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| failed(Box::new(e)))?;
            js.get_stream(&stream)
                .await
                .map_err(|e| failed(Box::new(e)))?
                .cached_info()
                .config
                .clone()
        }
    };
    if config.allow_rollup || config.num_replicas != replicas {
        config.allow_rollup = false;
        config.num_replicas = replicas;
        js.update_stream(config)
            .await
            .map_err(|e| failed(Box::new(e)))?;
    }
    js.get_key_value(bucket)
        .await
        .map_err(|e| failed(Box::new(e)))
}

/// The running operator, as every part of it sees it: its view of the fleet, its buckets and
/// connections, its identity, its leadership and its metrics.
#[derive(Debug)]
pub struct Operator {
    pub fleet: RwLock<Fleet>,
    pub buckets: Buckets,
    pub identity: Arc<crate::identity::Identity>,
    /// A connection in the system account, for pushing the fleet account's JWT.
    pub sys: async_nats::Client,
    /// The operator's own connection, for requests to devices (logs, exec).
    pub nats: async_nats::Client,
    /// How long the device JWTs the operator mints are valid.
    pub device_jwt_ttl: std::time::Duration,
    /// Woken whenever fan-out may have work.
    pub changed: Notify,
    /// Counts the operator connection's (re)connects.
    pub connections: tokio::sync::watch::Receiver<u64>,
    pub leadership: Arc<crate::lease::Leadership>,
    watches_current: [AtomicBool; 4],
    /// Whether the desired bucket matched the resources after the last fan-out pass of this
    /// leader (false until the first one after a start, a catch-up or a takeover).
    written: AtomicBool,
    pub metrics: Metrics,
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub desired_puts: AtomicU64,
    pub desired_deletes: AtomicU64,
    pub fan_out_errors: AtomicU64,
    pub unreadable_values: AtomicU64,
    /// Requests to the operator's responders refused before any work: a reply subject outside
    /// the requester's own inbox, a malformed subject.
    pub refused_requests: AtomicU64,
    /// Report entries refused: a key or value that is not what the key holds, too large, too
    /// many keys.
    pub refused_reports: AtomicU64,
}

/// The index of the desired bucket's watch.
const DESIRED_WATCH: usize = 2;
/// The index of the resources bucket's watch.
const RESOURCES_WATCH: usize = 0;
/// The index of the reported bucket's watch.
const REPORTED_WATCH: usize = 1;

const WATCH_NAMES: [&str; 4] = [
    "resources",
    "reported state",
    "desired state",
    "device identities",
];

impl Operator {
    pub fn new(
        buckets: Buckets,
        identity: Arc<crate::identity::Identity>,
        sys: async_nats::Client,
        nats: async_nats::Client,
        device_jwt_ttl: std::time::Duration,
        leadership: Arc<crate::lease::Leadership>,
        connections: tokio::sync::watch::Receiver<u64>,
    ) -> Arc<Operator> {
        Arc::new(Operator {
            fleet: RwLock::new(Fleet::default()),
            buckets,
            identity,
            sys,
            nats,
            device_jwt_ttl,
            changed: Notify::new(),
            connections,
            leadership,
            watches_current: Default::default(),
            written: AtomicBool::new(false),
            metrics: Metrics::default(),
        })
    }

    /// True once every watch has read its whole bucket: the view is complete and reads may
    /// be answered.
    pub fn caught_up(&self) -> bool {
        self.watches_current
            .iter()
            .all(|w| w.load(Ordering::Acquire))
    }

    /// True once the desired watch has read the whole bucket: a device's desired state may be
    /// answered in full.
    pub fn desired_read(&self) -> bool {
        self.watches_current[DESIRED_WATCH].load(Ordering::Acquire)
    }

    /// True once the reported watch has read the whole bucket: the view knows every reported
    /// key.
    pub fn reported_read(&self) -> bool {
        self.watches_current[REPORTED_WATCH].load(Ordering::Acquire)
    }

    /// True once the resources watch has read the whole bucket (the store's identity and the
    /// adoptions with it).
    pub fn resources_read(&self) -> bool {
        self.watches_current[RESOURCES_WATCH].load(Ordering::Acquire)
    }

    /// Caught up and, while leading, the desired bucket written to match: nothing left to
    /// rebuild.
    pub fn converged(&self) -> bool {
        self.caught_up() && (!self.leadership.is_leader() || self.written.load(Ordering::Acquire))
    }

    /// What is still being rebuilt, for the recovery status.
    pub fn pending(&self) -> Vec<String> {
        let mut pending: Vec<String> = WATCH_NAMES
            .iter()
            .zip(&self.watches_current)
            .filter(|(_, done)| !done.load(Ordering::Acquire))
            .map(|(name, _)| format!("reading {name} from NATS KV"))
            .collect();
        if self.leadership.is_leader() && !self.written.load(Ordering::Acquire) {
            pending.push("writing the desired state of every device".into());
        }
        pending
    }

    fn set_current(&self, watch: usize, current: bool) {
        let was = self.watches_current[watch].swap(current, Ordering::AcqRel);
        if !current {
            self.written.store(false, Ordering::Release);
        }
        if current && !was {
            info!(watch = WATCH_NAMES[watch], "caught up");
            if self.caught_up() {
                info!("every bucket has been read");
                self.changed.notify_one();
            }
        }
    }
}

pub fn now_ms() -> u64 {
    crate::clock::unix_ms()
}

/// Rings the doorbell of every device the view knows: those with desired keys, a record or a
/// heartbeat (an unregistered device holding on another store is owed a ring too).
async fn ring_all(shared: &Operator) {
    let devices: std::collections::BTreeSet<String> = {
        let fleet = shared.fleet.read().unwrap();
        fleet
            .desired
            .keys()
            .filter_map(|k| k.split_once('.').map(|(d, _)| d.to_owned()))
            .chain(fleet.devices.keys().cloned())
            .chain(fleet.heartbeats.keys().cloned())
            .collect()
    };
    for device in &devices {
        crate::gateway::ring(shared, device).await;
    }
    debug!(devices = devices.len(), "rang every device");
}

/// Starts the watches and the fan-out loop.
pub fn spawn(shared: Arc<Operator>, resync: Duration) {
    let watches: [(&'static str, Apply); 4] = [
        (RESOURCES_BUCKET, apply_resource),
        (REPORTED_BUCKET, apply_reported),
        (DESIRED_BUCKET, apply_desired),
        (ENROLLMENT_BUCKET, apply_identity),
    ];
    for (index, (bucket, apply)) in watches.into_iter().enumerate() {
        tokio::spawn(watch_forever(shared.clone(), index, bucket, apply));
    }
    tokio::spawn(fan_out_loop(shared, resync));
}

/// Timeout of the requests that set a watch up: short, so a create that went to a cluster node
/// that just died is retried soon (the next one lands on a live node).
const WATCH_SETUP_TIMEOUT: Duration = Duration::from_secs(2);

type Apply = fn(&Operator, &kv::Entry) -> Result<bool, String>;

/// Follows one bucket from its start, forever; a failed watch is rebuilt from scratch (the
/// bucket's current contents replace what was known).
async fn watch_forever(shared: Arc<Operator>, index: usize, bucket: &'static str, apply: Apply) {
    let js = jetstream::ContextBuilder::new()
        .timeout(WATCH_SETUP_TIMEOUT)
        .build(shared.nats.clone());
    const FIRST_BACKOFF: Duration = Duration::from_millis(200);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let started = crate::clock::now();
        let watched = match js.get_key_value(bucket).await {
            Ok(store) => watch_once(&shared, index, store, apply).await,
            Err(e) => Err(e.into()),
        };
        if started.elapsed() > Duration::from_secs(30) {
            backoff = FIRST_BACKOFF; // It worked for a while: this is a new failure.
        }
        match watched {
            Ok(()) => warn!(watch = WATCH_NAMES[index], "watch ended; restarting it"),
            Err(e) => {
                warn!(watch = WATCH_NAMES[index], error = %e, retry_in = ?backoff, "watch failed")
            }
        }
        shared.set_current(index, false);
        tokio::time::sleep(backoff).await;
        // Short: while the watch is down the operator is recovering (no fan-out, no reads).
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

async fn watch_once(
    shared: &Operator,
    index: usize,
    store: kv::Store,
    apply: Apply,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let empty = store.status().await?.values() == 0;
    let mut watch = store.watch_with_history(">").await?;
    // A rebuilt watch replays everything: start from a clean slate for this bucket.
    clear(shared, index);
    let prefix = format!("{}/", store.name);
    shared
        .fleet
        .write()
        .unwrap()
        .unreadable
        .retain(|k, _| !k.starts_with(&prefix));
    if empty {
        shared.set_current(index, true);
    }
    // After a reconnect, read the bucket again rather than trust async-nats to recreate the
    // watch's consumer: its recreation retries silently and can stay stuck on a cluster that
    // is electing leaders.
    let mut connections = shared.connections.clone();
    connections.borrow_and_update();
    let mut reconnects = true;
    loop {
        let entry = tokio::select! {
            entry = watch.next() => entry,
            changed = connections.changed(), if reconnects => {
                if changed.is_ok() {
                    return Err("reconnected to NATS; reading the bucket again".into());
                }
                reconnects = false;
                continue;
            }
        };
        let Some(entry) = entry else { break };
        let entry = entry?;
        let unreadable_key = format!("{}/{}", entry.bucket, entry.key);
        match apply(shared, &entry) {
            Ok(changed) => {
                let was = shared
                    .fleet
                    .write()
                    .unwrap()
                    .unreadable
                    .remove(&unreadable_key)
                    .is_some();
                if changed || was {
                    shared.changed.notify_one();
                }
            }
            Err(e) => {
                // A value this operator cannot read (newer schema, corruption): report and skip,
                // never crash the loop or delete anything because of it.
                shared
                    .metrics
                    .unreadable_values
                    .fetch_add(1, Ordering::Relaxed);
                warn!(bucket = %entry.bucket, key = %entry.key, error = %e, "skipping an unreadable value");
                let mut fleet = shared.fleet.write().unwrap();
                fleet.unreadable.insert(unreadable_key, e);
            }
        }
        if entry.delta == 0 {
            shared.set_current(index, true);
        }
        // The desired bucket was derived whole from a new store (a restore, a new store): every
        // device may now be answered, with a store it has not seen yet.
        if index == DESIRED_WATCH
            && entry.key == fleet_contracts::names::DESIRED_STORE_KEY
            && shared.desired_read()
            && shared.leadership.is_leader()
        {
            ring_all(shared).await;
        }
        // An admin's adoption or release changes what the device is answered.
        if index == RESOURCES_WATCH
            && shared.resources_read()
            && shared.leadership.is_leader()
            && let Some(device) = entry.key.strip_prefix("adoption.")
        {
            crate::gateway::ring(shared, device).await;
        }
        // A device hears that its desired state changed, from the leader (the writer) once
        // the view is whole: it then asks for all of it.
        if index == DESIRED_WATCH
            && shared.desired_read()
            && shared.leadership.is_leader()
            && let Some(
                fleet_contracts::names::DeviceKey::Deployment { device, .. }
                | fleet_contracts::names::DeviceKey::Os { device },
            ) = fleet_contracts::names::parse_device_key(&entry.key)
        {
            crate::gateway::ring(shared, device).await;
        }
    }
    Ok(())
}

fn clear(shared: &Operator, index: usize) {
    let mut fleet = shared.fleet.write().unwrap();
    match index {
        0 => {
            fleet.deployments.clear();
            fleet.devices.clear();
            fleet.resumes.clear();
            fleet.store = None;
            fleet.adoptions.clear();
            fleet.os_upgrades.clear();
        }
        1 => {
            fleet.reported.clear();
            fleet.heartbeats.clear();
            fleet.os_reports.clear();
        }
        2 => {
            fleet.desired.clear();
            fleet.desired_revision = 0;
        }
        _ => fleet.identities.clear(),
    }
}

fn value(entry: &kv::Entry) -> Option<&[u8]> {
    matches!(entry.operation, Operation::Put).then_some(entry.value.as_ref())
}

fn apply_resource(shared: &Operator, entry: &kv::Entry) -> Result<bool, String> {
    let mut fleet = shared.fleet.write().unwrap();
    let Some((kind, name)) = entry.key.split_once('.') else {
        return Err("not a <kind>.<name> key".into());
    };
    match (kind, value(entry)) {
        ("deployment", None) => fleet.deployments.remove(name).is_some(),
        ("device", None) => {
            // Its reports were purged with it (a purge leaves nothing for a watch to see).
            fleet.reported.remove(name);
            fleet.heartbeats.remove(name);
            fleet.os_reports.remove(name);
            fleet.devices.remove(name).is_some()
        }
        ("osupgrade", None) => fleet.os_upgrades.remove(name).is_some(),
        ("osupgrade", Some(bytes)) => {
            let u: OsUpgrade = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            fleet.os_upgrades.insert(name.to_owned(), u);
            true
        }
        ("rollout", None) => fleet.resumes.remove(name).is_some(),
        ("fleet", None) if name == "store" => fleet.store.take().is_some(),
        ("fleet", Some(bytes)) if name == "store" => {
            fleet.store = Some(serde_json::from_slice(bytes).map_err(|e| e.to_string())?);
            true
        }
        ("adoption", None) => fleet.adoptions.remove(name).is_some(),
        ("adoption", Some(bytes)) => {
            let a = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            fleet.adoptions.insert(name.to_owned(), a);
            true
        }
        ("rollout", Some(bytes)) => {
            let r: fleet_contracts::state::RolloutResume =
                serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            fleet.resumes.insert(name.to_owned(), r);
            true
        }
        ("deployment", Some(bytes)) => {
            let d: Deployment = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            fleet.deployments.insert(name.to_owned(), d);
            true
        }
        ("device", Some(bytes)) => {
            let d: Device = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            fleet.devices.insert(name.to_owned(), d);
            true
        }
        (other, _) => return Err(format!("unknown resource kind {other:?}")),
    };
    Ok(true)
}

fn apply_reported(shared: &Operator, entry: &kv::Entry) -> Result<bool, String> {
    let mut fleet = shared.fleet.write().unwrap();
    fleet.apply_reported(&entry.key, value(entry), stored_at_ms(entry))?;
    // A deployment's report can move a staged rollout on, an OS report a campaign;
    // heartbeats cannot.
    Ok(match fleet_contracts::names::parse_device_key(&entry.key) {
        Some(fleet_contracts::names::DeviceKey::Deployment { .. }) => {
            fleet.deployments.values().any(|d| d.spec.rollout.is_some())
        }
        Some(fleet_contracts::names::DeviceKey::Os { .. }) => !fleet.os_upgrades.is_empty(),
        _ => false,
    })
}

fn apply_desired(shared: &Operator, entry: &kv::Entry) -> Result<bool, String> {
    let mut fleet = shared.fleet.write().unwrap();
    fleet.desired_revision = fleet.desired_revision.max(entry.revision);
    match value(entry) {
        Some(bytes) => {
            let stored = Stored {
                bytes: bytes.to_vec(),
                at_ms: stored_at_ms(entry),
            };
            fleet.desired.insert(entry.key.clone(), stored);
        }
        None => {
            fleet.desired.remove(&entry.key);
        }
    };
    Ok(true)
}

/// When NATS stored the entry, by the server's clock.
fn stored_at_ms(entry: &kv::Entry) -> u64 {
    (entry.created.unix_timestamp_nanos() / 1_000_000) as u64
}

fn apply_identity(shared: &Operator, entry: &kv::Entry) -> Result<bool, String> {
    // Tokens and the revocation list share the bucket; only device records matter here.
    let Some(device) = entry.key.strip_prefix("device.") else {
        return Ok(false);
    };
    let mut fleet = shared.fleet.write().unwrap();
    match value(entry) {
        Some(bytes) => {
            let identity = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
            fleet.identities.insert(device.to_owned(), identity);
        }
        None => {
            fleet.identities.remove(device);
        }
    }
    Ok(false)
}

/// Writes the desired bucket whenever the resources or the bucket change, and on a timer.
async fn fan_out_loop(shared: Arc<Operator>, resync: Duration) {
    loop {
        tokio::select! {
            _ = shared.changed.notified() => {}
            _ = shared.leadership.gained.notified() => {}
            _ = tokio::time::sleep(resync) => {}
        }
        // Only the leader writes, and only from a complete view: acting on a partial one
        // would delete the desired keys of resources not read yet.
        if !shared.caught_up() || !shared.leadership.is_leader() {
            shared.written.store(false, Ordering::Release);
            continue;
        }
        let written_at = now_ms();
        let (work, view_store) = {
            let fleet = shared.fleet.read().unwrap();
            (fleet.fan_out(written_at), fleet.store.clone())
        };
        // The store marker tells every operator that devices may be answered as this store:
        // written only if the view's identity is the store's current one. A view whose
        // resources watch lags (a restore just began) would otherwise mark the desired bucket
        // with the old identity while the restore's writes reach it.
        if work
            .put
            .iter()
            .any(|(k, _)| k == fleet_contracts::names::DESIRED_STORE_KEY)
        {
            let current = match shared.buckets.resources.get(STORE_KEY).await {
                Ok(Some(bytes)) => serde_json::from_slice::<StoreIdentity>(&bytes).ok(),
                Ok(None) => None,
                Err(e) => {
                    warn!(error = %e, "cannot read the store identity; the next pass retries");
                    continue;
                }
            };
            if current != view_store {
                debug!("the view's store identity is behind the store's; waiting for the watch");
                continue;
            }
        }
        if work.put.is_empty() && work.delete.is_empty() {
            if !shared.written.swap(true, Ordering::AcqRel) {
                info!("converged: the desired state matches every resource");
                // A leader that has just started, taken over or re-read its buckets may have
                // missed rings a device was owed: every device with desired keys asks again.
                ring_all(&shared).await;
            }
            continue;
        }
        debug!(
            puts = work.put.len(),
            deletes = work.delete.len(),
            "fan-out"
        );
        let desired = &shared.buckets.desired;
        // Pipelined: every publish goes out before the first ack is awaited.
        let puts = work.put.iter().map(|(key, bytes)| async move {
            (
                key,
                desired
                    .put(key, bytes.clone().into())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
            )
        });
        let deletes = work
            .delete
            .iter()
            .map(|key| async move { (key, desired.delete(key).await.map_err(|e| e.to_string())) });
        let puts: Vec<_> = futures::future::join_all(puts).await;
        let deletes: Vec<_> = futures::future::join_all(deletes).await;
        let mut fleet = shared.fleet.write().unwrap();
        let failed =
            puts.iter().any(|(_, r)| r.is_err()) || deletes.iter().any(|(_, r)| r.is_err());
        for ((key, result), (_, bytes)) in puts.into_iter().zip(&work.put) {
            match result {
                Ok(()) => {
                    shared.metrics.desired_puts.fetch_add(1, Ordering::Relaxed);
                    // Record what was written now, so the next pass does not write it again
                    // before the watch echoes it back (with the server's time).
                    let stored = Stored {
                        bytes: bytes.clone(),
                        at_ms: written_at,
                    };
                    fleet.desired.insert(key.clone(), stored);
                }
                Err(e) => {
                    shared
                        .metrics
                        .fan_out_errors
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(%key, error = %e, "desired write failed; the next pass retries");
                }
            }
        }
        for (key, result) in deletes {
            match result {
                Ok(()) => {
                    shared
                        .metrics
                        .desired_deletes
                        .fetch_add(1, Ordering::Relaxed);
                    fleet.desired.remove(key);
                }
                Err(e) => {
                    shared
                        .metrics
                        .fan_out_errors
                        .fetch_add(1, Ordering::Relaxed);
                    warn!(%key, error = %e, "desired delete failed; the next pass retries");
                }
            }
        }
        drop(fleet);
        // A pass that wrote something is followed by one that checks nothing is left (that
        // one marks the state converged); a failed write is retried at the next resync.
        if failed {
            shared.written.store(false, Ordering::Release);
        } else {
            shared.changed.notify_one();
        }
    }
}
