//! Continuous writes against the operator's API and the checks that the fleet then holds
//! exactly the declared state: shared by the chaos and cluster tests and the benchmark.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Result, bail};
use fleet_contracts::{
    names,
    resource::Deployment,
    state::{DesiredDeployment, Phase, ReportedDeployment},
};
use futures::StreamExt;

use crate::{Hollow, TestFleet};

/// `device -> deployment -> (generation, VERSION)`.
pub type Placement = BTreeMap<String, BTreeMap<String, (u64, String)>>;

pub const NAMES: [&str; 5] = ["alpha", "bravo", "charlie", "delta", "echo"];
pub const ROLES: [&str; 2] = ["a", "b"];

/// xorshift64*: enough randomness for a schedule, no dependency.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from the environment variable `var` when it holds a number, else from the clock;
    /// prints the seed (saying what it drives), so a failing run can be replayed.
    pub fn seeded(var: &str, what: &str) -> Rng {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            })
            | 1;
        eprintln!("{what} seed: {seed} ({var}={seed} replays this run)");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }

    /// Up to `max` random bytes.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        (0..self.below(max as u64 + 1))
            .map(|_| self.below(256) as u8)
            .collect()
    }

    /// A short name of letters, digits, `-` and `_`.
    pub fn token(&mut self) -> String {
        let chars = b"abcdefghijklmnopqrstuvwxyz0123456789-_";
        (0..1 + self.below(12))
            .map(|_| char::from(*self.pick(chars)))
            .collect()
    }
}

pub fn job(name: &str, role: &str, version: u64) -> serde_json::Value {
    crate::busybox_deployment(name, role, &version.to_string())
}

/// The writer's last operation on a name, and whether the API acknowledged it.
#[derive(Debug, Clone)]
pub enum LastOp {
    Applied {
        generation: u64,
        version: u64,
    },
    Deleted,
    /// Sent, but the answer never came (the operator died): either outcome is fine.
    Unknown,
}

/// Applies and deletes at random until `stop`, recording what the API acknowledged.
pub fn writer(
    url: String,
    token: String,
    seed: u64,
    stop: Arc<AtomicBool>,
    last: Arc<Mutex<BTreeMap<String, LastOp>>>,
) -> usize {
    let client = fleetctl::Client::new(&url, Some(&token));
    let mut rng = Rng(seed | 1);
    let mut acknowledged = 0;
    while !stop.load(Ordering::Relaxed) {
        let name = NAMES[rng.below(NAMES.len() as u64) as usize];
        let op = if rng.below(10) < 7 {
            let version = rng.next_u64() % 1000;
            let role = ROLES[rng.below(2) as usize];
            client
                .apply(&job(name, role, version))
                .map(|r| LastOp::Applied {
                    generation: r.generation,
                    version,
                })
                .map_err(|e| e.to_string())
        } else {
            client
                .delete("deployments", name)
                .map(|_| LastOp::Deleted)
                .map_err(|e| e.to_string())
        };
        let op = match op {
            Ok(op) => {
                acknowledged += 1;
                op
            }
            // Refused before anything was stored: the last acknowledged state stands.
            Err(e) if e.contains("not found") || e.contains("recovering") => continue,
            Err(_) => LastOp::Unknown,
        };
        last.lock().unwrap().insert(name.to_owned(), op);
        // Pace the writer (a poll interval, not a wait for readiness).
        std::thread::sleep(Duration::from_millis(10));
    }
    acknowledged
}

/// The declared state: every Deployment resource in KV.
pub async fn declared(fleet: &TestFleet) -> Result<BTreeMap<String, Deployment>> {
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let kv = js.get_key_value(names::RESOURCES_BUCKET).await?;
    let mut keys = kv.keys().await?;
    let mut all = BTreeMap::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if let (Some(name), Some(bytes)) = (key.strip_prefix("deployment."), kv.get(&key).await?) {
            all.insert(name.to_owned(), serde_json::from_slice(&bytes)?);
        }
    }
    Ok(all)
}

/// `device -> deployment -> (generation, VERSION)` that the declared state calls for.
pub fn expected(
    declared: &BTreeMap<String, Deployment>,
    roles: &BTreeMap<String, &str>,
) -> Placement {
    let mut want = Placement::new();
    for (device, role) in roles {
        let entry = want.entry(device.clone()).or_default();
        for (name, d) in declared {
            if d.spec.selector.match_labels.get("role").map(String::as_str) == Some(role) {
                let version = d.spec.template.containers[0].env[0].value.clone();
                entry.insert(name.clone(), (d.metadata.generation, version));
            }
        }
    }
    want
}

fn version_of(d: &DesiredDeployment) -> String {
    d.spec.containers[0].env[0].value.clone()
}

/// What the desired bucket, the devices and the reported bucket hold, in the shape of
/// [`expected`].
pub async fn actual(fleet: &TestFleet, devices: &[Hollow]) -> Result<[Placement; 3]> {
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let mut bucket = Placement::new();
    let mut reported = bucket.clone();
    let mut held = bucket.clone();
    for d in devices {
        bucket.insert(d.name.clone(), BTreeMap::new());
        reported.insert(d.name.clone(), BTreeMap::new());
        held.insert(
            d.name.clone(),
            d.desired()
                .into_iter()
                .map(|(k, v)| {
                    let version = version_of(&v);
                    (k, (v.generation, version))
                })
                .collect(),
        );
    }
    let desired = js.get_key_value(names::DESIRED_BUCKET).await?;
    let mut keys = desired.keys().await?;
    while let Some(key) = keys.next().await {
        let key = key?;
        if key == names::DESIRED_STORE_KEY {
            continue;
        }
        let Some(bytes) = desired.get(&key).await? else {
            continue;
        };
        let v: DesiredDeployment = serde_json::from_slice(&bytes)?;
        let (device, deployment) = key.split_once('.').unwrap();
        let version = version_of(&v);
        bucket
            .entry(device.to_owned())
            .or_default()
            .insert(deployment.to_owned(), (v.generation, version));
    }
    let kv = js.get_key_value(names::REPORTED_BUCKET).await?;
    let mut keys = kv.keys().await?;
    while let Some(key) = keys.next().await {
        let key = key?;
        if key.ends_with("._info") {
            continue;
        }
        let Some(bytes) = kv.get(&key).await? else {
            continue;
        };
        let r: ReportedDeployment = serde_json::from_slice(&bytes)?;
        if r.phase != Phase::Ready {
            bail!("{key} reports {}", r.phase);
        }
        let (device, deployment) = key.split_once('.').unwrap();
        // The hollow device reports the generation it holds; the version is checked above.
        let version = held
            .get(device)
            .and_then(|m| m.get(deployment))
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        reported
            .entry(device.to_owned())
            .or_default()
            .insert(deployment.to_owned(), (r.observed_generation, version));
    }
    Ok([bucket, held, reported])
}

/// Asserts that the last acknowledged operation on each name stands in `declared`.
pub fn check_acknowledged(
    last: &BTreeMap<String, LastOp>,
    declared: &BTreeMap<String, Deployment>,
) -> Result<()> {
    for (name, op) in last {
        match (op, declared.get(name)) {
            (
                LastOp::Applied {
                    generation,
                    version,
                },
                Some(d),
            ) => {
                let stored = &d.spec.template.containers[0].env[0].value;
                if (d.metadata.generation, stored) != (*generation, &version.to_string()) {
                    bail!(
                        "{name}: acknowledged generation {generation} version {version}, stored {} {stored}",
                        d.metadata.generation
                    );
                }
            }
            (LastOp::Applied { .. }, None) => bail!("acknowledged apply of {name} is gone"),
            (LastOp::Deleted, Some(_)) => bail!("acknowledged delete of {name} is undone"),
            _ => {}
        }
    }
    Ok(())
}

/// Whether the desired bucket, what the devices hold and what they report all equal `want`.
pub async fn matches(
    fleet: &TestFleet,
    devices: &[Hollow],
    want: &Placement,
) -> Result<Option<()>> {
    let [bucket, held, reported] = actual(fleet, devices).await?;
    for (what, got) in [("desired", bucket), ("held", held), ("reported", reported)] {
        if &got != want {
            bail!("{what}: {got:?}\n  want {want:?}");
        }
    }
    Ok(Some(()))
}
