//! The devices' only way to the fleet's state: a device uses no JetStream (docs/adr/0010), so
//! the operator answers its sync request with its whole desired state from the in-memory view
//! (`fleet.sync.<device>`), stores its reports under that device's own reported keys
//! (`fleet.report.<device>`), and rings its doorbell (`fleet.dev.<device>.desired`) when its
//! desired keys change. Every operator answers (one queue group); the leader rings.
//!
//! A device is known by the subject it asked on, which NATS lets only that device publish to:
//! whatever a report claims, it lands under the asker's keys, checked for shape and size first.

use std::{
    collections::BTreeMap,
    sync::{Arc, atomic::Ordering},
};

use fleet_contracts::{
    SCHEMA_VERSION, checks,
    names::{self, INFO_KEY, OS_KEY, check_name},
    rpc::{
        DesiredChanged, MAX_REPORT_BYTES, MAX_REPORT_ENTRIES, ReportReply, ReportRequest, SyncReply,
    },
    state::{HealthFlag, Heartbeat, OsReport, ReportedDeployment},
};
use tracing::{debug, warn};

use crate::{
    controller::Operator,
    respond::{self, Answer},
};

/// Most reported keys one device may hold (its deployments and its heartbeat): a device cannot
/// grow the bucket, or the operator's view of it, without bound.
pub const MAX_REPORTED_KEYS: usize = 256;

/// Answers sync requests on the responder's connection until it closes.
pub async fn serve_sync(client: async_nats::Client, shared: Arc<Operator>) {
    let state = shared.clone();
    respond::serve(
        client,
        names::sync_subject,
        names::device_inbox,
        shared,
        true,
        move |device, _| {
            let shared = state.clone();
            async move { Answer::json(&sync(&shared, &device)) }
        },
    )
    .await
}

/// The device's whole desired state from the view, or [`SyncReply::NotReady`] while the view
/// has not read the whole desired bucket (a partial answer would make the device remove what
/// it lacks).
///
/// The answer names the store its desired state was derived from; there is none to name
/// while the store's identity is unread, a restore is under way, or the desired bucket was not
/// yet derived whole from the current store: the device is then told to ask again.
pub fn sync(shared: &Operator, device: &str) -> SyncReply {
    if !shared.desired_read() || !shared.resources_read() {
        return SyncReply::NotReady;
    }
    let fleet = shared.fleet.read().unwrap();
    let Some(store) = fleet.answering_store() else {
        return SyncReply::NotReady;
    };
    let adoption = fleet.adoptions.get(device);
    let prefix = format!("{device}.");
    let mut desired: BTreeMap<String, serde_json::Value> = fleet
        .desired
        .range(prefix.clone()..)
        .take_while(|(key, _)| key.starts_with(&prefix))
        .map(|(key, stored)| {
            // A value the operator cannot parse still goes out, as something the device cannot
            // read either: it keeps what runs instead of removing it.
            let value = serde_json::from_slice(&stored.bytes).unwrap_or_else(|e| {
                serde_json::Value::String(format!("unreadable desired value: {e}"))
            });
            (key[prefix.len()..].to_owned(), value)
        })
        .collect();
    let os = desired.remove(OS_KEY);
    SyncReply::Desired {
        os,
        revision: fleet.desired_revision,
        desired,
        accept: adoption.and_then(|a| a.accept.clone()),
        release_held: adoption.is_some_and(|a| a.release.as_ref() == Some(&store)),
        store: Some(store),
    }
}

/// Stores reports on the responder's connection's requests until it closes.
pub async fn serve_reports(client: async_nats::Client, shared: Arc<Operator>) {
    let state = shared.clone();
    respond::serve(
        client,
        names::report_subject,
        names::device_inbox,
        shared,
        true,
        move |device, payload| {
            let shared = state.clone();
            async move { Answer::json(&report(&shared, &device, &payload).await) }
        },
    )
    .await
}

async fn report(shared: &Operator, device: &str, payload: &[u8]) -> ReportReply {
    let request: ReportRequest = match serde_json::from_slice(payload) {
        Ok(r) => r,
        Err(e) => {
            return ReportReply::Failed {
                reason: format!("malformed report request: {e}"),
            };
        }
    };
    if request.entries.len() > MAX_REPORT_ENTRIES {
        return ReportReply::Failed {
            reason: format!(
                "{} entries in one request; at most {MAX_REPORT_ENTRIES}",
                request.entries.len()
            ),
        };
    }
    let mut refused = BTreeMap::new();
    let held = {
        let fleet = shared.fleet.read().unwrap();
        fleet.reported.get(device).map_or(0, |m| m.len())
            + usize::from(fleet.heartbeats.contains_key(device))
            + usize::from(fleet.os_reports.contains_key(device))
    };
    // Whether the view knows every reported key: while its watch is rebuilt (after a NATS
    // hiccup) a key the device holds may look unknown, and its removal must still happen.
    let view_whole = shared.reported_read();
    let mut new_keys = 0;
    for entry in request.entries {
        let key = names::deployment_key(device, &entry.key);
        let known = {
            let fleet = shared.fleet.read().unwrap();
            if entry.key == INFO_KEY {
                fleet.heartbeats.contains_key(device)
            } else if entry.key == OS_KEY {
                fleet.os_reports.contains_key(device)
            } else {
                fleet
                    .reported
                    .get(device)
                    .is_some_and(|m| m.contains_key(&entry.key))
            }
        };
        let checked = match entry.value {
            // Removing what is not there is done already; writing a delete marker for it would
            // let a device make subjects without end. Only a whole view can tell it is not
            // there: a delete skipped on a partial one left a stale report for good.
            None if !known && view_whole => match valid_key(&entry.key) {
                Ok(()) => continue,
                Err(e) => Err(e),
            },
            None => valid_key(&entry.key).map(|()| None),
            Some(value) => {
                if !known && held + new_keys >= MAX_REPORTED_KEYS {
                    Err(format!(
                        "the device already holds {MAX_REPORTED_KEYS} reported keys"
                    ))
                } else {
                    let checked = check_value(device, &entry.key, &value);
                    if checked.is_ok() && !known {
                        new_keys += 1;
                    }
                    checked.map(Some)
                }
            }
        };
        let bytes = match checked {
            Ok(bytes) => bytes,
            Err(why) => {
                shared
                    .metrics
                    .refused_reports
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%device, key = %entry.key.chars().take(64).collect::<String>(), %why, "report refused");
                refused.insert(entry.key, why);
                continue;
            }
        };
        let stored = match bytes {
            Some(bytes) => shared
                .buckets
                .reported
                .put(&key, bytes.into())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            None => shared
                .buckets
                .reported
                .delete(&key)
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = stored {
            warn!(%device, %key, error = %e, "cannot store a report; the device sends it again");
            return ReportReply::Failed {
                reason: format!("cannot store {key}: {e}"),
            };
        }
    }
    ReportReply::Stored { refused }
}

fn valid_key(key: &str) -> Result<(), String> {
    if key == INFO_KEY || key == OS_KEY {
        return Ok(());
    }
    check_name(key).map_err(|e| format!("invalid key {key:?}: {e}"))
}

/// The bytes to store for `value` under the device's `key`, if it is what that key holds: the
/// device's own heartbeat, or a status of the deployment the key names; and not too large.
fn check_value(device: &str, key: &str, value: &serde_json::Value) -> Result<Vec<u8>, String> {
    valid_key(key)?;
    let bytes = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    if bytes.len() > MAX_REPORT_BYTES {
        return Err(format!(
            "{} bytes; a reported value holds at most {MAX_REPORT_BYTES}",
            bytes.len()
        ));
    }
    if key == OS_KEY {
        let report: OsReport =
            serde_json::from_value(value.clone()).map_err(|e| format!("not an OS report: {e}"))?;
        check_os_report(&report)?;
    } else if key == INFO_KEY {
        let hb: Heartbeat =
            serde_json::from_value(value.clone()).map_err(|e| format!("not a heartbeat: {e}"))?;
        if hb.device != device {
            return Err(format!("a heartbeat of {:?}, not of {device}", hb.device));
        }
        // What an admin's adoption acts on, and `fleetctl describe` prints: a store is named
        // as Fleet names one, held deployments as deployments are.
        for flag in &hb.health_flags {
            match flag {
                HealthFlag::StoreChanged { cached, found } => {
                    for store in [cached, found] {
                        let id = &store.fleet_id;
                        if id.is_empty()
                            || id.len() > 64
                            || !id.bytes().all(|b| b.is_ascii_hexdigit())
                        {
                            return Err(format!("storeChanged: fleet id {id:?} is not one"));
                        }
                    }
                }
                HealthFlag::HeldDeployments { deployments } => {
                    for name in deployments {
                        check_name(name).map_err(|e| format!("heldDeployments: {name:?}: {e}"))?;
                    }
                }
                _ => {}
            }
        }
    } else {
        let r: ReportedDeployment = serde_json::from_value(value.clone())
            .map_err(|e| format!("not a deployment status: {e}"))?;
        if r.deployment != key {
            return Err(format!("a status of {:?}, not of {key}", r.deployment));
        }
    }
    Ok(bytes)
}

/// Rings `device`'s doorbell: its desired state changed. Best effort: a device that misses it
/// asks on its own within its sync interval.
pub async fn ring(shared: &Operator, device: &str) {
    let body = serde_json::to_vec(&DesiredChanged {
        schema: SCHEMA_VERSION,
    })
    .expect("serializes");
    if let Err(e) = shared
        .nats
        .publish(names::desired_doorbell_subject(device), body.into())
        .await
    {
        debug!(%device, error = %e, "cannot ring the device's doorbell");
    }
}

/// Longest message an OS report may carry: a reason in words, not a log.
pub const MAX_OS_MESSAGE_BYTES: usize = 2048;

/// What an OS report names is named as Fleet names it: a release as a release, the upgrade as
/// a resource; its message is bounded.
fn check_os_report(report: &OsReport) -> Result<(), String> {
    let release = |what: &str, name: &str| {
        if name == "unknown" {
            return Ok(());
        }
        checks::check_release_name(name).map_err(|e| format!("{what} {name:?}: {e}"))
    };
    release("release", &report.release)?;
    if let Some(u) = &report.upgrade {
        check_name(&u.upgrade).map_err(|e| format!("upgrade {:?}: {e}", u.upgrade))?;
        release("fromRelease", &u.from_release)?;
        release("toRelease", &u.to_release)?;
        if u.message.len() > MAX_OS_MESSAGE_BYTES {
            return Err(format!(
                "message of {} bytes; at most {MAX_OS_MESSAGE_BYTES}",
                u.message.len()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_must_be_what_its_key_holds() {
        let hb = |device: &str| {
            serde_json::json!({"schema": 1, "device": device, "agent_version": "1", "os": "x",
                "uptime_secs": 1, "sent_at_ms": 1, "interval_ms": 1000, "deployments": 0})
        };
        let status = |deployment: &str| {
            serde_json::json!({"schema": 1, "deployment": deployment, "observed_generation": 1,
                "phase": "Ready", "since_ms": 1})
        };
        let check =
            |key: &str, value: serde_json::Value| check_value("pi-01", key, &value).map(drop);
        assert_eq!(check("_info", hb("pi-01")), Ok(()));
        assert_eq!(
            check("_info", hb("pi-02")),
            Err("a heartbeat of \"pi-02\", not of pi-01".into())
        );
        assert_eq!(check("web", status("web")), Ok(()));
        assert_eq!(
            check("web", status("db")),
            Err("a status of \"db\", not of web".into())
        );
        assert!(
            check("web", hb("pi-01"))
                .unwrap_err()
                .starts_with("not a deployment status")
        );
        assert!(
            check("_evil", hb("pi-01"))
                .unwrap_err()
                .starts_with("invalid key")
        );
        assert!(
            check("a.b", status("a.b"))
                .unwrap_err()
                .starts_with("invalid key")
        );
        // The store flags an adoption acts on are what Fleet makes, nothing a terminal runs.
        let mut flagged = hb("pi-01");
        let store = |id: &str| serde_json::json!({"fleetId": id, "epoch": 1});
        flagged["health_flags"] = serde_json::json!([
            {"storeChanged": {"cached": store("0a1b"), "found": store("ff")}},
            {"heldDeployments": {"deployments": ["web"]}}
        ]);
        assert_eq!(check("_info", flagged.clone()), Ok(()));
        flagged["health_flags"][0]["storeChanged"]["cached"] = store("\u{1b}]0;x\u{7}");
        assert!(
            check("_info", flagged.clone())
                .unwrap_err()
                .starts_with("storeChanged")
        );
        flagged["health_flags"][0]["storeChanged"]["cached"] = store("0a1b");
        flagged["health_flags"][1]["heldDeployments"]["deployments"][0] = "../x".into();
        assert!(
            check("_info", flagged)
                .unwrap_err()
                .starts_with("heldDeployments")
        );
        let big = serde_json::json!({"deployment": "web", "pad": "x".repeat(MAX_REPORT_BYTES)});
        assert!(check("web", big).unwrap_err().contains("holds at most"));
    }

    #[test]
    fn an_os_report_names_releases_and_upgrades_as_fleet_names_them() {
        let check = |value: serde_json::Value| check_value("pi-01", "_os", &value).map(drop);
        let report = || {
            serde_json::json!({"schema": 1, "release": "fleet-pi-1", "upgrade": {
                "upgrade": "spring", "generation": 1, "phase": "Probation",
                "fromRelease": "fleet-pi-1", "toRelease": "fleet-pi-2",
                "message": "boot 1", "sinceMs": 1}})
        };
        assert_eq!(check(report()), Ok(()));
        assert_eq!(
            check(serde_json::json!({"schema": 1, "release": "unknown"})),
            Ok(())
        );
        for (field, bad, why) in [
            ("/release", serde_json::json!("\u{1b}[2J"), "release"),
            ("/upgrade/upgrade", serde_json::json!("a.b"), "upgrade"),
            ("/upgrade/toRelease", serde_json::json!("x y"), "toRelease"),
            ("/upgrade/fromRelease", serde_json::json!(""), "fromRelease"),
            (
                "/upgrade/message",
                serde_json::json!("x".repeat(MAX_OS_MESSAGE_BYTES + 1)),
                "message of",
            ),
        ] {
            let mut r = report();
            *r.pointer_mut(field).unwrap() = bad;
            let err = check(r).unwrap_err();
            assert!(err.starts_with(why), "{field}: {err}");
        }
        assert!(
            check(serde_json::json!({"schema": 1}))
                .unwrap_err()
                .starts_with("not an OS report")
        );
    }
}
