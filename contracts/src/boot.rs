//! The OS upgrade state kept on the boot (FAT) partition, outside every snapshot:
//! `rollback/state`, a few `key=value` lines. Written by the bootguard: in the initramfs, and
//! by its userspace commands (`arm`, `commit`, `request-rollback`; the agent reads it through
//! the bootguard's library, and its upgrade driver and the provisioner are to write it too);
//! always replaced whole (write `state.tmp`, fsync, rename, fsync the folder), so a power cut
//! leaves the old or the new file, never half of one.
//!
//! This is the one type and the one parser of that file. It needs nothing but `std`: the
//! bootguard uses it with this crate's default features off (no serde, no serde_json in the
//! initramfs; `scripts/check-deps.sh` checks it).

use std::fmt;

/// Where an OS upgrade stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No upgrade in progress.
    Idle,
    /// An upgrade was installed and its boots are being counted until userspace checks in.
    Pending,
    /// Userspace found the upgrade bad (failed install, failed check-in): roll back at boot.
    RollbackRequested,
    /// A rollback started (a power cut here repeats it: every step is idempotent).
    RollingBack,
    /// Userspace accepted the upgrade and is removing the snapshot.
    Committing,
}

impl Phase {
    /// Whether the state file may go from this phase to `next`; the same phase again is a
    /// step repeated after a power cut. The upgrade command arms (idle to pending), the
    /// bootguard counts boots and rolls back (pending, rollback-requested or rolling-back to
    /// rolling-back, then idle; a pending upgrade without its snapshot back to idle), the
    /// check-in commits (pending to committing to idle) or asks for a rollback (pending to
    /// rollback-requested). A missing or corrupt file has no phase: the bootguard decides
    /// from what it finds.
    pub fn may_become(self, next: Phase) -> bool {
        use Phase::*;
        matches!(
            (self, next),
            (Idle, Idle | Pending)
                | (
                    Pending,
                    Pending | Committing | RollbackRequested | RollingBack | Idle
                )
                | (RollbackRequested, RollbackRequested | RollingBack)
                | (RollingBack, RollingBack | Idle)
                | (Committing, Committing | Idle)
        )
    }

    pub const ALL: [Phase; 5] = [
        Phase::Idle,
        Phase::Pending,
        Phase::RollbackRequested,
        Phase::RollingBack,
        Phase::Committing,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Pending => "pending",
            Phase::RollbackRequested => "rollback-requested",
            Phase::RollingBack => "rolling-back",
            Phase::Committing => "committing",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How `last_result` starts once the bootguard rolled an upgrade back, and once the check-in
/// committed one: what the agent's upgrade driver reads to tell how an upgrade ended.
pub const ROLLED_BACK: &str = "rolled back: ";
pub const COMMITTED: &str = "committed: ";

/// The default number of boots an upgrade gets to check in.
pub const DEFAULT_MAX_BOOTS: u32 = 3;

/// The contents of `rollback/state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootState {
    pub phase: Phase,
    /// Boots started since the upgrade was installed (counted by the bootguard).
    pub boot_count: u32,
    pub max_boots: u32,
    /// The thin snapshot of root taken before the upgrade (`vg0/<snapshot>`).
    pub snapshot: String,
    /// Names the upgrade for the records (set by the upgrade command).
    pub upgrade_id: String,
    /// What happened last, in words for people (`rolled back: 4 boots without check-in`).
    pub last_result: String,
}

impl Default for BootState {
    fn default() -> Self {
        BootState {
            phase: Phase::Idle,
            boot_count: 0,
            max_boots: DEFAULT_MAX_BOOTS,
            snapshot: "root_preupgrade".into(),
            upgrade_id: String::new(),
            last_result: String::new(),
        }
    }
}

/// Why a state file could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt(pub String);

impl fmt::Display for Corrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the upgrade state file is unreadable: {}", self.0)
    }
}

impl std::error::Error for Corrupt {}

impl BootState {
    /// Reads the file's text. Unknown keys are ignored (a newer writer); a missing `phase`, a
    /// value out of range, or a line that is not `key=value` makes the file corrupt.
    pub fn parse(text: &str) -> Result<BootState, Corrupt> {
        let mut state = BootState::default();
        let mut phase = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(Corrupt(format!("line {} is not key=value", n + 1)));
            };
            let number = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| Corrupt(format!("{key}={v} is not a count")))
            };
            match key {
                "phase" => {
                    phase = Some(
                        Phase::ALL
                            .into_iter()
                            .find(|p| p.as_str() == value)
                            .ok_or_else(|| Corrupt(format!("unknown phase {value:?}")))?,
                    );
                }
                "boot_count" => state.boot_count = number(value)?,
                "max_boots" => state.max_boots = number(value)?.max(1),
                "snapshot" => {
                    if value.is_empty()
                        || !value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                    {
                        return Err(Corrupt(format!(
                            "snapshot name {value:?} is not an LV name"
                        )));
                    }
                    state.snapshot = value.to_owned();
                }
                "upgrade_id" => state.upgrade_id = value.to_owned(),
                "last_result" => state.last_result = value.to_owned(),
                _ => {}
            }
        }
        state.phase = phase.ok_or_else(|| Corrupt("no phase".into()))?;
        Ok(state)
    }

    /// The file's text; [`BootState::parse`] reads it back unchanged.
    pub fn render(&self) -> String {
        format!(
            "phase={}\nboot_count={}\nmax_boots={}\nsnapshot={}\nupgrade_id={}\nlast_result={}\n",
            self.phase,
            self.boot_count,
            self.max_boots,
            self.snapshot,
            one_line(&self.upgrade_id),
            one_line(&self.last_result)
        )
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_round_trips() {
        for phase in Phase::ALL {
            let state = BootState {
                phase,
                boot_count: 2,
                max_boots: 5,
                snapshot: "root_pre-7".into(),
                upgrade_id: "2026-11-27 trixie point release".into(),
                last_result: "rolled back: a\nb".into(),
            };
            let back = BootState::parse(&state.render()).unwrap();
            assert_eq!(
                back,
                BootState {
                    last_result: "rolled back: a b".into(),
                    ..state
                }
            );
        }
    }

    #[test]
    fn damaged_files_are_corrupt_with_the_reason_and_newer_keys_are_ignored() {
        let bad = |text: &str| BootState::parse(text).unwrap_err().0;
        assert_eq!(bad(""), "no phase");
        assert_eq!(
            bad("\x00\x00garbage\nphase=pending"),
            "line 1 is not key=value"
        );
        assert_eq!(
            bad("phase=pending\x00\x00"),
            "unknown phase \"pending\\0\\0\""
        );
        assert_eq!(bad("phase=maybe\n"), "unknown phase \"maybe\"");
        assert_eq!(
            bad("phase=pending\nboot_count=-1\n"),
            "boot_count=-1 is not a count"
        );
        assert_eq!(
            bad("phase=pending\nsnapshot=../root\n"),
            "snapshot name \"../root\" is not an LV name"
        );
        let newer = BootState::parse("phase=idle\nchecksum=abc\n").unwrap();
        assert_eq!(newer.phase, Phase::Idle);
    }

    #[test]
    fn the_allowed_transitions() {
        use Phase::*;
        // (from, to) pairs that may happen; every other pair of the 25 may not.
        let allowed = [
            (Idle, Idle),
            (Idle, Pending),
            (Pending, Pending),
            (Pending, Committing),
            (Pending, RollbackRequested),
            (Pending, RollingBack),
            (Pending, Idle),
            (RollbackRequested, RollbackRequested),
            (RollbackRequested, RollingBack),
            (RollingBack, RollingBack),
            (RollingBack, Idle),
            (Committing, Committing),
            (Committing, Idle),
        ];
        for from in Phase::ALL {
            for to in Phase::ALL {
                assert_eq!(
                    from.may_become(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
    }
}
