//! The on-disk copy of the last complete desired state, so workloads come back after a reboot
//! with no network.
//!
//! Written only from a complete replay or a change that followed one, never from a guess: a
//! missing or unreadable cache means "desired state unknown", and the agent then leaves
//! containers alone until NATS answers (it never removes a workload because a file was lost).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
};

use fleet_contracts::{
    SCHEMA_VERSION,
    state::{DesiredDeployment, StoreRef},
};
use serde::{Deserialize, Serialize};

const FILE: &str = "desired.json";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read the desired-state cache {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the desired-state cache {path} is corrupt ({source}); waiting for NATS instead")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("the desired-state cache {path} belongs to device {found:?}, not {expected:?}")]
    OtherDevice {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("cannot write the desired-state cache {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheFile {
    schema: u32,
    device: String,
    deployments: BTreeMap<String, DesiredDeployment>,
    /// The store `deployments` came from; absent in a cache written before stores had an
    /// identity (the next answer's store is then taken as the device's, and what that answer
    /// omits is held, as after a restore: `crate::store`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    store: Option<StoreRef>,
    /// Which of `deployments` are held from an earlier store ([`crate::store`]).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    held: BTreeSet<String>,
}

/// What the cache holds: everything to run (held deployments included), and the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cached {
    pub deployments: BTreeMap<String, DesiredDeployment>,
    pub store: Option<StoreRef>,
    pub held: BTreeSet<String>,
}

/// Loads the cache; `Ok(None)` when there is none yet.
pub fn load(dir: &Path, device: &str) -> Result<Option<Cached>, CacheError> {
    let path = dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CacheError::Read { path, source }),
    };
    let file: CacheFile = serde_json::from_slice(&bytes).map_err(|source| CacheError::Corrupt {
        path: path.clone(),
        source,
    })?;
    if file.device != device {
        return Err(CacheError::OtherDevice {
            path,
            found: file.device,
            expected: device.to_owned(),
        });
    }
    Ok(Some(Cached {
        deployments: file.deployments,
        store: file.store,
        held: file.held,
    }))
}

/// Replaces the cache atomically: a crash at any point leaves the old or the new file whole.
pub fn save(dir: &Path, device: &str, cached: &Cached) -> Result<(), CacheError> {
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let file = CacheFile {
        schema: SCHEMA_VERSION,
        device: device.to_owned(),
        deployments: cached.deployments.clone(),
        store: cached.store.clone(),
        held: cached.held.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&file).expect("the cache always serializes");
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        // Data must be on disk before the rename makes it the cache, or a power cut could
        // leave a renamed but empty file.
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        // And the rename itself must reach the disk.
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|source| CacheError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_contracts::spec::{Container, PodTemplate};

    fn desired() -> Cached {
        let spec = PodTemplate::single(Container::new("web", "img:1"));
        Cached {
            deployments: [("web".to_owned(), DesiredDeployment::new("web", 4, spec))].into(),
            store: Some(StoreRef {
                fleet_id: "F".into(),
                epoch: 3,
            }),
            held: ["web".to_owned()].into(),
        }
    }

    #[test]
    fn round_trip_and_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path(), "pi-01").unwrap(), None);
        save(dir.path(), "pi-01", &desired()).unwrap();
        assert_eq!(load(dir.path(), "pi-01").unwrap(), Some(desired()));
        assert!(!dir.path().join("desired.json.tmp").exists());
    }

    #[test]
    fn a_cache_from_before_store_identities_reads_with_no_store() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE),
            br#"{"schema":1,"device":"pi-01","deployments":{}}"#,
        )
        .unwrap();
        assert_eq!(load(dir.path(), "pi-01").unwrap(), Some(Cached::default()));
    }

    #[test]
    fn corrupt_or_foreign_cache_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{\"schema\":1,\"dev").unwrap();
        let err = load(dir.path(), "pi-01").unwrap_err().to_string();
        assert!(err.contains("is corrupt"), "{err}");
        save(dir.path(), "pi-02", &desired()).unwrap();
        let err = load(dir.path(), "pi-01").unwrap_err().to_string();
        assert!(err.contains("belongs to device \"pi-02\""), "{err}");
    }
}
