//! Resource documents in Kubernetes shape (`apiVersion`, `kind`, `metadata`, `spec`, `status`)
//! and their strict validation.
//!
//! Reading a stored document is lenient (unknown fields ignored, so a newer operator's
//! additions do not break an older reader). Accepting a document from a person is strict:
//! [`Resource::from_user`] rejects unknown fields and invalid values with errors that name the
//! field (`spec.template.containers[0].image: must not be empty`), type and range errors too
//! (`...ports[0].containerPort: 70000 is out of range (1-65535)`, through
//! `serde_path_to_error`). Values that become podman arguments or a request line are checked
//! for what that consumer does with them ([`crate::checks`]). Status is never taken from the
//! user; the operator computes it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::{OsRelease, PodTemplate};
use crate::state::{Audit, Health, HealthFlag, Heartbeat, OsReport, ReportedDeployment};
use crate::{FieldError, Labels};

use validate::strict;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Bumped by the operator whenever the spec changes; ignored on input.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A workload to run on every device whose labels match the selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: DeploymentSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeploymentStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentSpec {
    pub selector: LabelSelector,
    pub template: PodTemplate,
    /// Roll a new generation out in waves; without it every device gets it at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutPolicy>,
}

/// Staged rollout of a new generation: a wave of devices at a time, the next wave only once
/// every device of the earlier waves reports the new generation `Ready` (its probes pass) and
/// the pause has passed. A device that fails, or is not Ready within the progress deadline,
/// halts the rollout; the remaining devices keep the old generation until a new spec (a fix)
/// or `fleetctl rollout resume`. Devices that run nothing of this Deployment yet get the new
/// generation at once: there is nothing to protect on them. Healthy devices are given the new
/// generation before unhealthy ones (offline, stale).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPolicy {
    /// Devices per wave (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_size: Option<u32>,
    /// Devices per wave as a percentage of the matching devices (rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_percent: Option<u32>,
    #[serde(default)]
    pub pause_seconds: u32,
    #[serde(default = "default_progress_deadline")]
    pub progress_deadline_seconds: u32,
    /// At most this many matching devices may be unavailable (not Ready, or not Healthy)
    /// once a wave is admitted: a wave shrinks to fit, and waits while none fits. Unset: no
    /// limit beyond the wave size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<u32>,
}

fn default_progress_deadline() -> u32 {
    300
}

impl RolloutPolicy {
    /// Devices per wave out of `total`.
    pub fn wave(&self, total: usize) -> usize {
        match (self.wave_size, self.wave_percent) {
            (Some(n), _) => n.max(1) as usize,
            (None, Some(p)) => (total * p as usize).div_ceil(100).max(1),
            (None, None) => total.max(1),
        }
    }
}

/// An OS upgrade campaign: every device the selector matches installs `release`, a wave at a
/// time. The canaries go first; each next wave starts once every device before it has ended
/// (committed, rolled back or refused).
/// A device that rolls back or refuses counts as a failure; `haltAfterFailures` of them halt
/// the campaign (devices not reached keep their release until a new spec). Each device undoes
/// a bad upgrade on its own: a check-in that fails or misses `checkInDeadlineSeconds` rolls
/// it back, and so does an upgraded system that does not get through `bootAttempts` boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OsUpgrade {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: OsUpgradeSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<OsUpgradeStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OsUpgradeSpec {
    pub selector: LabelSelector,
    pub release: OsRelease,
    /// Devices upgraded first, alone, before any wave (at least 0).
    #[serde(default = "default_canaries")]
    pub canaries: u32,
    /// Devices per wave after the canaries; unset: all the rest at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_size: Option<u32>,
    /// Failed devices (rolled back or refused) that halt the campaign (at least 1).
    #[serde(default = "default_halt_after")]
    pub halt_after_failures: u32,
    #[serde(default = "default_check_in_deadline")]
    pub check_in_deadline_seconds: u32,
    #[serde(default = "default_boot_attempts")]
    pub boot_attempts: u32,
    /// Checks the upgraded system must pass too before it commits (at most 8).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<crate::spec::CheckInCommand>,
}

/// The range of `checkInDeadlineSeconds`: long enough for a slow boot and a few probes, short
/// enough that a device does not stay unprotected for a day.
pub const MIN_CHECK_IN_SECONDS: u32 = 60;
pub const MAX_CHECK_IN_SECONDS: u32 = 3600;
/// The most `bootAttempts` (the bootguard's boot limit).
pub const MAX_BOOT_ATTEMPTS: u32 = 10;

fn default_canaries() -> u32 {
    1
}
fn default_halt_after() -> u32 {
    1
}
fn default_check_in_deadline() -> u32 {
    600
}
fn default_boot_attempts() -> u32 {
    3
}

/// Computed by the operator from the devices' reports; never stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OsUpgradeStatus {
    pub phase: OsUpgradePhase,
    pub desired_devices: usize,
    /// Devices given the upgrade so far (canaries and admitted waves).
    pub started_devices: usize,
    pub committed_devices: usize,
    pub failed_devices: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted: Option<String>,
    pub devices: Vec<DeviceOsStatus>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OsUpgradePhase {
    NoDevices,
    #[default]
    Progressing,
    /// Every matching device committed the release.
    Complete,
    /// `haltAfterFailures` devices failed: no further device is started.
    Halted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceOsStatus {
    pub device: String,
    /// 0 for a canary, then the wave's number; `None` until the device's wave is reached.
    pub wave: Option<u32>,
    /// The device's report, when it is about this upgrade's generation.
    pub reported: Option<OsReport>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

impl LabelSelector {
    /// True when every required label is present with the required value.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: DeviceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {}

/// Computed by the operator from the devices' reports; never stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    /// The aggregate phase: `Running` only when every matching device runs the current
    /// generation.
    pub phase: RolloutPhase,
    pub desired_devices: usize,
    pub running_devices: usize,
    pub failed_devices: usize,
    pub devices: Vec<DeviceDeploymentStatus>,
    /// For a staged rollout: how far it got and why it stopped, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Devices given the current generation so far.
    pub updated_devices: usize,
    pub wave_size: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted: Option<String>,
    /// Why the next wave waits although the last one is Ready (`maxUnavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutPhase {
    /// No device matches the selector.
    NoDevices,
    /// Some devices have not reported the current generation running yet.
    #[default]
    Progressing,
    /// Every matching device runs the current generation.
    Running,
    /// At least one device reports the current generation failed.
    Failed,
    /// A staged rollout stopped: a device of an admitted wave failed or missed its deadline.
    Halted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceDeploymentStatus {
    pub device: String,
    /// `None` until the device has reported on this Deployment.
    pub reported: Option<ReportedDeployment>,
    pub device_health: Health,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    pub health: Health,
    pub heartbeat: Option<Heartbeat>,
    /// Milliseconds since the last heartbeat arrived, by the operator's clock.
    pub heartbeat_age_ms: Option<u64>,
    pub deployments: Vec<String>,
    /// Set while the device is blacklisted: who, when, why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blacklist: Option<Audit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_unblacklist: Option<Audit>,
    /// The device reports but has no Device record: it enrolled in a store that was lost, or
    /// restored from before it enrolled. `fleetctl device adopt` gives it one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unregistered: bool,
    /// The OS release the device runs and its last OS upgrade, once reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<OsReport>,
}

impl DeviceStatus {
    /// The health as people see it: `Unregistered` for a device without a record, and
    /// `(holding)` after it while the device holds on another store.
    pub fn shown_health(&self) -> String {
        let holding = self.heartbeat.as_ref().is_some_and(|h| {
            h.health_flags
                .iter()
                .any(|f| matches!(f, HealthFlag::StoreChanged { .. }))
        });
        let health = if self.unregistered {
            "Unregistered".to_owned()
        } else {
            self.health.to_string()
        };
        if holding {
            format!("{health} (holding)")
        } else {
            health
        }
    }
}

/// Any resource a person can apply. (A Device carries its status when read back, which makes
/// it the largest; values of this enum are few and short-lived.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Deployment(Deployment),
    Device(Device),
    OsUpgrade(OsUpgrade),
}

/// The kinds a person can apply, as `kind` spells them.
pub const KINDS: [&str; 3] = ["Deployment", "Device", "OsUpgrade"];

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Deployment(_) => "Deployment",
            Resource::Device(_) => "Device",
            Resource::OsUpgrade(_) => "OsUpgrade",
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Deployment(d) => &d.metadata,
            Resource::Device(d) => &d.metadata,
            Resource::OsUpgrade(u) => &u.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut Metadata {
        match self {
            Resource::Deployment(d) => &mut d.metadata,
            Resource::Device(d) => &mut d.metadata,
            Resource::OsUpgrade(u) => &mut u.metadata,
        }
    }

    /// The resource as it is stored in KV (compact JSON): what [`crate::document::MAX_RESOURCE_BYTES`]
    /// bounds, measured the same way by `fleetctl` and the operator.
    pub fn to_stored_json(&self) -> Vec<u8> {
        match self {
            Resource::Deployment(d) => serde_json::to_vec(d),
            Resource::Device(d) => serde_json::to_vec(d),
            Resource::OsUpgrade(u) => serde_json::to_vec(u),
        }
        .expect("resources serialize")
    }

    /// Parses and validates a document a person wrote: unknown fields and invalid values are
    /// errors naming the field. Any `status` and `metadata.generation` given are dropped.
    pub fn from_user(mut doc: serde_json::Value) -> Result<Resource, Vec<FieldError>> {
        // What a strict reading refuses (a NUL byte anywhere), also for a caller that built
        // the value itself.
        crate::document::from_deserializer(&doc).map_err(|e| vec![e])?;
        let Some(obj) = doc.as_object_mut() else {
            return Err(vec![FieldError::new("", "a resource must be a mapping")]);
        };
        obj.remove("status");
        if let Some(meta) = obj.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("generation");
        }
        let kind = match obj.get("kind") {
            Some(serde_json::Value::String(k)) => k.clone(),
            Some(_) => return Err(vec![FieldError::new("kind", "must be a string")]),
            None => {
                return Err(vec![FieldError::new(
                    "kind",
                    format!("missing; one of {}", KINDS.join(", ")),
                )]);
            }
        };
        let (resource, mut errors) = match kind.as_str() {
            "Deployment" => strict(doc).map(|(d, e)| (Resource::Deployment(d), e))?,
            "Device" => strict(doc).map(|(d, e)| (Resource::Device(d), e))?,
            "OsUpgrade" => strict(doc).map(|(u, e)| (Resource::OsUpgrade(u), e))?,
            other => {
                return Err(vec![FieldError::new(
                    "kind",
                    format!("unknown kind {other:?}; one of {}", KINDS.join(", ")),
                )]);
            }
        };
        errors.extend(resource.validate());
        if errors.is_empty() {
            Ok(resource)
        } else {
            Err(errors)
        }
    }

    /// Every problem with the document's values, in document order.
    pub fn validate(&self) -> Vec<FieldError> {
        validate::resource(self)
    }
}

#[cfg(test)]
mod tests;
mod validate;
