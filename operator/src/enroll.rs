//! Enrollment: one-time tokens that let a new device trade its public key for a NATS user JWT.
//!
//! A token is a throwaway NATS user (`<seed>:<jwt>`, see [`Identity::enrollment_token`]) that
//! may only publish to `fleet.enroll.<token id>`; the operator answers there. The token's
//! record in `fleet-enrollment` (`token.<id>`) makes it single-use (compare-and-set on the
//! revision), expiring and revocable; the device's key is recorded as `device.<name>`, and a
//! different key for the same device is refused until an admin deletes the device.
//!
//! Renewal: an enrolled device asks on `fleet.renew.<device>` (NATS lets only that device
//! publish there) and gets a fresh JWT for the key it enrolled with, unless it is blacklisted.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::kv::{self, Operation};
use fleet_contracts::{
    API_VERSION, SCHEMA_VERSION,
    api::{DeviceIdentity, EnrollReply, EnrollRequest, EnrollmentToken},
    names::{self, check_name},
    resource::{Device, Labels, Metadata},
};
use futures::StreamExt;
use tracing::{info, warn};

use crate::{
    controller::{Shared, now_ms},
    identity::Identity,
};

/// How long a device JWT is valid by default; the agent renews it once two thirds have passed.
pub const DEVICE_JWT_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

pub fn token_key(id: &str) -> String {
    format!("token.{id}")
}

pub fn identity_key(device: &str) -> String {
    format!("device.{device}")
}

/// A fresh token id: 12 characters of `[a-z0-9]`, a valid name and subject token.
pub fn new_token_id() -> String {
    let mut b = [0u8; 12];
    getrandom::getrandom(&mut b).expect("the OS random source works");
    b.iter()
        .map(|x| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[usize::from(*x) % 36]))
        .collect()
}

/// Answers requests on `fleet.<verb>.*` until the connection closes: `answer` gets the last
/// subject token (a token id, a device id) and the payload. NATS permissions decide who may
/// publish on each subject, so the token is trustworthy.
async fn respond<F, Fut>(client: async_nats::Client, verb: &str, answer: F)
where
    F: Fn(String, bytes::Bytes) -> Fut,
    Fut: std::future::Future<Output = EnrollReply>,
{
    let prefix = format!("fleet.{verb}.");
    // A queue group: with several operators (active/passive), one of them answers each request.
    let subscribed = client
        .queue_subscribe(format!("{prefix}*"), "fleet-operator".to_owned())
        .await;
    let mut sub = match subscribed {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, verb, "cannot serve requests");
            return;
        }
    };
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let token = msg.subject.as_str().trim_start_matches(&prefix).to_owned();
        let answer = answer(token.clone(), msg.payload).await;
        match &answer {
            EnrollReply::Enrolled { expires_at, .. } => {
                info!(verb, %token, expires_at, "credentials issued")
            }
            EnrollReply::Refused { reason } => warn!(verb, %token, %reason, "refused"),
        }
        let bytes = serde_json::to_vec(&answer).expect("replies serialize");
        if let Err(e) = client.publish(reply, bytes.into()).await {
            warn!(error = %e, verb, "cannot answer a request");
        }
    }
}

/// Answers enrollment requests (`fleet.enroll.<token id>`) until the connection closes.
pub async fn serve(client: async_nats::Client, shared: Arc<Shared>, identity: Arc<Identity>) {
    respond(client, "enroll", |token_id, payload| {
        let (shared, identity) = (shared.clone(), identity.clone());
        async move {
            match serde_json::from_slice::<EnrollRequest>(&payload) {
                Ok(req) => enroll(&shared, &identity, &token_id, &req).await,
                Err(e) => EnrollReply::Refused {
                    reason: format!("malformed enrollment request: {e}"),
                },
            }
        }
    })
    .await
}

/// Answers renewal requests (`fleet.renew.<device>`) until the connection closes.
pub async fn serve_renewals(client: async_nats::Client, shared: Arc<Shared>) {
    respond(client, "renew", |device, _| {
        let shared = shared.clone();
        async move {
            renew(&shared, &device)
                .await
                .unwrap_or_else(|reason| EnrollReply::Refused { reason })
        }
    })
    .await
}

async fn enroll(
    shared: &Shared,
    identity: &Identity,
    token_id: &str,
    req: &EnrollRequest,
) -> EnrollReply {
    match try_enroll(shared, identity, token_id, req).await {
        Ok(reply) => reply,
        Err(reason) => EnrollReply::Refused { reason },
    }
}

async fn try_enroll(
    shared: &Shared,
    identity: &Identity,
    token_id: &str,
    req: &EnrollRequest,
) -> Result<EnrollReply, String> {
    let store = &shared.buckets.enrollment;
    check_name(&req.device).map_err(|e| format!("invalid device id {:?}: {e}", req.device))?;
    let entry = store
        .entry(token_key(token_id))
        .await
        .map_err(|e| format!("cannot read the token (try again): {e}"))?
        .filter(|e| e.operation == Operation::Put)
        .ok_or_else(|| format!("unknown enrollment token {token_id}"))?;
    let mut token: EnrollmentToken = serde_json::from_slice(&entry.value)
        .map_err(|e| format!("unreadable token record: {e}"))?;
    let existing: Option<DeviceIdentity> = store
        .get(identity_key(&req.device))
        .await
        .map_err(|e| format!("cannot read the device's identity (try again): {e}"))?
        .and_then(|b| serde_json::from_slice(&b).ok());
    let now = now_ms();
    if let Some(b) = existing.as_ref().and_then(|e| e.blacklist.as_ref()) {
        return Err(format!(
            "device {} is blacklisted (by {}: {}); an admin must unblacklist it first",
            req.device, b.by, b.reason
        ));
    }
    match &existing {
        Some(known) if known.public_key != req.public_key => {
            return Err(format!(
                "device {} is already enrolled with another key; to enroll it again, an admin must delete it first (fleetctl delete device {})",
                req.device, req.device
            ));
        }
        // The same device with the same key asking again with its own token (it crashed before
        // saving the answer): answer again.
        Some(known)
            if known.token == token_id
                && token.used_by.as_deref() == Some(&req.device)
                && !token.revoked => {}
        _ => {
            if let Some(reason) = token.refusal(now) {
                return Err(reason);
            }
            token.used_by = Some(req.device.clone());
            token.used_ms = Some(now);
            let bytes = serde_json::to_vec(&token).expect("tokens serialize");
            store
                .update(token_key(token_id), bytes.into(), entry.revision)
                .await
                .map_err(|_| format!("enrollment token {token_id} was used concurrently"))?;
        }
    }
    let expires_at = (now / 1000) + shared.device_jwt_ttl.as_secs();
    let jwt = identity
        .device_jwt(&req.device, &req.public_key, expires_at)
        .map_err(|e| e.to_string())?;
    let record = DeviceIdentity {
        schema: SCHEMA_VERSION,
        device: req.device.clone(),
        public_key: req.public_key.clone(),
        enrolled_ms: existing.as_ref().map_or(now, |e| e.enrolled_ms),
        token: token_id.to_owned(),
        blacklist: None,
        last_unblacklist: existing.as_ref().and_then(|e| e.last_unblacklist.clone()),
    };
    store
        .put(
            identity_key(&req.device),
            serde_json::to_vec(&record).expect("serializes").into(),
        )
        .await
        .map_err(|e| format!("cannot record the device's key (try again): {e}"))?;
    create_device(&shared.buckets.resources, &req.device, &token.labels).await?;
    Ok(EnrollReply::Enrolled { jwt, expires_at })
}

/// Creates the Device resource with the token's labels, unless an admin made it already.
async fn create_device(resources: &kv::Store, name: &str, labels: &Labels) -> Result<(), String> {
    let device = Device {
        api_version: API_VERSION.into(),
        kind: "Device".into(),
        metadata: Metadata {
            name: name.into(),
            labels: labels.clone(),
            generation: 1,
        },
        spec: Default::default(),
        status: None,
    };
    let bytes = serde_json::to_vec(&device).expect("serializes");
    match resources
        .create(names::resource_key("Device", name), bytes.into())
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!(
            "cannot create the Device resource (try again): {e}"
        )),
    }
}

async fn renew(shared: &Shared, device: &str) -> Result<EnrollReply, String> {
    check_name(device).map_err(|e| format!("invalid device id {device:?}: {e}"))?;
    let identity: DeviceIdentity = shared
        .buckets
        .enrollment
        .get(identity_key(device))
        .await
        .map_err(|e| format!("cannot read the device's identity (try again): {e}"))?
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| format!("device {device} is not enrolled"))?;
    if let Some(b) = &identity.blacklist {
        return Err(format!(
            "device {device} is blacklisted (by {}: {})",
            b.by, b.reason
        ));
    }
    let expires_at = now_ms() / 1000 + shared.device_jwt_ttl.as_secs();
    let jwt = shared
        .identity
        .device_jwt(device, &identity.public_key, expires_at)
        .map_err(|e| e.to_string())?;
    Ok(EnrollReply::Enrolled { jwt, expires_at })
}
