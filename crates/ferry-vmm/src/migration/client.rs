//! Asking another VMM's control API to migrate, and for its progress.

use std::path::Path;

use ferry_migration::MigrationStats;
use serde_json::Value;

use super::{MigrateError, MigrateOptions, MigrationProgress};
use crate::api::{ApiClient, ApiError, Request};

/// Asks the VMM behind `api_socket` to migrate to `to` and waits (without a time limit) for
/// the final statistics.
pub fn request_migration(
    api_socket: &Path,
    to: &str,
    options: &MigrateOptions,
) -> Result<MigrationStats, MigrateError> {
    let options =
        serde_json::to_value(options).map_err(|e| MigrateError::Options(e.to_string()))?;
    let stats = ApiClient::connect(api_socket)?.migrate(to, options)?;
    serde_json::from_value(stats).map_err(|e| ApiError::Reply(e.to_string()).into())
}

/// The progress of the current or last migration of the VMM behind `api_socket`.
pub fn query_progress(api_socket: &Path) -> Result<Option<MigrationProgress>, MigrateError> {
    let mut client = ApiClient::connect(api_socket)?;
    let status = client.request(&Request::Status)?;
    match status.get("migration") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| ApiError::Reply(e.to_string()).into()),
    }
}
