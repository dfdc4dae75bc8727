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
    io::{self, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
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
    checks::{self, Checks, PoolDecision, PoolSeen},
    decide,
    error::{At, Error, Result, ToolFailure},
};
use fleet_contracts::boot::{BootState, COMMITTED, Phase};

/// How long a query (`lvs`) may take before the bootguard gives up on it.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2 * 60);
/// How long activating root (and with it the pool's `thin_check`) may take.
const ACTIVATE_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// How long a merge, a snapshot or a pool repair may take. A repair of the image's 64 MiB of
/// pool metadata takes seconds; this only bounds a tool that hangs.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How long the bootguard pets the watchdog at most. Past it the petting stops and the
/// hardware resets the device, so a bootguard stuck anywhere (a hung tool, a hung FAT) ends in
/// a reset instead of a device that hangs petted forever. Longer than every timeout above
/// taken together.
pub const WATCHDOG_BUDGET: Duration = Duration::from_secs(30 * 60);

/// The logical volumes the bootguard needs.
pub trait Volumes {
    fn exists(&self, lv: &str) -> Result<bool>;
    /// Merges thin snapshot `lv` into its origin (at once when neither is open).
    fn merge(&self, lv: &str) -> Result<()>;
    /// Takes thin snapshot `name` of `origin`.
    fn snapshot(&self, origin: &str, name: &str) -> Result<()>;
    fn remove(&self, lv: &str) -> Result<()>;
    /// The thin pool `lv` lives in; `None` when `lv` is not a thin LV.
    fn pool_of(&self, lv: &str) -> Result<Option<String>>;
    /// Activates `lv` and with it its thin pool, whose activation runs `thin_check` on the
    /// pool's metadata (lvm.conf's `thin_check_options`). An error only when lvm cannot run.
    fn activate(&self, lv: &str) -> Result<PoolSeen>;
    /// What `thin_check` says of an inactive pool's metadata, for the record; best effort.
    fn check_pool(&self, pool: &str) -> String;
    /// `lvconvert --repair` of an inactive pool: new metadata rebuilt from the old one into
    /// the pool's spare metadata area; the old one is kept as `<pool>_meta<N>`. Returns what
    /// lvm said.
    fn repair_pool(&self, pool: &str) -> Result<String>;
}

/// The `lvm` command on volume group `vg`.
#[derive(Debug, Clone)]
pub struct Lvm {
    pub vg: String,
    pub program: PathBuf,
    pub thin_check: PathBuf,
}

impl Lvm {
    pub fn new(vg: &str) -> Lvm {
        Lvm {
            vg: vg.to_owned(),
            program: PathBuf::from("lvm"),
            thin_check: PathBuf::from("thin_check"),
        }
    }

    fn run(&self, args: &[&str], timeout: Duration) -> Result<Output, Error> {
        #[allow(clippy::disallowed_methods)] // The bootguard's one process seam: the lvm tool.
        let mut cmd = Command::new(&self.program);
        cmd.args(args);
        run_bounded(cmd, timeout, &format!("lvm {}", args.join(" ")))
    }

    fn checked(&self, args: &[&str], timeout: Duration) -> Result<String, Error> {
        let out = self.run(args, timeout)?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(said.trim().to_owned())
        } else {
            Err(Error::Tool {
                command: format!("lvm {}", args.join(" ")),
                failure: ToolFailure::Failed {
                    status: out.status.code(),
                    said: said.trim().to_owned(),
                },
            })
        }
    }

    fn name(&self, lv: &str) -> String {
        format!("{}/{lv}", self.vg)
    }
}

/// Runs `cmd` to its end, but at most `timeout`: then it is killed and the result is an error
/// naming `what` (the command line). Its output is read while it runs, so a chatty tool cannot
/// block on a full pipe.
fn run_bounded(mut cmd: Command, timeout: Duration, what: &str) -> Result<Output, Error> {
    let tool = |failure| Error::Tool {
        command: what.to_owned(),
        failure,
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| tool(ToolFailure::CannotStart(e)))?;
    let drain = |child: &mut Child, out: bool| {
        let mut pipe: Box<dyn Read + Send> = if out {
            Box::new(child.stdout.take().expect("piped"))
        } else {
            Box::new(child.stderr.take().expect("piped"))
        };
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let (stdout, stderr) = (drain(&mut child, true), drain(&mut child, false));
    let start = crate::clock::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| tool(ToolFailure::Io(e)))? {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(tool(ToolFailure::TimedOut { after: timeout }));
        }
        thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// The device-mapper name of `vg/lv` (`-` inside either name is doubled).
fn dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

impl Volumes for Lvm {
    fn exists(&self, lv: &str) -> Result<bool, Error> {
        let name = self.name(lv);
        let out = self.run(
            &["lvs", "--noheadings", "-o", "lv_name", &name],
            QUERY_TIMEOUT,
        )?;
        if out.status.success() {
            return Ok(true);
        }
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("Failed to find logical volume") {
            Ok(false)
        } else {
            Err(Error::Tool {
                command: format!("lvm lvs {name}"),
                failure: ToolFailure::Failed {
                    status: out.status.code(),
                    said: err.trim().to_owned(),
                },
            })
        }
    }

    fn merge(&self, lv: &str) -> Result<(), Error> {
        self.checked(&["lvconvert", "--merge", &self.name(lv)], CHANGE_TIMEOUT)
            .map(drop)
    }

    fn snapshot(&self, origin: &str, name: &str) -> Result<(), Error> {
        // No size: a size would make a thick copy-on-write snapshot instead of a thin one.
        self.checked(
            &["lvcreate", "-s", "-n", name, &self.name(origin)],
            CHANGE_TIMEOUT,
        )
        .map(drop)
    }

    fn remove(&self, lv: &str) -> Result<(), Error> {
        self.checked(&["lvremove", "-y", &self.name(lv)], CHANGE_TIMEOUT)
            .map(drop)
    }

    fn pool_of(&self, lv: &str) -> Result<Option<String>, Error> {
        let pool = self.checked(
            &["lvs", "--noheadings", "-o", "pool_lv", &self.name(lv)],
            QUERY_TIMEOUT,
        )?;
        let pool = pool.trim().trim_start_matches('[').trim_end_matches(']');
        Ok((!pool.is_empty()).then(|| pool.to_owned()))
    }

    fn activate(&self, lv: &str) -> Result<PoolSeen, Error> {
        let out = self.run(&["lvchange", "-ay", &self.name(lv)], ACTIVATE_TIMEOUT)?;
        if out.status.success() {
            return Ok(PoolSeen::Active);
        }
        let said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        // lvm's words when thin_check refuses the metadata: "Check of pool vg0/pool failed
        // (status:64). Manual repair required!" (lib/activate/dev_manager.c).
        Ok(if said.contains("Check of pool") {
            PoolSeen::CheckFailed(checks::one_line(&said))
        } else {
            PoolSeen::OtherFailure(checks::one_line(&said))
        })
    }

    fn check_pool(&self, pool: &str) -> String {
        // The metadata of an inactive pool can be activated alone, read-only ("component
        // activation"), and read by thin_check for the words the lvm error lacks.
        let meta = format!("{pool}_tmeta");
        if let Err(e) = self.checked(&["lvchange", "-ay", "-y", &self.name(&meta)], QUERY_TIMEOUT) {
            return format!("(the metadata could not be read: {e})");
        }
        #[allow(clippy::disallowed_methods)] // thin_check, read-only, bounded like lvm.
        let mut cmd = Command::new(&self.thin_check);
        cmd.arg(format!("/dev/mapper/{}", dm_name(&self.vg, &meta)));
        let what = format!("thin_check /dev/mapper/{}", dm_name(&self.vg, &meta));
        let said = match run_bounded(cmd, ACTIVATE_TIMEOUT, &what) {
            Ok(out) => format!(
                "thin_check (exit {}): {}{}",
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => e.to_string(),
        };
        if let Err(e) = self.checked(&["lvchange", "-an", &self.name(&meta)], QUERY_TIMEOUT) {
            return format!("{said}; and its metadata stays active read-only: {e}");
        }
        said
    }

    fn repair_pool(&self, pool: &str) -> Result<String, Error> {
        self.checked(
            &["lvconvert", "--repair", "-y", &self.name(pool)],
            CHANGE_TIMEOUT,
        )
    }
}

/// How a boot goes on after the bootguard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Continue,
    Reboot,
}

/// What the bootguard sees on this device.
pub fn observe(boot: &BootPartition, volumes: &dyn Volumes) -> Result<Observed, Error> {
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

/// What `fsck.fat -a` said of the boot partition before it was mounted (the `local-top`
/// script runs it and hands its exit status and output over).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatCheck {
    pub exit: i32,
    pub output: String,
}

/// One boot: record the boot partition's check, check the thin pool under root (repairing it
/// when its check fails, once per boot), then observe, decide and apply the upgrade's steps in
/// order. Every step is logged through `say` (the console) and the result into
/// `rollback/events`. A failed storage check is reported and the boot goes on; a failed
/// upgrade step ends the run with the error, and the state written before it makes the next
/// boot try again.
pub fn boot(
    boot: &BootPartition,
    volumes: &dyn Volumes,
    root_lv: &str,
    fat: Option<&FatCheck>,
    say: &mut dyn FnMut(&str),
) -> Result<Outcome, Error> {
    let mut checks = match boot.read_checks() {
        Ok(Ok(c)) => c.unwrap_or_default(),
        Ok(Err(e)) => {
            say(&format!("{e}; starting it afresh"));
            Checks::default()
        }
        Err(e) => {
            say(&format!("{e}; starting the storage check record afresh"));
            Checks::default()
        }
    };
    if let Some(fat) = fat
        && let Some(next) = checks::fat_record(&checks, fat.exit, &fat.output)
    {
        say(&next.last_fat);
        record(boot, &next, &format!("fat-check {}", next.last_fat), say);
        checks = next;
    }
    if let Err(e) = check_pool(boot, volumes, root_lv, &checks, say) {
        say(&format!("the thin pool check failed: {e}; booting on"));
    }
    upgrade_steps(boot, volumes, say)
}

/// Writes the check record and logs `event`; a failure is said, not fatal: the boot matters
/// more than its record.
fn record(boot: &BootPartition, checks: &Checks, event: &str, say: &mut dyn FnMut(&str)) {
    if let Err(e) = boot
        .write_checks(checks)
        .and_then(|()| boot.log_event(event))
    {
        say(&format!("cannot write the storage check record: {e}"));
    }
}

/// Activates root and its thin pool; when the pool fails its check, repairs it (one attempt
/// per boot, at most [`checks::MAX_POOL_REPAIR_BOOTS`] boots in a row) and activates again.
fn check_pool(
    boot: &BootPartition,
    volumes: &dyn Volumes,
    root_lv: &str,
    checks: &Checks,
    say: &mut dyn FnMut(&str),
) -> Result<(), Error> {
    let Some(pool) = volumes.pool_of(root_lv)? else {
        return Ok(());
    };
    let seen = volumes.activate(root_lv)?;
    match checks::pool_decision(&seen, checks, &pool) {
        PoolDecision::Continue(None) => {}
        PoolDecision::Continue(Some(next)) => {
            say(&format!("pool {pool} activates again"));
            record(
                boot,
                &next,
                &format!("pool-check {pool} activates again"),
                say,
            );
        }
        PoolDecision::GiveUp(next, why) => {
            say(&why);
            if let Some(next) = next {
                record(boot, &next, &format!("pool-check {}", next.last_pool), say);
            }
        }
        PoolDecision::Repair(counted) => {
            say(&counted.last_pool);
            // Counted before the repair starts: a power cut or a hang during it counts too.
            record(
                boot,
                &counted,
                &format!("pool-check {}", counted.last_pool),
                say,
            );
            let found = volumes.check_pool(&pool);
            say(&format!("pool {pool}: {}", checks::one_line(&found)));
            let repaired =
                volumes
                    .repair_pool(&pool)
                    .and_then(|said| match volumes.activate(root_lv)? {
                        PoolSeen::Active => Ok(said),
                        PoolSeen::CheckFailed(e) | PoolSeen::OtherFailure(e) => {
                            Err(Error::Volume {
                                lv: root_lv.to_owned(),
                                problem: format!("still does not activate after the repair: {e}"),
                            })
                        }
                    });
            let next = match repaired {
                Ok(said) => {
                    let done = format!(
                        "pool {pool} repaired with lvconvert --repair after it failed its check \
                         (found: {found}; lvm: {said}); the old metadata is kept beside it as \
                         {pool}_meta<N> until a person removes it"
                    );
                    say(&format!("pool {pool} repaired"));
                    Checks {
                        pool_repair_boots: 0,
                        pool_repairs: counted.pool_repairs + 1,
                        last_pool: checks::one_line(&done),
                        ..counted
                    }
                }
                Err(e) => {
                    let failed = format!("pool {pool}: the repair failed: {e} (found: {found})");
                    say(&failed);
                    Checks {
                        last_pool: checks::one_line(&failed),
                        ..counted
                    }
                }
            };
            record(boot, &next, &format!("pool-repair {}", next.last_pool), say);
        }
    }
    Ok(())
}

/// The upgrade's part of a boot: observe, decide, apply the steps in order.
fn upgrade_steps(
    boot: &BootPartition,
    volumes: &dyn Volumes,
    say: &mut dyn FnMut(&str),
) -> Result<Outcome, Error> {
    let observed = observe(boot, volumes)?;
    let steps = decide(&observed);
    for step in steps {
        match step {
            Step::WriteState(state) => {
                boot.write_state(&state)?;
                boot.log_event(&format!(
                    "{} boot={} upgrade={} {}",
                    state.phase, state.boot_count, state.upgrade_id, state.last_result
                ))?;
                // Said once written (and synced): a line on the console is a state on disk.
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
    max_boots: u32,
) -> Result<BootState, Error> {
    if max_boots == 0 {
        return Err(Error::Usage("--max-boots must be at least 1".into()));
    }
    if let Some(s) = boot.state()?.filter(|s| s.phase != Phase::Idle) {
        return Err(Error::refused(format!(
            "an upgrade is already {} ({}): commit it or roll it back first",
            s.phase, s.upgrade_id
        )));
    }
    let state = BootState {
        phase: Phase::Pending,
        boot_count: 0,
        upgrade_id: upgrade_id.to_owned(),
        last_result: String::new(),
        max_boots,
        ..BootState::default()
    };
    if volumes.exists(&state.snapshot)? {
        return Err(Error::Volume {
            lv: state.snapshot.clone(),
            problem: "the snapshot exists already: remove it first".into(),
        });
    }
    boot.save_known_good()?;
    boot.write_state(&state)?;
    volumes.snapshot(origin, &state.snapshot)?;
    boot.log_event(&format!("pending boot=0 upgrade={upgrade_id} armed"))?;
    Ok(state)
}

/// Accepts the running upgrade: `committing`, the snapshot and the copy removed, `idle`.
pub fn commit(boot: &BootPartition, volumes: &dyn Volumes) -> Result<BootState, Error> {
    let Some(state) = boot.state()? else {
        return Err(Error::refused("no upgrade to commit"));
    };
    if !matches!(state.phase, Phase::Pending | Phase::Committing) {
        return Err(Error::refused(format!(
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
            "{COMMITTED}upgrade {} after {} boots",
            state.upgrade_id, state.boot_count
        ),
        ..state
    };
    boot.write_state(&done)?;
    boot.log_event(&format!("idle upgrade={} committed", done.upgrade_id))?;
    Ok(done)
}

/// Asks the next boot to roll back (a failed install or check-in).
pub fn request_rollback(boot: &BootPartition, reason: &str) -> Result<BootState, Error> {
    let Some(state) = boot.state()? else {
        return Err(Error::refused("no upgrade to roll back"));
    };
    if state.phase != Phase::Pending {
        return Err(Error::refused(format!(
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

/// The hardware watchdog, armed and petted while the bootguard works, for at most a budget.
/// Dropping it stops the petting but leaves it armed (no magic close), so a boot that hangs
/// before systemd takes the watchdog over resets the device and counts as a failed boot; and
/// a bootguard that hangs itself stops petting once its budget is spent.
#[derive(Debug)]
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    pinger: Option<thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Opens (and so starts) `path` and pets it for at most `budget`; `None` when the device
    /// has no watchdog there.
    pub fn arm(path: &Path, budget: Duration) -> Result<Option<Watchdog>, Error> {
        let mut file = match OpenOptions::new().write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at("open the watchdog", path),
        };
        ping(&mut file).at("pet the watchdog", path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let pinger = thread::spawn({
            let stop = stop.clone();
            move || {
                let start = crate::clock::now();
                while !stop.load(Ordering::Relaxed) && start.elapsed() < budget {
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

    /// Volumes in memory: a thin snapshot is a name; a merge removes it. Root lives in pool
    /// `pool`, whose activation fails its check while `bad_pool_boots` is above 0 (a repair
    /// sets it to `after_repair`).
    #[derive(Default)]
    struct Fake {
        lvs: RefCell<BTreeSet<String>>,
        bad_pool: RefCell<bool>,
        repair_works: bool,
        repairs: RefCell<u32>,
    }
    impl Fake {
        fn broken_pool(repair_works: bool) -> Fake {
            Fake {
                bad_pool: RefCell::new(true),
                repair_works,
                ..Fake::default()
            }
        }
    }
    impl Volumes for Fake {
        fn exists(&self, lv: &str) -> Result<bool> {
            Ok(self.lvs.borrow().contains(lv))
        }
        fn merge(&self, lv: &str) -> Result<()> {
            match self.lvs.borrow_mut().remove(lv) {
                true => Ok(()),
                false => Err(Error::Volume {
                    lv: lv.to_owned(),
                    problem: "no such snapshot".into(),
                }),
            }
        }
        fn snapshot(&self, _origin: &str, name: &str) -> Result<()> {
            self.lvs.borrow_mut().insert(name.to_owned());
            Ok(())
        }
        fn remove(&self, lv: &str) -> Result<()> {
            self.merge(lv)
        }
        fn pool_of(&self, lv: &str) -> Result<Option<String>> {
            Ok((lv == "root").then(|| "pool".to_owned()))
        }
        fn activate(&self, _lv: &str) -> Result<PoolSeen> {
            Ok(if *self.bad_pool.borrow() {
                PoolSeen::CheckFailed("Check of pool vg0/pool failed (status:64).".into())
            } else {
                PoolSeen::Active
            })
        }
        fn check_pool(&self, _pool: &str) -> String {
            "thin_check (exit 1): bad checksum in metadata index block".into()
        }
        fn repair_pool(&self, _pool: &str) -> Result<String> {
            *self.repairs.borrow_mut() += 1;
            if self.repair_works {
                *self.bad_pool.borrow_mut() = false;
                Ok("WARNING: LV vg0/pool_meta0 holds a backup".into())
            } else {
                Err(Error::Tool {
                    command: "lvm lvconvert --repair -y vg0/pool".into(),
                    failure: ToolFailure::Failed {
                        status: Some(5),
                        said: "thin_repair failed".into(),
                    },
                })
            }
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
        arm(&part, &lvm, "root", "u1", 3).unwrap();
        assert_eq!(part.known_good().unwrap(), KnownGood::Complete);
        // The upgrade replaces the kernel.
        fs::remove_file(dir.join("vmlinuz-1")).unwrap();
        fs::write(dir.join("vmlinuz-2"), "new kernel").unwrap();
        fs::write(dir.join("config.txt"), "kernel=vmlinuz-2\n").unwrap();

        let mut said = Vec::new();
        for boot_no in 1..=3 {
            let out = boot(&part, &lvm, "root", None, &mut |s| said.push(s.to_owned())).unwrap();
            assert_eq!(out, Outcome::Continue, "boot {boot_no}");
        }
        let out = boot(&part, &lvm, "root", None, &mut |s| said.push(s.to_owned())).unwrap();
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
        assert_eq!(
            boot(&part, &lvm, "root", None, &mut |_| {}).unwrap(),
            Outcome::Continue
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_commit_removes_the_snapshot_and_the_copy_and_a_second_arm_is_refused_meanwhile() {
        let (dir, part) = device("commit");
        let lvm = Fake::default();
        arm(&part, &lvm, "root", "u1", 3).unwrap();
        let err = arm(&part, &lvm, "root", "u2", 3).unwrap_err();
        assert!(err.to_string().contains("already pending"), "{err}");
        boot(&part, &lvm, "root", None, &mut |_| {}).unwrap();
        let done = commit(&part, &lvm).unwrap();
        assert_eq!(done.phase, Phase::Idle);
        assert_eq!(done.last_result, "committed: upgrade u1 after 1 boots");
        assert!(!lvm.exists("root_preupgrade").unwrap());
        assert_eq!(part.known_good().unwrap(), KnownGood::Missing);
        assert!(commit(&part, &lvm).is_err(), "nothing left to commit");
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_requested_rollback_happens_on_the_next_boot() {
        let (dir, part) = device("requested");
        let lvm = Fake::default();
        arm(&part, &lvm, "root", "u1", 3).unwrap();
        request_rollback(&part, "check-in failed: app probe").unwrap();
        assert_eq!(
            boot(&part, &lvm, "root", None, &mut |_| {}).unwrap(),
            Outcome::Reboot
        );
        let state = part.read_state().unwrap().unwrap().unwrap();
        assert!(
            state.last_result.contains("requested by userspace"),
            "{}",
            state.last_result
        );
        fs::remove_dir_all(dir).unwrap();
    }

    /// What lvm says when the volume group is not there.
    fn vg_missing() -> Error {
        Error::Tool {
            command: "lvm lvs vg0/root_preupgrade".into(),
            failure: ToolFailure::Failed {
                status: Some(5),
                said: "Volume group \"vg0\" not found".into(),
            },
        }
    }

    /// Volumes that cannot be asked (no volume group yet, a broken lvm).
    struct Unreachable;
    impl Volumes for Unreachable {
        fn exists(&self, _: &str) -> Result<bool> {
            Err(vg_missing())
        }
        fn merge(&self, _: &str) -> Result<()> {
            unreachable!()
        }
        fn snapshot(&self, _: &str, _: &str) -> Result<()> {
            unreachable!()
        }
        fn remove(&self, _: &str) -> Result<()> {
            unreachable!()
        }
        fn pool_of(&self, _: &str) -> Result<Option<String>> {
            Err(vg_missing())
        }
        fn activate(&self, _: &str) -> Result<PoolSeen> {
            unreachable!()
        }
        fn check_pool(&self, _: &str) -> String {
            unreachable!()
        }
        fn repair_pool(&self, _: &str) -> Result<String> {
            unreachable!()
        }
    }

    #[test]
    fn without_a_volume_group_a_device_without_an_upgrade_still_boots() {
        let (dir, part) = device("no-vg");
        let mut said = Vec::new();
        assert_eq!(
            boot(&part, &Unreachable, "root", None, &mut |s| said
                .push(s.to_owned()))
            .unwrap(),
            Outcome::Continue
        );
        assert!(
            said.iter()
                .any(|s| s.contains("thin pool check failed") && s.contains("not found")),
            "{said:?}"
        );
        // With an upgrade pending, not knowing about the snapshot is an error (the next boot
        // tries again).
        part.write_state(&BootState {
            phase: Phase::Pending,
            ..BootState::default()
        })
        .unwrap();
        let err = boot(&part, &Unreachable, "root", None, &mut |_| {}).unwrap_err();
        assert_eq!(
            err.to_string(),
            "lvm lvs vg0/root_preupgrade: exit 5: Volume group \"vg0\" not found"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_pool_that_fails_its_check_is_repaired_once_and_the_record_says_so() {
        let (dir, part) = device("pool-repair");
        let lvm = Fake::broken_pool(true);
        let mut said = Vec::new();
        let out = boot(&part, &lvm, "root", None, &mut |s| said.push(s.to_owned())).unwrap();
        assert_eq!(out, Outcome::Continue);
        assert_eq!(*lvm.repairs.borrow(), 1);
        let checks = part.read_checks().unwrap().unwrap().unwrap();
        assert_eq!((checks.pool_repair_boots, checks.pool_repairs), (0, 1));
        assert!(
            checks
                .last_pool
                .contains("repaired with lvconvert --repair")
                && checks
                    .last_pool
                    .contains("bad checksum in metadata index block"),
            "{}",
            checks.last_pool
        );
        assert!(said.iter().any(|s| s == "pool pool repaired"), "{said:?}");
        let events = fs::read_to_string(dir.join("rollback/events")).unwrap();
        assert!(
            events.contains("pool-check") && events.contains("pool-repair"),
            "{events}"
        );
        // The next boot finds a healthy pool and writes nothing.
        let before = fs::read(dir.join("rollback/checks")).unwrap();
        boot(&part, &lvm, "root", None, &mut |_| {}).unwrap();
        assert_eq!(fs::read(dir.join("rollback/checks")).unwrap(), before);
        assert_eq!(*lvm.repairs.borrow(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_pool_that_cannot_be_repaired_is_tried_on_two_boots_then_left_alone() {
        let (dir, part) = device("pool-broken");
        let lvm = Fake::broken_pool(false);
        for _ in 0..5 {
            // Every boot goes on (root will be missing: the initramfs says so and reboots).
            assert_eq!(
                boot(&part, &lvm, "root", None, &mut |_| {}).unwrap(),
                Outcome::Continue
            );
        }
        assert_eq!(*lvm.repairs.borrow(), checks::MAX_POOL_REPAIR_BOOTS);
        let checks = part.read_checks().unwrap().unwrap().unwrap();
        assert!(
            checks.last_pool.contains("not repairing again"),
            "{}",
            checks.last_pool
        );
        assert_eq!(checks.pool_repairs, 0);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_fat_check_that_fixed_something_is_recorded_and_a_clean_one_is_not() {
        let (dir, part) = device("fat");
        let lvm = Fake::default();
        let clean = FatCheck {
            exit: 0,
            output: "/dev/vda1: 20 files, 30/60000 clusters".into(),
        };
        boot(&part, &lvm, "root", Some(&clean), &mut |_| {}).unwrap();
        assert_eq!(part.read_checks().unwrap().unwrap(), None);
        let dirty = FatCheck {
            exit: 1,
            output: "Dirty bit is set. Fs was not properly unmounted".into(),
        };
        boot(&part, &lvm, "root", Some(&dirty), &mut |_| {}).unwrap();
        boot(&part, &lvm, "root", Some(&dirty), &mut |_| {}).unwrap();
        let checks = part.read_checks().unwrap().unwrap().unwrap();
        assert_eq!(checks.fat_repairs, 2);
        assert!(checks.last_fat.contains("Dirty bit"), "{}", checks.last_fat);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_tool_that_hangs_is_killed_after_its_time() {
        #[allow(clippy::disallowed_methods)]
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let err = run_bounded(cmd, Duration::from_millis(200), "sleep 30").unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Tool { command, failure: ToolFailure::TimedOut { .. } }
                    if command == "sleep 30"
            ),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "sleep 30: no result after 200ms; killed");
    }

    #[test]
    fn a_missing_watchdog_is_not_an_error() {
        assert!(
            Watchdog::arm(Path::new("/nonexistent/watchdog0"), WATCHDOG_BUDGET)
                .unwrap()
                .is_none()
        );
    }
}
