//! The store as a whole: its backup and restore, and the adoption of devices that hold
//! workloads from another store (docs/store-loss.md).
//!
//! A device takes a desired state that removes workloads only from the store its cache came
//! from (`agent/src/store.rs`); what happens here decides which store that is:
//!
//! - A **restore** writes the backup's resources and keeps its fleet id with a new epoch, so
//!   devices take the restored desired state but keep running (held) whatever it does not
//!   mention. The identity is marked `restoring` first, so no operator answers a device until
//!   the desired state was derived whole from the restored resources.
//! - An **adoption** gives a device that holds on another store (the store was wiped, or it
//!   enrolled after the backup) a Device record, its identity record back, and leave to take
//!   the current store, again keeping what runs as held.
//! - A **release** lets a device remove its held deployments.

use std::collections::{BTreeMap, BTreeSet};

use async_nats::jetstream::kv::{self, Operation};
use fleet_contracts::{
    API_VERSION, SCHEMA_VERSION,
    api::{AdoptRequest, AdoptResult, Backup, RestoreResult},
    document::MAX_RESOURCE_BYTES,
    names::{
        self, AUDIT_BUCKET, DESIRED_BUCKET, ENROLLMENT_BUCKET, REPORTED_BUCKET, RESOURCES_BUCKET,
        STORE_KEY,
    },
    resource::Resource,
    state::{Adoption, DeviceIdentity, HealthFlag, Revocations, StoreIdentity, StoreRef},
};
use futures::StreamExt;
use tracing::info;

use crate::{
    blacklist::{REVOCATIONS_KEY, push_account, update_revocations},
    controller::{Operator, now_ms},
    enroll::identity_key,
};

/// Why a store operation failed: the request (the caller's to fix) or NATS (try again).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("NATS: {0}; try again")]
    Nats(String),
}

fn nats(e: impl std::fmt::Display) -> StoreError {
    StoreError::Nats(e.to_string())
}

/// The buckets a backup holds, in the order a restore goes through them (the lease is the
/// running operators' own and never backed up).
pub const BACKED_UP: [&str; 5] = [
    RESOURCES_BUCKET,
    ENROLLMENT_BUCKET,
    AUDIT_BUCKET,
    DESIRED_BUCKET,
    REPORTED_BUCKET,
];

fn bucket<'a>(shared: &'a Operator, name: &str) -> &'a kv::Store {
    let b = &shared.buckets;
    match name {
        RESOURCES_BUCKET => &b.resources,
        ENROLLMENT_BUCKET => &b.enrollment,
        AUDIT_BUCKET => &b.audit,
        DESIRED_BUCKET => &b.desired,
        REPORTED_BUCKET => &b.reported,
        other => unreachable!("not a backed-up bucket: {other}"),
    }
}

/// Every current key and value of a bucket.
async fn read_all(store: &kv::Store) -> Result<BTreeMap<String, (Vec<u8>, u64)>, StoreError> {
    let mut keys = store.keys().await.map_err(nats)?;
    let mut all = BTreeMap::new();
    while let Some(key) = keys.next().await {
        let key = key.map_err(nats)?;
        if let Some(entry) = store.entry(&key).await.map_err(nats)?
            && entry.operation == Operation::Put
        {
            all.insert(key, (entry.value.to_vec(), entry.revision));
        }
    }
    Ok(all)
}

/// The store's identity and its revision.
async fn identity(shared: &Operator) -> Result<(StoreIdentity, u64), StoreError> {
    let entry = shared
        .buckets
        .resources
        .entry(STORE_KEY)
        .await
        .map_err(nats)?
        .filter(|e| e.operation == Operation::Put)
        .ok_or_else(|| nats("the store has no identity yet (the operator is starting)"))?;
    let identity = serde_json::from_slice(&entry.value)
        .map_err(|e| nats(format!("the store's identity is unreadable: {e}")))?;
    Ok((identity, entry.revision))
}

/// Reads every bucket but the lease. Values are JSON (every value Fleet writes is).
pub async fn backup(shared: &Operator) -> Result<Backup, StoreError> {
    let (identity, _) = identity(shared).await?;
    let mut buckets = BTreeMap::new();
    for name in BACKED_UP {
        let mut values = BTreeMap::new();
        for (key, (bytes, _)) in read_all(bucket(shared, name)).await? {
            let value = serde_json::from_slice(&bytes).map_err(|e| {
                StoreError::Conflict(format!(
                    "{name} {key} is not JSON ({e}): it was not written by Fleet and cannot be \
                     backed up; remove it"
                ))
            })?;
            values.insert(key, value);
        }
        buckets.insert(name.to_owned(), values);
    }
    Ok(Backup {
        kind: "FleetBackup".into(),
        schema: SCHEMA_VERSION,
        created_ms: now_ms(),
        store: identity.store,
        buckets,
    })
}

/// Checks a backup before anything is written: a bad one is refused whole, naming what is
/// wrong.
fn check(backup: &Backup) -> Result<(), StoreError> {
    let invalid = |m: String| Err(StoreError::Invalid(m));
    if backup.kind != "FleetBackup" {
        return invalid(format!(
            "kind: expected \"FleetBackup\", got {:?}",
            backup.kind
        ));
    }
    if backup.schema != SCHEMA_VERSION {
        return invalid(format!(
            "schema: this operator reads backups of schema {SCHEMA_VERSION}, got {}",
            backup.schema
        ));
    }
    if backup.store.fleet_id.is_empty() || backup.store.epoch == 0 {
        return invalid("store: a fleet id and an epoch of at least 1 are required".into());
    }
    if let Some(missing) = BACKED_UP.iter().find(|b| !backup.buckets.contains_key(**b)) {
        return invalid(format!(
            "buckets.{missing}: missing; a backup written by `fleetctl backup` holds {}",
            BACKED_UP.join(", ")
        ));
    }
    let recorded = backup.buckets[RESOURCES_BUCKET]
        .get(STORE_KEY)
        .and_then(|v| serde_json::from_value::<StoreIdentity>(v.clone()).ok());
    if recorded.as_ref().map(|r| &r.store) != Some(&backup.store) {
        return invalid(format!(
            "buckets.{RESOURCES_BUCKET}.{STORE_KEY}: must be the store identity the backup names \
             (store: {})",
            backup.store
        ));
    }
    for (name, values) in &backup.buckets {
        if !BACKED_UP.contains(&name.as_str()) {
            return invalid(format!(
                "buckets.{name}: not a bucket a backup holds ({})",
                BACKED_UP.join(", ")
            ));
        }
        for (key, value) in values {
            let valid_key = !key.is_empty()
                && key.len() <= 256
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=./".contains(&b))
                && !key.starts_with('.')
                && !key.ends_with('.');
            if !valid_key {
                return invalid(format!("buckets.{name}: {key:?} is not a KV key"));
            }
            let at = |e: String| StoreError::Invalid(format!("buckets.{name}.{key}: {e}"));
            let size = serde_json::to_vec(value).expect("serializes").len();
            if size > MAX_RESOURCE_BYTES {
                return Err(at(format!(
                    "{size} bytes; a stored value is at most {MAX_RESOURCE_BYTES}"
                )));
            }
            match name.as_str() {
                RESOURCES_BUCKET => check_resource(key, value).map_err(at)?,
                ENROLLMENT_BUCKET => check_identity(key, value).map_err(at)?,
                _ => {}
            }
        }
    }
    Ok(())
}

/// A device identity record must name its key's device and hold a user key; the revocation
/// list must read. Tokens are never restored, so their values do not matter.
fn check_identity(key: &str, value: &serde_json::Value) -> Result<(), String> {
    if let Some(device) = key.strip_prefix("device.") {
        names::check_name(device).map_err(|e| format!("device name: {e}"))?;
        let record: DeviceIdentity =
            serde_json::from_value(value.clone()).map_err(|e| e.to_string())?;
        if record.device != device {
            return Err(format!(
                "device: {:?} is not the device the key names",
                record.device
            ));
        }
        if !record.public_key.starts_with('U')
            || nkeys::KeyPair::from_public_key(&record.public_key).is_err()
        {
            return Err("public_key: not a NATS user key".into());
        }
    } else if key == REVOCATIONS_KEY {
        serde_json::from_value::<Revocations>(value.clone()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn check_resource(key: &str, value: &serde_json::Value) -> Result<(), String> {
    let (kind, name) = key.split_once('.').ok_or("not a <kind>.<name> key")?;
    match kind {
        "deployment" | "device" | "osupgrade" => {
            let stored = serde_json::to_vec(value).expect("serializes");
            let doc = fleet_contracts::document::from_json(&stored).map_err(|e| e.to_string())?;
            let resource = Resource::from_user(doc).map_err(|errors| {
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
            if !resource.kind().eq_ignore_ascii_case(kind) {
                return Err(format!("kind: {} under a {kind} key", resource.kind()));
            }
            if resource.metadata().name != name {
                return Err(format!(
                    "metadata.name: {:?} is not the name the key gives",
                    resource.metadata().name
                ));
            }
            Ok(())
        }
        "adoption" => serde_json::from_value::<Adoption>(value.clone())
            .map(drop)
            .map_err(|e| e.to_string()),
        "rollout" => serde_json::from_value::<fleet_contracts::state::RolloutResume>(value.clone())
            .map(drop)
            .map_err(|e| e.to_string()),
        "fleet" if name == "store" => Ok(()),
        other => Err(format!("unknown resource kind {other:?}")),
    }
}

/// Restores `backup` (see the module docs). Re-running it after an interruption finishes
/// the job.
pub async fn restore(shared: &Operator, backup: &Backup) -> Result<RestoreResult, StoreError> {
    check(backup)?;
    // 1. A new epoch of the backup's fleet, marked restoring: devices are answered again only
    // once the desired state is derived whole from what is written below.
    let (current, revision) = identity(shared).await?;
    // Past every epoch this fleet had, even in another store (a later restore of the same
    // backup elsewhere, a store devices ran on since): the restore's time in seconds, or one
    // more than the highest seen, whichever is larger.
    let seen = if current.store.fleet_id == backup.store.fleet_id {
        current.store.epoch.max(backup.store.epoch)
    } else {
        backup.store.epoch
    };
    let epoch = (seen + 1).max(now_ms() / 1000);
    let mut restoring = StoreIdentity {
        schema: SCHEMA_VERSION,
        store: StoreRef {
            fleet_id: backup.store.fleet_id.clone(),
            epoch,
        },
        restoring: true,
        created_ms: current.created_ms,
    };
    let revision = write_identity(shared, &restoring, revision).await?;
    info!(from = %backup.store, to = %restoring.store, "restore: started");
    // No operator answers a device until the desired state is derived from the restored
    // resources: the marker goes before any of them is written, so a view that sees a device
    // key derived from them has seen it go (one bucket, one order).
    shared
        .buckets
        .desired
        .delete(names::DESIRED_STORE_KEY)
        .await
        .map_err(nats)?;
    let empty = BTreeMap::new();
    let of = |name: &str| backup.buckets.get(name).unwrap_or(&empty);
    let mut said = BTreeMap::new();

    // 2. Resources: exactly the backup's.
    let resources = &shared.buckets.resources;
    let now = read_all(resources).await?;
    let wanted = of(RESOURCES_BUCKET);
    let mut removed = 0;
    for key in now
        .keys()
        .filter(|k| *k != STORE_KEY && !wanted.contains_key(*k))
    {
        resources.delete(key).await.map_err(nats)?;
        removed += 1;
    }
    let mut written = 0;
    for (key, value) in wanted.iter().filter(|(k, _)| *k != STORE_KEY) {
        let bytes = serde_json::to_vec(value).expect("serializes");
        if now.get(key).is_some_and(|(b, _)| *b == bytes) {
            continue;
        }
        resources.put(key, bytes.into()).await.map_err(nats)?;
        written += 1;
    }
    said.insert(
        RESOURCES_BUCKET.to_owned(),
        format!(
            "{} resources as in the backup ({written} written, {removed} not in the backup removed)",
            wanted.len() - usize::from(wanted.contains_key(STORE_KEY))
        ),
    );

    // 3. Identities: the backup's device records the store lacks (a record now is newer);
    // revocations: both lists; enrollment tokens: never (a token spent since must stay spent).
    let enrollment = &shared.buckets.enrollment;
    let now = read_all(enrollment).await?;
    let (mut devices, mut revoked, mut tokens) = (0, 0, 0);
    for (key, value) in of(ENROLLMENT_BUCKET) {
        if key.starts_with("device.") {
            if !now.contains_key(key) {
                let bytes = serde_json::to_vec(value).expect("serializes");
                enrollment.put(key, bytes.into()).await.map_err(nats)?;
                devices += 1;
            }
        } else if key == REVOCATIONS_KEY {
            let list: Revocations = serde_json::from_value(value.clone()).map_err(|e| {
                StoreError::Invalid(format!("buckets.{ENROLLMENT_BUCKET}.{key}: {e}"))
            })?;
            let current: Revocations = match now.get(key) {
                Some((b, _)) => serde_json::from_slice(b).map_err(nats)?,
                None => Revocations::default(),
            };
            for (k, entry) in list.keys {
                if !current.keys.contains_key(&k) {
                    update_revocations(enrollment, &k, Some(entry))
                        .await
                        .map_err(nats)?;
                    revoked += 1;
                }
            }
        } else {
            tokens += 1;
        }
    }
    if revoked > 0 {
        push_account(shared).await.map_err(nats)?;
    }
    said.insert(
        ENROLLMENT_BUCKET.to_owned(),
        format!(
            "{devices} device identities restored (those the store lacked), {revoked} revocations added; {tokens} enrollment tokens not restored (create new ones)"
        ),
    );

    // 4. Audit records: the backup's the store lacks.
    let audit = &shared.buckets.audit;
    let now = read_all(audit).await?;
    let mut added = 0;
    for (key, value) in of(AUDIT_BUCKET) {
        if !now.contains_key(key) {
            let bytes = serde_json::to_vec(value).expect("serializes");
            audit.put(key, bytes.into()).await.map_err(nats)?;
            added += 1;
        }
    }
    said.insert(
        AUDIT_BUCKET.to_owned(),
        format!("{added} audit records added"),
    );
    said.insert(
        DESIRED_BUCKET.to_owned(),
        "not restored: derived again from the restored resources".into(),
    );
    said.insert(
        REPORTED_BUCKET.to_owned(),
        "not restored: the devices report again".into(),
    );

    // 5. Done: the leader derives the desired state and then marks it as this store's.
    restoring.restoring = false;
    write_identity(shared, &restoring, revision).await?;
    info!(store = %restoring.store, "restore: done");
    Ok(RestoreResult {
        store: restoring.store,
        buckets: said,
    })
}

/// Replaces the store's identity if it is still at `revision`; returns the new revision.
async fn write_identity(
    shared: &Operator,
    identity: &StoreIdentity,
    revision: u64,
) -> Result<u64, StoreError> {
    let bytes = serde_json::to_vec(identity).expect("serializes");
    shared
        .buckets
        .resources
        .update(STORE_KEY, bytes.into(), revision)
        .await
        .map_err(|e| {
            StoreError::Conflict(format!(
                "the store changed meanwhile ({e}); run the restore again"
            ))
        })
}

/// Adopts `device` (see the module docs).
pub async fn adopt(
    shared: &Operator,
    device: &str,
    request: &AdoptRequest,
) -> Result<AdoptResult, StoreError> {
    let (heartbeat, exists) = {
        let fleet = shared.fleet.read().unwrap();
        (
            fleet.heartbeats.get(device).map(|s| s.heartbeat.clone()),
            fleet.devices.contains_key(device),
        )
    };
    let Some(heartbeat) = heartbeat else {
        return Err(StoreError::NotFound(format!(
            "device {device:?} has not reported to this store: there is nothing to adopt (a device reports within its heartbeat interval once it is connected)"
        )));
    };
    let holding = heartbeat.health_flags.iter().find_map(|f| match f {
        HealthFlag::StoreChanged { cached, .. } => Some(cached.clone()),
        _ => None,
    });
    if exists && holding.is_none() {
        return Err(StoreError::Conflict(format!(
            "device {device:?} has a record and holds on no other store: nothing to adopt (change its labels with `fleetctl apply`)"
        )));
    }
    let mut said = Vec::new();
    if !exists {
        let doc = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": "Device",
            "metadata": {"name": device, "labels": request.labels},
        });
        let mut resource = Resource::from_user(doc).map_err(|errors| {
            StoreError::Invalid(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        resource.metadata_mut().generation = 1;
        match shared
            .buckets
            .resources
            .create(
                names::resource_key("Device", device),
                resource.to_stored_json().into(),
            )
            .await
        {
            Ok(_) => said.push("Device record created".to_owned()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                said.push("its Device record exists already".to_owned())
            }
            Err(e) => return Err(nats(e)),
        }
    }
    // The key as the device reports it: a user key or nothing (a device could claim any
    // string; it only ever names the device's own identity).
    let key = &heartbeat.public_key;
    let valid_key = key.starts_with('U') && nkeys::KeyPair::from_public_key(key).is_ok();
    if !key.is_empty() && !valid_key {
        said.push("its reported key is not a NATS user key: identity record not restored".into());
    }
    if valid_key {
        let record = DeviceIdentity {
            schema: SCHEMA_VERSION,
            device: device.to_owned(),
            public_key: heartbeat.public_key.clone(),
            enrolled_ms: now_ms(),
            token: format!("adopted by {}", request.by),
            blacklist: None,
            last_unblacklist: None,
            jwt_expires_secs: None,
        };
        let bytes = serde_json::to_vec(&record).expect("serializes");
        match shared
            .buckets
            .enrollment
            .create(identity_key(device), bytes.into())
            .await
        {
            Ok(_) => said.push("identity record restored from the key it reports".to_owned()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                let recorded = shared
                    .fleet
                    .read()
                    .unwrap()
                    .identities
                    .get(device)
                    .map(|i| i.public_key.clone());
                if recorded.is_some_and(|k| k != *key) {
                    said.push(
                        "its identity record names another key than it reports: kept as it is \
                         (delete the device and enroll it again if the record is wrong)"
                            .to_owned(),
                    );
                }
            }
            Err(e) => return Err(nats(e)),
        }
    }
    if let Some(cached) = &holding {
        update_adoption(shared, device, &request.by, |a| {
            a.accept = Some(cached.clone())
        })
        .await?;
        said.push(format!(
            "it may leave {cached} for this store, keeping what it runs as held deployments"
        ));
    }
    info!(%device, by = %request.by, "device adopted");
    Ok(AdoptResult {
        device: device.to_owned(),
        message: said.join("; "),
    })
}

/// Releases the deployments `device` holds from an earlier store: it removes them.
pub async fn release(shared: &Operator, device: &str, by: &str) -> Result<AdoptResult, StoreError> {
    let (held, store) = {
        let fleet = shared.fleet.read().unwrap();
        let held: BTreeSet<String> = fleet
            .heartbeats
            .get(device)
            .into_iter()
            .flat_map(|s| &s.heartbeat.health_flags)
            .filter_map(|f| match f {
                HealthFlag::HeldDeployments { deployments } => Some(deployments.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        (held, fleet.answering_store())
    };
    let Some(store) = store else {
        return Err(nats("the store is being restored or not read yet"));
    };
    if held.is_empty() {
        return Err(StoreError::NotFound(format!(
            "device {device:?} reports no held deployments"
        )));
    }
    update_adoption(shared, device, by, |a| a.release = Some(store.clone())).await?;
    let held: Vec<_> = held.into_iter().collect();
    info!(%device, %by, held = ?held, "held deployments released");
    Ok(AdoptResult {
        device: device.to_owned(),
        message: format!("the device removes {}", held.join(", ")),
    })
}

async fn update_adoption(
    shared: &Operator,
    device: &str,
    by: &str,
    change: impl Fn(&mut Adoption),
) -> Result<(), StoreError> {
    let key = names::adoption_key(device);
    let store = &shared.buckets.resources;
    for _ in 0..5 {
        let entry = store
            .entry(&key)
            .await
            .map_err(nats)?
            .filter(|e| e.operation == Operation::Put);
        let mut adoption: Adoption = match &entry {
            Some(e) => serde_json::from_slice(&e.value).unwrap_or_default(),
            None => Adoption::default(),
        };
        adoption.schema = SCHEMA_VERSION;
        adoption.by = by.to_owned();
        adoption.at_ms = now_ms();
        change(&mut adoption);
        let bytes = serde_json::to_vec(&adoption).expect("serializes");
        let written = match &entry {
            Some(e) => store.update(&key, bytes.into(), e.revision).await.is_ok(),
            None => store.create(&key, bytes.into()).await.is_ok(),
        };
        if written {
            return Ok(());
        }
    }
    Err(nats("the adoption record kept changing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup() -> Backup {
        let store = StoreRef {
            fleet_id: "f".into(),
            epoch: 1,
        };
        let mut buckets: BTreeMap<_, BTreeMap<_, _>> = BACKED_UP
            .iter()
            .map(|b| (b.to_string(), BTreeMap::new()))
            .collect();
        let identity = StoreIdentity {
            schema: SCHEMA_VERSION,
            store: store.clone(),
            restoring: false,
            created_ms: 1,
        };
        buckets.get_mut(RESOURCES_BUCKET).unwrap().insert(
            STORE_KEY.to_owned(),
            serde_json::to_value(&identity).unwrap(),
        );
        Backup {
            kind: "FleetBackup".into(),
            schema: SCHEMA_VERSION,
            created_ms: 1,
            store,
            buckets,
        }
    }

    fn with(bucket: &str, key: &str, value: serde_json::Value) -> Backup {
        let mut b = backup();
        b.buckets
            .entry(bucket.to_owned())
            .or_default()
            .insert(key.to_owned(), value);
        b
    }

    fn refused(b: &Backup) -> String {
        check(b).unwrap_err().to_string()
    }

    #[test]
    fn a_bad_backup_is_refused_naming_what_is_wrong() {
        assert!(check(&backup()).is_ok());
        let device = serde_json::json!({"apiVersion": API_VERSION, "kind": "Device",
            "metadata": {"name": "pi-01", "generation": 1}});
        assert!(check(&with(RESOURCES_BUCKET, "device.pi-01", device.clone())).is_ok());

        let mut b = backup();
        b.kind = "Other".into();
        assert!(refused(&b).starts_with("kind:"));
        let mut b = backup();
        b.store.epoch = 0;
        assert!(refused(&b).starts_with("store:"));
        // A bucket left out (a hand-edited file) would empty it: refused.
        let mut b = backup();
        b.buckets.remove(RESOURCES_BUCKET);
        assert!(refused(&b).contains("buckets.fleet-resources: missing"));
        // The store it names must be the one its resources record.
        let mut b = backup();
        b.store.epoch = 2;
        let e = refused(&b);
        assert!(e.contains("buckets.fleet-resources.fleet.store"), "{e}");
        assert!(
            refused(&with("fleet-lease", "operator", 1.into())).contains("buckets.fleet-lease")
        );
        assert!(refused(&with(AUDIT_BUCKET, "a b", 1.into())).contains("is not a KV key"));
        assert!(refused(&with(AUDIT_BUCKET, "a.>", 1.into())).contains("is not a KV key"));
        // A resource under another name's key, a resource that does not validate.
        let e = refused(&with(RESOURCES_BUCKET, "device.pi-02", device));
        assert!(
            e.contains("buckets.fleet-resources.device.pi-02: metadata.name"),
            "{e}"
        );
        let e = refused(&with(
            RESOURCES_BUCKET,
            "device.x",
            serde_json::json!({"apiVersion": API_VERSION, "kind": "Device",
                "metadata": {"name": "x", "labels": {"Bad!": "1"}}}),
        ));
        assert!(e.contains("metadata.labels"), "{e}");
        let e = refused(&with(RESOURCES_BUCKET, "secret.x", serde_json::json!({})));
        assert!(e.contains("unknown resource kind"), "{e}");
        // An identity record for another device, or with a key that is no user key.
        let identity = |device: &str, key: &str| {
            serde_json::json!({"schema": 1, "device": device, "public_key": key,
                "enrolled_ms": 1, "token": "t"})
        };
        let user = nkeys::KeyPair::new_user().public_key();
        assert!(check(&with(ENROLLMENT_BUCKET, "device.a", identity("a", &user))).is_ok());
        let e = refused(&with(ENROLLMENT_BUCKET, "device.a", identity("b", &user)));
        assert!(e.contains(": device: \"b\""), "{e}");
        let account = nkeys::KeyPair::new_account().public_key();
        let e = refused(&with(
            ENROLLMENT_BUCKET,
            "device.a",
            identity("a", &account),
        ));
        assert!(e.contains("public_key"), "{e}");
        // Too large to be one stored value.
        let big = "x".repeat(MAX_RESOURCE_BYTES + 1);
        let e = refused(&with(AUDIT_BUCKET, "a", big.into()));
        assert!(e.contains("bytes; a stored value is at most"), "{e}");
    }
}
