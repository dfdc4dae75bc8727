//! Chaos: the operator is SIGKILLed at random moments while a writer applies and deletes
//! Deployments continuously across a set of hollow devices (enrolled, speaking the agent's
//! protocol). After each kill and restart the fleet converges to exactly the declared state:
//! every desired key the resources call for and no other, every device holding and reporting
//! exactly what it should run, and no write the API acknowledged is lost.
//!
//! The schedule comes from a seed (printed; set `FLEET_CHAOS_SEED` to replay it; the timing of
//! real processes still varies).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use fleet_contracts::{
    api::Role,
    names,
    resource::Deployment,
    state::{DesiredDeployment, Phase, ReportedDeployment},
};
use fleet_e2e::{Fleet, Hollow, Operator, WAIT, eventually};
use futures::StreamExt;

const DEVICES: usize = 6;
const NAMES: [&str; 5] = ["alpha", "bravo", "charlie", "delta", "echo"];
const ROLES: [&str; 2] = ["a", "b"];
const CYCLES: usize = 6;

/// xorshift64*: enough randomness for a schedule, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn job(name: &str, role: &str, version: u64) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"role": role}},
            "template": {"containers": [{
                "name": name,
                "image": "localhost/fleet-busybox:1",
                "env": [{"name": "VERSION", "value": version.to_string()}]
            }]}
        }
    })
}

/// The writer's last operation on a name, and whether the API acknowledged it.
#[derive(Debug, Clone)]
enum LastOp {
    Applied {
        generation: u64,
        version: u64,
    },
    Deleted,
    /// Sent, but the answer never came (the operator died): either outcome is fine.
    Unknown,
}

/// Applies and deletes at random until `stop`, recording what the API acknowledged.
fn writer(
    url: String,
    token: String,
    seed: u64,
    stop: Arc<AtomicBool>,
    last: Arc<Mutex<BTreeMap<String, LastOp>>>,
) -> usize {
    let client = fleet_operator::ctl::Client::new(&url, Some(&token));
    let mut rng = Rng(seed | 1);
    let mut acknowledged = 0;
    while !stop.load(Ordering::Relaxed) {
        let name = NAMES[rng.below(NAMES.len() as u64) as usize];
        let op = if rng.below(10) < 7 {
            let version = rng.next() % 1000;
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
async fn declared(fleet: &Fleet) -> Result<BTreeMap<String, Deployment>> {
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
fn expected(
    declared: &BTreeMap<String, Deployment>,
    roles: &BTreeMap<String, &str>,
) -> BTreeMap<String, BTreeMap<String, (u64, String)>> {
    let mut want: BTreeMap<String, BTreeMap<String, (u64, String)>> = BTreeMap::new();
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
async fn actual(
    fleet: &Fleet,
    devices: &[Hollow],
) -> Result<[BTreeMap<String, BTreeMap<String, (u64, String)>>; 3]> {
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let mut bucket: BTreeMap<String, BTreeMap<String, (u64, String)>> = BTreeMap::new();
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

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_converges_to_exactly_the_declared_state_after_every_kill_of_the_operator()
-> Result<()> {
    let seed = std::env::var("FLEET_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("chaos seed {seed} (FLEET_CHAOS_SEED={seed} replays the schedule)");
    let mut rng = Rng(seed | 1);
    let mut fleet = Fleet::start().await?;
    let mut devices = Vec::new();
    let mut roles = BTreeMap::new();
    for i in 0..DEVICES {
        let (name, role) = (format!("pi-{i}"), ROLES[i % 2]);
        devices.push(Hollow::start(&fleet, &name, &[("role", role)], true).await?);
        roles.insert(name, role);
    }
    let last = Arc::new(Mutex::new(BTreeMap::new()));
    let mut recoveries = Vec::new();
    let mut acknowledged = 0;
    for cycle in 0..CYCLES {
        let stop = Arc::new(AtomicBool::new(false));
        let writing = tokio::task::spawn_blocking({
            let (url, token) = (fleet.operator.url.clone(), fleet.operator.token.clone());
            let (stop, last, seed) = (stop.clone(), last.clone(), rng.next());
            move || writer(url, token, seed, stop, last)
        });
        // The kill lands at a random moment of a 0.3-2.3 s window of writes.
        let kill_at = Duration::from_millis(300 + rng.below(2000));
        tokio::time::sleep(kill_at).await;
        fleet.operator.proc.kill();
        let killed = Instant::now();
        // The writer goes on against the dead operator for a moment (its calls fail).
        tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
        stop.store(true, Ordering::Relaxed);
        acknowledged += writing.await?;

        fleet.operator = Operator::start(fleet.path(), &fleet.nats, &[]).await?;
        fleet.operator.wait_role(Role::Leader).await?;
        let declared = declared(&fleet).await?;
        // No acknowledged write lost: the last acknowledged operation on each name stands.
        for (name, op) in last.lock().unwrap().iter() {
            match (op, declared.get(name)) {
                (
                    LastOp::Applied {
                        generation,
                        version,
                    },
                    Some(d),
                ) => {
                    let stored = &d.spec.template.containers[0].env[0].value;
                    assert_eq!(
                        (d.metadata.generation, stored),
                        (*generation, &version.to_string()),
                        "cycle {cycle}: {name}"
                    );
                }
                (LastOp::Applied { .. }, None) => panic!("cycle {cycle}: applied {name} is gone"),
                (LastOp::Deleted, Some(_)) => panic!("cycle {cycle}: deleted {name} is back"),
                _ => {}
            }
        }
        let want = expected(&declared, &roles);
        eventually(
            &format!("cycle {cycle}: desired keys, devices and reports to match"),
            WAIT,
            || async {
                let [bucket, held, reported] = actual(&fleet, &devices).await?;
                for (what, got) in [("desired", bucket), ("held", held), ("reported", reported)] {
                    if got != want {
                        bail!("{what}: {got:?}\n  want {want:?}");
                    }
                }
                Ok(Some(()))
            },
        )
        .await?;
        recoveries.push(killed.elapsed());
        let running: BTreeSet<&String> = declared.keys().collect();
        eprintln!(
            "cycle {cycle}: killed after {kill_at:?}, converged {:?} after the kill; declared {running:?}",
            killed.elapsed()
        );
    }
    assert!(acknowledged > 0, "the writer never got a write through");
    eprintln!(
        "{CYCLES} kills, {acknowledged} acknowledged writes; kill -> converged: {recoveries:?}"
    );
    Ok(())
}
