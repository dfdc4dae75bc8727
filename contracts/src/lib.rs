//! Every type that crosses a Fleet process boundary: resource documents, the values stored in
//! NATS KV, the HTTP API bodies, the device's request/reply messages (`rpc`), and the names of
//! buckets, keys and subjects; and the strict reading (`document`) and value checks
//! (`checks`) every document a person sends goes through.
//!
//! This crate is pure: serde and nothing else. It never touches NATS, tokio, a file or a clock;
//! callers pass timestamps in. Values evolve additively: readers ignore unknown fields, writers
//! never drop a field within a schema version ([`SCHEMA_VERSION`]).

pub mod api;
pub mod checks;
pub mod document;
pub mod names;
pub mod resource;
pub mod rpc;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

/// The schema version every KV value carries in its `schema` field.
///
/// Bumped only for a breaking change; additive changes keep it.
pub const SCHEMA_VERSION: u32 = 1;

/// The `apiVersion` of every resource document.
pub const API_VERSION: &str = "fleet.dev/v1";

/// A problem with one field of a document, named by its path
/// (`spec.template.containers[0].image`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
