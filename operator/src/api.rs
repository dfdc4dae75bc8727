//! The operator's HTTP surface: the JSON API `fleetctl` uses, the status page and `/metrics`.
//!
//! Writes go to the resources bucket only (compare-and-set on the revision, so two concurrent
//! applies cannot silently overwrite each other); the controller does the fan-out. Reads come
//! from the in-memory view, and say `recovering` until it has read every bucket.

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
    resource::{Deployment, Device, Resource},
    rpc::{ExecReply, ExecRequest, LogsReply, LogsRequest},
    state::{EnrollmentToken, ExecAudit, Health},
};
use futures::StreamExt;
use tracing::info;

use crate::controller::{Operator, now_ms};

pub fn router(shared: Arc<Operator>) -> Router {
    let api = Router::new()
        .route("/api/v1/status", get(status))
        .route("/api/v1/apply", post(apply))
        .route("/api/v1/deployments", get(list_deployments))
        .route(
            "/api/v1/deployments/{name}",
            get(get_deployment).delete(delete_deployment),
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

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The `{name}` (or `{id}`) of a route, checked before anything else happens: a name is one
/// plain subject token ([`names::check_name`]), so nothing a caller sends can widen a NATS
/// subject, break the connection's control line (a 10,000-character name) or name another
/// key. An invalid one is the caller's error, 400.
#[derive(Debug)]
struct Name(String);

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
fn valid_name(field: &str, name: &str) -> Result<(), ApiError> {
    names::check_name(name).map_err(|why| {
        let shown: String = name.chars().take(64).collect();
        let more = if name.chars().count() > 64 { "..." } else { "" };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid {field} {shown:?}{more}: {why}"),
        )
    })
}

fn status_body(shared: &Operator) -> OperatorStatus {
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
fn require_converged(shared: &Operator) -> Result<(), ApiError> {
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

async fn apply(
    State(shared): State<Arc<Operator>>,
    request: axum::extract::Request,
) -> ApiResult<ApplyResult> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than {MAX_BODY_BYTES} bytes, the most the operator \
                 reads; a resource may be at most {MAX_RESOURCE_BYTES} bytes as stored"
            ),
        )
    };
    // A body announced too large is refused before any of it is read: a client that asked
    // `Expect: 100-continue` then sends none of it.
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let body = axum::body::to_bytes(request.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            let limit = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if limit {
                too_large()
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                )
            }
        })?;
    let invalid = |fields: Vec<fleet_contracts::FieldError>| {
        let error = match fields.as_slice() {
            [only] if only.path.is_empty() => format!("invalid resource: {}", only.message),
            [only] => format!("invalid resource: {only}"),
            _ => format!("invalid resource: {} problem(s)", fields.len()),
        };
        let fields = fields.into_iter().filter(|f| !f.path.is_empty()).collect();
        ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorBody { error, fields },
        )
    };
    let doc = document::from_json(&body).map_err(|e| {
        if e.path.is_empty() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not valid JSON: {}", e.message),
            )
        } else {
            invalid(vec![e])
        }
    })?;
    let mut resource = Resource::from_user(doc).map_err(invalid)?;
    let size = resource.to_stored_json().len();
    // 0 until the server's first INFO (the operator starts before NATS answers): unknown.
    let max_payload = shared.nats.server_info().max_payload;
    let limit = match max_payload {
        0 => MAX_RESOURCE_BYTES,
        n => MAX_RESOURCE_BYTES.min(n),
    };
    if size > limit {
        let server = match max_payload {
            0 => String::new(),
            n => format!("; this NATS server's max_payload is {n} bytes"),
        };
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} {:?} is {size} bytes as stored; a resource may be at most {limit} bytes \
                 (it is one NATS message{server})",
                resource.kind(),
                resource.metadata().name
            ),
        ));
    }
    refuse_while_restoring(&shared)?;
    // No need to wait for a recovering view: the write is a compare-and-set on KV itself.
    let key = names::resource_key(resource.kind(), &resource.metadata().name);
    let store = &shared.buckets.resources;
    let existing = store.entry(&key).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read {key} from NATS: {e}"),
        )
    })?;
    let existing =
        existing.filter(|e| matches!(e.operation, async_nats::jetstream::kv::Operation::Put));
    let previous = match &existing {
        Some(entry) => Some(stored_resource(resource.kind(), &entry.value).map_err(|e| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!("the stored {key} cannot be read ({e}); delete it first"),
            )
        })?),
        None => None,
    };
    let (generation, outcome) = match &previous {
        None => (1, ApplyOutcome::Created),
        Some(prev)
            if same_spec(prev, &resource)
                && prev.metadata().labels == resource.metadata().labels =>
        {
            (prev.metadata().generation, ApplyOutcome::Unchanged)
        }
        Some(prev) if same_spec(prev, &resource) => {
            (prev.metadata().generation, ApplyOutcome::Configured)
        }
        Some(prev) => (prev.metadata().generation + 1, ApplyOutcome::Configured),
    };
    resource.metadata_mut().generation = generation;
    let result = ApplyResult {
        kind: resource.kind().to_owned(),
        name: resource.metadata().name.clone(),
        generation,
        outcome,
        warnings: warnings(&shared, &resource),
    };
    if outcome == ApplyOutcome::Unchanged {
        return Ok(Json(result));
    }
    let bytes = resource.to_stored_json();
    // Only a lost compare-and-set is a conflict that applying again resolves; anything else
    // (NATS unreachable, a timeout) is the store's trouble, 503.
    let write = match &existing {
        Some(entry) => store
            .update(&key, bytes.into(), entry.revision)
            .await
            .map(drop)
            .map_err(|e| {
                let lost =
                    e.kind() == async_nats::jetstream::kv::UpdateErrorKind::WrongLastRevision;
                (lost, e.to_string())
            }),
        None => store
            .create(&key, bytes.into())
            .await
            .map(drop)
            .map_err(|e| {
                let lost = e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists;
                (lost, e.to_string())
            }),
    };
    write.map_err(|(lost, e)| {
        if lost {
            ApiError::new(
                StatusCode::CONFLICT,
                format!("{key} changed while applying ({e}); apply again"),
            )
        } else {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot write {key} to NATS: {e}"),
            )
        }
    })?;
    info!(kind = resource.kind(), name = %result.name, generation, %outcome, "applied");
    Ok(Json(result))
}

fn stored_resource(kind: &str, bytes: &[u8]) -> Result<Resource, serde_json::Error> {
    Ok(match kind {
        "Deployment" => Resource::Deployment(serde_json::from_slice(bytes)?),
        _ => Resource::Device(serde_json::from_slice(bytes)?),
    })
}

fn same_spec(a: &Resource, b: &Resource) -> bool {
    match (a, b) {
        (Resource::Deployment(a), Resource::Deployment(b)) => a.spec == b.spec,
        (Resource::Device(a), Resource::Device(b)) => a.spec == b.spec,
        _ => false,
    }
}

/// Advice that does not block the apply.
fn warnings(shared: &Operator, resource: &Resource) -> Vec<String> {
    let fleet = shared.fleet.read().unwrap();
    let mut out = Vec::new();
    if let Resource::Deployment(d) = resource {
        out.extend(d.spec.template.idempotency_warnings());
        if !shared.caught_up() {
            out.push(
                "the operator is still reading the fleet's state: selector and port checks were skipped"
                    .into(),
            );
            return out;
        }
        if fleet.matching_devices(d).next().is_none() {
            out.push(format!(
                "no device matches the selector {:?} yet; the Deployment waits for one",
                d.spec.selector.match_labels
            ));
        }
        // Host ports of another Deployment on the same devices would make one of them fail.
        let ports = |d: &Deployment| -> Vec<u16> {
            d.spec
                .template
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().map(|p| p.effective_host_port()))
                .collect()
        };
        let mine = ports(d);
        for other in fleet
            .deployments
            .values()
            .filter(|o| o.metadata.name != d.metadata.name)
        {
            let clash: Vec<u16> = ports(other)
                .into_iter()
                .filter(|p| mine.contains(p))
                .collect();
            let shared_device = fleet
                .matching_devices(d)
                .any(|dev| other.spec.selector.matches(&dev.metadata.labels));
            if !clash.is_empty() && shared_device {
                out.push(format!(
                    "host port(s) {clash:?} are also used by Deployment {} on the same devices",
                    other.metadata.name
                ));
            }
        }
    }
    out
}

async fn list_deployments(State(shared): State<Arc<Operator>>) -> ApiResult<Vec<Deployment>> {
    require_converged(&shared)?;
    let fleet = shared.fleet.read().unwrap();
    let now = now_ms();
    Ok(Json(
        fleet
            .deployments
            .values()
            .map(|d| Deployment {
                status: Some(fleet.deployment_status(d, now)),
                ..d.clone()
            })
            .collect(),
    ))
}

async fn get_deployment(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
) -> ApiResult<Deployment> {
    require_converged(&shared)?;
    let fleet = shared.fleet.read().unwrap();
    let d = fleet
        .deployments
        .get(&name)
        .ok_or_else(|| not_found("Deployment", &name))?;
    Ok(Json(Deployment {
        status: Some(fleet.deployment_status(d, now_ms())),
        ..d.clone()
    }))
}

async fn list_devices(State(shared): State<Arc<Operator>>) -> ApiResult<Vec<Device>> {
    require_converged(&shared)?;
    let fleet = shared.fleet.read().unwrap();
    let now = now_ms();
    Ok(Json(
        fleet
            .devices
            .values()
            .map(|d| Device {
                status: Some(fleet.device_status(d, now)),
                ..d.clone()
            })
            .chain(
                fleet
                    .unregistered()
                    .filter_map(|name| fleet.unregistered_device(name, now)),
            )
            .collect(),
    ))
}

async fn get_device(State(shared): State<Arc<Operator>>, Name(name): Name) -> ApiResult<Device> {
    require_converged(&shared)?;
    let fleet = shared.fleet.read().unwrap();
    let Some(d) = fleet.devices.get(&name) else {
        return fleet
            .unregistered_device(&name, now_ms())
            .map(Json)
            .ok_or_else(|| not_found("Device", &name));
    };
    Ok(Json(Device {
        status: Some(fleet.device_status(d, now_ms())),
        ..d.clone()
    }))
}

fn not_found(kind: &str, name: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("{kind} {name:?} not found"))
}

async fn delete_deployment(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
) -> Result<StatusCode, ApiError> {
    delete(&shared, "Deployment", &name).await
}

async fn delete_device(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
) -> Result<StatusCode, ApiError> {
    delete(&shared, "Device", &name).await
}

/// A change to the resources while a restore writes them would be mixed into, or lost under,
/// the backup's: refused until the restore is done (or run again, if it was interrupted).
fn refuse_while_restoring(shared: &Operator) -> Result<(), ApiError> {
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

async fn delete(shared: &Operator, kind: &str, name: &str) -> Result<StatusCode, ApiError> {
    refuse_while_restoring(shared)?;
    // KV decides, not the (possibly recovering) view.
    let key = names::resource_key(kind, name);
    let entry = shared.buckets.resources.entry(&key).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read {key} from NATS: {e}"),
        )
    })?;
    if !entry.is_some_and(|e| e.operation == async_nats::jetstream::kv::Operation::Put) {
        return Err(not_found(kind, name));
    }
    if kind == "Device" {
        forget_device(shared, name).await?;
    }
    shared.buckets.resources.delete(&key).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot delete {key} in NATS: {e}"),
        )
    })?;
    if kind == "Deployment" {
        // A resume belongs to the Deployment's generations: it goes with it.
        let key = names::resource_key("rollout", name);
        shared.buckets.resources.delete(&key).await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot delete {key} in NATS: {e}"),
            )
        })?;
    }
    info!(kind, name, "deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// What deleting a Device does before the resource goes: its enrolled key is revoked in the
/// fleet account (its connection ends at once, and no JWT of that key ever works again, so a
/// new device under the same id is out of its reach), its reported keys are purged, and its
/// identity record is removed (the id may enroll again, with a new key and a new token).
async fn forget_device(shared: &Operator, name: &str) -> Result<(), ApiError> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot delete device {name}: {what}: {e}; try again"),
        )
    };
    let key = crate::enroll::identity_key(name);
    let identity: Option<fleet_contracts::state::DeviceIdentity> = shared
        .buckets
        .enrollment
        .get(&key)
        .await
        .map_err(|e| unavailable("reading its identity", &e))?
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(identity) = &identity {
        let now = now_ms() / 1000;
        // Every JWT of this key expires by then: the newest one's expiry, or for a record
        // older than that field, anything minted up to now.
        let until = identity
            .jwt_expires_secs
            .unwrap_or(now + shared.device_jwt_ttl.as_secs());
        crate::blacklist::revoke(
            shared,
            &identity.public_key,
            fleet_contracts::state::Revoked {
                device: name.to_owned(),
                at_secs: now,
                reason: fleet_contracts::state::RevokedFor::Deleted,
                until_secs: Some(until),
            },
        )
        .await
        .map_err(|e| unavailable("revoking its key", &e))?;
    }
    let js = async_nats::jetstream::new(shared.nats.clone());
    js.get_stream(names::kv_stream(names::REPORTED_BUCKET))
        .await
        .map_err(|e| unavailable("opening the reported bucket", &e))?
        .purge()
        .filter(names::device_filter(names::REPORTED_BUCKET, name))
        .await
        .map_err(|e| unavailable("purging its reported keys", &e))?;
    shared
        .buckets
        .enrollment
        .delete(&key)
        .await
        .map_err(|e| unavailable("removing its identity record", &e))?;
    Ok(())
}

async fn metrics(State(shared): State<Arc<Operator>>) -> impl IntoResponse {
    let mut out = String::new();
    let m = &shared.metrics;
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        );
    };
    counter(
        &mut out,
        "fleet_operator_desired_puts_total",
        "Desired keys written.",
        m.desired_puts.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "fleet_operator_desired_deletes_total",
        "Desired keys deleted.",
        m.desired_deletes.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "fleet_operator_fan_out_errors_total",
        "Failed desired writes.",
        m.fan_out_errors.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "fleet_operator_unreadable_values_total",
        "KV values skipped as unreadable.",
        m.unreadable_values.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "fleet_operator_refused_requests_total",
        "Enrollment and renewal requests refused before any work (a reply subject outside the requester's inbox).",
        m.refused_requests.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "fleet_operator_refused_reports_total",
        "Report entries refused (not what their key holds, too large, too many keys).",
        m.refused_reports.load(Ordering::Relaxed),
    );
    let fleet = shared.fleet.read().unwrap();
    let now = now_ms();
    let _ = write!(
        out,
        "# HELP fleet_operator_converged 1 once every KV bucket has been read (and, leading, the desired state written).\n# TYPE fleet_operator_converged gauge\nfleet_operator_converged {}\n# HELP fleet_operator_leader 1 while this operator holds the leadership lease.\n# TYPE fleet_operator_leader gauge\nfleet_operator_leader {}\n",
        u8::from(shared.converged()),
        u8::from(shared.leadership.is_leader())
    );
    out.push_str(
        "# HELP fleet_operator_devices Devices by health.\n# TYPE fleet_operator_devices gauge\n",
    );
    for health in [
        Health::Healthy,
        Health::Stale,
        Health::Offline,
        Health::Unknown,
    ] {
        let n = fleet
            .devices
            .keys()
            .filter(|d| fleet.health(d, now).0 == health)
            .count();
        let _ = writeln!(out, "fleet_operator_devices{{health=\"{health}\"}} {n}");
    }
    let _ = write!(
        out,
        "# HELP fleet_operator_unregistered_devices Devices that report but have no Device record (the store lost it, or a restore predates it): `fleetctl device adopt`.\n# TYPE fleet_operator_unregistered_devices gauge\nfleet_operator_unregistered_devices {}\n",
        fleet.unregistered().count()
    );
    out.push_str("# HELP fleet_operator_deployment_devices Matching devices per Deployment by state.\n# TYPE fleet_operator_deployment_devices gauge\n");
    for d in fleet.deployments.values() {
        let s = fleet.deployment_status(d, now);
        let name = &d.metadata.name;
        for (state, n) in [
            ("desired", s.desired_devices),
            ("running", s.running_devices),
            ("failed", s.failed_devices),
        ] {
            let _ = writeln!(
                out,
                "fleet_operator_deployment_devices{{deployment=\"{name}\",state=\"{state}\"}} {n}"
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// The status page: server-rendered, refreshes itself every few seconds, no JavaScript.
async fn page(State(shared): State<Arc<Operator>>) -> Html<String> {
    let status = status_body(&shared);
    let fleet = shared.fleet.read().unwrap();
    let now = now_ms();
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=3>\
         <title>Fleet</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}.banner{padding:.5em;margin-bottom:1em}\
         .recovering{background:#fec}.converged{background:#dfd}.Failed,.Offline{color:#b00}.Stale,.Degraded{color:#a60}\
         .Running,.Healthy{color:#070}.Unregistered{color:#a0a}</style></head><body><h1>Fleet</h1>",
    );
    match status.state {
        RecoveryState::Converged => {
            h.push_str("<div class='banner converged' id=state>converged</div>")
        }
        RecoveryState::Recovering => {
            let _ = write!(
                h,
                "<div class='banner recovering' id=state>recovering: {}</div>",
                esc(&status.pending.join(", "))
            );
        }
    }
    let _ = write!(
        h,
        "<p id=role>operator {} ({}){}</p>",
        esc(&status.instance),
        if status.role == Role::Leader {
            "leader"
        } else {
            "standby"
        },
        match (&status.role, &status.leader) {
            (Role::Standby, Some(l)) => format!("; the leader is {}", esc(l)),
            (Role::Standby, None) => "; no leader known".to_owned(),
            _ => String::new(),
        }
    );
    if !status.unreadable.is_empty() {
        h.push_str("<div class='banner recovering' id=unreadable>skipped (unreadable, left as they are):<ul>");
        for u in &status.unreadable {
            let _ = write!(h, "<li>{}</li>", esc(u));
        }
        h.push_str("</ul></div>");
    }
    h.push_str("<h2>Deployments</h2><table><tr><th>name</th><th>generation</th><th>phase</th><th>running</th><th>devices</th></tr>");
    for d in fleet.deployments.values() {
        let s = fleet.deployment_status(d, now);
        let phase = format!("{:?}", s.phase);
        let devices = s
            .devices
            .iter()
            .map(|x| {
                let phase = x.reported.as_ref().map_or("-".to_owned(), |r| {
                    format!("{} (gen {})", r.phase, r.observed_generation)
                });
                format!("{}: {}", esc(&x.device), esc(&phase))
            })
            .collect::<Vec<_>>()
            .join("<br>");
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class={phase}>{phase}</td><td>{}/{}</td><td>{devices}</td></tr>",
            esc(&d.metadata.name),
            d.metadata.generation,
            s.running_devices,
            s.desired_devices
        );
    }
    h.push_str("</table><h2>Devices</h2><table><tr><th>name</th><th>health</th><th>last heartbeat</th><th>agent</th><th>os</th><th>labels</th></tr>");
    let unregistered: Vec<Device> = fleet
        .unregistered()
        .filter_map(|name| fleet.unregistered_device(name, now))
        .collect();
    for dev in fleet.devices.values().chain(&unregistered) {
        let s = dev
            .status
            .clone()
            .unwrap_or_else(|| fleet.device_status(dev, now));
        let age = s.heartbeat_age_ms.map_or("never".to_owned(), |ms| {
            format!("{:.1} s ago", ms as f64 / 1000.0)
        });
        let (agent, os) = s.heartbeat.as_ref().map_or(("-".into(), "-".into()), |hb| {
            (hb.agent_version.clone(), hb.os.clone())
        });
        let health = s.shown_health();
        let labels = dev
            .metadata
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            h,
            "<tr><td>{}</td><td class={}>{}</td><td>{age}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&dev.metadata.name),
            if s.unregistered {
                "Unregistered".to_owned()
            } else {
                s.health.to_string()
            },
            esc(&health),
            esc(&agent),
            esc(&os),
            esc(&labels)
        );
    }
    h.push_str("</table></body></html>");
    Html(h)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&#39;")
        .replace('"', "&quot;")
}

async fn create_token(
    State(shared): State<Arc<Operator>>,
    body: Bytes,
) -> ApiResult<CreatedEnrollmentToken> {
    let req: CreateEnrollmentToken = if body.is_empty() {
        CreateEnrollmentToken::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid request: {e}")))?
    };
    let ttl = req.ttl_secs.map_or(
        crate::enroll::DEFAULT_TOKEN_TTL,
        std::time::Duration::from_secs,
    );
    if ttl.is_zero() || ttl > crate::enroll::MAX_TOKEN_TTL {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "ttl_secs must be between 1 and {}",
                crate::enroll::MAX_TOKEN_TTL.as_secs()
            ),
        ));
    }
    // The labels go onto a Device: check them as the Device would be checked.
    let device = serde_json::json!({
        "apiVersion": fleet_contracts::API_VERSION, "kind": "Device",
        "metadata": {"name": "token-labels", "labels": req.labels},
    });
    if let Err(fields) = Resource::from_user(device) {
        let fields = fields
            .into_iter()
            .map(|f| {
                fleet_contracts::FieldError::new(
                    f.path.replace("metadata.labels", "labels"),
                    f.message,
                )
            })
            .collect();
        return Err(ApiError(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorBody {
                error: "invalid labels".into(),
                fields,
            },
        ));
    }
    let id = crate::enroll::new_token_id();
    let now = now_ms();
    let expires_ms = now + ttl.as_millis() as u64;
    let (token, user_key) = shared
        .identity
        .enrollment_token(&id, expires_ms / 1000)
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot mint the token: {e}"),
            )
        })?;
    let info = EnrollmentToken {
        schema: SCHEMA_VERSION,
        id: id.clone(),
        labels: req.labels,
        created_ms: now,
        expires_ms,
        used_by: None,
        used_ms: None,
        revoked: false,
        user_key: Some(user_key),
    };
    let bytes = serde_json::to_vec(&info).expect("serializes");
    shared
        .buckets
        .enrollment
        .create(crate::enroll::token_key(&id), bytes.into())
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot store the token in NATS: {e}"),
            )
        })?;
    info!(token = %id, "enrollment token created");
    Ok(Json(CreatedEnrollmentToken { token, info }))
}

async fn list_tokens(State(shared): State<Arc<Operator>>) -> ApiResult<Vec<EnrollmentToken>> {
    use futures::TryStreamExt;
    let store = &shared.buckets.enrollment;
    let unavailable = |e: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot list tokens: {e}"),
        )
    };
    let keys: Vec<String> = store
        .keys()
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .try_collect()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut tokens = Vec::new();
    for key in keys.iter().filter(|k| k.starts_with("token.")) {
        if let Some(bytes) = store
            .get(key)
            .await
            .map_err(|e| unavailable(e.to_string()))?
            && let Ok(t) = serde_json::from_slice::<EnrollmentToken>(&bytes)
        {
            tokens.push(t);
        }
    }
    tokens.sort_by_key(|t| t.created_ms);
    Ok(Json(tokens))
}

async fn revoke_token(
    State(shared): State<Arc<Operator>>,
    Name(id): Name,
) -> ApiResult<EnrollmentToken> {
    let store = &shared.buckets.enrollment;
    let key = crate::enroll::token_key(&id);
    let unavailable = |e: String| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot revoke {id}: {e}"),
        )
    };
    let entry = store
        .entry(&key)
        .await
        .map_err(|e| unavailable(e.to_string()))?
        .filter(|e| e.operation == async_nats::jetstream::kv::Operation::Put)
        .ok_or_else(|| not_found("enrollment token", &id))?;
    let mut token: EnrollmentToken =
        serde_json::from_slice(&entry.value).map_err(|e| unavailable(e.to_string()))?;
    token.revoked = true;
    store
        .update(
            &key,
            serde_json::to_vec(&token).expect("serializes").into(),
            entry.revision,
        )
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::CONFLICT,
                format!("{id} changed while revoking ({e}); try again"),
            )
        })?;
    crate::enroll::revoke_token_user(&shared, &token)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    info!(token = %id, "enrollment token revoked");
    Ok(Json(token))
}

/// Largest backup a restore reads: a fleet of thousands of devices is a few MiB.
const MAX_BACKUP_BYTES: usize = 256 * 1024 * 1024;

fn store_error(e: crate::store::StoreError) -> ApiError {
    use crate::store::StoreError;
    let status = match e {
        StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        StoreError::NotFound(_) => StatusCode::NOT_FOUND,
        StoreError::Conflict(_) => StatusCode::CONFLICT,
        StoreError::Nats(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError::new(status, e.to_string())
}

/// A JSON body read strictly: an error names the field.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
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

async fn adopt_device(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
    body: Bytes,
) -> ApiResult<fleet_contracts::api::AdoptResult> {
    require_converged(&shared)?;
    let request: fleet_contracts::api::AdoptRequest = json_body(&body)?;
    crate::store::adopt(&shared, &name, &request)
        .await
        .map(Json)
        .map_err(store_error)
}

async fn release_device(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
    body: Bytes,
) -> ApiResult<fleet_contracts::api::AdoptResult> {
    require_converged(&shared)?;
    let request: BlacklistRequest = json_body(&body)?;
    crate::store::release(&shared, &name, &request.by)
        .await
        .map(Json)
        .map_err(store_error)
}

async fn backup(State(shared): State<Arc<Operator>>) -> ApiResult<fleet_contracts::api::Backup> {
    crate::store::backup(&shared)
        .await
        .map(Json)
        .map_err(store_error)
}

async fn restore(
    State(shared): State<Arc<Operator>>,
    body: Bytes,
) -> ApiResult<fleet_contracts::api::RestoreResult> {
    let backup: fleet_contracts::api::Backup = json_body(&body)?;
    crate::store::restore(&shared, &backup)
        .await
        .map(Json)
        .map_err(store_error)
}

async fn blacklist_device(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
    body: Bytes,
) -> ApiResult<BlacklistResult> {
    set_blacklist(&shared, &name, true, &body).await
}

async fn unblacklist_device(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
    body: Bytes,
) -> ApiResult<BlacklistResult> {
    set_blacklist(&shared, &name, false, &body).await
}

async fn set_blacklist(
    shared: &Operator,
    name: &str,
    on: bool,
    body: &[u8],
) -> ApiResult<BlacklistResult> {
    let req: BlacklistRequest = if body.is_empty() {
        BlacklistRequest::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid request: {e}")))?
    };
    let audit = crate::blacklist::audit(&req.by, &req.reason);
    crate::blacklist::set(shared, name, on, audit)
        .await
        .map(Json)
        .map_err(|e| {
            let status = match e {
                crate::blacklist::BlacklistError::NotEnrolled(_) => StatusCode::NOT_FOUND,
                crate::blacklist::BlacklistError::Nats(_) => StatusCode::SERVICE_UNAVAILABLE,
                crate::blacklist::BlacklistError::Refused(_) => StatusCode::BAD_GATEWAY,
            };
            ApiError::new(status, e.to_string())
        })
}

#[derive(Debug, serde::Deserialize)]
struct LogsQuery {
    device: String,
    #[serde(default = "default_tail")]
    tail: u32,
    /// Keep streaming new lines (plain text) until the client goes away.
    #[serde(default)]
    follow: bool,
}

fn default_tail() -> u32 {
    100
}

/// Checks that `deployment` exists and `device` is one of its devices.
fn check_target(shared: &Operator, deployment: &str, device: &str) -> Result<(), ApiError> {
    valid_name("device", device)?;
    let fleet = shared.fleet.read().unwrap();
    let d = fleet
        .deployments
        .get(deployment)
        .ok_or_else(|| not_found("Deployment", deployment))?;
    if !fleet
        .matching_devices(d)
        .any(|dev| dev.metadata.name == device)
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("Deployment {deployment:?} does not run on device {device:?}"),
        ));
    }
    Ok(())
}

/// Sends a request to a device and reads its answer; a device that is not connected is a 503.
async fn ask_device<T: serde::de::DeserializeOwned>(
    shared: &Operator,
    subject: String,
    device: &str,
    body: Vec<u8>,
    timeout: std::time::Duration,
) -> Result<T, ApiError> {
    let request = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(timeout));
    let reply = shared
        .nats
        .send_request(subject, request)
        .await
        .map_err(|e| {
            let why = match e.kind() {
                async_nats::RequestErrorKind::NoResponders => {
                    format!("device {device:?} is not connected")
                }
                async_nats::RequestErrorKind::TimedOut => {
                    format!("device {device:?} did not answer within {timeout:?}")
                }
                _ => format!("cannot reach device {device:?}: {e}"),
            };
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, why)
        })?;
    serde_json::from_slice(&reply.payload).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            format!("unreadable answer from device {device:?}: {e}"),
        )
    })
}

async fn deployment_logs(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
    axum::extract::Query(q): axum::extract::Query<LogsQuery>,
) -> Result<Response, ApiError> {
    require_converged(&shared)?;
    check_target(&shared, &name, &q.device)?;
    if q.follow {
        return follow_logs(shared, name, q).await;
    }
    let req = LogsRequest {
        schema: SCHEMA_VERSION,
        deployment: name,
        tail: q.tail.min(100_000),
        follow_session: None,
    };
    let body = serde_json::to_vec(&req).expect("serializes");
    let reply: LogsReply = ask_device(
        &shared,
        names::logs_subject(&q.device),
        &q.device,
        body,
        std::time::Duration::from_secs(15),
    )
    .await?;
    match reply {
        LogsReply::Error { message } => Err(ApiError::new(StatusCode::NOT_FOUND, message)),
        lines => Ok(Json(lines).into_response()),
    }
}

/// Streams a followed log as plain text lines until the client goes away or the device ends
/// the session (its reason is the last line, prefixed `-- `). The operator acknowledges every
/// chunk and keeps the session alive while the HTTP client is connected; when the client
/// goes, the stream is dropped and the device is told to stop.
async fn follow_logs(
    shared: Arc<Operator>,
    deployment: String,
    q: LogsQuery,
) -> Result<Response, ApiError> {
    use fleet_contracts::{
        names::follow_ack_subject,
        rpc::{FollowAck, LogsChunk},
    };
    let session = crate::enroll::new_token_id();
    let nats = shared.nats.clone();
    let inbox = nats.new_inbox();
    let chunks = nats.subscribe(inbox.clone()).await.map_err(|e| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot follow: {e}"),
        )
    })?;
    let req = LogsRequest {
        schema: SCHEMA_VERSION,
        deployment,
        tail: q.tail.min(100_000),
        follow_session: Some(session.clone()),
    };
    let body = serde_json::to_vec(&req).expect("serializes");
    nats.publish_with_reply(names::logs_subject(&q.device), inbox, body.into())
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot follow: {e}"),
            )
        })?;
    let ack_subject = follow_ack_subject(&q.device, &session);
    // Keepalive while the stream lives; a stop when it is dropped (the client went away).
    let (alive, mut gone) = tokio::sync::watch::channel(0u64);
    {
        let (nats, ack_subject) = (nats.clone(), ack_subject.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = gone.changed() => if changed.is_err() { break },
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                }
                let ack = FollowAck {
                    seq: *gone.borrow(),
                    stop: false,
                };
                let _ = nats
                    .publish(
                        ack_subject.clone(),
                        serde_json::to_vec(&ack).expect("acks serialize").into(),
                    )
                    .await;
            }
            let stop = FollowAck { seq: 0, stop: true };
            let _ = nats
                .publish(
                    ack_subject,
                    serde_json::to_vec(&stop).expect("acks serialize").into(),
                )
                .await;
        });
    }
    let device = q.device.clone();
    let stream = futures::stream::unfold(
        (chunks, nats, ack_subject, alive, false),
        move |(mut chunks, nats, ack_subject, alive, ended)| {
            let device = device.clone();
            async move {
                if ended {
                    return None;
                }
                let next = tokio::time::timeout(
                    std::time::Duration::from_secs(
                        fleet_contracts::rpc::FOLLOW_ACK_TIMEOUT_SECS * 3,
                    ),
                    chunks.next(),
                )
                .await;
                let (text, ended) = match next {
                    Err(_) => (format!("-- device {device} stopped answering\n"), true),
                    Ok(None) => ("-- the subscription ended\n".to_owned(), true),
                    Ok(Some(msg)) => match serde_json::from_slice::<LogsChunk>(&msg.payload) {
                        Err(e) => (format!("-- unreadable chunk from {device}: {e}\n"), true),
                        Ok(chunk) => {
                            let ack = FollowAck {
                                seq: chunk.seq,
                                stop: false,
                            };
                            let _ = nats
                                .publish(
                                    ack_subject.clone(),
                                    serde_json::to_vec(&ack).expect("acks serialize").into(),
                                )
                                .await;
                            let _ = alive.send(chunk.seq);
                            let mut text: String =
                                chunk.lines.iter().map(|l| format!("{l}\n")).collect();
                            if let Some(reason) = &chunk.end {
                                text.push_str(&format!("-- {reason}\n"));
                            }
                            (text, chunk.end.is_some())
                        }
                    },
                };
                Some((
                    Ok::<_, std::convert::Infallible>(text),
                    (chunks, nats, ack_subject, alive, ended),
                ))
            }
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

async fn deployment_exec(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
    body: Bytes,
) -> ApiResult<ExecReply> {
    require_converged(&shared)?;
    let cmd: ExecCommand = serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid request: {e}")))?;
    if cmd.command.is_empty() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "command: must not be empty",
        ));
    }
    if cmd.timeout_secs == 0 || cmd.timeout_secs > 3600 {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "timeout_secs: must be 1-3600",
        ));
    }
    check_target(&shared, &name, &cmd.device)?;
    let req = ExecRequest {
        schema: SCHEMA_VERSION,
        deployment: name.clone(),
        command: cmd.command.clone(),
        timeout_secs: cmd.timeout_secs,
    };
    let wait = std::time::Duration::from_secs(u64::from(cmd.timeout_secs) + 5);
    let body = serde_json::to_vec(&req).expect("serializes");
    let result: Result<ExecReply, ApiError> = ask_device(
        &shared,
        names::exec_subject(&cmd.device),
        &cmd.device,
        body,
        wait,
    )
    .await;
    // Every attempt is audited, whatever its outcome.
    let outcome = match &result {
        Ok(ExecReply::Done { exit_code, .. }) => format!("exit {exit_code}"),
        Ok(ExecReply::TimedOut { after_secs }) => format!("timed out after {after_secs}s"),
        Ok(ExecReply::Error { message }) => format!("error: {message}"),
        Err(e) => format!("error: {}", e.1.error),
    };
    let at_ms = now_ms();
    let audit = ExecAudit {
        schema: SCHEMA_VERSION,
        by: if cmd.by.is_empty() {
            "unknown".into()
        } else {
            cmd.by.clone()
        },
        device: cmd.device.clone(),
        deployment: name,
        command: cmd.command,
        at_ms,
        outcome,
    };
    info!(by = %audit.by, device = %audit.device, deployment = %audit.deployment, command = ?audit.command, outcome = %audit.outcome, "exec");
    let key = format!("exec.{at_ms}.{}", audit.device);
    shared
        .buckets
        .audit
        .put(key, serde_json::to_vec(&audit).expect("serializes").into())
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot record the audit entry: {e}"),
            )
        })?;
    match result? {
        ExecReply::Error { message } => Err(ApiError::new(StatusCode::NOT_FOUND, message)),
        reply => Ok(Json(reply)),
    }
}

/// Continues a halted rollout of the Deployment's current generation past the devices that
/// hold it back now (`fleetctl rollout resume`).
async fn resume_rollout(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
    body: Bytes,
) -> ApiResult<fleet_contracts::state::RolloutResume> {
    require_converged(&shared)?;
    let req: BlacklistRequest = if body.is_empty() {
        BlacklistRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid request: {e}")))?
    };
    let generation = {
        let fleet = shared.fleet.read().unwrap();
        let d = fleet
            .deployments
            .get(&name)
            .ok_or_else(|| not_found("Deployment", &name))?;
        if d.spec.rollout.is_none() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("Deployment {name:?} has no rollout policy: there is nothing to resume"),
            ));
        }
        d.metadata.generation
    };
    let resume = fleet_contracts::state::RolloutResume {
        schema: SCHEMA_VERSION,
        generation,
        by: if req.by.is_empty() {
            "unknown".into()
        } else {
            req.by
        },
        at_ms: now_ms(),
    };
    let key = names::resource_key("rollout", &name);
    shared
        .buckets
        .resources
        .put(
            &key,
            serde_json::to_vec(&resume).expect("serializes").into(),
        )
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot record the resume: {e}"),
            )
        })?;
    info!(deployment = %name, generation, by = %resume.by, "rollout resumed");
    Ok(Json(resume))
}
