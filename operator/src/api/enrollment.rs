//! Enrollment tokens: create (the secret shown once), list, revoke.

use super::*;

pub(super) async fn create_token(
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

pub(super) async fn list_tokens(
    State(shared): State<Arc<Operator>>,
) -> ApiResult<Vec<EnrollmentToken>> {
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

pub(super) async fn revoke_token(
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
