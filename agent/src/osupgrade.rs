//! The device's OS upgrade driver: one state machine, its record persisted before each step
//! acts, so a power cut anywhere leaves a device that knows where it was.
//!
//! The flow for one upgrade (a [`DesiredOs`] from the operator): Preparing (preconditions,
//! refused with their numbers; nothing touched) -> Snapshotting (`fleet-bootguard arm`: the
//! known-good boot files, state `pending`, the thin snapshot of root) -> Upgrading (apt to the
//! release) -> Rebooting (the new boot set verified first) -> Probation (the check-in,
//! [`crate::checkin`], commits or asks for a rollback) -> Committed or RolledBack. The record
//! lives in the agent's state folder on the data LV, outside the root snapshot, so a rollback
//! does not undo it; the boot partition's state (the bootguard's) says what the boots did.
//!
//! [`decide`] is the whole decision, pure: from the record, the desired upgrade and what the
//! device shows (its boot id, the bootguard's state, the snapshot, the running release) to the
//! one [`Step`] to take. [`Driver`] takes the steps through the [`CommandRunner`] seam.

use std::path::{Path, PathBuf};

use fleet_contracts::{
    SCHEMA_VERSION,
    boot::COMMITTED,
    checks,
    spec::{CheckInCommand, OsRelease},
    state::{DesiredOs, MAX_OS_HISTORY, OsOutcome, OsPhase, OsReport, OsUpgradeReport},
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::runner::CommandRunner;

/// The driver's record, in the agent's state folder (on the data LV).
const RECORD_FILE: &str = "os-upgrade.json";
/// Where the running system names its release, one line (the image and each upgrade write it).
pub const RELEASE_FILE: &str = "/etc/fleet/release";
/// The apt sources file an upgrade writes, and the only one its apt runs read.
pub const SOURCES_FILE: &str = "/etc/apt/sources.list.d/fleet-release.list";
/// Preconditions: the thin pool's data and metadata fill before an upgrade, in percent.
pub const MAX_POOL_DATA_PERCENT: f64 = 80.0;
pub const MAX_POOL_METADATA_PERCENT: f64 = 70.0;
/// How long one apt or dpkg run, and any other tool, may take before it is stopped (and the
/// upgrade rolled back): nothing the driver waits for may hang it for good.
const APT_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(60 * 60);
const TOOL_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(10 * 60);
/// The longest message a report carries (the operator refuses more than 2 KiB).
const MAX_MESSAGE_BYTES: usize = 1024;
/// A clock before this (2026-01-01) is not set: snapshots and deadlines would be misdated.
const CLOCK_FLOOR_MS: u64 = 1_767_225_600_000;

/// The driver's record, `<state_dir>/os-upgrade.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub schema: u32,
    pub desired: DesiredOs,
    pub phase: OsPhase,
    pub from_release: String,
    #[serde(default)]
    pub message: String,
    pub since_ms: u64,
    /// The boot the phase was entered in (`/proc/sys/kernel/random/boot_id`): a different
    /// one now means the device restarted since.
    pub boot_id: String,
    #[serde(default)]
    pub history: Vec<OsOutcome>,
}

impl Record {
    /// The bootguard's name for this upgrade (`arm --upgrade-id`).
    pub fn upgrade_id(&self) -> String {
        upgrade_id(&self.desired)
    }

    pub fn report(&self, release: &str) -> OsReport {
        OsReport {
            schema: SCHEMA_VERSION,
            release: release.to_owned(),
            upgrade: Some(OsUpgradeReport {
                upgrade: self.desired.upgrade.clone(),
                generation: self.desired.generation,
                phase: self.phase,
                from_release: self.from_release.clone(),
                to_release: self.desired.release.name.clone(),
                message: self.message.clone(),
                since_ms: self.since_ms,
            }),
            history: self.history.clone(),
        }
    }

    fn is(&self, d: &DesiredOs) -> bool {
        self.desired.upgrade == d.upgrade && self.desired.generation == d.generation
    }
}

fn upgrade_id(d: &DesiredOs) -> String {
    format!("{}.{}", d.upgrade, d.generation)
}

/// The bootguard's state as the driver needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// No upgrade under way (no state file, or `idle`): `last` is the bootguard's word on the
    /// upgrade it last handled, and which.
    Idle { upgrade_id: String, last: String },
    /// `pending`, `committing`, `rollback-requested` or `rolling-back`, for `upgrade_id`.
    Busy {
        phase: fleet_contracts::boot::Phase,
        upgrade_id: String,
        boots: u32,
    },
    /// The state file cannot be read: the bootguard resets or rolls back at the next boot.
    Unreadable(String),
}

/// What the device shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub boot_id: String,
    pub boot: Boot,
    pub snapshot_present: bool,
}

/// The one thing to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until something changes.
    Wait,
    /// A new upgrade: record it as Preparing.
    Start(DesiredOs),
    /// Check the preconditions (Preparing).
    Precheck,
    /// `fleet-bootguard arm` (Snapshotting).
    Arm,
    /// apt to the release, verify the boot set, then reboot (Upgrading).
    Install,
    /// Reboot into what is installed or requested (Rebooting, RollingBack).
    Reboot,
    /// Ask the bootguard to roll back, then reboot (to RollingBack).
    RequestRollback(String),
    /// Only record a new phase, with a message.
    Enter(OsPhase, String),
    /// Only say something new in the phase the upgrade is in (its boot stays the same).
    Note(String),
}

/// The decision: what to do given the record, the desired upgrade and what the device shows.
pub fn decide(record: Option<&Record>, desired: Option<&DesiredOs>, seen: &Observed) -> Step {
    let ours = |r: &Record, id: &str| id == r.upgrade_id();
    let Some(r) = record.filter(|r| !r.phase.is_final()) else {
        // Idle: a desired upgrade not made yet starts (each upgrade and generation once).
        return match desired {
            Some(d)
                if !record.is_some_and(|r| r.is(d))
                    && !record.is_some_and(|r| {
                        r.history
                            .iter()
                            .any(|o| o.upgrade == d.upgrade && o.generation == d.generation)
                    }) =>
            {
                Step::Start(d.clone())
            }
            _ => Step::Wait,
        };
    };
    let rebooted = seen.boot_id != r.boot_id;
    match (r.phase, &seen.boot) {
        (OsPhase::Preparing, _) => Step::Precheck,
        // Armed: the snapshot is there and the bootguard counts our boots.
        (OsPhase::Snapshotting, Boot::Busy { upgrade_id, .. })
            if ours(r, upgrade_id) && seen.snapshot_present =>
        {
            Step::Enter(OsPhase::Upgrading, "armed; installing".into())
        }
        // Half armed (pending without the snapshot): the next boot resets it to idle.
        (OsPhase::Snapshotting, Boot::Busy { upgrade_id, .. }) if ours(r, upgrade_id) => {
            Step::Reboot
        }
        (
            OsPhase::Snapshotting,
            Boot::Busy {
                upgrade_id, phase, ..
            },
        ) => Step::Enter(
            OsPhase::Refused,
            format!("another upgrade ({upgrade_id}) is {phase} on this device"),
        ),
        (OsPhase::Snapshotting, _) => Step::Arm,
        (OsPhase::Upgrading, Boot::Busy { upgrade_id, .. }) if ours(r, upgrade_id) => {
            if rebooted {
                // The install was cut short (power, crash): what booted is half upgraded.
                Step::RequestRollback(
                    "the device restarted while the upgrade was being installed".into(),
                )
            } else {
                Step::Install
            }
        }
        (OsPhase::Rebooting, Boot::Busy { upgrade_id, .. }) if ours(r, upgrade_id) && !rebooted => {
            Step::Reboot
        }
        (
            OsPhase::Upgrading | OsPhase::Rebooting | OsPhase::Probation | OsPhase::RollingBack,
            Boot::Busy {
                upgrade_id,
                phase,
                boots,
            },
        ) if ours(r, upgrade_id) => {
            use fleet_contracts::boot::Phase as B;
            match phase {
                B::Pending if r.phase == OsPhase::RollingBack => {
                    // The request did not reach the boot partition: ask again.
                    Step::RequestRollback(r.message.clone())
                }
                B::Pending | B::Committing if r.phase != OsPhase::Probation => Step::Enter(
                    OsPhase::Probation,
                    format!("boot {boots} of the upgraded system; checking in"),
                ),
                B::Pending | B::Committing => Step::Wait,
                B::RollbackRequested | B::RollingBack if r.phase != OsPhase::RollingBack => {
                    Step::Enter(
                        OsPhase::RollingBack,
                        "the check-in asked for a rollback".into(),
                    )
                }
                // Requested in this boot: the next boot rolls back.
                B::RollbackRequested | B::RollingBack if !rebooted => Step::Reboot,
                // Still requested after a reboot: the bootguard could not finish it. Rebooting
                // again and again would not help; say so and wait for a person.
                B::RollbackRequested | B::RollingBack => {
                    let note = format!(
                        "the bootguard did not finish the rollback (the boot partition says \
                         {phase} at boot {boots}); see rollback/events on the boot partition"
                    );
                    if r.message == note {
                        Step::Wait
                    } else {
                        Step::Note(note)
                    }
                }
                B::Idle => Step::Wait,
            }
        }
        // The bootguard is done with our upgrade: its word says how it ended.
        (_, Boot::Idle { upgrade_id, last }) if ours(r, upgrade_id) => {
            // A commit says so; anything else (a rollback, or a pending upgrade reset for
            // want of its snapshot) left the old system in place.
            if last.starts_with(COMMITTED) {
                Step::Enter(OsPhase::Committed, last.clone())
            } else {
                Step::Enter(OsPhase::RolledBack, last.clone())
            }
        }
        (_, Boot::Unreadable(why)) if rebooted => Step::Enter(
            OsPhase::RolledBack,
            format!("the upgrade state on the boot partition was unreadable: {why}"),
        ),
        (_, Boot::Unreadable(_)) => Step::Wait,
        // The bootguard knows nothing of our upgrade any more (another one, or none).
        (_, _) => Step::Enter(
            OsPhase::RolledBack,
            "the boot partition no longer records this upgrade".into(),
        ),
    }
}

/// Runs the steps on a device.
#[derive(Debug)]
pub struct Driver<R> {
    pub runner: R,
    pub state_dir: PathBuf,
    pub boot_dir: PathBuf,
    pub vg: String,
    /// Where the running system names its release ([`RELEASE_FILE`] on a device).
    pub release_file: PathBuf,
    /// `os_upgrades` of the config: off, every upgrade is refused before anything is touched.
    pub enabled: bool,
    /// Where an install writes the release's apt sources ([`SOURCES_FILE`] on a device).
    pub sources_file: PathBuf,
}

/// Why a step could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{what}: {why}")]
    Failed { what: String, why: String },
}

fn failed(what: impl Into<String>, why: impl std::fmt::Display) -> DriverError {
    DriverError::Failed {
        what: what.into(),
        why: why.to_string(),
    }
}

impl<R: CommandRunner> Driver<R> {
    /// The driver of this agent's config.
    pub fn new(config: &crate::config::Config, runner: R) -> Driver<R> {
        Driver {
            runner,
            state_dir: config.state_dir.clone(),
            boot_dir: config.boot_dir.clone(),
            vg: config.volume_group.clone(),
            release_file: config.release_file.clone(),
            enabled: config.os_upgrades,
            sources_file: SOURCES_FILE.into(),
        }
    }

    fn record_path(&self) -> PathBuf {
        self.state_dir.join(RECORD_FILE)
    }

    /// The record, if an upgrade was ever started here ([`load_record`]).
    pub fn load(&self) -> Option<Record> {
        load_record(&self.state_dir)
    }

    /// Writes the record whole (temp file, fsync, rename, fsync the folder).
    pub fn save(&self, record: &Record) -> Result<(), DriverError> {
        let bytes = serde_json::to_vec_pretty(record).expect("records serialize");
        std::fs::create_dir_all(&self.state_dir)
            .map_err(|e| failed(format!("creating {}", self.state_dir.display()), e))?;
        fleet_bootguard::boot::write_atomic(&self.record_path(), &bytes)
            .map_err(|e| failed("saving the OS upgrade record", e))
    }

    /// The release the running system names.
    pub fn release(&self) -> String {
        read_release(&self.release_file)
    }

    /// What the device shows now; an error when `lvs` cannot say whether the snapshot exists
    /// (the driver then asks again rather than take it for absent).
    pub async fn observe(&self) -> Result<Observed, DriverError> {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let part = fleet_bootguard::boot::BootPartition::new(&self.boot_dir);
        let boot = match part.read_state() {
            Ok(Ok(None)) => Boot::Idle {
                upgrade_id: String::new(),
                last: String::new(),
            },
            Ok(Ok(Some(s))) if s.phase == fleet_contracts::boot::Phase::Idle => Boot::Idle {
                upgrade_id: s.upgrade_id,
                last: s.last_result,
            },
            Ok(Ok(Some(s))) => Boot::Busy {
                phase: s.phase,
                upgrade_id: s.upgrade_id,
                boots: s.boot_count,
            },
            Ok(Err(corrupt)) => Boot::Unreadable(corrupt.to_string()),
            Err(e) => Boot::Unreadable(e.to_string()),
        };
        // Only arming needs to know about the snapshot (the preconditions look for themselves):
        // lvm is asked then, and not every few seconds, nor on a machine without it.
        let arming = self
            .load()
            .is_some_and(|r| r.phase == OsPhase::Snapshotting);
        let snapshot_present = arming && self.snapshot_exists().await?;
        Ok(Observed {
            boot_id,
            boot,
            snapshot_present,
        })
    }

    /// `fields` of one LV (or VG), comma-separated, as `lvs` prints them.
    async fn lvs(&self, lv: &str, fields: &str) -> Result<String, DriverError> {
        self.run(
            "lvs",
            &[
                "--noheadings",
                "--nosuffix",
                "--separator",
                ",",
                "-o",
                fields,
                lv,
            ],
        )
        .await
    }

    /// Whether `<vg>/root_preupgrade` exists; an error when lvm cannot say.
    async fn snapshot_exists(&self) -> Result<bool, DriverError> {
        Ok(self
            .run("lvs", &["--noheadings", "-o", "lv_name", &self.vg])
            .await?
            .lines()
            .any(|l| l.trim() == "root_preupgrade"))
    }

    async fn run(&self, program: &str, args: &[&str]) -> Result<String, DriverError> {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        // An install names every pinned package: the message names the command, not all of it.
        let line = shorten(&format!("{program} {}", args.join(" ")), 160);
        let limit = if program == "apt-get" || program == "dpkg" {
            APT_TIME_LIMIT
        } else {
            TOOL_TIME_LIMIT
        };
        let out = tokio::time::timeout(limit, self.runner.run(program, &args))
            .await
            .map_err(|_| failed(&line, format!("still running after {limit:?}; stopped")))?
            .map_err(|e| failed(&line, e))?;
        if !out.success() {
            return Err(failed(&line, shorten(&out.error_line(), 400)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The preconditions, each refused with its numbers: root is a thin LV, the pool has
    /// room, the boot partition has room for the known-good copy, the clock is set, no other
    /// upgrade is pending.
    pub async fn precheck(&self, seen: &Observed, now_ms: u64) -> Result<(), String> {
        if !self.enabled {
            return Err("OS upgrades are off in this agent's config (os_upgrades = false)".into());
        }
        if let Boot::Busy {
            phase, upgrade_id, ..
        } = &seen.boot
        {
            return Err(format!("an upgrade ({upgrade_id}) is already {phase}"));
        }
        if self
            .snapshot_exists()
            .await
            .map_err(|e| format!("cannot list the LVs of {}: {e}", self.vg))?
        {
            return Err(format!(
                "the snapshot {}/root_preupgrade exists already (an earlier upgrade left it)",
                self.vg
            ));
        }
        if now_ms < CLOCK_FLOOR_MS {
            return Err(format!(
                "the clock says {now_ms} ms since 1970, before 2026: it is not set"
            ));
        }
        let root = format!("{}/root", self.vg);
        let lv = self
            .lvs(&root, "segtype,pool_lv")
            .await
            .map_err(|e| format!("root is not an LV ({e})"))?;
        let (segtype, pool) = lv.trim().split_once(',').unwrap_or(("", ""));
        if segtype != "thin" || pool.is_empty() {
            return Err(format!(
                "root {root} is a {segtype:?} LV, not a thin one: it cannot be snapshotted"
            ));
        }
        let pool = format!("{}/{pool}", self.vg);
        let fill = self
            .lvs(&pool, "data_percent,metadata_percent")
            .await
            .map_err(|e| e.to_string())?;
        let (data, meta) = parse_fill(&fill)?;
        if data >= MAX_POOL_DATA_PERCENT {
            return Err(format!(
                "the thin pool {pool} is {data:.1}% full (data); an upgrade needs it below {MAX_POOL_DATA_PERCENT}%"
            ));
        }
        if meta >= MAX_POOL_METADATA_PERCENT {
            return Err(format!(
                "the thin pool {pool}'s metadata is {meta:.1}% full; an upgrade needs it below {MAX_POOL_METADATA_PERCENT}%"
            ));
        }
        let (need, free) = boot_room(&self.boot_dir)
            .map_err(|e| format!("cannot measure {}: {e}", self.boot_dir.display()))?;
        if free < need {
            return Err(format!(
                "the boot partition has {free} bytes free; the known-good copy of its files needs {need}"
            ));
        }
        Ok(())
    }

    /// `fleet-bootguard arm` for the record's upgrade.
    pub async fn arm(&self, record: &Record) -> Result<(), DriverError> {
        let boot_dir = self.boot_dir.display().to_string();
        let boots = record.desired.boot_attempts.to_string();
        self.run(
            "fleet-bootguard",
            &[
                "arm",
                "--boot-dir",
                &boot_dir,
                "--vg",
                &self.vg,
                "--upgrade-id",
                &record.upgrade_id(),
                "--max-boots",
                &boots,
            ],
        )
        .await
        .map(drop)
    }

    /// apt to the release: its sources alone, every pinned package at its version (and a
    /// full upgrade when asked), then the release file. `progress` hears each stage.
    pub async fn install(
        &self,
        release: &OsRelease,
        progress: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), DriverError> {
        let result = self.install_from(release, progress).await;
        // The release's sources serve this install only: later apt runs use the device's own.
        if let Err(e) = std::fs::remove_file(&self.sources_file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            warn!(error = %e, file = %self.sources_file.display(), "cannot remove the release's apt sources");
        }
        result
    }

    async fn install_from(
        &self,
        release: &OsRelease,
        progress: &mut (dyn FnMut(String) + Send),
    ) -> Result<(), DriverError> {
        // Checked again here: the device writes these into a file apt reads and into apt's
        // command line, whatever the operator let through.
        for s in &release.sources {
            checks::check_apt_source(s).map_err(|e| failed(format!("source {s:?}"), e))?;
        }
        for (name, version) in &release.packages {
            checks::check_package_name(name).map_err(|e| failed(format!("package {name:?}"), e))?;
            checks::check_package_version(version)
                .map_err(|e| failed(format!("package {name} version {version:?}"), e))?;
        }
        checks::check_release_name(&release.name)
            .map_err(|e| failed(format!("release {:?}", release.name), e))?;
        let sources = release.sources.join("\n") + "\n";
        fleet_bootguard::boot::write_atomic(&self.sources_file, sources.as_bytes())
            .map_err(|e| failed("writing the apt sources", e))?;
        let sourcelist = format!("Dir::Etc::sourcelist={}", self.sources_file.display());
        let only_ours = [
            "-o",
            sourcelist.as_str(),
            "-o",
            "Dir::Etc::sourceparts=-",
            "-o",
            "APT::Get::List-Cleanup=0",
        ];
        // A dpkg cut short earlier (this upgrade's own apt, before a crash) is finished first.
        self.run("dpkg", &["--configure", "-a", "--force-confold"])
            .await?;
        progress("apt-get update".into());
        let mut update = vec!["-q"];
        update.extend(only_ours);
        update.push("update");
        self.run("apt-get", &update).await?;
        let mut install: Vec<String> = [
            "-q",
            "-y",
            "--allow-downgrades",
            "-o",
            "Dpkg::Options::=--force-confold",
        ]
        .iter()
        .chain(only_ours.iter())
        .map(|s| s.to_string())
        .collect();
        install.push("install".into());
        install.extend(release.packages.iter().map(|(n, v)| format!("{n}={v}")));
        progress(format!(
            "apt-get install: {} pinned package(s)",
            release.packages.len()
        ));
        if !release.packages.is_empty() {
            let args: Vec<&str> = install.iter().map(String::as_str).collect();
            self.run_apt(&args).await?;
        }
        if release.full_upgrade {
            progress("apt-get full-upgrade".into());
            let mut full = vec!["-q", "-y", "-o", "Dpkg::Options::=--force-confold"];
            full.extend(only_ours);
            full.push("full-upgrade");
            self.run_apt(&full).await?;
        }
        fleet_bootguard::boot::write_atomic(
            &self.release_file,
            format!("{}\n", release.name).as_bytes(),
        )
        .map_err(|e| failed("writing the release file", e))?;
        self.run("sync", &[]).await.map(drop)
    }

    async fn run_apt(&self, args: &[&str]) -> Result<(), DriverError> {
        // apt reads DEBIAN_FRONTEND; the runner passes the agent's environment, which the
        // unit sets (fleet-agent.service).
        self.run("apt-get", args).await.map(drop)
    }

    /// The new boot set is whole: the kernel and initramfs `config.txt` names exist, and the
    /// initramfs still holds the bootguard, lvm, the thin-pool module and `thin_check`.
    pub async fn verify_boot_set(&self) -> Result<(), String> {
        let config = std::fs::read_to_string(self.boot_dir.join("config.txt"))
            .map_err(|e| format!("cannot read config.txt: {e}"))?;
        let (kernel, initramfs) = boot_files(&config);
        let kernel = kernel.unwrap_or_else(|| "kernel8.img".into());
        let initramfs = initramfs.ok_or("config.txt names no initramfs")?;
        for f in [&kernel, &initramfs] {
            if !self.boot_dir.join(f).is_file() {
                return Err(format!(
                    "config.txt names {f}, which is not on the boot partition"
                ));
            }
        }
        let path = self.boot_dir.join(&initramfs).display().to_string();
        let listing = self
            .run("lsinitramfs", &[&path])
            .await
            .map_err(|e| e.to_string())?;
        for needed in ["fleet-bootguard", "sbin/lvm", "dm-thin-pool", "thin_check"] {
            if !listing.lines().any(|l| l.contains(needed)) {
                return Err(format!("the new initramfs {initramfs} lacks {needed}"));
            }
        }
        Ok(())
    }

    pub async fn request_rollback(&self, reason: &str) -> Result<(), DriverError> {
        let boot_dir = self.boot_dir.display().to_string();
        self.run(
            "fleet-bootguard",
            &[
                "request-rollback",
                "--boot-dir",
                &boot_dir,
                "--reason",
                reason,
            ],
        )
        .await
        .map(drop)
    }

    pub async fn reboot(&self) -> Result<(), DriverError> {
        self.run("sync", &[]).await?;
        self.run("systemctl", &["reboot"]).await.map(drop)
    }
}

/// How often a waiting driver looks at the boot partition again (the check-in changes it).
const LOOK_AGAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Drives OS upgrades until the agent stops: takes one step at a time, each persisted before
/// it acts, and reports `<device>._os` whenever it changes. `desired` carries the upgrade the
/// operator asks for (`None`: none); `report` hears every new report.
pub async fn drive<R: CommandRunner>(
    driver: Driver<R>,
    mut desired: tokio::sync::watch::Receiver<Option<DesiredOs>>,
    mut report: impl FnMut(&OsReport) + Send,
) {
    let mut last_sent: Option<OsReport> = None;
    loop {
        let record = driver.load();
        let release = driver.release();
        let sent = match &record {
            Some(r) => r.report(&release),
            None => OsReport {
                schema: SCHEMA_VERSION,
                release: release.clone(),
                upgrade: None,
                history: Vec::new(),
            },
        };
        if last_sent.as_ref() != Some(&sent) {
            report(&sent);
            last_sent = Some(sent);
        }
        let seen = match driver.observe().await {
            Ok(seen) => seen,
            Err(e) => {
                warn!(error = %e, "cannot see where the OS upgrade stands; asking again shortly");
                tokio::time::sleep(LOOK_AGAIN).await;
                continue;
            }
        };
        let wanted = desired.borrow_and_update().clone();
        let step = decide(record.as_ref(), wanted.as_ref(), &seen);
        let now = crate::clock::unix_ms();
        let result = match (step, record) {
            (Step::Wait, _) => {
                tokio::select! {
                    changed = desired.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(LOOK_AGAIN) => {}
                }
                Ok(())
            }
            (Step::Start(d), previous) => {
                info!(upgrade = %d.upgrade, generation = d.generation, release = %d.release.name, "OS upgrade starts");
                driver.save(&start(previous, d, &release, &seen.boot_id, now))
            }
            (step, None) => Err(failed(
                "the OS upgrade record",
                format!("{step:?} without one"),
            )),
            (Step::Precheck, Some(mut r)) => {
                let checked = match check_in_commands(&r.desired.checks) {
                    Ok(()) => driver.precheck(&seen, now).await,
                    Err(e) => Err(e),
                };
                match checked {
                    Ok(()) => enter(
                        &mut r,
                        OsPhase::Snapshotting,
                        "saving the known-good boot files and snapshotting root".into(),
                        &seen.boot_id,
                        now,
                    ),
                    Err(why) => enter(&mut r, OsPhase::Refused, why, &seen.boot_id, now),
                }
                driver.save(&r)
            }
            (Step::Arm, Some(mut r)) => match driver.arm(&r).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    enter(&mut r, OsPhase::Refused, e.to_string(), &seen.boot_id, now);
                    driver.save(&r)
                }
            },
            (Step::Install, Some(mut r)) => {
                // Each stage reaches the operator as the Upgrading phase's message (not saved:
                // a restart mid-install rolls back whatever stage it was at).
                let mut shown = r.clone();
                let mut progress = |stage: String| {
                    info!(%stage, "OS upgrade");
                    shown.message = shorten(&format!("installing: {stage}"), MAX_MESSAGE_BYTES);
                    let sent = shown.report(&release);
                    report(&sent);
                    last_sent = Some(sent);
                };
                let outcome = match driver.install(&r.desired.release, &mut progress).await {
                    Ok(()) => {
                        progress("verifying the new boot set".into());
                        driver.verify_boot_set().await
                    }
                    Err(e) => Err(format!("the install failed: {e}")),
                };
                match outcome {
                    Ok(()) => {
                        enter(
                            &mut r,
                            OsPhase::Rebooting,
                            "installed and verified; rebooting".into(),
                            &seen.boot_id,
                            now,
                        );
                        match driver.save(&r) {
                            Ok(()) => reboot(&driver).await,
                            Err(e) => Err(e),
                        }
                    }
                    Err(why) => roll_back(&driver, r, why, &seen.boot_id, now).await,
                }
            }
            (Step::Reboot, Some(_)) => reboot(&driver).await,
            (Step::RequestRollback(why), Some(r)) => {
                roll_back(&driver, r, why, &seen.boot_id, now).await
            }
            (Step::Enter(phase, message), Some(mut r)) => {
                enter(&mut r, phase, message, &seen.boot_id, now);
                driver.save(&r)
            }
            (Step::Note(message), Some(mut r)) => {
                warn!(upgrade = %r.desired.upgrade, %message, "OS upgrade");
                r.message = shorten(&message, MAX_MESSAGE_BYTES);
                driver.save(&r)
            }
        };
        if let Err(e) = result {
            warn!(error = %e, "OS upgrade step failed; trying again shortly");
            tokio::time::sleep(LOOK_AGAIN).await;
        }
    }
}

/// Records RollingBack with the reason, asks the bootguard to roll back, reboots.
async fn roll_back<R: CommandRunner>(
    driver: &Driver<R>,
    mut r: Record,
    why: String,
    boot_id: &str,
    now: u64,
) -> Result<(), DriverError> {
    warn!(reason = %why, "OS upgrade rolls back");
    enter(&mut r, OsPhase::RollingBack, why.clone(), boot_id, now);
    driver.save(&r)?;
    driver.request_rollback(&why).await?;
    reboot(driver).await
}

/// Reboots, and waits for the stop that follows.
async fn reboot<R: CommandRunner>(driver: &Driver<R>) -> Result<(), DriverError> {
    info!("rebooting for the OS upgrade");
    driver.reboot().await?;
    // systemd stops the agent; should it not, the next round asks again.
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    Ok(())
}

/// The driver's record in `state_dir`, if an upgrade was ever started there. An unreadable one
/// is set aside (renamed `.corrupt`) and logged: the bootguard still protects the device.
pub fn load_record(state_dir: &Path) -> Option<Record> {
    let path = state_dir.join(RECORD_FILE);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "the OS upgrade record is unreadable; set aside");
            let _ = std::fs::rename(&path, path.with_extension("json.corrupt"));
            None
        }
    }
}

/// A new record for `desired`, Preparing.
pub fn start(
    previous: Option<Record>,
    desired: DesiredOs,
    release: &str,
    boot_id: &str,
    now_ms: u64,
) -> Record {
    let mut history = previous
        .as_ref()
        .map_or_else(Vec::new, |p| p.history.clone());
    if let Some(p) = previous {
        history.push(OsOutcome {
            upgrade: p.desired.upgrade,
            generation: p.desired.generation,
            phase: p.phase,
        });
    }
    let excess = history.len().saturating_sub(MAX_OS_HISTORY);
    history.drain(..excess);
    Record {
        schema: SCHEMA_VERSION,
        desired,
        phase: OsPhase::Preparing,
        from_release: release.to_owned(),
        message: "checking the preconditions".into(),
        since_ms: now_ms,
        boot_id: boot_id.to_owned(),
        history,
    }
}

/// `text` cut to at most `max` bytes, at a character boundary, marked when cut.
pub fn shorten(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max.saturating_sub(3);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// `record` in `phase`, entered now in this boot.
pub fn enter(record: &mut Record, phase: OsPhase, message: String, boot_id: &str, now_ms: u64) {
    let message = shorten(&message, MAX_MESSAGE_BYTES);
    if record.phase != phase || record.message != message {
        info!(upgrade = %record.desired.upgrade, %phase, %message, "OS upgrade");
    }
    record.phase = phase;
    record.message = message;
    record.since_ms = now_ms;
    record.boot_id = boot_id.to_owned();
}

pub fn read_release(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.lines().next().map(|l| l.trim().to_owned()))
        .filter(|l| checks::check_release_name(l).is_ok())
        .unwrap_or_else(|| "unknown".into())
}

/// `data_percent,metadata_percent` as `lvs` prints them.
fn parse_fill(text: &str) -> Result<(f64, f64), String> {
    let (data, meta) = text
        .trim()
        .split_once(',')
        .ok_or_else(|| format!("lvs printed {:?}, not data,metadata", text.trim()))?;
    let number = |s: &str| {
        s.trim()
            .parse::<f64>()
            .map_err(|_| format!("lvs printed {s:?} for a fill percentage"))
    };
    Ok((number(data)?, number(meta)?))
}

/// The kernel and initramfs `config.txt` names (`kernel=`, `initramfs F followkernel`).
fn boot_files(config: &str) -> (Option<String>, Option<String>) {
    let mut kernel = None;
    let mut initramfs = None;
    for line in config.lines().map(str::trim) {
        if let Some(k) = line.strip_prefix("kernel=") {
            kernel = Some(k.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("initramfs ") {
            initramfs = rest.split_whitespace().next().map(str::to_owned);
        }
    }
    (kernel, initramfs)
}

/// (bytes the known-good copy needs, bytes free) on the boot partition: the copy holds the
/// boot files, so it needs about what they take now (everything but `rollback/`).
fn boot_room(boot_dir: &Path) -> std::io::Result<(u64, u64)> {
    fn size(dir: &Path, skip: &Path) -> std::io::Result<u64> {
        let mut total = 0;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            if path == skip {
                continue;
            }
            let meta = entry.metadata()?;
            total += if meta.is_dir() {
                size(&path, skip)?
            } else {
                meta.len()
            };
        }
        Ok(total)
    }
    let need = size(boot_dir, &boot_dir.join("rollback"))?;
    let stat = rustix::fs::statvfs(boot_dir)?;
    Ok((need, stat.f_bavail * stat.f_frsize))
}

/// Checks the campaign's check-in commands again on the device, which runs them as root:
/// the operator's checks, whatever it let through. Why not, naming the check.
pub fn check_in_commands(commands: &[CheckInCommand]) -> Result<(), String> {
    if commands.len() > checks::MAX_CHECK_IN_COMMANDS {
        return Err(format!(
            "{} check-in commands, at most {} run",
            commands.len(),
            checks::MAX_CHECK_IN_COMMANDS
        ));
    }
    for c in commands {
        fleet_contracts::names::check_name(&c.name)
            .map_err(|e| format!("check-in command name {:?}: {e}", c.name))?;
        checks::check_check_in_command(&c.command).map_err(|(word, e)| match word {
            Some(w) => format!("check-in command {} word {w}: {e}", c.name),
            None => format!("check-in command {}: {e}", c.name),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
