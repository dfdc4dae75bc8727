//! What the bootguard found on the device's storage at boot (`rollback/checks` on the boot
//! partition: `fsck.fat` fixes, thin-pool repairs), read for the heartbeat so the record
//! reaches the operator on the next contact. The file's one parser is the bootguard's own.

use std::path::Path;

use fleet_bootguard::boot::BootPartition;
use fleet_contracts::state::StorageChecks;
use tracing::debug;

/// The record under `boot_dir`, or `None` when there is none (nothing was ever found, or no
/// boot partition: a development host) or it cannot be read (logged).
pub fn read(boot_dir: &Path) -> Option<StorageChecks> {
    if !boot_dir.join("rollback").is_dir() {
        return None;
    }
    match BootPartition::new(boot_dir).read_checks() {
        Ok(Ok(Some(c))) => Some(StorageChecks {
            pool_repairs: c.pool_repairs,
            pool_repair_boots: c.pool_repair_boots,
            last_pool: c.last_pool,
            fat_repairs: c.fat_repairs,
            last_fat: c.last_fat,
        }),
        Ok(Ok(None)) => None,
        Ok(Err(e)) => {
            debug!(error = %e, "the storage check record is unreadable");
            None
        }
        Err(e) => {
            debug!(error = %e, dir = %boot_dir.display(), "cannot read the storage check record");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootguards_record_is_read_and_a_missing_one_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), None);
        std::fs::create_dir_all(dir.path().join("rollback")).unwrap();
        assert_eq!(read(dir.path()), None);
        BootPartition::new(dir.path())
            .write_checks(&fleet_bootguard::checks::Checks {
                pool_repairs: 1,
                last_pool: "pool pool repaired".into(),
                fat_repairs: 4,
                ..Default::default()
            })
            .unwrap();
        let got = read(dir.path()).unwrap();
        assert_eq!(
            (got.pool_repairs, got.fat_repairs, got.last_pool.as_str()),
            (1, 4, "pool pool repaired")
        );
        std::fs::write(dir.path().join("rollback/checks"), "nonsense").unwrap();
        assert_eq!(read(dir.path()), None);
    }
}
