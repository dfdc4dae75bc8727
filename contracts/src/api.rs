//! Bodies of the operator's HTTP API, shared by the operator and `fleetctl`.

use serde::{Deserialize, Serialize};

use crate::FieldError;

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

/// `fleet-lease` `operator`: which operator leads. Renewed by compare-and-set on its revision;
/// nobody compares the times in it across machines (they are for people).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub schema: u32,
    pub holder: String,
    pub ttl_ms: u64,
    pub renewed_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryState {
    /// Still reading KV after a start or a reconnect; answers may be incomplete.
    Recovering,
    /// Everything in KV has been read.
    Converged,
}

/// Sent by a device to `fleet.enroll.<token id>`, over a connection made with the enrollment
/// token itself (a short-lived bearer credential that can publish only there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub schema: u32,
    pub device: String,
    /// The device's NKey public key (`U...`); the seed never leaves the device.
    pub public_key: String,
}

/// The operator's answer to an [`EnrollRequest`]: a user JWT, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnrollReply {
    Enrolled { jwt: String, expires_at: u64 },
    Refused { reason: String },
}

/// `POST /api/v1/enrollment-tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateEnrollmentToken {
    /// Labels the enrolled Device gets.
    #[serde(default)]
    pub labels: crate::resource::Labels,
    /// How long the token may be used, in seconds (default one day).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

/// An enrollment token as stored in `fleet-enrollment` and listed by the API (the secret token
/// itself is shown once, at creation, and never stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub schema: u32,
    pub id: String,
    #[serde(default)]
    pub labels: crate::resource::Labels,
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

/// The answer to `POST /api/v1/enrollment-tokens`: the secret, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedEnrollmentToken {
    pub token: String,
    pub info: EnrollmentToken,
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

/// `POST /api/v1/devices/<name>/adopt`: give a device that reports but has no record (or
/// holds on another store) a Device record with these labels, accept the store it holds on,
/// and restore its identity record from the key it reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptRequest {
    pub by: String,
    #[serde(default)]
    pub labels: crate::resource::Labels,
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

#[cfg(test)]
mod tests {
    use super::*;

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

/// Largest reply body a device sends for logs or exec output (NATS carries at most 1 MiB).
pub const MAX_REPLY_BYTES: usize = 512 * 1024;

/// Sent to `fleet.dev.<device>.logs`: the last `tail` lines of a deployment's container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    pub schema: u32,
    pub deployment: String,
    pub tail: u32,
    /// Keep sending new lines as [`LogsChunk`]s to the reply subject until told to stop on
    /// `fleet.dev.<device>.logs.ack.<session>` or no ack arrives for [`FOLLOW_ACK_TIMEOUT_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_session: Option<String>,
}

/// A follower that has not acknowledged anything for this long is gone: the device stops.
pub const FOLLOW_ACK_TIMEOUT_SECS: u64 = 10;
/// Chunks a device sends ahead of the last acknowledged one (flow control).
pub const FOLLOW_WINDOW: u64 = 16;
/// Bytes one follow session may carry before the device ends it.
pub const FOLLOW_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Bytes of one line kept; the rest is cut and marked.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Where a follower acknowledges chunks (`{"seq":N}`) or says stop (`{"stop":true}`).
pub fn follow_ack_subject(device: &str, session: &str) -> String {
    format!("fleet.dev.{device}.logs.ack.{session}")
}

/// One batch of a followed log, in order; `end` says why the session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsChunk {
    pub seq: u64,
    pub lines: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

/// A follower's message on the ack subject.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowAck {
    pub seq: u64,
    #[serde(default)]
    pub stop: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogsReply {
    /// Oldest first; `truncated` when the byte cap dropped the oldest lines.
    Lines {
        lines: Vec<String>,
        truncated: bool,
    },
    Error {
        message: String,
    },
}

/// Sent to `fleet.dev.<device>.exec`: run a command once in a deployment's container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub schema: u32,
    pub deployment: String,
    pub command: Vec<String>,
    pub timeout_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecReply {
    Done {
        exit_code: i32,
        stdout: String,
        stderr: String,
        truncated: bool,
    },
    TimedOut {
        after_secs: u32,
    },
    Error {
        message: String,
    },
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
