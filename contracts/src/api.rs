//! Bodies of the operator's HTTP API, shared by the operator and `fleetctl`.

use serde::{Deserialize, Serialize};

use crate::FieldError;
use crate::state::EnrollmentToken;

/// The body of every 4xx/5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// The fields at fault, for validation errors.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<FieldError>,
}

/// What `POST /api/v1/apply` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResult {
    pub kind: String,
    pub name: String,
    pub generation: u64,
    pub outcome: ApplyOutcome,
    /// Advice that does not stop the apply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    Created,
    Configured,
    Unchanged,
}

impl std::fmt::Display for ApplyOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ApplyOutcome::Created => "created",
            ApplyOutcome::Configured => "configured",
            ApplyOutcome::Unchanged => "unchanged",
        })
    }
}

/// `GET /api/v1/status`: whether the operator's view is complete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorStatus {
    pub state: RecoveryState,
    /// What is still being rebuilt, while recovering.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
    pub deployments: usize,
    pub devices: usize,
    pub version: String,
    /// This operator's name (`--instance`).
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub role: Role,
    /// Who holds the lease, as far as this operator knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Values in KV this operator cannot read (`<bucket>/<key>: why`); skipped, never deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreadable: Vec<String>,
}

/// Whether an operator writes desired state (leads) or stands by with a warm view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Leader,
    #[default]
    Standby,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryState {
    /// Still reading KV after a start or a reconnect; answers may be incomplete.
    Recovering,
    /// Everything in KV has been read.
    Converged,
}

/// `POST /api/v1/enrollment-tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateEnrollmentToken {
    /// Labels the enrolled Device gets.
    #[serde(default)]
    pub labels: crate::Labels,
    /// How long the token may be used, in seconds (default one day).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// The answer to `POST /api/v1/enrollment-tokens`: the secret, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedEnrollmentToken {
    pub token: String,
    pub info: EnrollmentToken,
}

/// `POST /api/v1/devices/<name>/adopt`: give a device that reports but has no record (or
/// holds on another store) a Device record with these labels, accept the store it holds on,
/// and restore its identity record from the key it reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptRequest {
    pub by: String,
    #[serde(default)]
    pub labels: crate::Labels,
}

/// `POST /api/v1/devices/<name>/release`: remove the deployments the device holds from an
/// earlier store (the body is a [`BlacklistRequest`]: who asks).
///
/// The answer to an adopt or a release: what happened, in words to show as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdoptResult {
    pub device: String,
    pub message: String,
}

/// What `GET /api/v1/backup` returns and `POST /api/v1/restore` takes: every value of every
/// bucket but the leadership lease, as JSON, bucket -> key -> value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backup {
    /// Always `FleetBackup`.
    pub kind: String,
    pub schema: u32,
    pub created_ms: u64,
    /// The store the backup was taken of.
    pub store: crate::state::StoreRef,
    pub buckets:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, serde_json::Value>>,
}

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RestoreResult {
    /// The store as the devices now see it: the backup's fleet id, a new epoch.
    pub store: crate::state::StoreRef,
    /// What was done per bucket, in words to show as they are.
    pub buckets: std::collections::BTreeMap<String, String>,
}

/// `POST /api/v1/devices/<name>/blacklist` and `.../unblacklist`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlacklistRequest {
    /// Who asks (recorded on the device).
    pub by: String,
    #[serde(default)]
    pub reason: String,
}

/// The answer to a blacklist or unblacklist: what happened, in words to show as they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlacklistResult {
    pub device: String,
    pub blacklisted: bool,
    pub message: String,
}

/// `POST /api/v1/deployments/<name>/exec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecCommand {
    pub device: String,
    pub command: Vec<String>,
    #[serde(default = "default_exec_timeout")]
    pub timeout_secs: u32,
    /// Who runs it (recorded in the audit log).
    pub by: String,
}

fn default_exec_timeout() -> u32 {
    30
}
