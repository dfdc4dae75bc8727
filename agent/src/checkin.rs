//! The check-in of an upgraded system (`fleet-agent check-in`, run by `fleet-checkin.service`
//! on every boot, ordered before `boot-complete.target`).
//!
//! With no upgrade pending on the boot partition it ends at once. With one, it waits until the
//! agent (a separate process, the service) shows, for this boot, that it reached the operator
//! and that every workload is Ready, that no unit failed, and that the campaign's own checks
//! (argv, no shell, each bounded by a minute and by the deadline) exit 0; then it commits the upgrade
//! (`fleet-bootguard commit`). When that has not happened within the upgrade's deadline,
//! counted from the boot (`/proc/uptime`, CLOCK_BOOTTIME), it asks the bootguard for a rollback
//! and reboots. It decides on its own clock and checks: a device that cannot reach NATS during
//! probation fails its check-in at the deadline, it never waits forever.
//!
//! The agent's side is [`Evidence`], `<state_dir>/checkin.json`, rewritten when it changes;
//! the verdict is the pure [`judge`]. Only the upgraded system's own boot commits: while the
//! agent's record says the install is still under way ([`not_booted`]), the check-in waits
//! (and fails at the deadline like any other). A commit cut short (`committing` on the boot
//! partition) is finished by the next boot's check-in. Every command it runs has a time
//! limit.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use fleet_contracts::spec::CheckInCommand;

use crate::{config::Config, osupgrade, runner::CommandRunner};

const FILE: &str = "checkin.json";
/// The deadline when the upgrade's own is not known (no driver record: armed by hand).
pub const DEFAULT_DEADLINE_SECS: u64 = 600;

/// What the agent shows the check-in: for which boot, whether it reached the operator, and
/// which workloads are not Ready.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    pub boot_id: String,
    /// An answer with the device's desired state came from the operator in this process.
    pub synced: bool,
    /// Workloads not Ready (`name: phase`); `None` while the desired state is unknown.
    pub not_ready: Option<Vec<String>>,
    #[serde(skip)]
    written: Option<Box<Evidence>>,
}

impl Evidence {
    pub fn new(boot_id: String) -> Evidence {
        Evidence {
            boot_id,
            synced: false,
            not_ready: None,
            written: None,
        }
    }

    /// Writes the evidence when it changed (a failure is logged: the check-in then waits).
    pub fn save(&mut self, state_dir: &Path) {
        let now = Evidence {
            written: None,
            ..self.clone()
        };
        if self.written.as_deref() == Some(&now) {
            return;
        }
        let bytes = serde_json::to_vec(&now).expect("evidence serializes");
        match fleet_bootguard::boot::write_atomic(&state_dir.join(FILE), &bytes) {
            Ok(()) => self.written = Some(Box::new(now)),
            Err(e) => warn!(error = %e, "cannot write the check-in evidence"),
        }
    }

    pub fn load(state_dir: &Path) -> Option<Evidence> {
        serde_json::from_slice(&std::fs::read(state_dir.join(FILE)).ok()?).ok()
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The check-in's verdict at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// Not yet, and why.
    Wait(String),
    /// The deadline passed; why it was not met.
    Fail(String),
}

/// Judges the upgraded system `uptime_secs` after its boot. `not_booted` says why this boot
/// is not the upgraded system's yet, by the agent's record (the install is still under way);
/// such a boot never commits.
pub fn judge(
    evidence: Option<&Evidence>,
    boot_id: &str,
    not_booted: Option<&str>,
    failed_units: &[String],
    failed_checks: &[String],
    uptime_secs: u64,
    deadline_secs: u64,
) -> Verdict {
    let waiting = match evidence.filter(|e| e.boot_id == boot_id) {
        _ if not_booted.is_some() => not_booted.unwrap_or_default().to_owned(),
        None => "the agent has shown nothing in this boot".to_owned(),
        Some(e) if !e.synced => "the agent has not reached the operator".to_owned(),
        Some(Evidence {
            not_ready: None, ..
        }) => "the agent does not know its desired state yet".to_owned(),
        Some(Evidence {
            not_ready: Some(n), ..
        }) if !n.is_empty() => format!("workloads not Ready: {}", n.join(", ")),
        Some(_) if !failed_units.is_empty() => {
            format!("failed units: {}", failed_units.join(", "))
        }
        Some(_) if !failed_checks.is_empty() => {
            format!("checks failing: {}", failed_checks.join("; "))
        }
        Some(_) => return Verdict::Pass,
    };
    if uptime_secs >= deadline_secs {
        Verdict::Fail(format!(
            "no check-in within {deadline_secs}s of the boot: {waiting}"
        ))
    } else {
        Verdict::Wait(waiting)
    }
}

/// How the check-in ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No upgrade was pending.
    NothingPending,
    Committed,
    /// A rollback was requested and the device reboots; why.
    RollingBack(String),
}

/// Whether this boot may commit the upgrade `upgrade_id`, by the agent's record: `None` when it
/// may (the upgraded system booted: the record is in Probation, or Rebooting from an earlier
/// boot; or there is no record of it, an upgrade armed by hand), else why not.
pub fn not_booted(
    record: Option<&osupgrade::Record>,
    upgrade_id: &str,
    boot_id: &str,
) -> Option<String> {
    use fleet_contracts::state::OsPhase;
    let r = record.filter(|r| r.upgrade_id() == upgrade_id)?;
    match r.phase {
        OsPhase::Probation => None,
        OsPhase::Rebooting if r.boot_id != boot_id => None,
        phase => Some(format!(
            "the upgrade has not booted yet (the agent's record says {phase})"
        )),
    }
}

/// How long one command of the check-in may take.
const COMMAND_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// Runs the check-in to its end.
pub async fn run<R: CommandRunner>(config: &Config, runner: &R) -> Result<Outcome, String> {
    let part = fleet_bootguard::boot::BootPartition::new(&config.boot_dir);
    let read_state = || {
        part.read_state()
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    };
    let boot_dir = config.boot_dir.display().to_string();
    let commit = async || {
        run_ok(
            runner,
            "fleet-bootguard",
            &["commit", "--boot-dir", &boot_dir],
        )
        .await
    };
    use fleet_contracts::boot::Phase;
    let Some(state) =
        read_state()?.filter(|s| matches!(s.phase, Phase::Pending | Phase::Committing))
    else {
        return Ok(Outcome::NothingPending);
    };
    if state.phase == Phase::Committing {
        // A commit cut short (power, a failed lvremove): finish it.
        commit().await?;
        info!(upgrade = %state.upgrade_id, "finished the commit an earlier boot began");
        return Ok(Outcome::Committed);
    }
    let deadline = osupgrade::load_record(&config.state_dir)
        .filter(|r| r.upgrade_id() == state.upgrade_id)
        .map_or(DEFAULT_DEADLINE_SECS, |r| {
            u64::from(r.desired.check_in_deadline_seconds)
        });
    info!(upgrade = %state.upgrade_id, boot = state.boot_count, deadline_secs = deadline, "checking in");
    let boot = boot_id();
    let mut said = String::new();
    loop {
        // The agent may have asked for a rollback meanwhile (an install cut short): then there
        // is nothing left to judge.
        match read_state()? {
            Some(s) if s.phase == Phase::Pending && s.upgrade_id == state.upgrade_id => {}
            _ => return Ok(Outcome::NothingPending),
        }
        let uptime = uptime_secs().map_err(|e| format!("cannot read /proc/uptime: {e}"))?;
        let failed = failed_units(runner).await;
        let evidence = Evidence::load(&config.state_dir);
        let record = osupgrade::load_record(&config.state_dir);
        let waiting_for_install = not_booted(record.as_ref(), &state.upgrade_id, &boot);
        let judge_with = |failed_checks: &[String], uptime: u64| {
            judge(
                evidence.as_ref(),
                &boot,
                waiting_for_install.as_deref(),
                &failed,
                failed_checks,
                uptime,
                deadline,
            )
        };
        let mut verdict = judge_with(&[], uptime);
        // The campaign's own checks run once the agent's pass (they may be slow): each within
        // what is left of the deadline, and judged at the time they ended, so they can neither
        // push the deadline back nor commit after it.
        let commands = record
            .as_ref()
            .filter(|r| r.upgrade_id() == state.upgrade_id)
            .map(|r| r.desired.checks.as_slice())
            .unwrap_or_default();
        if verdict == Verdict::Pass && !commands.is_empty() {
            let left = || {
                let now = uptime_secs().unwrap_or(u64::MAX);
                std::time::Duration::from_secs(deadline.saturating_sub(now))
            };
            let failing = run_checks(runner, commands, left).await;
            let uptime = uptime_secs().map_err(|e| format!("cannot read /proc/uptime: {e}"))?;
            verdict = judge_with(&failing, uptime);
        }
        match verdict {
            Verdict::Pass => {
                commit().await?;
                info!(upgrade = %state.upgrade_id, "checked in: the upgrade is committed");
                return Ok(Outcome::Committed);
            }
            Verdict::Fail(why) => {
                warn!(upgrade = %state.upgrade_id, reason = %why, "check-in failed: rolling back");
                run_ok(
                    runner,
                    "fleet-bootguard",
                    &[
                        "request-rollback",
                        "--boot-dir",
                        &boot_dir,
                        "--reason",
                        &why,
                    ],
                )
                .await?;
                run_ok(runner, "systemctl", &["reboot"]).await?;
                return Ok(Outcome::RollingBack(why));
            }
            Verdict::Wait(why) => {
                if why != said {
                    info!(
                        uptime_secs = uptime,
                        deadline_secs = deadline,
                        "waiting: {why}"
                    );
                    said = why;
                }
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
}

async fn run_ok<R: CommandRunner>(runner: &R, program: &str, args: &[&str]) -> Result<(), String> {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::time::timeout(COMMAND_TIME_LIMIT, runner.run(program, &args))
        .await
        .map_err(|_| format!("{program}: still running after {COMMAND_TIME_LIMIT:?}"))?
        .map_err(|e| format!("{program}: {e}"))?;
    if out.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            out.error_line()
        ))
    }
}

/// How long one run of a campaign's check may take.
const CHECK_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs the campaign's checks (no shell), each at most [`CHECK_TIME_LIMIT`] and never past
/// what `left()` says remains of the deadline: why each that did not exit 0 failed, naming it.
/// Commands the device refuses (checked again here) fail; so do those no time is left for.
async fn run_checks<R: CommandRunner>(
    runner: &R,
    commands: &[CheckInCommand],
    left: impl Fn() -> std::time::Duration,
) -> Vec<String> {
    if let Err(e) = osupgrade::check_in_commands(commands) {
        return vec![e];
    }
    let mut failing = Vec::new();
    for c in commands {
        let limit = CHECK_TIME_LIMIT.min(left());
        if limit.is_zero() {
            failing.push(format!("{} (not run: the deadline has come)", c.name));
            continue;
        }
        let (program, args) = c.command.split_first().expect("checked: at least one word");
        let ran = tokio::time::timeout(limit, runner.run(program, args)).await;
        let why = match ran {
            Err(_) => format!("still running after {limit:?}"),
            Ok(Err(e)) => format!("cannot run {program}: {e}"),
            Ok(Ok(out)) if out.success() => continue,
            Ok(Ok(out)) => {
                let status = match out.code {
                    Some(code) => format!("exit {code}"),
                    None => "killed by a signal".to_owned(),
                };
                // What it said last, on stderr or else stdout, cut to a line of a reason.
                match last_line(&out.stderr).or_else(|| last_line(&out.stdout)) {
                    Some(line) => format!("{status}: {line}"),
                    None => status,
                }
            }
        };
        failing.push(format!("{} ({why})", c.name));
    }
    failing
}

/// The last non-empty line of `output`, at most 160 bytes, with what would garble a reason
/// line, a console or a terminal (escapes, bidi overrides) replaced by `?`.
fn last_line(output: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(output);
    let line = text.lines().rev().map(str::trim).find(|l| !l.is_empty())?;
    Some(osupgrade::shorten(
        &fleet_contracts::checks::showable(line),
        160,
    ))
}

/// Units systemd lists as failed (none when it cannot be asked: the other checks still hold).
async fn failed_units<R: CommandRunner>(runner: &R) -> Vec<String> {
    let args: Vec<String> = ["list-units", "--state=failed", "--no-legend", "--plain"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let listed = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        runner.run("systemctl", &args),
    )
    .await;
    match listed {
        Ok(Ok(out)) if out.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    }
}

/// Seconds since the boot, suspend included (`/proc/uptime` is CLOCK_BOOTTIME).
fn uptime_secs() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/uptime")?;
    text.split('.')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("unexpected /proc/uptime {text:?}")))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::runner::{CmdOutput, Lines};

    fn evidence(boot: &str, synced: bool, not_ready: Option<Vec<&str>>) -> Evidence {
        Evidence {
            boot_id: boot.into(),
            synced,
            not_ready: not_ready.map(|v| v.into_iter().map(String::from).collect()),
            written: None,
        }
    }

    #[test]
    fn the_verdict_needs_the_operator_ready_workloads_and_no_failed_unit_before_the_deadline() {
        let good = evidence("b2", true, Some(vec![]));
        assert_eq!(
            judge(Some(&good), "b2", None, &[], &[], 30, 600),
            Verdict::Pass
        );
        // Evidence of the boot before does not count.
        assert_eq!(
            judge(Some(&good), "b3", None, &[], &[], 30, 600),
            Verdict::Wait("the agent has shown nothing in this boot".into())
        );
        let offline = evidence("b2", false, Some(vec![]));
        assert_eq!(
            judge(Some(&offline), "b2", None, &[], &[], 30, 600),
            Verdict::Wait("the agent has not reached the operator".into())
        );
        // Without NATS the device decides alone, at its deadline.
        assert_eq!(
            judge(Some(&offline), "b2", None, &[], &[], 600, 600),
            Verdict::Fail(
                "no check-in within 600s of the boot: the agent has not reached the operator"
                    .into()
            )
        );
        let starting = evidence("b2", true, Some(vec!["web: Starting"]));
        assert_eq!(
            judge(Some(&starting), "b2", None, &[], &[], 700, 600),
            Verdict::Fail(
                "no check-in within 600s of the boot: workloads not Ready: web: Starting".into()
            )
        );
        let failed = ["broken.service".to_owned()];
        assert_eq!(
            judge(Some(&good), "b2", None, &failed, &[], 10, 600),
            Verdict::Wait("failed units: broken.service".into())
        );
        assert_eq!(
            judge(None, "b2", None, &[], &[], 10, 600),
            Verdict::Wait("the agent has shown nothing in this boot".into())
        );
    }

    /// A boot before the upgrade's own (the agent restarted mid-install, or is still at it)
    /// never commits, however good it looks; at the deadline it fails like any other.
    #[test]
    fn only_the_upgraded_systems_boot_commits() {
        use fleet_contracts::state::{DesiredOs, OsPhase};
        let desired = DesiredOs {
            schema: 1,
            upgrade: "up".into(),
            generation: 1,
            release: fleet_contracts::spec::OsRelease {
                name: "r2".into(),
                sources: vec![],
                packages: Default::default(),
                full_upgrade: true,
            },
            check_in_deadline_seconds: 600,
            boot_attempts: 3,
            checks: vec![],
        };
        let record = |phase, boot: &str| {
            let mut r = osupgrade::start(None, desired.clone(), "r1", boot, 0);
            r.phase = phase;
            r
        };
        assert_eq!(not_booted(None, "up.1", "b2"), None, "armed by hand");
        assert_eq!(
            not_booted(Some(&record(OsPhase::Probation, "b2")), "up.1", "b2"),
            None
        );
        assert_eq!(
            not_booted(Some(&record(OsPhase::Rebooting, "b1")), "up.1", "b2"),
            None
        );
        for (phase, boot) in [
            (OsPhase::Rebooting, "b2"),
            (OsPhase::Upgrading, "b1"),
            (OsPhase::Upgrading, "b2"),
            (OsPhase::Snapshotting, "b2"),
            (OsPhase::RollingBack, "b2"),
        ] {
            let why = not_booted(Some(&record(phase, boot)), "up.1", "b2");
            assert!(why.is_some(), "{phase} from {boot}");
        }
        // Another upgrade's record says nothing about this one.
        assert_eq!(
            not_booted(Some(&record(OsPhase::Upgrading, "b2")), "other.1", "b2"),
            None
        );
        let good = evidence("b2", true, Some(vec![]));
        let why = "the upgrade has not booted yet (the agent's record says Upgrading)";
        assert_eq!(
            judge(Some(&good), "b2", Some(why), &[], &[], 30, 600),
            Verdict::Wait(why.into())
        );
        assert_eq!(
            judge(Some(&good), "b2", Some(why), &[], &[], 600, 600),
            Verdict::Fail(format!("no check-in within 600s of the boot: {why}"))
        );
    }

    #[test]
    fn the_campaigns_checks_hold_the_commit_and_name_themselves_at_the_deadline() {
        let good = evidence("b2", true, Some(vec![]));
        let failing = ["db (exit 2: no answer)".to_owned()];
        assert_eq!(
            judge(Some(&good), "b2", None, &[], &failing, 30, 600),
            Verdict::Wait("checks failing: db (exit 2: no answer)".into())
        );
        assert_eq!(
            judge(Some(&good), "b2", None, &[], &failing, 600, 600),
            Verdict::Fail(
                "no check-in within 600s of the boot: checks failing: db (exit 2: no answer)"
                    .into()
            )
        );
    }

    #[tokio::test]
    async fn checks_run_without_a_shell_and_say_why_they_failed() {
        let runner = crate::runner::RecordingRunner::default();
        let command = |name: &str, words: &[&str]| CheckInCommand {
            name: name.into(),
            command: words.iter().map(|w| w.to_string()).collect(),
        };
        runner.answer(0, "", "");
        runner.answer(3, "", "warming up\nnot ready yet\n");
        runner.answer(1, "", "");
        runner.answer(7, "HTTP 503 \u{1b}[2J\u{202e}x\n\n", "");
        let minute = || Duration::from_secs(60);
        let failing = run_checks(
            &runner,
            &[
                command("up", &["/usr/bin/true"]),
                command("db", &["/usr/bin/pg_isready", "-h", "127.0.0.1; reboot"]),
                command("file", &["/usr/bin/test", "-e", "/x"]),
                command("web", &["/usr/bin/curl", "-f", "http://127.0.0.1/"]),
            ],
            minute,
        )
        .await;
        assert_eq!(
            failing,
            [
                "db (exit 3: not ready yet)",
                "file (exit 1)",
                "web (exit 7: HTTP 503 ?[2J?x)"
            ]
        );
        assert_eq!(
            runner.calls(),
            [
                "/usr/bin/true",
                "/usr/bin/pg_isready -h 127.0.0.1; reboot",
                "/usr/bin/test -e /x",
                "/usr/bin/curl -f http://127.0.0.1/"
            ],
            "each word one argument, as given"
        );
        // A command the device refuses is never run: it fails, naming why.
        let runner = crate::runner::RecordingRunner::default();
        let failing = run_checks(&runner, &[command("sh", &["sh", "-c", "x"])], minute).await;
        assert_eq!(
            failing,
            [
                "check-in command sh word 0: the program must be an absolute path (no shell looks it up)"
            ]
        );
        assert!(runner.calls().is_empty());
    }

    /// A check that never ends is stopped at its limit, and never outlives the deadline:
    /// the limit is what is left of it; with nothing left, no check runs.
    #[tokio::test(start_paused = true)]
    async fn a_hung_check_is_stopped_and_none_runs_past_the_deadline() {
        struct Hangs;
        impl CommandRunner for Hangs {
            async fn run(&self, _: &str, _: &[String]) -> std::io::Result<CmdOutput> {
                std::future::pending().await
            }
            fn spawn_lines(&self, _: &str, _: &[String]) -> std::io::Result<Lines> {
                Ok(Lines::scripted(vec![]))
            }
        }
        let hung = [CheckInCommand {
            name: "db".into(),
            command: vec!["/usr/bin/sleep".into(), "infinity".into()],
        }];
        let started = crate::clock::now();
        let failing = run_checks(&Hangs, &hung, || Duration::from_secs(3600)).await;
        assert_eq!(failing, ["db (still running after 60s)"]);
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        let failing = run_checks(&Hangs, &hung, || Duration::from_secs(7)).await;
        assert_eq!(failing, ["db (still running after 7s)"]);
        let failing = run_checks(&Hangs, &hung, || Duration::ZERO).await;
        assert_eq!(failing, ["db (not run: the deadline has come)"]);
    }

    #[test]
    fn evidence_is_written_only_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Evidence::new("b1".into());
        e.save(dir.path());
        let path = dir.path().join(FILE);
        let first = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::remove_file(&path).unwrap();
        e.save(dir.path());
        assert!(!path.exists(), "unchanged evidence is not written again");
        e.synced = true;
        e.save(dir.path());
        let read = Evidence::load(dir.path()).unwrap();
        assert!(read.synced && read.boot_id == "b1");
        let _ = first;
    }
}
