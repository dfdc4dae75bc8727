//! The on-disk copy of the last complete desired state, so workloads come back after a reboot
//! with no network.
//!
//! Written only from a complete replay or a change that followed one, never from a guess: a
//! missing or unreadable cache means "desired state unknown", and the agent then leaves
//! containers alone until NATS answers (it never removes a workload because a file was lost).

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
};

use fleet_contracts::{SCHEMA_VERSION, state::DesiredDeployment};
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
}

/// Loads the cache; `Ok(None)` when there is none yet.
pub fn load(
    dir: &Path,
    device: &str,
) -> Result<Option<BTreeMap<String, DesiredDeployment>>, CacheError> {
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
    Ok(Some(file.deployments))
}

/// Replaces the cache atomically: a crash at any point leaves the old or the new file whole.
pub fn save(
    dir: &Path,
    device: &str,
    deployments: &BTreeMap<String, DesiredDeployment>,
) -> Result<(), CacheError> {
    let path = dir.join(FILE);
    let tmp = dir.join(format!("{FILE}.tmp"));
    let file = CacheFile {
        schema: SCHEMA_VERSION,
        device: device.to_owned(),
        deployments: deployments.clone(),
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
    use fleet_contracts::resource::{Container, PodTemplate};

    fn desired() -> BTreeMap<String, DesiredDeployment> {
        let spec = PodTemplate::single(Container::new("web", "img:1"));
        [("web".to_owned(), DesiredDeployment::new("web", 4, spec))].into()
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
