//! Request/reply messages between a device and the operator over core NATS: the device's whole
//! desired state on request (`fleet.sync.<device>`), its reports for the operator to store
//! (`fleet.report.<device>`), and the doorbell that tells it its desired state changed
//! (`fleet.dev.<device>.desired`).
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
