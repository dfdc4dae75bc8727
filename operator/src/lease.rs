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

use std::{sync::Mutex, time::Duration};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use fleet_contracts::{SCHEMA_VERSION, names::LEASE_KEY, state::Lease};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::clock;

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
            .is_some_and(|(_, until)| clock::now() < until)
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
        let was = state.held.is_some_and(|(_, until)| clock::now() < until);
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
            .filter(|(_, until)| clock::now() < *until)
            .map(|(rev, _)| rev)
    }
}

fn lease_bytes(instance: &str, ttl: Duration) -> bytes::Bytes {
    let lease = Lease {
        schema: SCHEMA_VERSION,
        holder: instance.to_owned(),
        ttl_ms: ttl.as_millis() as u64,
        renewed_at_ms: clock::unix_ms(),
    };
    serde_json::to_vec(&lease)
        .expect("a lease serializes")
        .into()
}

/// The lease key as a standby read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    pub revision: u64,
    /// `None`: the key was deleted or purged (released). `Some(None)`: a value that does not
    /// read as a lease. `Some(Some(name))`: held by `name`.
    pub holder: Option<Option<String>>,
}

/// What a standby does about the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// Someone else holds it and renews it: stand by.
    Wait,
    /// There has never been a key: create it.
    Create,
    /// Free (released), silent for a whole lease time, or already ours: take it by
    /// compare-and-set on the revision read.
    Take,
}

/// The standby's decision, a pure function of what it saw before (`seen`: a revision and
/// when it was first seen, by this process's monotonic clock), what it reads now (`read`;
/// `None` when there is no key), the time now, the lease time and its own name. Returns the
/// decision and what to remember as seen. No clock of another machine is ever compared: a
/// lease is silent when *its revision* has not moved for a whole lease time here.
pub fn decide(
    seen: Option<(u64, Instant)>,
    read: Option<&Read>,
    now: Instant,
    ttl: Duration,
    me: &str,
) -> (Takeover, Option<(u64, Instant)>) {
    let revision = read.map_or(0, |r| r.revision);
    let (stale, seen) = match seen {
        Some((rev, since)) if rev == revision => {
            (now.duration_since(since) >= ttl, Some((rev, since)))
        }
        _ => (false, Some((revision, now))),
    };
    let takeover = match read {
        None => Takeover::Create,
        Some(Read { holder: None, .. }) => Takeover::Take,
        Some(Read {
            holder: Some(holder),
            ..
        }) => {
            if stale || holder.as_deref() == Some(me) {
                Takeover::Take
            } else {
                Takeover::Wait
            }
        }
    };
    (takeover, seen)
}

/// Takes, renews and watches the lease until the process ends.
pub async fn run(store: kv::Store, leadership: std::sync::Arc<Leadership>) {
    let every = leadership.ttl / 3;
    let me = leadership.instance.clone();
    // The revision last read and when it was first seen, by this process's clock.
    let mut seen: Option<(u64, Instant)> = None;
    loop {
        let sent = clock::now();
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
                    let read = entry.map(|e| Read {
                        revision: e.revision,
                        holder: (e.operation == Operation::Put).then(|| {
                            serde_json::from_slice::<Lease>(&e.value)
                                .ok()
                                .map(|l| l.holder)
                        }),
                    });
                    let holder = read.as_ref().and_then(|r| r.holder.clone().flatten());
                    leadership.state.lock().unwrap().leader = holder.clone();
                    let (takeover, next_seen) =
                        decide(seen, read.as_ref(), clock::now(), leadership.ttl, &me);
                    seen = next_seen;
                    if takeover != Takeover::Wait {
                        let bytes = lease_bytes(&me, leadership.ttl);
                        // Err((lost to another operator, why)) when not taken.
                        let taken = match takeover {
                            Takeover::Create => store.create(LEASE_KEY, bytes).await.map_err(|e| {
                                (e.kind() == CreateErrorKind::AlreadyExists, e.to_string())
                            }),
                            _ => store
                                .update(LEASE_KEY, bytes, read.map_or(0, |r| r.revision))
                                .await
                                .map_err(|e| {
                                    (
                                        e.kind() == UpdateErrorKind::WrongLastRevision,
                                        e.to_string(),
                                    )
                                }),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_takes_over_a_free_silent_or_own_lease_and_waits_otherwise() {
        let ttl = Duration::from_secs(6);
        let t0 = clock::now();
        let held = |rev: u64, by: &str| Read {
            revision: rev,
            holder: Some(Some(by.to_owned())),
        };
        let released = Read {
            revision: 9,
            holder: None,
        };
        let garbled = Read {
            revision: 4,
            holder: Some(None),
        };
        let (b3, b4, a3) = (held(3, "b"), held(4, "b"), held(3, "a"));
        let later = |secs| t0 + Duration::from_secs(secs);
        // (seen before, read now, now) -> (decision, seen after)
        type Seen = Option<(u64, Instant)>;
        let table: Vec<(Seen, Option<&Read>, Instant, Takeover, Seen)> = vec![
            // No key at all: create it.
            (None, None, t0, Takeover::Create, Some((0, t0))),
            // Released (deleted or purged): take it at once, whoever held it.
            (None, Some(&released), t0, Takeover::Take, Some((9, t0))),
            // Another's lease, first seen: wait, and start counting from now.
            (None, Some(&b3), t0, Takeover::Wait, Some((3, t0))),
            // Still the same revision, not yet a lease time: wait, counting from the first sight.
            (
                Some((3, t0)),
                Some(&b3),
                later(5),
                Takeover::Wait,
                Some((3, t0)),
            ),
            // The same revision for a whole lease time: the holder is silent, take it.
            (
                Some((3, t0)),
                Some(&b3),
                later(6),
                Takeover::Take,
                Some((3, t0)),
            ),
            // The revision moved (renewed): wait, counting afresh.
            (
                Some((3, t0)),
                Some(&b4),
                later(7),
                Takeover::Wait,
                Some((4, later(7))),
            ),
            // Our own name (a restart within the lease time): take it back at once.
            (None, Some(&a3), t0, Takeover::Take, Some((3, t0))),
            // A value that is no lease: only silence makes it ours.
            (None, Some(&garbled), t0, Takeover::Wait, Some((4, t0))),
            (
                Some((4, t0)),
                Some(&garbled),
                later(6),
                Takeover::Take,
                Some((4, t0)),
            ),
        ];
        for (i, (seen, read, now, want, want_seen)) in table.into_iter().enumerate() {
            assert_eq!(
                decide(seen, read, now, ttl, "a"),
                (want, want_seen),
                "row {i}: seen {seen:?}, read {read:?}"
            );
        }
    }

    /// A leader counts its lease from when it sent the renewal and stops a margin before the
    /// lease time, so it has stopped before any standby can start (a standby waits a whole
    /// lease time from when it first saw the revision, which is after the sending).
    #[tokio::test(start_paused = true)]
    async fn a_leader_stops_a_margin_before_its_lease_runs_out() {
        let ttl = Duration::from_secs(6);
        let leadership = Leadership::new("a".into(), ttl);
        assert!(!leadership.is_leader());
        let sent = clock::now();
        leadership.hold(7, sent);
        assert!(leadership.is_leader());
        assert_eq!(leadership.held_revision(), Some(7));
        assert_eq!(leadership.leader().as_deref(), Some("a"));
        tokio::time::advance(ttl - leadership.margin() - Duration::from_millis(1)).await;
        assert!(
            leadership.is_leader(),
            "still within the lease, less the margin"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            !leadership.is_leader(),
            "stopped a margin before the lease time"
        );
        assert_eq!(leadership.held_revision(), None);
        // A renewal sent now counts from now.
        leadership.hold(8, clock::now());
        assert!(leadership.is_leader());
        leadership.lose("test");
        assert!(!leadership.is_leader());
    }
}
