//! Every type that crosses a Fleet process boundary, one module per channel:
//!
//! - [`names`]: every bucket, key, subject and inbox prefix (nothing else spells one), and the
//!   rule every device and resource name obeys;
//! - [`checks`] and [`document`]: the value checks and the strict reading every document a
//!   person sends goes through;
//! - [`spec`]: the pod template, what a Deployment runs on each device;
//! - [`state`]: every value stored in NATS KV;
//! - [`resource`]: the documents people apply (Deployment, Device) and their validation;
//! - [`rpc`]: every request/reply message over core NATS (sync, report, enroll, logs, exec);
//! - [`api`]: the operator's HTTP bodies, and nothing else;
//! - [`boot`]: the OS upgrade state on the boot partition and its allowed transitions, written
//!   by the bootguard (the agent's upgrade driver and the provisioner are to use it too); plain
//!   `std`, the one module left with the `wire` feature off.
//!
//! Dependencies run one way, in that order (`tests/tidy.rs` checks it); the wire formats are
//! pinned in `tests/wire.rs`.
//!
//! This crate is pure: serde and nothing else. It never touches NATS, tokio, a file or a clock;
//! callers pass timestamps in. Values evolve additively: readers ignore unknown fields, writers
//! never drop a field within a schema version ([`SCHEMA_VERSION`]).

#[cfg(feature = "wire")]
pub mod api;
pub mod boot;
#[cfg(feature = "wire")]
pub mod checks;
#[cfg(feature = "wire")]
pub mod document;
#[cfg(feature = "wire")]
pub mod names;
#[cfg(feature = "wire")]
pub mod resource;
#[cfg(feature = "wire")]
pub mod rpc;
#[cfg(feature = "wire")]
pub mod spec;
#[cfg(feature = "wire")]
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

/// The schema version every KV value carries in its `schema` field.
///
/// Bumped only for a breaking change; additive changes keep it.
pub const SCHEMA_VERSION: u32 = 1;

/// The `apiVersion` of every resource document.
pub const API_VERSION: &str = "fleet.dev/v1";

/// Labels on a resource, and the labels a selector requires.
pub type Labels = std::collections::BTreeMap<String, String>;

/// A problem with one field of a document, named by its path
/// (`spec.template.containers[0].image`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "wire", derive(serde::Serialize, serde::Deserialize))]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}
