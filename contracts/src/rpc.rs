//! Request/reply messages between a device and the operator over core NATS: the device's whole
//! desired state on request (`fleet.sync.<device>`), its reports for the operator to store
//! (`fleet.report.<device>`), the doorbell that tells it its desired state changed
//! (`fleet.dev.<device>.desired`), enrollment and renewal (`fleet.enroll.<token>`,
//! `fleet.renew.<device>`), and the operator's log and exec requests to a device
//! (`fleet.dev.<device>.logs`, `.exec`).
//!
//! A device uses no JetStream at all (docs/adr/0010): every message it sends is a plain
//! request the operator answers on the device's own inbox, so nothing a device sends can make
//! the server publish on its behalf to a subject it chose.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::StoreRef;

/// Longest reported value the operator stores, in bytes: a heartbeat or a deployment's status
/// is a few hundred; the cap keeps one device from filling the bucket or the operator's memory.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// Most entries one report request may carry.
pub const MAX_REPORT_ENTRIES: usize = 64;

/// `fleet.sync.<device>`: "send me my whole desired state".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncRequest {
    pub schema: u32,
}

/// The answer to a [`SyncRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum SyncReply {
    /// Every desired value of the device, complete as of `revision`: deployment -> the value
    /// as stored (a [`crate::state::DesiredDeployment`], which the device parses itself so one
    /// it cannot read is reported and left alone rather than lost).
    Desired {
        /// The desired bucket's stream sequence the answering operator had read up to. A
        /// device ignores an answer older than one it already applied (several operators may
        /// answer, one of them behind).
        revision: u64,
        desired: BTreeMap<String, serde_json::Value>,
        /// The store this desired state was derived from. A device applies an answer that
        /// removes workloads only from the store its cache came from (see `agent/src/store.rs`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        store: Option<StoreRef>,
        /// An admin adopted this device from the store it holds on: holding exactly this
        /// store, it takes the current one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        accept: Option<StoreRef>,
        /// An admin released the device's held deployments in the current store.
        #[serde(
            default,
            rename = "releaseHeld",
            skip_serializing_if = "std::ops::Not::not"
        )]
        release_held: bool,
        /// The OS upgrade the device is to make (its desired `_os` value, a
        /// [`crate::state::DesiredOs`], as stored), if any. Kept apart from `desired`, which
        /// holds deployments only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        os: Option<serde_json::Value>,
    },
    /// The operator has not read the whole desired bucket yet: ask again shortly. Never an
    /// incomplete answer, since a device removes what a complete answer lacks.
    NotReady,
    Refused {
        reason: String,
    },
}

/// One reported value to store (`value`), or to remove (`None`), under the device's own key
/// `<device>.<key>`: `key` is `_info` (the heartbeat) or a deployment name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportEntry {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<serde_json::Value>,
}

/// `fleet.report.<device>`: store these reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRequest {
    pub schema: u32,
    pub entries: Vec<ReportEntry>,
}

/// The answer to a [`ReportRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "camelCase")]
pub enum ReportReply {
    /// Every entry was stored, except the `refused` ones (key -> why), which will never be:
    /// the device drops them instead of sending them again.
    Stored {
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        refused: BTreeMap<String, String>,
    },
    /// Nothing was stored (the whole request was malformed, or NATS failed): send again later.
    Failed { reason: String },
}

/// `fleet.dev.<device>.desired`: the device's desired state changed; it asks for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredChanged {
    pub schema: u32,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_tolerate_newer_fields() {
        let reply = SyncReply::Desired {
            revision: 7,
            desired: [("web".to_owned(), serde_json::json!({"schema": 1}))].into(),
            store: Some(StoreRef {
                fleet_id: "F".into(),
                epoch: 2,
            }),
            accept: None,
            release_held: true,
            os: Some(serde_json::json!({"schema": 1, "upgrade": "up"})),
        };
        // An older operator's answer (no store) still reads.
        let old: SyncReply =
            serde_json::from_str(r#"{"result":"desired","revision":1,"desired":{}}"#).unwrap();
        assert!(matches!(old, SyncReply::Desired { store: None, .. }));
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(serde_json::from_str::<SyncReply>(&json).unwrap(), reply);
        let not_ready: SyncReply =
            serde_json::from_str(r#"{"result":"notReady","later":1}"#).unwrap();
        assert_eq!(not_ready, SyncReply::NotReady);
        let request = ReportRequest {
            schema: 1,
            entries: vec![
                ReportEntry {
                    key: "_info".into(),
                    value: Some(serde_json::json!({"x": 1})),
                },
                ReportEntry {
                    key: "web".into(),
                    value: None,
                },
            ],
        };
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(
            serde_json::from_str::<ReportRequest>(&json).unwrap(),
            request
        );
        let stored: ReportReply = serde_json::from_str(r#"{"result":"stored"}"#).unwrap();
        assert_eq!(
            stored,
            ReportReply::Stored {
                refused: BTreeMap::new()
            }
        );
    }
}
