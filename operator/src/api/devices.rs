//! Requests that reach a device (logs, followed logs, exec, each exec audited first) and the
//! admin's actions on one: blacklist, adopt, release.

use super::*;

pub(super) async fn adopt_device(
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

pub(super) async fn release_device(
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

pub(super) async fn blacklist_device(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
    body: Bytes,
) -> ApiResult<BlacklistResult> {
    set_blacklist(&shared, &name, true, &body).await
}

pub(super) async fn unblacklist_device(
    State(shared): State<Arc<Operator>>,
    Name(name): Name,
    body: Bytes,
) -> ApiResult<BlacklistResult> {
    set_blacklist(&shared, &name, false, &body).await
}

pub(super) async fn set_blacklist(
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
pub(super) struct LogsQuery {
    device: String,
    #[serde(default = "default_tail")]
    tail: u32,
    /// Keep streaming new lines (plain text) until the client goes away.
    #[serde(default)]
    follow: bool,
}

pub(super) fn default_tail() -> u32 {
    100
}

/// Checks that `deployment` exists and `device` is one of its devices.
pub(super) fn check_target(
    shared: &Operator,
    deployment: &str,
    device: &str,
) -> Result<(), ApiError> {
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
pub(super) async fn ask_device<T: serde::de::DeserializeOwned>(
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

pub(super) async fn deployment_logs(
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
pub(super) async fn follow_logs(
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

pub(super) async fn deployment_exec(
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
