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
    API_VERSION, Labels, SCHEMA_VERSION,
    names::{self, check_name},
    resource::{Device, Metadata},
    rpc::{EnrollReply, EnrollRequest},
    state::{DeviceIdentity, EnrollmentToken, Revoked, RevokedFor},
};
use tracing::{info, warn};

use crate::{
    controller::{Operator, now_ms},
    identity::Identity,
    respond,
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

/// What the enrollment or renewal responder did with one request.
#[derive(Debug)]
struct Answered {
    /// The credentials issued (a JWT and its expiry, unix seconds), or why not.
    outcome: Result<(String, u64), Refusal>,
    /// An enrollment token that is used up (by this request or before): its NATS user is
    /// revoked once the answer is out.
    spent: Option<EnrollmentToken>,
}

/// Why a request was refused: in full for the operator's log, and what the requester is told.
#[derive(Debug)]
struct Refusal {
    detail: String,
    said: String,
}

impl Refusal {
    /// A refusal the requester may read in full (its request was malformed).
    fn plain(detail: String) -> Refusal {
        Refusal {
            said: detail.clone(),
            detail,
        }
    }

    /// A refusal whose reason stays in the operator's log: the requester learns nothing about
    /// which tokens or device ids exist.
    fn hidden(detail: String) -> Refusal {
        Refusal {
            detail,
            said: ENROLLMENT_REFUSED.to_owned(),
        }
    }
}

/// What a refused enrollment request is told, whatever the reason (a spent, revoked, expired
/// or unknown token; a device id enrolled with another key; a blacklisted device).
pub const ENROLLMENT_REFUSED: &str = "enrollment refused: this token cannot enroll this device \
     (it may be used, revoked or expired, or the device id may be taken); \
     ask the fleet's admin for a new token";

/// Revokes the NATS user of `token` (its holder can then not even ask again), until the
/// token's own JWT would have expired anyway. Tokens recorded before their user key was kept
/// have nothing to revoke; they expire on their own.
pub async fn revoke_token_user(
    shared: &Operator,
    token: &EnrollmentToken,
) -> Result<(), crate::blacklist::BlacklistError> {
    let Some(key) = &token.user_key else {
        return Ok(());
    };
    crate::blacklist::revoke(
        shared,
        key,
        Revoked {
            device: token.id.clone(),
            at_secs: now_ms() / 1000,
            reason: RevokedFor::Token,
            until_secs: Some(token.expires_ms / 1000 + 1),
        },
    )
    .await
}

/// Answers enrollment requests (`fleet.enroll.<token id>`) on `client` (the responder's own
/// connection: it may only publish to enrollment and device inboxes) until it closes.
pub async fn serve(client: async_nats::Client, shared: Arc<Operator>, identity: Arc<Identity>) {
    let state = shared.clone();
    respond::serve(
        client,
        names::enroll_subject,
        names::enroll_inbox,
        shared,
        false,
        move |token_id, payload| {
            let (shared, identity) = (state.clone(), identity.clone());
            async move {
                let answered = match serde_json::from_slice::<EnrollRequest>(&payload) {
                    Ok(req) => try_enroll(&shared, &identity, &token_id, &req).await,
                    Err(e) => Answered {
                        outcome: Err(Refusal::plain(format!("malformed enrollment request: {e}"))),
                        spent: None,
                    },
                };
                answered.into_answer("enroll", &token_id, shared)
            }
        },
    )
    .await
}

/// Answers renewal requests (`fleet.renew.<device>`) on the responder's connection until it
/// closes.
pub async fn serve_renewals(client: async_nats::Client, shared: Arc<Operator>) {
    let state = shared.clone();
    respond::serve(
        client,
        names::renew_subject,
        names::device_inbox,
        shared,
        false,
        move |device, _| {
            let shared = state.clone();
            async move {
                let answered = Answered {
                    outcome: renew(&shared, &device).await.map_err(Refusal::plain),
                    spent: None,
                };
                answered.into_answer("renew", &device, shared)
            }
        },
    )
    .await
}

impl Answered {
    /// The reply, logged; and a spent token's revocation to follow it.
    fn into_answer(self, verb: &str, token: &str, shared: Arc<Operator>) -> respond::Answer {
        let reply = match &self.outcome {
            Ok((jwt, expires_at)) => {
                info!(verb, %token, expires_at, "credentials issued");
                EnrollReply::Enrolled {
                    jwt: jwt.clone(),
                    expires_at: *expires_at,
                }
            }
            Err(refusal) => {
                warn!(verb, %token, reason = %refusal.detail, "refused");
                EnrollReply::Refused {
                    reason: refusal.said.clone(),
                }
            }
        };
        let mut answer = respond::Answer::json(&reply);
        if let Some(spent) = self.spent {
            answer.then = Some(Box::pin(async move {
                if let Err(e) = revoke_token_user(&shared, &spent).await {
                    warn!(token = %spent.id, error = %e, "cannot revoke the spent token's user; the next request with it tries again");
                }
            }));
        }
        answer
    }
}

async fn try_enroll(
    shared: &Operator,
    identity: &Identity,
    token_id: &str,
    req: &EnrollRequest,
) -> Answered {
    let plain = |detail: String| Answered {
        outcome: Err(Refusal::plain(detail)),
        spent: None,
    };
    if let Err(e) = check_name(&req.device) {
        return plain(format!("invalid device id {:?}: {e}", req.device));
    }
    let store = &shared.buckets.enrollment;
    let entry = match store.entry(token_key(token_id)).await {
        Ok(Some(e)) if e.operation == Operation::Put => e,
        Ok(_) => {
            return Answered {
                outcome: Err(Refusal::hidden(format!(
                    "unknown enrollment token {token_id}"
                ))),
                spent: None,
            };
        }
        Err(e) => return plain(format!("cannot read the token (try again): {e}")),
    };
    let mut token: EnrollmentToken = match serde_json::from_slice(&entry.value) {
        Ok(t) => t,
        Err(e) => return plain(format!("unreadable token record: {e}")),
    };
    let existing: Option<DeviceIdentity> = match store.get(identity_key(&req.device)).await {
        Ok(b) => b.and_then(|b| serde_json::from_slice(&b).ok()),
        Err(e) => {
            return plain(format!(
                "cannot read the device's identity (try again): {e}"
            ));
        }
    };
    let now = now_ms();
    let refuse = |detail: String, token: &EnrollmentToken| Answered {
        outcome: Err(Refusal::hidden(detail)),
        // A token that is used or revoked is spent whatever this request wanted.
        spent: (token.used_by.is_some() || token.revoked).then(|| token.clone()),
    };
    if let Some(b) = existing.as_ref().and_then(|e| e.blacklist.as_ref()) {
        let detail = format!(
            "device {} is blacklisted (by {}: {}); an admin must unblacklist it first",
            req.device, b.by, b.reason
        );
        return refuse(detail, &token);
    }
    match &existing {
        Some(known) if known.public_key != req.public_key => {
            let detail = format!(
                "device {} is already enrolled with another key; to enroll it again, an admin must delete it first (fleetctl delete device {})",
                req.device, req.device
            );
            return refuse(detail, &token);
        }
        // The same device with the same key asking again with its own token (it crashed
        // before saving the answer, and its token's user was not revoked yet): answer again.
        Some(known)
            if known.token == token_id
                && token.used_by.as_deref() == Some(&req.device)
                && !token.revoked => {}
        _ => {
            if let Some(reason) = token.refusal(now) {
                return refuse(reason, &token);
            }
            token.used_by = Some(req.device.clone());
            token.used_ms = Some(now);
            let bytes = serde_json::to_vec(&token).expect("tokens serialize");
            if store
                .update(token_key(token_id), bytes.into(), entry.revision)
                .await
                .is_err()
            {
                return refuse(
                    format!("enrollment token {token_id} was used concurrently"),
                    &token,
                );
            }
        }
    }
    let expires_at = (now / 1000) + shared.device_jwt_ttl.as_secs();
    let issued = issue(
        shared, identity, req, token_id, &token, existing, now, expires_at,
    )
    .await;
    Answered {
        outcome: issued.map_err(Refusal::plain),
        spent: Some(token),
    }
}

/// Mints the device's JWT, records its key (and the JWT's expiry) and its Device resource.
#[allow(clippy::too_many_arguments)]
async fn issue(
    shared: &Operator,
    identity: &Identity,
    req: &EnrollRequest,
    token_id: &str,
    token: &EnrollmentToken,
    existing: Option<DeviceIdentity>,
    now: u64,
    expires_at: u64,
) -> Result<(String, u64), String> {
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
        jwt_expires_secs: Some(expires_at),
    };
    shared
        .buckets
        .enrollment
        .put(
            identity_key(&req.device),
            serde_json::to_vec(&record).expect("serializes").into(),
        )
        .await
        .map_err(|e| format!("cannot record the device's key (try again): {e}"))?;
    create_device(&shared.buckets.resources, &req.device, &token.labels).await?;
    Ok((jwt, expires_at))
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

async fn renew(shared: &Operator, device: &str) -> Result<(String, u64), String> {
    check_name(device).map_err(|e| format!("invalid device id {device:?}: {e}"))?;
    let store = &shared.buckets.enrollment;
    let entry = store
        .entry(identity_key(device))
        .await
        .map_err(|e| format!("cannot read the device's identity (try again): {e}"))?
        .filter(|e| e.operation == Operation::Put)
        .ok_or_else(|| format!("device {device} is not enrolled"))?;
    let mut identity: DeviceIdentity = serde_json::from_slice(&entry.value)
        .map_err(|e| format!("unreadable identity record: {e}"))?;
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
    // The record knows how long this key's newest JWT lasts, so revoking the key (a delete)
    // lasts long enough. Compare-and-set: a blacklist meanwhile wins.
    identity.jwt_expires_secs = Some(expires_at);
    store
        .update(
            identity_key(device),
            serde_json::to_vec(&identity).expect("serializes").into(),
            entry.revision,
        )
        .await
        .map_err(|e| format!("the device's identity changed meanwhile (try again): {e}"))?;
    Ok((jwt, expires_at))
}
