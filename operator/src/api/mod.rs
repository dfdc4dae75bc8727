//! The operator's HTTP surface: the JSON API `fleetctl` uses, the status page and `/metrics`.
//!
//! Writes go to the resources bucket only (compare-and-set on the revision, so two concurrent
//! applies cannot silently overwrite each other); the controller does the fan-out. Reads come
//! from the in-memory view, and say `recovering` until it has read every bucket.
//!
//! This module is the router, the admin-token check and the one error type ([`ApiError`]);
//! the handlers live by concern: `resources`, `enrollment`, `devices` (logs, exec, blacklist,
//! adopt, release), `backup`, and `page` (the status page and `/metrics`, open without the
//! token). `e2e/tests/api.rs` calls the router in-process against a real nats-server.

use std::{fmt::Write as _, sync::Arc, sync::atomic::Ordering};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
};
use fleet_contracts::{
    SCHEMA_VERSION,
    api::{
        ApplyOutcome, ApplyResult, BlacklistRequest, BlacklistResult, CreateEnrollmentToken,
        CreatedEnrollmentToken, ErrorBody, ExecCommand, OperatorStatus, RecoveryState, Role,
    },
    document::{self, MAX_BODY_BYTES, MAX_RESOURCE_BYTES},
    names,
    resource::{Deployment, Device, OsUpgrade, Resource},
    rpc::{ExecReply, ExecRequest, LogsReply, LogsRequest},
    state::{EnrollmentToken, ExecAudit, Health},
};
use futures::StreamExt;
use tracing::info;

use crate::controller::{Operator, now_ms};

mod backup;
mod devices;
mod enrollment;
mod page;
mod resources;

use backup::*;
use devices::*;
use enrollment::*;
use page::*;
use resources::*;

pub fn router(shared: Arc<Operator>) -> Router {
    let api = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/deployments", get(list_deployments))
        .route(
            "/api/v1/deployments/{name}",
            get(get_deployment).delete(delete_deployment),
        )
        .route("/api/v1/osupgrades", get(list_os_upgrades))
        .route(
            "/api/v1/osupgrades/{name}",
            get(get_os_upgrade).delete(delete_os_upgrade),
        )
        .route("/api/v1/devices", get(list_devices))
        .route(
            "/api/v1/devices/{name}",
            get(get_device).delete(delete_device),
        )
        .route("/api/v1/deployments/{name}/logs", get(deployment_logs))
        .route("/api/v1/deployments/{name}/exec", post(deployment_exec))
        .route(
            "/api/v1/deployments/{name}/rollout/resume",
            post(resume_rollout),
        )
        .route("/api/v1/devices/{name}/adopt", post(adopt_device))
        .route("/api/v1/devices/{name}/release", post(release_device))
        .route("/api/v1/backup", get(backup))
        .route(
            "/api/v1/restore",
            post(restore).layer(DefaultBodyLimit::max(MAX_BACKUP_BYTES)),
        )
        .route("/api/v1/devices/{name}/blacklist", post(blacklist_device))
        .route(
            "/api/v1/devices/{name}/unblacklist",
            post(unblacklist_device),
        )
        .route(
            "/api/v1/enrollment-tokens",
            get(list_tokens).post(create_token),
        )
        .route(
            "/api/v1/enrollment-tokens/{id}",
            axum::routing::delete(revoke_token),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ))
        // A body above this is refused (413) before it is read whole.
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(shared)
}

/// Every `/api/` call must carry the admin token (`Authorization: Bearer <token>`), until the
/// OIDC login with the `fleet-admin` role replaces it. The status page and `/metrics` are
/// read-only and stay open.
async fn require_token(
    State(shared): State<Arc<Operator>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if crate::identity::constant_time_eq(
        presented.as_bytes(),
        shared.identity.admin_token().as_bytes(),
    ) {
        next.run(request).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token: pass it as `Authorization: Bearer <token>` (fleetctl reads FLEET_TOKEN or FLEET_TOKEN_FILE)",
        )
        .into_response()
    }
}

/// An API error: status code plus the JSON body `fleetctl` prints.
#[derive(Debug)]
pub struct ApiError(StatusCode, ErrorBody);

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        ApiError(
            status,
            ErrorBody {
                error: error.into(),
                fields: vec![],
            },
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

pub(super) type ApiResult<T> = Result<Json<T>, ApiError>;

/// The `{name}` (or `{id}`) of a route, checked before anything else happens: a name is one
/// plain subject token ([`names::check_name`]), so nothing a caller sends can widen a NATS
/// subject, break the connection's control line (a 10,000-character name) or name another
/// key. An invalid one is the caller's error, 400.
#[derive(Debug)]
pub(super) struct Name(String);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Name {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
        valid_name("name", &name)?;
        Ok(Name(name))
    }
}

/// `name` checked as a device, resource or token name; the error names the `field`.
pub(super) fn valid_name(field: &str, name: &str) -> Result<(), ApiError> {
    names::check_name(name).map_err(|why| {
        let shown: String = name.chars().take(64).collect();
        let more = if name.chars().count() > 64 { "..." } else { "" };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid {field} {shown:?}{more}: {why}"),
        )
    })
}

pub(super) fn status_body(shared: &Operator) -> OperatorStatus {
    let fleet = shared.fleet.read().unwrap();
    let converged = shared.converged();
    OperatorStatus {
        state: if converged {
            RecoveryState::Converged
        } else {
            RecoveryState::Recovering
        },
        pending: shared.pending(),
        deployments: fleet.deployments.len(),
        devices: fleet.devices.len(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        instance: shared.leadership.instance.clone(),
        role: if shared.leadership.is_leader() {
            Role::Leader
        } else {
            Role::Standby
        },
        leader: shared.leadership.leader(),
        unreadable: fleet
            .unreadable
            .iter()
            .map(|(k, why)| format!("{k}: {why}"))
            .collect(),
    }
}

async fn status(State(shared): State<Arc<Operator>>) -> Json<OperatorStatus> {
    Json(status_body(&shared))
}

/// Reads must not answer from a half-read view: "not found" could be a lie.
pub(super) fn require_converged(shared: &Operator) -> Result<(), ApiError> {
    if shared.caught_up() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "operator is recovering ({}); retry in a moment",
                shared.pending().join(", ")
            ),
        ))
    }
}

pub(super) fn not_found(kind: &str, name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("{kind} {name:?} not found"))
}

/// A change to the resources while a restore writes them would be mixed into, or lost under,
/// the backup's: refused until the restore is done (or run again, if it was interrupted).
pub(super) fn refuse_while_restoring(shared: &Operator) -> Result<(), ApiError> {
    let fleet = shared.fleet.read().unwrap();
    match &fleet.store {
        Some(s) if s.restoring => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "a restore to {} is under way: try again once it is done (an interrupted one is \
                 finished by running `fleetctl restore` again)",
                s.store
            ),
        )),
        _ => Ok(()),
    }
}

/// A JSON body read strictly: an error names the field.
pub(super) fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            if path == "." {
                format!("invalid request: {message}")
            } else {
                format!("invalid request: {path}: {message}")
            },
        )
    })
}
