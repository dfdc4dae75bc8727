//! The agent's NATS side: replays and follows its own desired keys, and publishes its reports.
//!
//! Desired state arrives through a named ordered push consumer on the desired bucket's stream,
//! filtered to `$KV.fleet-desired.<device>.>` (async-nats then uses the filtered
//! consumer-create subject, which per-device permissions can allow). It deliberately avoids
//! async-nats' `Store::watch*` helpers: they create consumers through the unfiltered subject
//! and need `STREAM.INFO`, which a device must not be granted (docs/adr/0007).
//!
//! Reports go out with plain JetStream publishes to the device's own reported keys, through an
//! outbox that coalesces by key and retries until NATS acknowledges, so nothing reported while
//! disconnected is lost and only the newest value per key is sent.

use std::{collections::BTreeMap, time::Duration};

use async_nats::{
    HeaderMap,
    jetstream::{self, consumer::DeliverPolicy, consumer::push::OrderedConfig},
};
use fleet_contracts::{
    names::{self, DESIRED_BUCKET, REPORTED_BUCKET},
    state::DesiredDeployment,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// A desired value as received: parsed, or the reason it could not be.
pub type DesiredValue = Result<DesiredDeployment, String>;

#[derive(Debug)]
pub enum DesiredEvent {
    /// The complete desired state after a replay: replaces everything the agent knew.
    Snapshot(BTreeMap<String, DesiredValue>),
    /// A deployment was added or changed after the replay.
    Put(String, DesiredValue),
    /// A deployment was removed after the replay.
    Delete(String),
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
        .custom_inbox_prefix(format!("_INBOX.dev.{device}"))
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
                    async_nats::Event::ServerError(async_nats::ServerError::Other(error))
                        if is_refused_consumer_delete(&error) =>
                    {
                        debug!(%device, %error, "the server refused async-nats' clean-up of an old consumer (expected: devices may not delete consumers; it expires by itself)");
                    }
                    // Permission violations arrive only here; the failed call just times out.
                    other => warn!(%device, event = %other, "NATS event"),
                }
            }
        })
        .connect(servers(url))
        .await?;
    Ok((client, connections))
}

/// Whether a server error is the refusal of a consumer delete. After a reconnect async-nats'
/// ordered consumer deletes its old consumer before making a new one; a device may not delete
/// consumers (the name is one token, so a grant could not be limited to the device's own), so
/// the server refuses it with a permissions violation on every reconnect. Expected, not a
/// warning: the old consumer expires by itself.
fn is_refused_consumer_delete(error: &str) -> bool {
    error.starts_with("Permissions Violation for Publish to")
        && error.contains("\"$JS.API.CONSUMER.DELETE.")
}

/// `nats://a:4222,nats://b:4222` -> each server of a cluster; the client fails over between them.
pub fn servers(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).collect()
}

/// Follows this device's desired keys forever, sending events to the reconciler.
///
/// After a reconnect it starts over with a fresh consumer (and a full replay) instead of
/// letting async-nats recreate the ordered consumer: that recreation retries silently forever
/// and, when a create times out on a cluster electing leaders but happened anyway, it keeps
/// failing on the name it already used, so the device would hear nothing more.
pub async fn follow_desired(
    js: jetstream::Context,
    device: String,
    tx: mpsc::Sender<DesiredEvent>,
    mut connections: Connections,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(250);
    let mut backoff = FIRST_BACKOFF;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        connections.borrow_and_update();
        let reconnected = async {
            if connections.changed().await.is_err() {
                // The client is gone; nothing will reconnect.
                std::future::pending::<()>().await;
            }
        };
        let started = tokio::time::Instant::now();
        let followed = tokio::select! {
            r = replay_and_follow(&js, &device, attempt, &tx) => r,
            () = reconnected => {
                // Not a failure: start over soon (jittered, so a fleet that lost its server
                // does not come back in lockstep).
                debug!(%device, "reconnected to NATS; following the desired state afresh");
                backoff = FIRST_BACKOFF;
                tokio::time::sleep(jittered(FIRST_BACKOFF)).await;
                continue;
            }
        };
        if started.elapsed() > Duration::from_secs(30) {
            backoff = FIRST_BACKOFF; // It worked for a while: this is a new failure.
        }
        match followed {
            Ok(()) => return, // The reconciler is gone: the agent is shutting down.
            Err(e) => {
                // Jitter, so a fleet that lost its server does not come back in lockstep and
                // flood the JetStream API queue with consumer creates.
                let wait = jittered(backoff);
                warn!(%device, error = %e, retry_in = ?wait, "desired-state stream failed");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// `base` plus up to 50 % more, varied per process and per call. Not cryptographic: the clock's
/// nanoseconds and the process id are random enough to spread devices apart.
fn jittered(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let spread = (nanos ^ std::process::id().wrapping_mul(2_654_435_761)) % 1000;
    base + base.mul_f64(f64::from(spread) / 2000.0)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn replay_and_follow(
    js: &jetstream::Context,
    device: &str,
    attempt: u32,
    tx: &mpsc::Sender<DesiredEvent>,
) -> Result<(), BoxError> {
    let prefix = format!("$KV.{DESIRED_BUCKET}.{device}.");
    let config = OrderedConfig {
        // A fresh name per process and attempt: a consumer left by a previous run (it expires
        // by itself) never clashes with this one.
        name: Some(format!("agent-{device}-{}-{attempt}", std::process::id())),
        filter_subject: names::device_filter(DESIRED_BUCKET, device),
        deliver_subject: js.client().new_inbox(),
        deliver_policy: DeliverPolicy::LastPerSubject,
        ..Default::default()
    };
    let consumer = js
        .create_consumer_on_stream(config, names::kv_stream(DESIRED_BUCKET))
        .await?;
    let mut pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await?;
    let mut snapshot = Some(BTreeMap::new());
    debug!(%device, pending, "replaying desired state");
    if pending == 0 {
        let done = snapshot.take().unwrap_or_default();
        if tx.send(DesiredEvent::Snapshot(done)).await.is_err() {
            return Ok(());
        }
    }
    while let Some(message) = messages.next().await {
        let message = message?;
        let Some(deployment) = message.subject.as_str().strip_prefix(&prefix) else {
            continue;
        };
        if names::check_name(deployment).is_err() {
            warn!(%device, key = %message.subject, "ignoring a desired key that is not a deployment name");
            continue;
        }
        let deleted = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
        let value = (!deleted).then(|| parse_desired(deployment, &message.payload));
        if let Ok(info) = message.info() {
            pending = info.pending;
        }
        let event = match (&mut snapshot, value) {
            (Some(snap), Some(v)) => {
                snap.insert(deployment.to_owned(), v);
                None
            }
            (Some(snap), None) => {
                snap.remove(deployment);
                None
            }
            (None, Some(v)) => Some(DesiredEvent::Put(deployment.to_owned(), v)),
            (None, None) => Some(DesiredEvent::Delete(deployment.to_owned())),
        };
        let event = match event {
            Some(e) => Some(e),
            None if pending == 0 => snapshot.take().map(DesiredEvent::Snapshot),
            None => None,
        };
        if let Some(event) = event {
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
    Err("the desired-state consumer ended".into())
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

    #[test]
    fn only_a_refused_consumer_delete_is_expected() {
        // As nats-server 2.10 words it (seen in the agent's log after a reconnect).
        let delete = r#"Permissions Violation for Publish to "$JS.API.CONSUMER.DELETE.KV_fleet-desired.agent-pi-01-9000-2""#;
        assert!(is_refused_consumer_delete(delete));
        for other in [
            r#"Permissions Violation for Publish to "$JS.API.CONSUMER.CREATE.KV_fleet-desired.x""#,
            r#"Permissions Violation for Subscription to "$JS.API.CONSUMER.DELETE.KV_fleet-desired.x""#,
            r#"Permissions Violation for Publish to "$KV.fleet-reported.pi-02.hello""#,
            "Maximum Payload Violation",
        ] {
            assert!(!is_refused_consumer_delete(other), "{other}");
        }
    }
}

fn parse_desired(deployment: &str, payload: &[u8]) -> DesiredValue {
    let d: DesiredDeployment = serde_json::from_slice(payload)
        .map_err(|e| format!("cannot read the desired state of {deployment}: {e}"))?;
    if d.deployment != deployment {
        return Err(format!(
            "desired value under key {deployment} names deployment {:?}",
            d.deployment
        ));
    }
    Ok(d)
}

/// Reported values waiting to be published: the newest per key, `None` meaning delete.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<(String, Option<Vec<u8>>)>,
}

impl Outbox {
    /// Queues `value` for the reported key `key` (`<device>.<deployment>` or `<device>._info`).
    pub fn put(&self, key: String, value: Vec<u8>) {
        let _ = self.tx.send((key, Some(value)));
    }

    pub fn delete(&self, key: String) {
        let _ = self.tx.send((key, None));
    }
}

/// Starts the publisher task behind an [`Outbox`]. Reports queue until `js` arrives (the
/// device may still be enrolling) and NATS acknowledges them.
pub fn outbox(js: tokio::sync::oneshot::Receiver<jetstream::Context>) -> Outbox {
    let (tx, mut rx) = mpsc::unbounded_channel::<(String, Option<Vec<u8>>)>();
    tokio::spawn(async move {
        let Ok(js) = js.await else { return };
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
            let mut failed = false;
            while let Some((key, value)) = pending.pop_first() {
                if let Err(e) = publish(&js, &key, value.as_deref()).await {
                    debug!(%key, error = %e, "report not published yet; will retry");
                    pending.insert(key, value);
                    failed = true;
                    break;
                }
                // Newer values for other keys may have arrived meanwhile; take them too.
                while let Ok((k, v)) = rx.try_recv() {
                    pending.insert(k, v);
                }
            }
            if failed {
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
            } else {
                retry = Duration::from_millis(200);
            }
        }
    });
    Outbox { tx }
}

async fn publish(js: &jetstream::Context, key: &str, value: Option<&[u8]>) -> Result<(), BoxError> {
    let subject = names::kv_subject(REPORTED_BUCKET, key);
    let ack = match value {
        Some(v) => js.publish(subject, v.to_vec().into()).await?,
        None => {
            let mut headers = HeaderMap::new();
            headers.insert("KV-Operation", "DEL");
            js.publish_with_headers(subject, headers, Default::default())
                .await?
        }
    };
    tokio::time::timeout(Duration::from_secs(5), ack).await??;
    Ok(())
}
