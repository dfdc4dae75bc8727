//! Blacklist and un-blacklist: quarantine a device at the NATS level, at once, and undo it;
//! and the revocation list every revoked credential goes through ([`revoke`]: a deleted
//! device's key, a used or revoked enrollment token's user), entries pruned once every JWT of
//! their key has expired.
//!
//! Blacklisting records who, when and why on the device's identity record, adds the device's
//! key to the revocation list (`fleet-enrollment` `revocations`), renders the fleet account's
//! JWT with that list and pushes it through the system account (`$SYS.REQ.CLAIMS.UPDATE`),
//! waiting for the server's confirmation. The server then closes the device's connection and
//! refuses its JWT; the operator refuses to enroll it or mint for it. The device's containers
//! keep running: this is quarantine, not removal. Un-blacklisting removes the entry and pushes
//! again; the device's existing JWT works again and it reconnects by itself.

use async_nats::jetstream::kv::{Operation, Store};
use fleet_contracts::{
    SCHEMA_VERSION,
    api::BlacklistResult,
    state::{Audit, DeviceIdentity, Revocations, Revoked, RevokedFor},
};
use tracing::info;

use crate::{
    controller::{Operator, now_ms},
    enroll::identity_key,
};

pub(crate) const REVOCATIONS_KEY: &str = "revocations";

#[derive(Debug, thiserror::Error)]
pub enum BlacklistError {
    #[error("device {0:?} has never enrolled, so it has no credentials to revoke")]
    NotEnrolled(String),
    #[error("{0}")]
    Nats(String),
    #[error("nats-server refused the account update: {0}")]
    Refused(String),
}

/// Blacklists (`on = true`) or un-blacklists a device.
pub async fn set(
    shared: &Operator,
    device: &str,
    on: bool,
    audit: Audit,
) -> Result<BlacklistResult, BlacklistError> {
    let store = &shared.buckets.enrollment;
    let nats = |e: &dyn std::fmt::Display| BlacklistError::Nats(format!("NATS KV: {e}; try again"));
    let entry = store
        .entry(identity_key(device))
        .await
        .map_err(|e| nats(&e))?
        .filter(|e| e.operation == Operation::Put)
        .ok_or_else(|| BlacklistError::NotEnrolled(device.to_owned()))?;
    let mut identity: DeviceIdentity =
        serde_json::from_slice(&entry.value).map_err(|e| nats(&e))?;
    if on {
        identity.blacklist = Some(audit.clone());
    } else if let Some(_was) = identity.blacklist.take() {
        identity.last_unblacklist = Some(audit.clone());
    }
    let bytes = serde_json::to_vec(&identity).expect("serializes");
    store
        .update(identity_key(device), bytes.into(), entry.revision)
        .await
        .map_err(|e| nats(&e))?;
    let entry = on.then(|| Revoked {
        device: device.to_owned(),
        at_secs: audit.at_ms / 1000,
        reason: RevokedFor::Blacklisted,
        until_secs: None,
    });
    update_revocations(store, &identity.public_key, entry).await?;
    push_account(shared).await?;
    info!(%device, blacklisted = on, by = %audit.by, reason = %audit.reason, "blacklist changed");
    let message = if on {
        format!(
            "device {device} is blacklisted: its NATS connection was closed and it can neither reconnect nor get new credentials. \
             Its containers keep running (quarantine, not removal): to stop them, delete its Deployments or the device. \
             Undo with: fleetctl device unblacklist {device}"
        )
    } else {
        format!(
            "device {device} is no longer blacklisted: it reconnects by itself within seconds and converges to its desired state"
        )
    };
    Ok(BlacklistResult {
        device: device.to_owned(),
        blacklisted: on,
        message,
    })
}

/// Revokes NATS user `key` in the fleet account at once: recorded, pushed to the servers (which
/// close its connections and refuse it from then on), and confirmed.
pub async fn revoke(shared: &Operator, key: &str, entry: Revoked) -> Result<(), BlacklistError> {
    let (device, reason) = (entry.device.clone(), entry.reason);
    update_revocations(&shared.buckets.enrollment, key, Some(entry)).await?;
    push_account(shared).await?;
    info!(%device, ?reason, %key, "credentials revoked");
    Ok(())
}

/// Sets (`Some`) or removes the entry of `key` in the revocation list, compare-and-set, and
/// drops the entries whose credentials have all expired by now.
pub(crate) async fn update_revocations(
    store: &Store,
    key: &str,
    entry: Option<Revoked>,
) -> Result<(), BlacklistError> {
    for _ in 0..5 {
        let current = store
            .entry(REVOCATIONS_KEY)
            .await
            .map_err(|e| BlacklistError::Nats(e.to_string()))?
            .filter(|e| e.operation == Operation::Put);
        let mut list: Revocations = match &current {
            Some(e) => {
                serde_json::from_slice(&e.value).map_err(|e| BlacklistError::Nats(e.to_string()))?
            }
            None => Revocations {
                schema: SCHEMA_VERSION,
                keys: Default::default(),
            },
        };
        let now = now_ms() / 1000;
        list.keys
            .retain(|_, r| r.until_secs.is_none_or(|until| until >= now));
        match &entry {
            Some(entry) => {
                list.keys.insert(key.to_owned(), entry.clone());
            }
            None => {
                list.keys.remove(key);
            }
        }
        let bytes = serde_json::to_vec(&list).expect("serializes");
        let written = match &current {
            Some(e) => store
                .update(REVOCATIONS_KEY, bytes.into(), e.revision)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            None => store
                .create(REVOCATIONS_KEY, bytes.into())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        if written.is_ok() {
            return Ok(());
        }
        // Another change to the list happened meanwhile: read it again.
    }
    Err(BlacklistError::Nats(
        "the revocation list kept changing; try again".into(),
    ))
}

/// Renders the fleet account's JWT from the revocation list and pushes it to nats-server,
/// waiting for its confirmation. Idempotent: the operator also calls it at start, so a push
/// that failed earlier takes effect.
pub async fn push_account(shared: &Operator) -> Result<(), BlacklistError> {
    let list: Revocations = match shared.buckets.enrollment.get(REVOCATIONS_KEY).await {
        Ok(Some(bytes)) => {
            serde_json::from_slice(&bytes).map_err(|e| BlacklistError::Nats(e.to_string()))?
        }
        Ok(None) => Revocations::default(),
        Err(e) => return Err(BlacklistError::Nats(e.to_string())),
    };
    let revocations = list
        .keys
        .iter()
        .map(|(k, r)| (k.clone(), r.at_secs))
        .collect();
    let jwt = shared
        .identity
        .fleet_account_jwt(revocations)
        .map_err(|e| BlacklistError::Nats(e.to_string()))?;
    let reply = shared
        .sys
        .request("$SYS.REQ.CLAIMS.UPDATE", jwt.into())
        .await
        .map_err(|e| BlacklistError::Nats(format!("the account update got no answer: {e}")))?;
    #[derive(serde::Deserialize)]
    struct Reply {
        data: Option<ReplyData>,
        error: Option<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    struct ReplyData {
        code: u16,
        message: String,
    }
    let parsed: Reply = serde_json::from_slice(&reply.payload)
        .map_err(|e| BlacklistError::Refused(format!("unreadable answer ({e})")))?;
    match (parsed.data, parsed.error) {
        (Some(d), None) if d.code == 200 => {
            info!(revoked = list.keys.len(), answer = %d.message, "fleet account updated");
            Ok(())
        }
        (_, Some(e)) => Err(BlacklistError::Refused(e.to_string())),
        (Some(d), None) => Err(BlacklistError::Refused(format!("{} {}", d.code, d.message))),
        (None, None) => Err(BlacklistError::Refused("an empty answer".into())),
    }
}

/// Who and when, for the record.
pub fn audit(by: &str, reason: &str) -> Audit {
    Audit {
        by: if by.is_empty() {
            "unknown".into()
        } else {
            by.to_owned()
        },
        at_ms: now_ms(),
        reason: reason.to_owned(),
    }
}
