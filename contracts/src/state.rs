//! Every value stored in NATS KV: desired and reported state, the store's own records in the
//! resources bucket (its identity, adoptions, rollout resumes), enrollment tokens and device
//! identities, revocations, the leadership lease and the exec audit.
//!
//! Every value carries `schema` ([`crate::SCHEMA_VERSION`]); readers ignore unknown fields.
//! Timestamps are milliseconds since the Unix epoch, taken by the writer's clock.

use serde::{Deserialize, Serialize};

use crate::{
    Labels, SCHEMA_VERSION,
    spec::{OsRelease, PodTemplate},
};

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
    /// the message names the failing one. Agents before this name wrote `Running`, which
    /// still reads as `Degraded` (a Deployment's `Running` means every device is Ready).
    #[serde(alias = "Running")]
    Degraded,
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

/// `fleet-desired` `<device>._os`: the OS upgrade this device is to make (from an
/// `OsUpgrade` campaign whose wave reached it). A device makes each (upgrade, generation) once:
/// after it committed or rolled back, the same value changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DesiredOs {
    pub schema: u32,
    /// The OsUpgrade's name.
    pub upgrade: String,
    /// The OsUpgrade's `metadata.generation`.
    pub generation: u64,
    pub release: OsRelease,
    /// How long the upgraded system has, from its boot, to check in.
    pub check_in_deadline_seconds: u32,
    /// Boots the upgraded system gets before the bootguard rolls it back.
    pub boot_attempts: u32,
    /// The campaign's own checks, run by the check-in after the agent's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<crate::spec::CheckInCommand>,
}

/// `fleet-reported` `<device>._os`: the OS release the device runs and where its last (or
/// current) OS upgrade stands. Sent at every agent start and on every phase change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OsReport {
    pub schema: u32,
    /// The release the running system says it is (`/etc/fleet/os-release`), `unknown` when
    /// it says nothing.
    pub release: String,
    /// The upgrade this report is about; absent on a device that never upgraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<OsUpgradeReport>,
    /// How earlier upgrades ended, newest last (at most [`MAX_OS_HISTORY`]): a campaign still
    /// counts a device that has moved on to the next one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<OsOutcome>,
}

/// The most earlier upgrades an [`OsReport`] lists.
pub const MAX_OS_HISTORY: usize = 16;

/// How one earlier OS upgrade ended on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OsOutcome {
    pub upgrade: String,
    pub generation: u64,
    pub phase: OsPhase,
}

/// One OS upgrade on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OsUpgradeReport {
    pub upgrade: String,
    pub generation: u64,
    pub phase: OsPhase,
    /// The release before the upgrade, and its target.
    pub from_release: String,
    pub to_release: String,
    /// What is happening, or why it ended as it did (which check failed, the boot limit, the
    /// precondition with its numbers), in words a person can act on.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the upgrade entered this phase (the device's clock).
    pub since_ms: u64,
}

/// Where one device's OS upgrade stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum OsPhase {
    /// Checking the preconditions (pool fill, room on the boot partition, clock, layout).
    Preparing,
    /// Saving the known-good boot files and snapshotting root (`fleet-bootguard arm`).
    Snapshotting,
    /// apt is installing the release; the message says how far it got.
    Upgrading,
    /// The new boot set is verified; the device reboots into it.
    Rebooting,
    /// The upgraded system booted and must check in before its deadline.
    Probation,
    /// The upgrade checked in and is kept: the snapshot is removed.
    Committed,
    /// The upgrade is being undone (a failed install or check-in asked for it).
    RollingBack,
    /// The device runs the old release again; the message says why.
    RolledBack,
    /// A precondition failed: nothing was touched; the message names it with its numbers.
    Refused,
    /// A phase this reader does not know (written by a newer agent).
    #[serde(other)]
    Unknown,
}

impl OsPhase {
    /// Whether the upgrade has ended on this device.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            OsPhase::Committed | OsPhase::RolledBack | OsPhase::Refused
        )
    }

    /// Whether it ended without the new release.
    pub fn is_failure(self) -> bool {
        matches!(self, OsPhase::RolledBack | OsPhase::Refused)
    }
}

impl std::fmt::Display for OsPhase {
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

/// `fleet-lease` `operator`: which operator leads. Renewed by compare-and-set on its revision;
/// nobody compares the times in it across machines (they are for people).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub schema: u32,
    pub holder: String,
    pub ttl_ms: u64,
    pub renewed_at_ms: u64,
}

/// An enrollment token as stored in `fleet-enrollment` and listed by the API (the secret token
/// itself is shown once, at creation, and never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub schema: u32,
    pub id: String,
    #[serde(default)]
    pub labels: Labels,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// The device that used it; a token works once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked: bool,
    /// The public key of the token's own NATS user (what the token's holder connects as):
    /// revoked in the fleet account as soon as the token is used or revoked. Absent in
    /// records older than that rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_key: Option<String>,
}

impl EnrollmentToken {
    /// Why this token cannot be used at `now_ms`, if it cannot.
    pub fn refusal(&self, now_ms: u64) -> Option<String> {
        if self.revoked {
            Some(format!("enrollment token {} was revoked", self.id))
        } else if let Some(device) = &self.used_by {
            Some(format!(
                "enrollment token {} was already used (by {device})",
                self.id
            ))
        } else if now_ms >= self.expires_ms {
            Some(format!("enrollment token {} has expired", self.id))
        } else {
            None
        }
    }
}

/// `fleet-enrollment` `device.<name>`: the key a device enrolled with. Kept apart from the
/// Device resource, which people edit, so re-applying a Device never drops its identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    pub schema: u32,
    pub device: String,
    pub public_key: String,
    pub enrolled_ms: u64,
    /// The enrollment token it used.
    pub token: String,
    /// Set while the device is blacklisted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blacklist: Option<Audit>,
    /// The last time a blacklist was lifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_unblacklist: Option<Audit>,
    /// When the newest JWT minted for this key expires (unix seconds): a revocation of the key
    /// must last until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_expires_secs: Option<u64>,
}

/// Who did something, when, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    pub by: String,
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// `fleet-enrollment` `revocations`: the user keys revoked in the fleet account (blacklisted
/// and deleted devices, used and revoked enrollment tokens), key -> what and since when. The
/// account JWT's revocation list is rendered from it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocations {
    pub schema: u32,
    #[serde(default)]
    pub keys: std::collections::BTreeMap<String, Revoked>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// The device whose key this is, or for an enrollment token its id.
    pub device: String,
    /// JWTs issued at or before this second are refused.
    pub at_secs: u64,
    #[serde(default)]
    pub reason: RevokedFor,
    /// No JWT of this key is valid after this second anyway: the entry may then go, which
    /// keeps the account JWT small. `None`: kept until undone (a blacklist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_secs: Option<u64>,
}

/// Why a key is revoked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RevokedFor {
    /// A blacklisted device (undone by un-blacklisting).
    #[default]
    Blacklisted,
    /// A deleted device: its id may enroll again, with a new key, never this one.
    Deleted,
    /// An enrollment token that was used or revoked: its holder may not even ask again.
    Token,
    #[serde(other)]
    Unknown,
}

/// `fleet-resources` `rollout.<deployment>`: an operator's decision to continue a halted
/// rollout of `generation` (`fleetctl rollout resume`): devices given that generation before
/// `at_ms` no longer hold it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutResume {
    pub schema: u32,
    pub generation: u64,
    pub by: String,
    pub at_ms: u64,
}

/// `fleet-audit` `exec.<unix ms>.<device>`: who ran what, where, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecAudit {
    pub schema: u32,
    pub by: String,
    pub device: String,
    pub deployment: String,
    pub command: Vec<String>,
    pub at_ms: u64,
    /// `exit 0`, `timed out after 30s`, or the error.
    pub outcome: String,
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

    #[test]
    fn token_refusals() {
        let token = EnrollmentToken {
            schema: 1,
            id: "t1".into(),
            labels: Default::default(),
            created_ms: 0,
            expires_ms: 1000,
            used_by: None,
            used_ms: None,
            revoked: false,
            user_key: None,
        };
        assert_eq!(token.refusal(999), None);
        assert_eq!(
            token.refusal(1000).as_deref(),
            Some("enrollment token t1 has expired")
        );
        let used = EnrollmentToken {
            used_by: Some("pi-01".into()),
            ..token.clone()
        };
        assert_eq!(
            used.refusal(0).as_deref(),
            Some("enrollment token t1 was already used (by pi-01)")
        );
        let revoked = EnrollmentToken {
            revoked: true,
            ..used
        };
        assert_eq!(
            revoked.refusal(0).as_deref(),
            Some("enrollment token t1 was revoked")
        );
    }
}
