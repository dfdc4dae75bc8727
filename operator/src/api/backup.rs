//! Backup and restore of the whole store.

use super::*;

/// Largest backup a restore reads: a fleet of thousands of devices is a few MiB.
pub(super) const MAX_BACKUP_BYTES: usize = 256 * 1024 * 1024;

pub(super) fn store_error(e: crate::store::StoreError) -> ApiError {
    use crate::store::StoreError;
    let status = match e {
        StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        StoreError::NotFound(_) => StatusCode::NOT_FOUND,
        StoreError::Conflict(_) => StatusCode::CONFLICT,
        StoreError::Nats(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError::new(status, e.to_string())
}

pub(super) async fn backup(
    State(shared): State<Arc<Operator>>,
) -> ApiResult<fleet_contracts::api::Backup> {
    crate::store::backup(&shared)
        .await
        .map(Json)
        .map_err(store_error)
}

pub(super) async fn restore(
    State(shared): State<Arc<Operator>>,
    body: Bytes,
) -> ApiResult<fleet_contracts::api::RestoreResult> {
    let backup: fleet_contracts::api::Backup = json_body(&body)?;
    crate::store::restore(&shared, &backup)
        .await
        .map(Json)
        .map_err(store_error)
}
