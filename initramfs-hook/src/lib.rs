//! `fleet-bootguard`: the step in the initramfs that undoes a bad OS upgrade on its own.
//!
//! On every boot, before root is mounted, it counts the boots of a pending upgrade and, past
//! the limit (or when userspace asked for it), merges the pre-upgrade thin snapshot back into
//! root, restores the boot partition's known-good files, records why, and reboots into the old
//! system. The design is in `docs/ARCHITECTURE.md` and `docs/adr/`.
//!
//! This crate holds the decision, as a pure function ([`decide`]) from what the bootguard
//! observes ([`Observed`]: the state file, whether the snapshot exists, whether the known-good
//! boot set is complete) to the [`Step`]s to take. Every step is idempotent and the state is
//! written before the steps that depend on it, so a power cut at any point leaves a device
//! that boots and finishes the job on the next boot (proven by the model test below, which
//! cuts the power after every step of every plan).
//!
//! Before the upgrade's decision, every boot checks the device's storage: it records what
//! `fsck.fat` fixed on the boot partition, and activates root's thin pool, repairing the pool's
//! metadata with `lvconvert --repair` when it fails its check (once per boot, a bounded number
//! of boots in a row; [`checks`] holds that decision and its record, `rollback/checks`).
//!
//! [`boot`] is the boot partition (state file, check record, known-good copy with its
//! manifest, event log); [`run`] applies the steps on a device (LVM through the `lvm` tool,
//! the watchdog, the reboot) and holds the userspace commands `arm`, `commit` and
//! `request-rollback`; every failure is an [`Error`] naming the operation and what it was done
//! on (the file and its path, the tool's command line and what it said). The binary
//! (`src/main.rs`) is what the initramfs-tools `local-top` script (`initramfs/`) calls.
//!
//! No tokio, no NATS, no serde_json (checked by `scripts/check-deps.sh`): it runs in the
//! initramfs, a static musl binary of a few hundred KiB.

pub mod boot;
pub mod checks;
pub mod clock;
pub mod error;
pub mod run;

pub use error::Error;

use fleet_contracts::boot::{BootState, Corrupt, Phase, ROLLED_BACK};

/// The known-good copy of the boot partition's files (`rollback/boot-prev/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownGood {
    /// The manifest is there and every file in it matches its size and digest.
    Complete,
    /// No copy (never made, or already restored and removed).
    Missing,
    /// A manifest whose files are missing or differ: restoring it would leave a mix.
    Incomplete,
}

/// What the bootguard sees when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The state file: `Ok(None)` when there is none (a device that never upgraded).
    pub state: Result<Option<BootState>, Corrupt>,
    /// Whether the pre-upgrade snapshot named in the state (or the default name) exists.
    pub snapshot_present: bool,
    pub known_good: KnownGood,
}

/// One thing to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Replace the state file (atomically) with this one.
    WriteState(BootState),
    /// `lvm lvconvert --merge vg0/<name>`: root becomes the pre-upgrade root.
    MergeSnapshot(String),
    /// Copy the known-good boot files back (per manifest, `config.txt` last) and remove the
    /// copy.
    RestoreBootFiles,
    /// Reboot into what the steps left.
    Reboot,
    /// Go on with the normal boot (mount root).
    ContinueBoot,
}

/// The steps for what was observed. The last step is always [`Step::Reboot`] or
/// [`Step::ContinueBoot`].
pub fn decide(observed: &Observed) -> Vec<Step> {
    let state = match &observed.state {
        Ok(None) => return vec![Step::ContinueBoot],
        Ok(Some(s)) => s.clone(),
        Err(corrupt) => {
            // Nobody can tell how many boots an upgrade had. With the snapshot there, the safe
            // way is back to the system that is known to work; without it there is nothing to
            // go back to, so start over from idle.
            let base = BootState::default();
            return if observed.snapshot_present {
                rollback(observed, base, &corrupt.to_string())
            } else {
                vec![
                    Step::WriteState(BootState {
                        last_result: format!("{corrupt}; reset to idle"),
                        ..base
                    }),
                    Step::ContinueBoot,
                ]
            };
        }
    };
    match state.phase {
        Phase::Idle | Phase::Committing => vec![Step::ContinueBoot],
        Phase::Pending if !observed.snapshot_present => vec![
            Step::WriteState(BootState {
                phase: Phase::Idle,
                boot_count: 0,
                last_result: format!(
                    "upgrade {} was pending without its snapshot {}: nothing to roll back to",
                    state.upgrade_id, state.snapshot
                ),
                ..state
            }),
            Step::ContinueBoot,
        ],
        Phase::Pending => {
            let boots = state.boot_count.saturating_add(1);
            if boots > state.max_boots {
                let why = format!(
                    "{} boots without a successful check-in (limit {})",
                    boots - 1,
                    state.max_boots
                );
                rollback(observed, state, &why)
            } else {
                vec![
                    Step::WriteState(BootState {
                        boot_count: boots,
                        ..state
                    }),
                    Step::ContinueBoot,
                ]
            }
        }
        Phase::RollbackRequested => {
            let why = match state.last_result.as_str() {
                "" => "requested by userspace".to_owned(),
                reason => format!("requested by userspace: {reason}"),
            };
            rollback(observed, state, &why)
        }
        Phase::RollingBack => {
            let why = if state.last_result.is_empty() {
                "interrupted rollback".to_owned()
            } else {
                state.last_result.clone()
            };
            rollback(observed, state, &why)
        }
    }
}

/// Mark the rollback first (a power cut repeats it), merge if the snapshot is still there,
/// restore the boot set if it is whole, then record the result and reboot.
fn rollback(observed: &Observed, state: BootState, why: &str) -> Vec<Step> {
    let mut steps = vec![Step::WriteState(BootState {
        phase: Phase::RollingBack,
        last_result: why.to_owned(),
        ..state.clone()
    })];
    let mut done = vec![format!("{ROLLED_BACK}{why}")];
    if observed.snapshot_present {
        steps.push(Step::MergeSnapshot(state.snapshot.clone()));
    }
    match observed.known_good {
        KnownGood::Complete => steps.push(Step::RestoreBootFiles),
        KnownGood::Missing => {}
        KnownGood::Incomplete => {
            done.push("the known-good boot files were incomplete and were left alone".into())
        }
    }
    steps.push(Step::WriteState(BootState {
        phase: Phase::Idle,
        boot_count: 0,
        last_result: done.join("; "),
        ..state
    }));
    steps.push(Step::Reboot);
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(boot_count: u32) -> BootState {
        BootState {
            phase: Phase::Pending,
            boot_count,
            upgrade_id: "u1".into(),
            ..BootState::default()
        }
    }

    fn observed(
        state: Result<Option<BootState>, Corrupt>,
        snapshot: bool,
        kg: KnownGood,
    ) -> Observed {
        Observed {
            state,
            snapshot_present: snapshot,
            known_good: kg,
        }
    }

    fn state_of(phase: Phase, count: u32) -> BootState {
        BootState {
            phase,
            boot_count: count,
            ..pending(count)
        }
    }

    /// The steps without the states' texts: what the bootguard does.
    fn shape(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .map(|s| match s {
                Step::WriteState(st) => format!("state {} {}", st.phase, st.boot_count),
                Step::MergeSnapshot(n) => format!("merge {n}"),
                Step::RestoreBootFiles => "restore".into(),
                Step::Reboot => "reboot".into(),
                Step::ContinueBoot => "continue".into(),
            })
            .collect()
    }

    /// Every combination of phase, boot count around the limit, snapshot, known-good set and
    /// a missing or corrupt file, against the expected steps.
    #[test]
    fn decisions_for_every_combination() {
        use KnownGood::*;
        let phases = [
            Phase::Idle,
            Phase::Pending,
            Phase::RollbackRequested,
            Phase::RollingBack,
            Phase::Committing,
        ];
        let rollback = |snapshot: bool, kg: KnownGood, before: &str| {
            let mut v = vec![format!("state rolling-back {before}")];
            if snapshot {
                v.push("merge root_preupgrade".into());
            }
            if kg == Complete {
                v.push("restore".into());
            }
            v.push("state idle 0".into());
            v.push("reboot".into());
            v
        };
        let mut cases = 0;
        for phase in phases {
            for count in [0, 1, 2, 3, 4, 9] {
                for snapshot in [true, false] {
                    for kg in [Complete, Missing, Incomplete] {
                        let state = BootState {
                            phase,
                            boot_count: count,
                            ..pending(count)
                        };
                        let got = shape(&decide(&observed(Ok(Some(state)), snapshot, kg)));
                        let want: Vec<String> = match phase {
                            Phase::Idle | Phase::Committing => vec!["continue".into()],
                            Phase::Pending if !snapshot => {
                                vec!["state idle 0".into(), "continue".into()]
                            }
                            // The boot that exceeds the limit (3) rolls back.
                            Phase::Pending if count + 1 > 3 => {
                                rollback(snapshot, kg, &count.to_string())
                            }
                            Phase::Pending => {
                                vec![format!("state pending {}", count + 1), "continue".into()]
                            }
                            Phase::RollbackRequested | Phase::RollingBack => {
                                rollback(snapshot, kg, &count.to_string())
                            }
                        };
                        assert_eq!(
                            got, want,
                            "{phase} count {count} snapshot {snapshot} {kg:?}"
                        );
                        // Every state written follows the allowed transitions
                        // (`fleet_contracts::boot::Phase::may_become`).
                        let mut at = phase;
                        for step in
                            decide(&observed(Ok(Some(state_of(phase, count))), snapshot, kg))
                        {
                            if let Step::WriteState(next) = step {
                                assert!(
                                    at.may_become(next.phase),
                                    "{phase} count {count}: {at} -> {}",
                                    next.phase
                                );
                                at = next.phase;
                            }
                        }
                        cases += 1;
                    }
                }
            }
        }
        for snapshot in [true, false] {
            for kg in [Complete, Missing, Incomplete] {
                let none = shape(&decide(&observed(Ok(None), snapshot, kg)));
                assert_eq!(none, ["continue"]);
                let corrupt = decide(&observed(Err(Corrupt("no phase".into())), snapshot, kg));
                let want = if snapshot {
                    rollback(true, kg, "0")
                } else {
                    vec!["state idle 0".into(), "continue".into()]
                };
                assert_eq!(shape(&corrupt), want, "corrupt, snapshot {snapshot} {kg:?}");
                cases += 2;
            }
        }
        assert_eq!(cases, 5 * 6 * 2 * 3 + 12);
    }

    #[test]
    fn the_recorded_reason_says_what_happened() {
        let steps = decide(&observed(Ok(Some(pending(3))), true, KnownGood::Incomplete));
        let Some(Step::WriteState(last)) = steps.iter().rev().nth(1) else {
            panic!("{steps:?}")
        };
        assert_eq!(
            last.last_result,
            "rolled back: 3 boots without a successful check-in (limit 3); \
             the known-good boot files were incomplete and were left alone"
        );
        let steps = decide(&observed(Ok(Some(pending(0))), false, KnownGood::Complete));
        let Step::WriteState(s) = &steps[0] else {
            panic!()
        };
        assert_eq!(
            s.last_result,
            "upgrade u1 was pending without its snapshot root_preupgrade: nothing to roll back to"
        );
    }

    /// A device as far as the bootguard is concerned.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Device {
        state: Option<BootState>,
        snapshot: bool,
        known_good: KnownGood,
        /// True once root holds the pre-upgrade system.
        old_root: bool,
        /// True once the boot partition holds the pre-upgrade files.
        old_boot: bool,
    }

    impl Device {
        fn observed(&self) -> Observed {
            observed(Ok(self.state.clone()), self.snapshot, self.known_good)
        }

        /// Carries out one step; a merge consumes the snapshot, a restore the copy.
        fn apply(&mut self, step: &Step) {
            match step {
                Step::WriteState(s) => self.state = Some(s.clone()),
                Step::MergeSnapshot(_) => {
                    self.snapshot = false;
                    self.old_root = true;
                }
                Step::RestoreBootFiles => {
                    self.known_good = KnownGood::Missing;
                    self.old_boot = true;
                }
                Step::Reboot | Step::ContinueBoot => {}
            }
        }
    }

    /// Power is cut after every step of every boot of a rollback: the device always comes
    /// back, rolls back exactly once (old root and old boot files), and ends idle, within a
    /// bounded number of boots.
    #[test]
    fn a_power_cut_after_any_step_still_ends_rolled_back_and_idle() {
        for start in [Phase::Pending, Phase::RollbackRequested, Phase::RollingBack] {
            let fresh = Device {
                state: Some(BootState {
                    phase: start,
                    ..pending(3)
                }),
                snapshot: true,
                known_good: KnownGood::Complete,
                old_root: false,
                old_boot: false,
            };
            let steps = decide(&fresh.observed());
            for cut_after in 0..steps.len() {
                let mut device = fresh.clone();
                // The first boot loses power after `cut_after` steps...
                for step in &steps[..cut_after] {
                    device.apply(step);
                }
                // ...then boots run to their end until the device continues normally.
                let mut boots = 0;
                loop {
                    boots += 1;
                    assert!(boots < 5, "{start} cut after {cut_after}: no end");
                    let plan = decide(&device.observed());
                    for step in &plan {
                        device.apply(step);
                    }
                    if plan.last() == Some(&Step::ContinueBoot) {
                        break;
                    }
                }
                let state = device.state.clone().unwrap();
                assert_eq!(
                    (state.phase, device.old_root, device.old_boot),
                    (Phase::Idle, true, true),
                    "{start} cut after {cut_after}: {device:?}"
                );
                assert!(state.last_result.starts_with("rolled back: "), "{state:?}");
            }
        }
    }
}
