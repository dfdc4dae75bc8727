//! Values stored in the desired and reported KV buckets, and the store's own records in the
//! resources bucket (its identity, adoptions).
//!
//! Every value carries `schema` ([`crate::SCHEMA_VERSION`]); readers ignore unknown fields.
//! Timestamps are milliseconds since the Unix epoch, taken by the writer's clock.

use serde::{Deserialize, Serialize};

use crate::{SCHEMA_VERSION, resource::PodTemplate};

/// `fleet-desired` `<device>.<deployment>`: what one device must run for one Deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredDeployment {
    pub schema: u32,
    pub deployment: String,
    /// The Deployment's `metadata.generation` this spec belongs to.
    pub generation: u64,
    pub spec: PodTemplate,
}

impl DesiredDeployment {
    pub fn new(deployment: &str, generation: u64, spec: PodTemplate) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            deployment: deployment.to_owned(),
            generation,
            spec,
        }
    }
}

/// `fleet-reported` `<device>.<deployment>`: how one Deployment fares on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedDeployment {
    pub schema: u32,
    pub deployment: String,
    /// The generation the phase refers to.
    pub observed_generation: u64,
    pub phase: Phase,
    /// Why the deployment is in this phase, in words a person can act on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// When the deployment entered this phase.
    pub since_ms: u64,
}

/// The phase of one Deployment on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Desired state received, nothing done yet.
    Pending,
    /// The old container is being stopped (its stop signal, its grace) to make way for a new
    /// spec.
    Upgrading,
    /// The init containers run, in order.
    Initializing,
    /// The container is being created (image lookup, create).
    Creating,
    /// The container is being started, or runs but has not passed all its probes since it
    /// started; the message names the probe it waits for.
    Starting,
    /// The container runs and was Ready, but a probe now fails (past its failure threshold);
    /// the message names the failing one.
    Running,
    /// The container runs and every probe passes (a container without probes is ready as soon
    /// as it runs).
    Ready,
    /// The container ran to completion with exit code 0 and is not restarted (`Never`,
    /// `OnFailure`).
    Completed,
    /// The container cannot be created or started, or exited with a failure it is not
    /// restarted from; the message says why.
    Failed,
    /// A phase this reader does not know (written by a newer agent).
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// `fleet-reported` `<device>._info`: the device's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub schema: u32,
    pub device: String,
    pub agent_version: String,
    /// `PRETTY_NAME` of the device's os-release.
    pub os: String,
    pub uptime_secs: u64,
    pub sent_at_ms: u64,
    /// How often the agent sends a heartbeat, so the operator can judge staleness.
    pub interval_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health_flags: Vec<HealthFlag>,
    /// Number of deployments the agent currently manages.
    pub deployments: u32,
    /// When the agent last finished comparing podman with the desired state: a heartbeat
    /// whose reconcile time stands still means an agent that is alive but stuck.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reconcile_ms: Option<u64>,
    /// What the device's boots found on its storage and did about it (the bootguard's record
    /// on the boot partition); absent until a check first found something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageChecks>,
    /// Messages on the device's request subjects that were not well-formed operator requests
    /// (dropped unanswered) since the agent started: something is trying its subjects.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_requests: u64,
    /// The device's NATS public key, so an admin adopting it after the store was lost can
    /// restore its identity record (and so its JWT renewals).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub public_key: String,
}

/// `fleet-resources` `fleet.store` ([`crate::names::STORE_KEY`]): which store this is. Written
/// once when the operator first creates the buckets, and again only by a restore, which keeps
/// the backup's fleet id and moves the epoch forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreIdentity {
    pub schema: u32,
    #[serde(flatten)]
    pub store: StoreRef,
    /// Set while a restore writes the buckets: the operators answer no device until the
    /// desired state was derived from the restored resources.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restoring: bool,
    pub created_ms: u64,
}

/// A fleet store as a device knows it: the fleet id (random, 128 bits, made when the store
/// was first created) and the epoch (1, then one more per restore).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoreRef {
    pub fleet_id: String,
    pub epoch: u64,
}

impl std::fmt::Display for StoreRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fleet {} epoch {}", self.fleet_id, self.epoch)
    }
}

/// `fleet-resources` `adoption.<device>`: what an admin decided for a device that holds
/// workloads from another store (`fleetctl device adopt` / `release`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Adoption {
    pub schema: u32,
    /// The store the device held on when it was adopted: a device holding exactly this one
    /// takes the current store, keeping what it ran as held deployments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept: Option<StoreRef>,
    /// Held deployments are released (removed) on the device while the current store is this
    /// one; a later restore needs a new release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<StoreRef>,
    pub by: String,
    pub at_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The bootguard's storage checks at boot, as the agent found them on the boot partition
/// (`rollback/checks`). Counts are since the device was made; texts are the last finding.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageChecks {
    /// Times the thin pool under root failed its check and `lvconvert --repair` brought it
    /// back.
    pub pool_repairs: u32,
    /// Boots in a row whose pool failed its check (0 once one activates it again).
    pub pool_repair_boots: u32,
    /// The last pool finding and what was done, in words for people.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_pool: String,
    /// Boots that found the boot partition not cleanly unmounted or damaged, fixed by
    /// `fsck.fat` (each is an unclean shutdown: a crash or a power cut).
    pub fat_repairs: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_fat: String,
}

/// Something wrong on a device that does not stop it from working.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HealthFlag {
    /// podman did not answer: containers cannot be managed.
    PodmanUnavailable { message: String },
    /// The desired state cannot be saved to disk: a reboot without network would lose it.
    CacheWriteFailed { message: String },
    /// "store changed: holding": the operator answered from another store than the one the
    /// device's desired state came from (`cached`), a different fleet or an older epoch
    /// (`found`). The device keeps running exactly what it had and waits for an admin
    /// (`fleetctl device adopt`).
    StoreChanged { cached: StoreRef, found: StoreRef },
    /// Deployments the device kept running from an earlier store after a restore or an
    /// adoption, which the current store does not mention: they run until an admin applies
    /// them again or releases them (`fleetctl device release`).
    HeldDeployments { deployments: Vec<String> },
    /// A flag this reader does not know.
    #[serde(other)]
    Unknown,
}

/// A device's health as the operator judges it from the age of its last heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    /// A heartbeat arrived recently.
    Healthy,
    /// Heartbeats are late.
    Stale,
    /// No heartbeat for long enough that the device is considered gone.
    Offline,
    /// No heartbeat was ever seen.
    #[default]
    Unknown,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_tolerate_newer_values() {
        let v = r#"{"schema":1,"deployment":"web","observed_generation":3,"phase":"Hibernating",
                    "since_ms":5,"new_field":{"x":1}}"#;
        let r: ReportedDeployment = serde_json::from_str(v).unwrap();
        assert_eq!(r.phase, Phase::Unknown);
        assert_eq!(r.observed_generation, 3);
    }

    #[test]
    fn heartbeat_round_trips() {
        let hb = Heartbeat {
            schema: SCHEMA_VERSION,
            device: "pi-01".into(),
            agent_version: "0.1.0".into(),
            os: "Debian GNU/Linux 13 (trixie)".into(),
            uptime_secs: 7,
            sent_at_ms: 1,
            interval_ms: 10_000,
            health_flags: vec![HealthFlag::PodmanUnavailable {
                message: "x".into(),
            }],
            deployments: 2,
            last_reconcile_ms: Some(5),
            storage: Some(StorageChecks {
                pool_repairs: 1,
                last_pool: "pool vg0/pool repaired".into(),
                fat_repairs: 3,
                ..StorageChecks::default()
            }),
            dropped_requests: 3,
            public_key: "UABC".into(),
        };
        let json = serde_json::to_string(&hb).unwrap();
        assert_eq!(serde_json::from_str::<Heartbeat>(&json).unwrap(), hb);
    }
}
