//! The whole NATS store of a test fleet, captured so an attack test can prove that nothing
//! changed anywhere: every stream's message count and last sequence, and every KV bucket's
//! current keys and values, read with the harness's own (operator) credentials.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use async_nats::jetstream;
use fleet_contracts::names::LEASE_BUCKET;
use futures::{StreamExt, TryStreamExt};

/// One stream as the server reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    pub messages: u64,
    pub last_sequence: u64,
}

/// Every stream's state and every bucket's contents at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Stream name -> state.
    pub streams: BTreeMap<String, StreamState>,
    /// Bucket -> key -> value, for every `KV_` stream.
    pub buckets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
}

impl Snapshot {
    /// Reads everything through `client`.
    pub async fn take(client: &async_nats::Client) -> Result<Snapshot> {
        let js = jetstream::new(client.clone());
        let mut snapshot = Snapshot::default();
        let mut names = js.stream_names();
        let mut streams = Vec::new();
        while let Some(name) = names.next().await {
            streams.push(name.context("listing streams")?);
        }
        for name in streams {
            let mut stream = js.get_stream(&name).await?;
            let info = stream.info().await?;
            snapshot.streams.insert(
                name.clone(),
                StreamState {
                    messages: info.state.messages,
                    last_sequence: info.state.last_sequence,
                },
            );
            let Some(bucket) = name.strip_prefix("KV_") else {
                continue;
            };
            let kv = js.get_key_value(bucket).await?;
            let keys: Vec<String> = match kv.keys().await {
                Ok(keys) => keys.try_collect().await?,
                Err(e) => return Err(e).with_context(|| format!("listing {bucket}")),
            };
            let mut values = BTreeMap::new();
            for key in keys {
                if let Some(v) = kv.get(&key).await? {
                    values.insert(key, v.to_vec());
                }
            }
            snapshot.buckets.insert(bucket.to_owned(), values);
        }
        Ok(snapshot)
    }

    /// This snapshot without the keys `skip(bucket, key)` names and without the counters of
    /// the streams in `moving` (buckets an actor may legitimately write to meanwhile: the
    /// operators' lease, an attacker's own reported keys).
    pub fn without(&self, skip: impl Fn(&str, &str) -> bool, moving: &[&str]) -> Snapshot {
        let buckets = self
            .buckets
            .iter()
            .map(|(b, values)| {
                let kept = values
                    .iter()
                    .filter(|(k, _)| !skip(b, k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (b.clone(), kept)
            })
            .collect();
        let streams = self
            .streams
            .iter()
            .filter(|(name, _)| !moving.contains(&name.as_str()))
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        Snapshot { streams, buckets }
    }

    /// What differs from `other`, one line each; empty when nothing does.
    pub fn diff(&self, other: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        let names: std::collections::BTreeSet<&String> =
            self.streams.keys().chain(other.streams.keys()).collect();
        for name in names {
            let (a, b) = (self.streams.get(name), other.streams.get(name));
            if a != b {
                out.push(format!("stream {name}: {a:?} -> {b:?}"));
            }
        }
        let buckets: std::collections::BTreeSet<&String> =
            self.buckets.keys().chain(other.buckets.keys()).collect();
        for bucket in buckets {
            let empty = BTreeMap::new();
            let a = self.buckets.get(bucket).unwrap_or(&empty);
            let b = other.buckets.get(bucket).unwrap_or(&empty);
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let (x, y) = (a.get(key), b.get(key));
                if x != y {
                    let show = |v: Option<&Vec<u8>>| {
                        v.map_or("(none)".to_owned(), |v| {
                            String::from_utf8_lossy(&v[..v.len().min(120)]).into_owned()
                        })
                    };
                    out.push(format!("{bucket}/{key}: {} -> {}", show(x), show(y)));
                }
            }
        }
        out
    }
}

/// Everything in `fleet`'s store but the operators' lease (renewed all the time).
pub async fn snapshot(fleet: &crate::TestFleet) -> Result<Snapshot> {
    let admin = fleet.nats.client().await?;
    Ok(Snapshot::take(&admin)
        .await?
        .without(|bucket, _| bucket == LEASE_BUCKET, &["KV_fleet-lease"]))
}

/// A snapshot once the store has stopped changing: two in a row alike.
pub async fn settled(fleet: &crate::TestFleet) -> Result<Snapshot> {
    let last = std::sync::Mutex::new(snapshot(fleet).await?);
    crate::eventually("the store to stop changing", crate::WAIT, || async {
        let now = snapshot(fleet).await?;
        let mut last = last.lock().unwrap();
        let same = *last == now;
        *last = now;
        Ok(same.then(|| last.clone()))
    })
    .await
}

/// Fails with every difference when `after` is not `before`.
pub fn unchanged(before: &Snapshot, after: &Snapshot) -> Result<()> {
    let diff = before.diff(after);
    ensure!(diff.is_empty(), "the store changed:\n{}", diff.join("\n"));
    Ok(())
}
