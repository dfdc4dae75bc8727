//! The agent's NATS side: its whole desired state on request, and its reports, both through
//! the operator over core NATS. A device uses no JetStream at all (docs/adr/0010): nothing it
//! sends can make the server publish on its behalf to a subject it chose.
//!
//! Desired state: the agent asks for all of it on `fleet.sync.<device>` at start, after every
//! (re)connect, whenever the operator rings `fleet.dev.<device>.desired`, and every
//! `desired_sync_secs` as a safety net for a missed ring. Each answer is complete and replaces
//! everything the agent knew; an answer older than one already applied (from an operator whose
//! view lags) is ignored. An operator that has not read the whole desired bucket yet says so
//! instead of answering.
//!
//! Reports go out as requests on `fleet.report.<device>`, through an outbox that coalesces by
//! key and sends again until the operator has stored them, so nothing reported while
//! disconnected is lost and only the newest value per key is sent. An entry the operator
//! refuses for good is dropped and logged.

use std::{collections::BTreeMap, time::Duration};

use fleet_contracts::{
    SCHEMA_VERSION, names,
    rpc::{
        MAX_REPORT_BYTES, MAX_REPORT_ENTRIES, ReportEntry, ReportReply, ReportRequest, SyncReply,
        SyncRequest,
    },
    state::{DesiredDeployment, DesiredOs, StoreRef},
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// A desired value as received: parsed, or the reason it could not be.
pub type DesiredValue = Result<DesiredDeployment, String>;

/// The device's complete desired state as one answer gave it, and the store it came from:
/// [`crate::store`] decides what of it to apply.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredSnapshot {
    pub desired: BTreeMap<String, DesiredValue>,
    pub store: Option<StoreRef>,
    /// An admin adopted the device from this store.
    pub accept: Option<StoreRef>,
    /// An admin released the device's held deployments.
    pub release_held: bool,
    /// The OS upgrade to make, or why the value could not be read.
    pub os: Option<Result<Box<DesiredOs>, String>>,
}

/// Counts the connections made (the first and every reconnect).
pub type Connections = tokio::sync::watch::Receiver<u64>;

/// Connects to NATS in the background: the agent must work (from its cache) while NATS is down.
/// `options` carries the device's credentials; the connection is TLS, to a server signed by
/// the fleet CA `ca`. The [`Connections`] count lets [`follow_desired`] start afresh after a
/// reconnect.
pub async fn connect(
    options: async_nats::ConnectOptions,
    url: &str,
    ca: &std::path::Path,
    device: &str,
) -> Result<(async_nats::Client, Connections), async_nats::ConnectError> {
    let device_name = device.to_owned();
    let (count, connections) = tokio::sync::watch::channel(0u64);
    let client = options
        .add_root_certificates(ca.to_owned())
        .require_tls(true)
        .name(format!("fleet-agent {device}"))
        // Its own inbox prefix: replies to other devices are out of its reach (`_INBOX.>` is
        // not granted).
        .custom_inbox_prefix(names::device_inbox(device))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let device = device_name.clone();
            if matches!(event, async_nats::Event::Connected) {
                count.send_modify(|n| *n += 1);
            }
            async move {
                match event {
                    async_nats::Event::Connected => info!(%device, "connected to NATS"),
                    async_nats::Event::Disconnected => warn!(%device, "disconnected from NATS"),
                    // Permission violations arrive only here; the failed call just times out.
                    other => warn!(%device, event = %other, "NATS event"),
                }
            }
        })
        .connect(servers(url))
        .await?;
    Ok((client, connections))
}

/// `nats://a:4222,nats://b:4222` -> each server of a cluster; the client fails over between them.
pub fn servers(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).collect()
}

/// Keeps the reconciler's desired state current forever (see the module docs).
pub async fn follow_desired(
    client: async_nats::Client,
    device: String,
    tx: mpsc::Sender<DesiredSnapshot>,
    mut connections: Connections,
    every: Duration,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(250);
    let mut doorbell = loop {
        match client
            .subscribe(names::desired_doorbell_subject(&device))
            .await
        {
            Ok(s) => break s,
            Err(e) => {
                warn!(%device, error = %e, "cannot hear the operator's doorbell yet");
                tokio::time::sleep(jittered(Duration::from_secs(1))).await;
            }
        }
    };
    let mut timer = tokio::time::interval(every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    timer.tick().await; // The first tick is now; the first sync happens anyway.
    // The newest revision taken per store (a handful over a device's life): an answer of
    // another store in between does not reset the guard against a lagging operator.
    let mut applied: BTreeMap<Option<StoreRef>, u64> = BTreeMap::new();
    let mut backoff = FIRST_BACKOFF;
    let mut due = true;
    loop {
        if due {
            match sync_once(&client, &device).await {
                // Revisions count within one store only: a rebuilt or restored store starts
                // again (and what to do with another store is `crate::store`'s decision).
                Ok(Synced::Desired(revision, snapshot))
                    if applied.get(&snapshot.store).is_some_and(|a| revision < *a) =>
                {
                    debug!(%device, revision, applied = ?applied, "an answer older than the one applied; asking again");
                }
                Ok(Synced::Desired(revision, snapshot)) => {
                    debug!(%device, revision, deployments = snapshot.desired.len(), "desired state received");
                    applied.insert(snapshot.store.clone(), revision);
                    if tx.send(snapshot).await.is_err() {
                        return; // The reconciler is gone: the agent is shutting down.
                    }
                    due = false;
                    backoff = FIRST_BACKOFF;
                }
                Ok(Synced::NotReady) => {
                    debug!(%device, "the operator is still reading the desired state");
                }
                Err(e) => {
                    warn!(%device, error = %e, "cannot get the desired state yet");
                    if timed_out(&e) {
                        // The wait for an answer was the pause: ask again soon (another
                        // operator of the queue group likely answers).
                        backoff = FIRST_BACKOFF;
                    }
                }
            }
            if due {
                // Jitter, so a fleet that lost its operator does not come back in lockstep.
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        }
        tokio::select! {
            ring = doorbell.next() => match ring {
                Some(_) => due = true,
                None => return, // The client is gone.
            },
            _ = timer.tick() => due = true,
            changed = connections.changed() => {
                if changed.is_err() {
                    std::future::pending::<()>().await;
                }
                // Spread the fleet's reconnect syncs a little.
                tokio::time::sleep(jittered(FIRST_BACKOFF)).await;
                due = true;
            }
        }
    }
}

/// What one sync got.
enum Synced {
    Desired(u64, DesiredSnapshot),
    NotReady,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long a sync or a report waits for its answer. An operator answers in milliseconds; a
/// request that got none most likely went to an operator that is frozen (a paused VM) but
/// still in the responders' queue group, where the server keeps handing it about half of the
/// requests until it drops the connection (minutes, at its ping interval). Asking again soon
/// reaches the live one.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);

/// Whether a request failed for want of an answer in time (not: nobody listens, or a bad
/// answer, which call for the backoff).
fn timed_out(e: &BoxError) -> bool {
    e.downcast_ref::<async_nats::RequestError>()
        .is_some_and(|e| e.kind() == async_nats::RequestErrorKind::TimedOut)
}

async fn sync_once(client: &async_nats::Client, device: &str) -> Result<Synced, BoxError> {
    let body = serde_json::to_vec(&SyncRequest {
        schema: SCHEMA_VERSION,
    })?;
    let reply = client
        .send_request(
            names::sync_subject(device),
            async_nats::Request::new()
                .payload(body.into())
                .timeout(Some(REQUEST_TIMEOUT)),
        )
        .await?;
    match serde_json::from_slice::<SyncReply>(&reply.payload)? {
        SyncReply::Desired {
            revision,
            desired,
            store,
            accept,
            release_held,
            os,
        } => {
            let desired = desired
                .into_iter()
                .filter_map(|(deployment, value)| {
                    if names::check_name(&deployment).is_err() {
                        warn!(%device, key = %deployment, "ignoring a desired key that is not a deployment name");
                        return None;
                    }
                    let parsed = parse_desired(&deployment, value);
                    Some((deployment, parsed))
                })
                .collect();
            let os = os.map(|value| {
                serde_json::from_value::<Box<DesiredOs>>(value)
                    .map_err(|e| format!("unreadable desired OS upgrade: {e}"))
            });
            let snapshot = DesiredSnapshot {
                desired,
                store,
                accept,
                release_held,
                os,
            };
            Ok(Synced::Desired(revision, snapshot))
        }
        SyncReply::NotReady => Ok(Synced::NotReady),
        SyncReply::Refused { reason } => Err(format!("the operator refused: {reason}").into()),
    }
}

/// `base` plus up to 50 % more, varied per process and per call. Not cryptographic: the clock's
/// nanoseconds and the process id are random enough to spread devices apart.
fn jittered(base: Duration) -> Duration {
    let nanos = crate::clock::since_epoch().subsec_nanos();
    let spread = (nanos ^ std::process::id().wrapping_mul(2_654_435_761)) % 1000;
    base + base.mul_f64(f64::from(spread) / 2000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_again() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(2));
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(3),
                "{d:?}"
            );
        }
    }
}

fn parse_desired(deployment: &str, value: serde_json::Value) -> DesiredValue {
    let d: DesiredDeployment = serde_json::from_value(value)
        .map_err(|e| format!("cannot read the desired state of {deployment}: {e}"))?;
    if d.deployment != deployment {
        return Err(format!(
            "desired value under key {deployment} names deployment {:?}",
            d.deployment
        ));
    }
    Ok(d)
}

/// Reported values waiting to be sent: the newest per key, `None` meaning delete.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<(String, Option<Vec<u8>>)>,
}

impl Outbox {
    /// Queues `value` (JSON) for the reported key `key` (`<device>.<deployment>` or
    /// `<device>._info`).
    pub fn put(&self, key: String, value: Vec<u8>) {
        let _ = self.tx.send((key, Some(value)));
    }

    pub fn delete(&self, key: String) {
        let _ = self.tx.send((key, None));
    }
}

/// Most bytes of values in one report request, well under NATS's 1 MiB payload.
const MAX_BATCH_BYTES: usize = 512 * 1024;

/// Starts the sender behind an [`Outbox`] for `device`. Reports queue until `client` arrives
/// (the device may still be enrolling) and the operator has stored them.
pub fn outbox(
    client: tokio::sync::oneshot::Receiver<async_nats::Client>,
    device: String,
) -> Outbox {
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Option<Vec<u8>>)>();
    tokio::spawn(async move {
        let Ok(client) = client.await else { return };
        let prefix = format!("{device}.");
        let mut pending: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let mut retry = Duration::from_millis(200);
        loop {
            if pending.is_empty() {
                match rx.recv().await {
                    Some((k, v)) => {
                        pending.insert(k, v);
                    }
                    None => return,
                }
            }
            while let Ok((k, v)) = rx.try_recv() {
                pending.insert(k, v);
            }
            let batch = take_batch(&mut pending, &prefix);
            if batch.is_empty() {
                continue;
            }
            match send(&client, &device, &batch).await {
                Ok(refused) => {
                    for (key, why) in refused {
                        warn!(%key, reason = %why, "the operator refused a report; dropping it");
                    }
                    retry = Duration::from_millis(200);
                }
                Err(e) => {
                    debug!(error = %e, entries = batch.len(), "reports not stored yet; will retry");
                    if timed_out(&e) {
                        retry = Duration::from_millis(200); // As for a sync: ask again soon.
                    }
                    // Put them back unless something newer for the key came meanwhile.
                    for (key, value) in batch {
                        pending.entry(format!("{prefix}{key}")).or_insert(value);
                    }
                    // Wait for the retry time, but keep collecting (newer values replace older).
                    let sleep = tokio::time::sleep(retry);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            msg = rx.recv() => match msg {
                                Some((k, v)) => { pending.insert(k, v); }
                                None => return,
                            },
                        }
                    }
                    retry = (retry * 2).min(Duration::from_secs(5));
                }
            }
        }
    });
    Outbox { tx }
}

/// Takes up to one request's worth of entries out of `pending` as (key under the device, value).
/// A key that is not the device's own, or a value that is not JSON or is too large, is dropped
/// with a warning: the operator would refuse it forever.
fn take_batch(
    pending: &mut BTreeMap<String, Option<Vec<u8>>>,
    prefix: &str,
) -> Vec<(String, Option<Vec<u8>>)> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    while batch.len() < MAX_REPORT_ENTRIES {
        let Some(entry) = pending.first_entry() else {
            break;
        };
        let size = entry.get().as_ref().map_or(0, Vec::len);
        if !batch.is_empty() && bytes + size > MAX_BATCH_BYTES {
            break;
        }
        let (key, value) = entry.remove_entry();
        let Some(own) = key.strip_prefix(prefix) else {
            warn!(%key, "dropping a report for a key that is not this device's");
            continue;
        };
        if size > MAX_REPORT_BYTES {
            warn!(%key, size, "dropping a report larger than the operator stores");
            continue;
        }
        bytes += size;
        batch.push((own.to_owned(), value));
    }
    batch
}

/// One report request; `Ok` with the entries the operator refused for good.
async fn send(
    client: &async_nats::Client,
    device: &str,
    batch: &[(String, Option<Vec<u8>>)],
) -> Result<BTreeMap<String, String>, BoxError> {
    let mut refused = BTreeMap::new();
    let mut entries = Vec::new();
    for (key, value) in batch {
        let value = match value {
            Some(bytes) => match serde_json::from_slice(bytes) {
                Ok(v) => Some(v),
                Err(e) => {
                    refused.insert(key.clone(), format!("not JSON: {e}"));
                    continue;
                }
            },
            None => None,
        };
        entries.push(ReportEntry {
            key: key.clone(),
            value,
        });
    }
    let request = ReportRequest {
        schema: SCHEMA_VERSION,
        entries,
    };
    let reply = client
        .send_request(
            names::report_subject(device),
            async_nats::Request::new()
                .payload(serde_json::to_vec(&request)?.into())
                .timeout(Some(REQUEST_TIMEOUT)),
        )
        .await?;
    match serde_json::from_slice::<ReportReply>(&reply.payload)? {
        ReportReply::Stored { refused: more } => {
            refused.extend(more);
            Ok(refused)
        }
        ReportReply::Failed { reason } => Err(reason.into()),
    }
}
