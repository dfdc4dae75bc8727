//! Carrying out the decision: what the bootguard observes on a real device, the steps applied
//! to the boot partition and the volumes, the hardware watchdog, and the userspace commands
//! that start, commit or abandon an upgrade (`arm`, `commit`, `request-rollback`). The reboot
//! itself is the caller's: the `local-top` script unmounts the boot partition first, so the
//! FAT is written out whole (its allocation summary too) before the reboot.
//!
//! LVM is reached through the [`Volumes`] seam: [`Lvm`] runs the `lvm` tool (the real thing,
//! proven under QEMU in `qemu-tests/`); the unit tests here use an in-memory set of volumes.

use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use crate::{
    Observed, Step,
    boot::BootPartition,
    decide,
    state::{BootState, Phase},
};

/// The logical volumes the bootguard needs.
pub trait Volumes {
    fn exists(&self, lv: &str) -> io::Result<bool>;
    /// Merges thin snapshot `lv` into its origin (at once when neither is open).
    fn merge(&self, lv: &str) -> io::Result<()>;
    /// Takes thin snapshot `name` of `origin`.
    fn snapshot(&self, origin: &str, name: &str) -> io::Result<()>;
    fn remove(&self, lv: &str) -> io::Result<()>;
}

/// The `lvm` command on volume group `vg`.
#[derive(Debug, Clone)]
pub struct Lvm {
    pub vg: String,
    pub program: PathBuf,
}

impl Lvm {
    pub fn new(vg: &str) -> Lvm {
        Lvm {
            vg: vg.to_owned(),
            program: PathBuf::from("lvm"),
        }
    }

    fn run(&self, args: &[&str]) -> io::Result<Output> {
        #[allow(clippy::disallowed_methods)] // The bootguard's one process seam: the lvm tool.
        let mut cmd = Command::new(&self.program);
        cmd.args(args).output()
    }

    fn checked(&self, args: &[&str]) -> io::Result<()> {
        let out = self.run(args)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "lvm {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

impl Volumes for Lvm {
    fn exists(&self, lv: &str) -> io::Result<bool> {
        let name = format!("{}/{lv}", self.vg);
        let out = self.run(&["lvs", "--noheadings", "-o", "lv_name", &name])?;
        if out.status.success() {
            return Ok(true);
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("Failed to find logical volume") {
            Ok(false)
        } else {
            Err(io::Error::other(format!("lvm lvs {name}: {}", err.trim())))
        }
    }

    fn merge(&self, lv: &str) -> io::Result<()> {
        self.checked(&["lvconvert", "--merge", &format!("{}/{lv}", self.vg)])
    }

    fn snapshot(&self, origin: &str, name: &str) -> io::Result<()> {
        // No size: a size would make a thick copy-on-write snapshot instead of a thin one.
        self.checked(&[
            "lvcreate",
            "-s",
            "-n",
            name,
            &format!("{}/{origin}", self.vg),
        ])
    }

    fn remove(&self, lv: &str) -> io::Result<()> {
        self.checked(&["lvremove", "-y", &format!("{}/{lv}", self.vg)])
    }
}

/// How a boot goes on after the bootguard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    Reboot,
}

/// What the bootguard sees on this device.
pub fn observe(boot: &BootPartition, volumes: &dyn Volumes) -> io::Result<Observed> {
    let state = boot.read_state()?;
    let snapshot = match &state {
        // No upgrade ever: nothing to ask LVM (which may not even hold the volume group yet).
        Ok(None) => None,
        Ok(Some(s)) => Some(s.snapshot.clone()),
        Err(_) => Some(BootState::default().snapshot),
    };
    let snapshot_present = match snapshot {
        Some(name) => volumes.exists(&name)?,
        None => false,
    };
    Ok(Observed {
        state,
        snapshot_present,
        known_good: boot.known_good()?,
    })
}

/// One boot: observe, decide, apply the steps in order. Every step is logged through `say`
/// (the console) and the result into `rollback/events`. A step that fails ends the run with
/// the error; the state written before it makes the next boot try again.
pub fn boot(
    boot: &BootPartition,
    volumes: &dyn Volumes,
    say: &mut dyn FnMut(&str),
) -> io::Result<Outcome> {
    let observed = observe(boot, volumes)?;
    let steps = decide(&observed);
    for step in steps {
        match step {
            Step::WriteState(state) => {
                say(&format!(
                    "state {} (boot {} of {}){}",
                    state.phase,
                    state.boot_count,
                    state.max_boots,
                    if state.last_result.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", state.last_result)
                    }
                ));
                boot.write_state(&state)?;
                boot.log_event(&format!(
                    "{} boot={} upgrade={} {}",
                    state.phase, state.boot_count, state.upgrade_id, state.last_result
                ))?;
            }
            Step::MergeSnapshot(name) => {
                say(&format!("merging snapshot {name} into root"));
                volumes.merge(&name)?;
            }
            Step::RestoreBootFiles => {
                let n = boot.restore_known_good()?;
                say(&format!("restored {n} known-good boot files"));
            }
            Step::Reboot => {
                say("rebooting into the restored system");
                return Ok(Outcome::Reboot);
            }
            Step::ContinueBoot => return Ok(Outcome::Continue),
        }
    }
    Ok(Outcome::Continue)
}

/// Starts counting the boots of an upgrade about to be installed: the known-good copy of the
/// boot files, then the state `pending`, then the snapshot of `origin`. A crash before the
/// snapshot leaves `pending` without it, which the next boot resets to idle.
pub fn arm(
    boot: &BootPartition,
    volumes: &dyn Volumes,
    origin: &str,
    upgrade_id: &str,
) -> io::Result<BootState> {
    let current = boot.read_state()?.map_err(io::Error::other)?;
    if let Some(s) = current.filter(|s| s.phase != Phase::Idle) {
        return Err(io::Error::other(format!(
            "an upgrade is already {} ({}): commit it or roll it back first",
            s.phase, s.upgrade_id
        )));
    }
    let state = BootState {
        phase: Phase::Pending,
        boot_count: 0,
        upgrade_id: upgrade_id.to_owned(),
        last_result: String::new(),
        ..BootState::default()
    };
    if volumes.exists(&state.snapshot)? {
        return Err(io::Error::other(format!(
            "snapshot {} exists already: remove it first",
            state.snapshot
        )));
    }
    boot.save_known_good()?;
    boot.write_state(&state)?;
    volumes.snapshot(origin, &state.snapshot)?;
    boot.log_event(&format!("pending boot=0 upgrade={upgrade_id} armed"))?;
    Ok(state)
}

/// Accepts the running upgrade: `committing`, the snapshot and the copy removed, `idle`.
pub fn commit(boot: &BootPartition, volumes: &dyn Volumes) -> io::Result<BootState> {
    let Ok(Some(state)) = boot.read_state()? else {
        return Err(io::Error::other("no upgrade to commit"));
    };
    if !matches!(state.phase, Phase::Pending | Phase::Committing) {
        return Err(io::Error::other(format!(
            "the upgrade is {}, not pending",
            state.phase
        )));
    }
    boot.write_state(&BootState {
        phase: Phase::Committing,
        ..state.clone()
    })?;
    if volumes.exists(&state.snapshot)? {
        volumes.remove(&state.snapshot)?;
    }
    boot.drop_known_good()?;
    let done = BootState {
        phase: Phase::Idle,
        boot_count: 0,
        last_result: format!(
            "upgrade {} committed after {} boots",
            state.upgrade_id, state.boot_count
        ),
        ..state
    };
    boot.write_state(&done)?;
    boot.log_event(&format!("idle upgrade={} committed", done.upgrade_id))?;
    Ok(done)
}

/// Asks the next boot to roll back (a failed install or check-in).
pub fn request_rollback(boot: &BootPartition, reason: &str) -> io::Result<BootState> {
    let Ok(Some(state)) = boot.read_state()? else {
        return Err(io::Error::other("no upgrade to roll back"));
    };
    if state.phase != Phase::Pending {
        return Err(io::Error::other(format!(
            "the upgrade is {}, not pending",
            state.phase
        )));
    }
    let requested = BootState {
        phase: Phase::RollbackRequested,
        last_result: reason.to_owned(),
        ..state
    };
    boot.write_state(&requested)?;
    boot.log_event(&format!("rollback-requested {reason}"))?;
    Ok(requested)
}

/// The hardware watchdog, armed and petted while the bootguard works. Dropping it stops the
/// petting but leaves it armed (no magic close), so a boot that hangs before systemd takes
/// the watchdog over resets the device and counts as a failed boot.
#[derive(Debug)]
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    pinger: Option<thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Opens (and so starts) `path`; `None` when the device has no watchdog there.
    pub fn arm(path: &Path) -> io::Result<Option<Watchdog>> {
        let mut file = match OpenOptions::new().write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        ping(&mut file)?;
        let stop = Arc::new(AtomicBool::new(false));
        let pinger = thread::spawn({
            let stop = stop.clone();
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = ping(&mut file);
                    thread::sleep(Duration::from_millis(500));
                }
                // Closing without writing 'V' leaves the watchdog running.
                drop(file);
            }
        });
        Ok(Some(Watchdog {
            stop,
            pinger: Some(pinger),
        }))
    }
}

fn ping(file: &mut File) -> io::Result<()> {
    // Any byte but 'V' pets it ('V' would allow a magic close).
    file.write_all(b"\n")
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.pinger.take() {
            let _ = p.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeSet, fs};

    use super::*;
    use crate::KnownGood;

    /// Volumes in memory: a thin snapshot is a name; a merge removes it.
    #[derive(Default)]
    struct Fake(RefCell<BTreeSet<String>>);
    impl Volumes for Fake {
        fn exists(&self, lv: &str) -> io::Result<bool> {
            Ok(self.0.borrow().contains(lv))
        }
        fn merge(&self, lv: &str) -> io::Result<()> {
            match self.0.borrow_mut().remove(lv) {
                true => Ok(()),
                false => Err(io::Error::other("no such snapshot")),
            }
        }
        fn snapshot(&self, _origin: &str, name: &str) -> io::Result<()> {
            self.0.borrow_mut().insert(name.to_owned());
            Ok(())
        }
        fn remove(&self, lv: &str) -> io::Result<()> {
            self.merge(lv)
        }
    }

    fn device(name: &str) -> (PathBuf, BootPartition) {
        let dir = std::env::temp_dir().join(format!("bootguard-run-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("config.txt"), "kernel=vmlinuz-1\n").unwrap();
        fs::write(dir.join("vmlinuz-1"), "old kernel").unwrap();
        (dir.clone(), BootPartition::new(dir))
    }

    #[test]
    fn an_armed_upgrade_that_never_checks_in_is_rolled_back_after_the_limit() {
        let (dir, part) = device("limit");
        let lvm = Fake::default();
        arm(&part, &lvm, "root", "u1").unwrap();
        assert_eq!(part.known_good().unwrap(), KnownGood::Complete);
        // The upgrade replaces the kernel.
        fs::remove_file(dir.join("vmlinuz-1")).unwrap();
        fs::write(dir.join("vmlinuz-2"), "new kernel").unwrap();
        fs::write(dir.join("config.txt"), "kernel=vmlinuz-2\n").unwrap();

        let mut said = Vec::new();
        for boot_no in 1..=3 {
            let out = boot(&part, &lvm, &mut |s| said.push(s.to_owned())).unwrap();
            assert_eq!(out, Outcome::Continue, "boot {boot_no}");
        }
        let out = boot(&part, &lvm, &mut |s| said.push(s.to_owned())).unwrap();
        assert_eq!(out, Outcome::Reboot);
        assert!(!lvm.exists("root_preupgrade").unwrap(), "merged");
        assert_eq!(
            fs::read_to_string(dir.join("config.txt")).unwrap(),
            "kernel=vmlinuz-1\n"
        );
        assert!(dir.join("vmlinuz-1").exists() && !dir.join("vmlinuz-2").exists());
        let state = part.read_state().unwrap().unwrap().unwrap();
        assert_eq!(state.phase, Phase::Idle);
        assert!(
            state
                .last_result
                .contains("3 boots without a successful check-in"),
            "{}",
            state.last_result
        );
        let events = fs::read_to_string(dir.join("rollback/events")).unwrap();
        assert!(events.contains("rolling-back"), "{events}");
        // The next boot is an ordinary one.
        assert_eq!(boot(&part, &lvm, &mut |_| {}).unwrap(), Outcome::Continue);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_commit_removes_the_snapshot_and_the_copy_and_a_second_arm_is_refused_meanwhile() {
        let (dir, part) = device("commit");
        let lvm = Fake::default();
        arm(&part, &lvm, "root", "u1").unwrap();
        let err = arm(&part, &lvm, "root", "u2").unwrap_err();
        assert!(err.to_string().contains("already pending"), "{err}");
        boot(&part, &lvm, &mut |_| {}).unwrap();
        let done = commit(&part, &lvm).unwrap();
        assert_eq!(done.phase, Phase::Idle);
        assert!(done.last_result.contains("committed after 1 boots"));
        assert!(!lvm.exists("root_preupgrade").unwrap());
        assert_eq!(part.known_good().unwrap(), KnownGood::Missing);
        assert!(commit(&part, &lvm).is_err(), "nothing left to commit");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_requested_rollback_happens_on_the_next_boot() {
        let (dir, part) = device("requested");
        let lvm = Fake::default();
        arm(&part, &lvm, "root", "u1").unwrap();
        request_rollback(&part, "check-in failed: app probe").unwrap();
        assert_eq!(boot(&part, &lvm, &mut |_| {}).unwrap(), Outcome::Reboot);
        let state = part.read_state().unwrap().unwrap().unwrap();
        assert!(
            state.last_result.contains("requested by userspace"),
            "{}",
            state.last_result
        );
        fs::remove_dir_all(dir).unwrap();
    }

    /// Volumes that cannot be asked (no volume group yet, a broken lvm).
    struct Unreachable;
    impl Volumes for Unreachable {
        fn exists(&self, _: &str) -> io::Result<bool> {
            Err(io::Error::other("Volume group \"vg0\" not found"))
        }
        fn merge(&self, _: &str) -> io::Result<()> {
            unreachable!()
        }
        fn snapshot(&self, _: &str, _: &str) -> io::Result<()> {
            unreachable!()
        }
        fn remove(&self, _: &str) -> io::Result<()> {
            unreachable!()
        }
    }

    #[test]
    fn without_a_state_file_lvm_is_not_asked() {
        let (dir, part) = device("no-state");
        assert_eq!(
            boot(&part, &Unreachable, &mut |_| {}).unwrap(),
            Outcome::Continue
        );
        part.write_state(&BootState {
            phase: Phase::Pending,
            ..BootState::default()
        })
        .unwrap();
        let err = boot(&part, &Unreachable, &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_missing_watchdog_is_not_an_error() {
        assert!(
            Watchdog::arm(Path::new("/nonexistent/watchdog0"))
                .unwrap()
                .is_none()
        );
    }
}
