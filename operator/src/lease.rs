//! Active/passive operators: a lease in NATS KV decides which one leads (writes desired state);
//! the others stand by with a warm view and take over when the leader stops renewing.
//!
//! The lease is one key, `fleet-lease` `operator`, naming its holder. The holder renews it by
//! compare-and-set on the revision it last wrote, every third of the lease time. A standby
//! reads the key as often; when the revision has not moved for a whole lease time by its own
//! monotonic clock, it takes the lease by compare-and-set on that revision, so of several
//! standbys exactly one wins. A leader counts its lease from the moment it *sent* the last
//! renewal that succeeded and stops leading a margin before a lease time has passed: it stops
//! before any standby can start, and no two machines' clocks are ever compared.
//!
//! A leader that loses NATS stops leading when its lease runs out; one that finds the
//! revision moved (someone took over) stops at once. On shutdown the leader releases the lease
//! (compare-and-set delete), so a standby takes over within one poll instead of a lease time.
//!
//! Should two operators lead for a moment anyway (a paused process), they write the same
//! bytes: fan-out is canonical, byte-deterministic and skipped when the bytes are equal
//! ([`crate::fleet::Fleet::fan_out`]), and rollout timing comes from KV, not from memory.

use std::{
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use fleet_contracts::{SCHEMA_VERSION, names::LEASE_KEY, state::Lease};
use tokio::time::Instant;
use tracing::{info, warn};

/// Who leads, as this operator sees it.
#[derive(Debug)]
pub struct Leadership {
    pub instance: String,
    pub ttl: Duration,
    state: Mutex<State>,
    /// Woken when this operator becomes leader.
    pub gained: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct State {
    /// While leading: the revision last written and when the lease runs out here.
    held: Option<(u64, Instant)>,
    /// The holder named in the key, as last read.
    leader: Option<String>,
}

impl Leadership {
    pub fn new(instance: String, ttl: Duration) -> Leadership {
        Leadership {
            instance,
            ttl,
            state: Mutex::default(),
            gained: tokio::sync::Notify::new(),
        }
    }

    /// True while this operator holds a lease that has not run out.
    pub fn is_leader(&self) -> bool {
        self.state
            .lock()
            .unwrap()
            .held
            .is_some_and(|(_, until)| Instant::now() < until)
    }

    /// The holder of the lease as last seen (this operator's name while it leads).
    pub fn leader(&self) -> Option<String> {
        if self.is_leader() {
            return Some(self.instance.clone());
        }
        self.state.lock().unwrap().leader.clone()
    }

    /// How long before the lease time a leader stops, for the delay between its sending a
    /// renewal and the standby reading it.
    fn margin(&self) -> Duration {
        self.ttl / 5
    }

    fn hold(&self, revision: u64, sent: Instant) {
        let mut state = self.state.lock().unwrap();
        let was = state.held.is_some_and(|(_, until)| Instant::now() < until);
        state.held = Some((revision, sent + self.ttl - self.margin()));
        state.leader = Some(self.instance.clone());
        drop(state);
        if !was {
            info!(instance = %self.instance, "leading: this operator writes desired state now");
            self.gained.notify_one();
        }
    }

    fn lose(&self, why: &str) {
        let mut state = self.state.lock().unwrap();
        if state.held.take().is_some() {
            warn!(instance = %self.instance, why, "no longer leading");
        }
    }

    fn held_revision(&self) -> Option<u64> {
        let state = self.state.lock().unwrap();
        state
            .held
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(rev, _)| rev)
    }
}

fn lease_bytes(instance: &str, ttl: Duration) -> bytes::Bytes {
    let lease = Lease {
        schema: SCHEMA_VERSION,
        holder: instance.to_owned(),
        ttl_ms: ttl.as_millis() as u64,
        renewed_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    serde_json::to_vec(&lease)
        .expect("a lease serializes")
        .into()
}

/// Takes, renews and watches the lease until the process ends.
pub async fn run(store: kv::Store, leadership: std::sync::Arc<Leadership>) {
    let every = leadership.ttl / 3;
    let me = leadership.instance.clone();
    // The revision last read and when it was first seen, by this process's clock.
    let mut seen: Option<(u64, Instant)> = None;
    loop {
        let sent = Instant::now();
        if let Some(revision) = leadership.held_revision() {
            let renewal = store.update(LEASE_KEY, lease_bytes(&me, leadership.ttl), revision);
            match tokio::time::timeout(every, renewal).await {
                Ok(Ok(next)) => leadership.hold(next, sent),
                Ok(Err(e)) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    leadership.lose("another operator took the lease");
                    seen = None;
                }
                Ok(Err(e)) => warn!(error = %e, "cannot renew the lease; retrying"),
                Err(_) => warn!("renewing the lease timed out; retrying"),
            }
        } else {
            leadership.lose("the lease ran out before it could be renewed");
            match store.entry(LEASE_KEY).await {
                Ok(entry) => {
                    let free = entry.as_ref().is_none_or(|e| e.operation != Operation::Put);
                    let holder = entry
                        .as_ref()
                        .filter(|e| e.operation == Operation::Put)
                        .and_then(|e| serde_json::from_slice::<Lease>(&e.value).ok())
                        .map(|l| l.holder);
                    let revision = entry.as_ref().map_or(0, |e| e.revision);
                    let now = Instant::now();
                    let stale = match seen {
                        Some((rev, since)) if rev == revision => {
                            now.duration_since(since) >= leadership.ttl
                        }
                        _ => {
                            seen = Some((revision, now));
                            false
                        }
                    };
                    leadership.state.lock().unwrap().leader = holder.clone();
                    if free || stale || holder.as_deref() == Some(me.as_str()) {
                        let bytes = lease_bytes(&me, leadership.ttl);
                        // Err((lost to another operator, why)) when not taken.
                        let taken = match entry {
                            None => store.create(LEASE_KEY, bytes).await.map_err(|e| {
                                (e.kind() == CreateErrorKind::AlreadyExists, e.to_string())
                            }),
                            Some(_) => {
                                store.update(LEASE_KEY, bytes, revision).await.map_err(|e| {
                                    (
                                        e.kind() == UpdateErrorKind::WrongLastRevision,
                                        e.to_string(),
                                    )
                                })
                            }
                        };
                        match taken {
                            Ok(next) => {
                                if let Some(old) = holder.filter(|h| h != &me) {
                                    info!(previous = %old, "took over the lease from a silent leader");
                                }
                                leadership.hold(next, sent);
                            }
                            Err((true, _)) => info!("another operator was quicker to the lease"),
                            Err((false, e)) => warn!(error = %e, "cannot take the lease; retrying"),
                        }
                    }
                }
                Err(e) => warn!(error = %e, "cannot read the lease; standing by"),
            }
        }
        tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
    }
}

/// Gives the lease up, if held, so a standby takes over at once (used on shutdown).
pub async fn release(store: &kv::Store, leadership: &Leadership) {
    if let Some(revision) = leadership.held_revision() {
        leadership.lose("shutting down");
        match store
            .delete_expect_revision(LEASE_KEY, Some(revision))
            .await
        {
            Ok(()) => info!("released the lease"),
            Err(e) => {
                warn!(error = %e, "cannot release the lease; a standby takes over when it runs out")
            }
        }
    }
}
