//! Resources: apply (strict reading, validation, compare-and-set on the stored document),
//! list, get and delete Deployments and Devices, and resume a halted rollout.

use super::*;

pub(super) async fn apply(
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

pub(super) fn stored_resource(kind: &str, bytes: &[u8]) -> Result<Resource, serde_json::Error> {
    Ok(match kind {
        "Deployment" => Resource::Deployment(serde_json::from_slice(bytes)?),
        "OsUpgrade" => Resource::OsUpgrade(serde_json::from_slice(bytes)?),
        _ => Resource::Device(serde_json::from_slice(bytes)?),
    })
}

pub(super) fn same_spec(a: &Resource, b: &Resource) -> bool {
    match (a, b) {
        (Resource::Deployment(a), Resource::Deployment(b)) => a.spec == b.spec,
        (Resource::Device(a), Resource::Device(b)) => a.spec == b.spec,
        (Resource::OsUpgrade(a), Resource::OsUpgrade(b)) => a.spec == b.spec,
        _ => false,
    }
}

/// Advice that does not block the apply.
pub(super) fn warnings(shared: &Operator, resource: &Resource) -> Vec<String> {
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

pub(super) async fn list_deployments(
    State(shared): State<Arc<Operator>>,
) -> ApiResult<Vec<Deployment>> {
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

pub(super) async fn get_deployment(
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

pub(super) async fn list_devices(State(shared): State<Arc<Operator>>) -> ApiResult<Vec<Device>> {
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

pub(super) async fn get_device(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
) -> ApiResult<Device> {
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

pub(super) async fn delete_deployment(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
) -> Result<StatusCode, ApiError> {
    delete(&shared, "Deployment", &name).await
}

pub(super) async fn list_os_upgrades(
    State(shared): State<Arc<Operator>>,
) -> ApiResult<Vec<OsUpgrade>> {
    require_converged(&shared)?;
    let fleet = shared.fleet.read().unwrap();
    let now = now_ms();
    Ok(Json(
        fleet
            .os_upgrades
            .values()
            .map(|u| OsUpgrade {
                status: Some(fleet.os_upgrade_status(u, now)),
                ..u.clone()
            })
            .collect(),
    ))
}

pub(super) async fn get_os_upgrade(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
) -> ApiResult<OsUpgrade> {
    require_converged(&shared)?;
    let fleet = shared.fleet.read().unwrap();
    let u = fleet
        .os_upgrades
        .get(&name)
        .ok_or_else(|| not_found("OsUpgrade", &name))?;
    Ok(Json(OsUpgrade {
        status: Some(fleet.os_upgrade_status(u, now_ms())),
        ..u.clone()
    }))
}

pub(super) async fn delete_os_upgrade(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
) -> Result<StatusCode, ApiError> {
    delete(&shared, "OsUpgrade", &name).await
}

pub(super) async fn delete_device(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
) -> Result<StatusCode, ApiError> {
    delete(&shared, "Device", &name).await
}

pub(super) async fn delete(
    shared: &Operator,
    kind: &str,
    name: &str,
) -> Result<StatusCode, ApiError> {
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
pub(super) async fn forget_device(shared: &Operator, name: &str) -> Result<(), ApiError> {
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

/// Continues a halted rollout of the Deployment's current generation past the devices that
/// hold it back now (`fleetctl rollout resume`).
pub(super) async fn resume_rollout(
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
