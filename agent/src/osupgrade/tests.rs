//! The driver's decision, case by case, and its preconditions against a scripted `lvs`.

use super::*;
use crate::runner::RecordingRunner;
use fleet_contracts::boot::Phase as B;

fn desired(generation: u64) -> DesiredOs {
    DesiredOs {
        schema: 1,
        upgrade: "up".into(),
        generation,
        release: OsRelease {
            name: "r2".into(),
            sources: vec!["deb http://x/ ./".into()],
            packages: [("fleet-os-marker".to_owned(), "2".to_owned())].into(),
            full_upgrade: false,
        },
        check_in_deadline_seconds: 600,
        boot_attempts: 3,
        checks: vec![],
    }
}

fn record(phase: OsPhase, boot_id: &str) -> Record {
    let mut r = start(None, desired(1), "r1", boot_id, 0);
    r.phase = phase;
    r
}

fn seen(boot_id: &str, boot: Boot, snapshot: bool) -> Observed {
    Observed {
        boot_id: boot_id.into(),
        boot,
        snapshot_present: snapshot,
    }
}

fn idle(id: &str, last: &str) -> Boot {
    Boot::Idle {
        upgrade_id: id.into(),
        last: last.into(),
    }
}

fn busy(phase: B, id: &str, boots: u32) -> Boot {
    Boot::Busy {
        phase,
        upgrade_id: id.into(),
        boots,
    }
}

#[test]
fn each_upgrade_and_generation_is_made_once() {
    let fresh = seen("b1", idle("", ""), false);
    assert_eq!(decide(None, None, &fresh), Step::Wait);
    assert_eq!(
        decide(None, Some(&desired(1)), &fresh),
        Step::Start(desired(1))
    );
    let done = record(OsPhase::Committed, "b1");
    assert_eq!(decide(Some(&done), Some(&desired(1)), &fresh), Step::Wait);
    let rolled = record(OsPhase::RolledBack, "b1");
    assert_eq!(decide(Some(&rolled), Some(&desired(1)), &fresh), Step::Wait);
    // A new generation (a fixed spec) is a new upgrade.
    assert_eq!(
        decide(Some(&rolled), Some(&desired(2)), &fresh),
        Step::Start(desired(2))
    );
    // One already in the history is not made again either.
    let later = start(Some(rolled), desired(2), "r1", "b1", 0);
    let mut later = later;
    later.phase = OsPhase::Committed;
    assert_eq!(decide(Some(&later), Some(&desired(1)), &fresh), Step::Wait);
    assert_eq!(later.history.len(), 1);
}

#[test]
fn an_upgrade_under_way_goes_on_whatever_the_desired_state_says() {
    let r = record(OsPhase::Upgrading, "b1");
    let s = seen("b1", busy(B::Pending, "up.1", 0), true);
    assert_eq!(decide(Some(&r), None, &s), Step::Install);
    assert_eq!(decide(Some(&r), Some(&desired(2)), &s), Step::Install);
}

#[test]
fn the_flow_from_preparing_to_committed() {
    let id = "up.1";
    let cases: Vec<(OsPhase, &str, Boot, bool, Step)> = vec![
        (
            OsPhase::Preparing,
            "b1",
            idle("", ""),
            false,
            Step::Precheck,
        ),
        (OsPhase::Snapshotting, "b1", idle("", ""), false, Step::Arm),
        (
            OsPhase::Snapshotting,
            "b1",
            busy(B::Pending, id, 0),
            true,
            Step::Enter(OsPhase::Upgrading, "armed; installing".into()),
        ),
        (
            OsPhase::Upgrading,
            "b1",
            busy(B::Pending, id, 0),
            true,
            Step::Install,
        ),
        (
            OsPhase::Rebooting,
            "b1",
            busy(B::Pending, id, 0),
            true,
            Step::Reboot,
        ),
        (
            OsPhase::Rebooting,
            "b2",
            busy(B::Pending, id, 1),
            true,
            Step::Enter(
                OsPhase::Probation,
                "boot 1 of the upgraded system; checking in".into(),
            ),
        ),
        (
            OsPhase::Probation,
            "b2",
            busy(B::Pending, id, 1),
            true,
            Step::Wait,
        ),
        (
            OsPhase::Probation,
            "b2",
            busy(B::Committing, id, 1),
            false,
            Step::Wait,
        ),
        (
            OsPhase::Probation,
            "b2",
            idle(id, "committed: upgrade up.1 after 1 boots"),
            false,
            Step::Enter(
                OsPhase::Committed,
                "committed: upgrade up.1 after 1 boots".into(),
            ),
        ),
    ];
    for (phase, boot_id, boot, snapshot, want) in cases {
        let r = record(phase, "b1");
        let got = decide(Some(&r), None, &seen(boot_id, boot.clone(), snapshot));
        assert_eq!(got, want, "{phase} in {boot_id} with {boot:?}");
    }
}

#[test]
fn every_way_an_upgrade_fails_ends_rolled_back_with_the_bootguards_reason() {
    let id = "up.1";
    let limit = "rolled back: 3 boots without a successful check-in (limit 3)";
    let cases: Vec<(OsPhase, &str, Boot, bool, Step)> = vec![
        // Power cut during apt: what booted is half upgraded.
        (
            OsPhase::Upgrading,
            "b2",
            busy(B::Pending, id, 1),
            true,
            Step::RequestRollback(
                "the device restarted while the upgrade was being installed".into(),
            ),
        ),
        // The check-in asked for a rollback.
        (
            OsPhase::Probation,
            "b2",
            busy(B::RollbackRequested, id, 1),
            true,
            Step::Enter(
                OsPhase::RollingBack,
                "the check-in asked for a rollback".into(),
            ),
        ),
        // Requested in this boot: reboot into the bootguard's rollback.
        (
            OsPhase::RollingBack,
            "b1",
            busy(B::RollbackRequested, id, 1),
            true,
            Step::Reboot,
        ),
        // A request that never reached the boot partition is made again.
        (
            OsPhase::RollingBack,
            "b2",
            busy(B::Pending, id, 1),
            true,
            Step::RequestRollback("checking the preconditions".into()),
        ),
        // The bootguard rolled back (the boot limit, a requested rollback).
        (
            OsPhase::Probation,
            "b5",
            idle(id, limit),
            false,
            Step::Enter(OsPhase::RolledBack, limit.into()),
        ),
        (
            OsPhase::Rebooting,
            "b5",
            idle(id, limit),
            false,
            Step::Enter(OsPhase::RolledBack, limit.into()),
        ),
        (
            OsPhase::RollingBack,
            "b3",
            idle(id, "rolled back: requested by userspace: x"),
            false,
            Step::Enter(
                OsPhase::RolledBack,
                "rolled back: requested by userspace: x".into(),
            ),
        ),
        // Half armed: a reboot makes the bootguard reset it, then it is armed again.
        (
            OsPhase::Snapshotting,
            "b1",
            busy(B::Pending, id, 0),
            false,
            Step::Reboot,
        ),
        (
            OsPhase::Snapshotting,
            "b2",
            idle(id, "upgrade up.1 was pending without its snapshot"),
            false,
            Step::Arm,
        ),
        // Someone else's upgrade holds the device.
        (
            OsPhase::Snapshotting,
            "b1",
            busy(B::Pending, "manual", 0),
            true,
            Step::Enter(
                OsPhase::Refused,
                "another upgrade (manual) is pending on this device".into(),
            ),
        ),
        // The record outlived the boot partition's (reflashed card, a restored FAT).
        (
            OsPhase::Probation,
            "b3",
            idle("", ""),
            false,
            Step::Enter(
                OsPhase::RolledBack,
                "the boot partition no longer records this upgrade".into(),
            ),
        ),
        (
            OsPhase::Probation,
            "b2",
            Boot::Unreadable("x".into()),
            false,
            Step::Enter(
                OsPhase::RolledBack,
                "the upgrade state on the boot partition was unreadable: x".into(),
            ),
        ),
        (
            OsPhase::Probation,
            "b1",
            Boot::Unreadable("x".into()),
            false,
            Step::Wait,
        ),
    ];
    for (phase, boot_id, boot, snapshot, want) in cases {
        let r = record(phase, "b1");
        let got = decide(Some(&r), None, &seen(boot_id, boot.clone(), snapshot));
        assert_eq!(got, want, "{phase} in {boot_id} with {boot:?}");
    }
}

/// Every phase and every boot state the device can show leads to a step; and a device that
/// keeps being rebooted in probation (by hand) waits for its check-in, it is not failed.
#[test]
fn a_manual_reboot_in_probation_is_not_a_failure() {
    let r = record(OsPhase::Probation, "b2");
    for boots in 1..=3 {
        let s = seen(
            &format!("b{}", boots + 2),
            busy(B::Pending, "up.1", boots),
            true,
        );
        assert_eq!(decide(Some(&r), None, &s), Step::Wait);
    }
}

fn driver(runner: RecordingRunner, boot_dir: &Path) -> Driver<RecordingRunner> {
    Driver {
        runner,
        state_dir: boot_dir.join("state"),
        boot_dir: boot_dir.to_owned(),
        vg: "vg0".into(),
        release_file: boot_dir.join("release"),
        enabled: true,
        sources_file: boot_dir.join("fleet-release.list"),
    }
}

#[tokio::test]
async fn preconditions_are_refused_with_their_numbers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kernel8.img"), vec![0u8; 4096]).unwrap();
    let now = CLOCK_FLOOR_MS + 1;
    let quiet = seen("b1", idle("", ""), false);

    const LVS: &str = "  data\n  pool\n  root\n";
    let r = RecordingRunner::default();
    r.answer(0, LVS, "");
    r.answer(0, "  thin,pool\n", "");
    r.answer(0, "  85.20,10.00\n", "");
    let err = driver(r, dir.path())
        .precheck(&quiet, now)
        .await
        .unwrap_err();
    assert_eq!(
        err,
        "the thin pool vg0/pool is 85.2% full (data); an upgrade needs it below 80%"
    );

    let r = RecordingRunner::default();
    r.answer(0, LVS, "");
    r.answer(0, "  thin,pool\n", "");
    r.answer(0, "  12.00,71.50\n", "");
    let err = driver(r, dir.path())
        .precheck(&quiet, now)
        .await
        .unwrap_err();
    assert!(err.contains("metadata is 71.5% full"), "{err}");

    let r = RecordingRunner::default();
    r.answer(0, LVS, "");
    r.answer(0, "  linear,\n", "");
    let err = driver(r, dir.path())
        .precheck(&quiet, now)
        .await
        .unwrap_err();
    assert!(err.contains("not a thin one"), "{err}");

    let busy_boot = seen("b1", busy(B::Pending, "other", 1), true);
    let err = driver(RecordingRunner::default(), dir.path())
        .precheck(&busy_boot, now)
        .await
        .unwrap_err();
    assert_eq!(err, "an upgrade (other) is already pending");

    let r = RecordingRunner::default();
    r.answer(0, "  pool\n  root\n  root_preupgrade\n", "");
    let err = driver(r, dir.path())
        .precheck(&quiet, now)
        .await
        .unwrap_err();
    assert!(err.contains("root_preupgrade exists already"), "{err}");

    // No lvm on this machine: refused, saying so.
    let r = RecordingRunner::default();
    r.answer(127, "", "lvs: not found");
    let err = driver(r, dir.path())
        .precheck(&quiet, now)
        .await
        .unwrap_err();
    assert!(err.starts_with("cannot list the LVs of vg0"), "{err}");

    let r = RecordingRunner::default();
    r.answer(0, LVS, "");
    let err = driver(r, dir.path())
        .precheck(&quiet, 1_000)
        .await
        .unwrap_err();
    assert!(err.contains("not set"), "{err}");

    let mut off = driver(RecordingRunner::default(), dir.path());
    off.enabled = false;
    let err = off.precheck(&quiet, now).await.unwrap_err();
    assert!(err.contains("os_upgrades = false"), "{err}");
    assert!(off.runner.calls().is_empty(), "nothing was run");

    let r = RecordingRunner::default();
    r.answer(0, LVS, "");
    r.answer(0, "  thin,pool\n", "");
    r.answer(0, "  12.00,10.00\n", "");
    let d = driver(r, dir.path());
    assert_eq!(d.precheck(&quiet, now).await, Ok(()));
    assert_eq!(
        d.runner.calls(),
        [
            "lvs --noheadings -o lv_name vg0",
            "lvs --noheadings --nosuffix --separator , -o segtype,pool_lv vg0/root",
            "lvs --noheadings --nosuffix --separator , -o data_percent,metadata_percent vg0/pool"
        ]
    );
}

#[tokio::test]
async fn an_install_refuses_a_hostile_release_before_touching_apt() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(RecordingRunner::default(), dir.path());
    let mut release = desired(1).release;
    release.packages = [("curl".to_owned(), "1 -o APT::x=1".to_owned())].into();
    let err = d.install(&release, &mut |_| {}).await.unwrap_err();
    assert!(err.to_string().contains("package curl version"), "{err}");
    assert!(d.runner.calls().is_empty());
}

#[test]
fn hostile_check_in_commands_are_refused_on_the_device() {
    let check = |name: &str, words: &[&str]| CheckInCommand {
        name: name.into(),
        command: words.iter().map(|w| w.to_string()).collect(),
    };
    assert_eq!(
        check_in_commands(&[check("up", &["/usr/bin/true"])]),
        Ok(())
    );
    assert_eq!(
        check_in_commands(&[check("up", &["true"])]),
        Err("check-in command up word 0: the program must be an absolute path (no shell looks it up)".into())
    );
    assert_eq!(
        check_in_commands(&[check("up", &["/bin/echo", "a\u{1b}]2;x\u{7}"])]),
        Err("check-in command up word 1: must not contain '\\u{1b}'".into())
    );
    assert!(
        check_in_commands(&[check("a b", &["/bin/true"])])
            .unwrap_err()
            .starts_with("check-in command name \"a b\":")
    );
    let many: Vec<_> = (0..9)
        .map(|i| check(&format!("c{i}"), &["/bin/true"]))
        .collect();
    assert_eq!(
        check_in_commands(&many),
        Err("9 check-in commands, at most 8 run".into())
    );
}

#[test]
fn the_record_survives_a_round_trip_and_an_unreadable_one_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(RecordingRunner::default(), dir.path());
    assert_eq!(d.load(), None);
    let r = record(OsPhase::Probation, "b1");
    d.save(&r).unwrap();
    assert_eq!(d.load(), Some(r));
    std::fs::write(d.state_dir.join("os-upgrade.json"), "{").unwrap();
    assert_eq!(d.load(), None);
    assert!(d.state_dir.join("os-upgrade.json.corrupt").exists());
}

#[test]
fn config_txt_names_the_boot_files() {
    let config = "[all]\nkernel=vmlinuz-6.12\ninitramfs initrd.img-6.12 followkernel\n";
    assert_eq!(
        boot_files(config),
        (Some("vmlinuz-6.12".into()), Some("initrd.img-6.12".into()))
    );
    assert_eq!(parse_fill(" 1.5,2\n"), Ok((1.5, 2.0)));
    assert!(parse_fill("x").is_err());
}

/// A rollback the bootguard could not finish is said once and waited on, never rebooted
/// into again and again.
#[test]
fn an_unfinished_rollback_does_not_reboot_the_device_in_a_loop() {
    let r = record(OsPhase::RollingBack, "b1");
    let stuck = seen("b2", busy(B::RollbackRequested, "up.1", 2), true);
    let Step::Note(note) = decide(Some(&r), None, &stuck) else {
        panic!("not a note")
    };
    assert!(note.contains("did not finish the rollback"), "{note}");
    let mut noted = r.clone();
    noted.message = note;
    assert_eq!(decide(Some(&noted), None, &stuck), Step::Wait);
    let later = seen("b3", busy(B::RollingBack, "up.1", 2), true);
    assert!(matches!(
        decide(Some(&noted), None, &later),
        Step::Note(_) | Step::Wait
    ));
    assert_ne!(decide(Some(&noted), None, &later), Step::Reboot);
}

#[test]
fn messages_are_cut_to_what_a_report_may_carry() {
    let mut r = record(OsPhase::Upgrading, "b1");
    enter(&mut r, OsPhase::RollingBack, "é".repeat(5000), "b1", 1);
    assert!(r.message.len() <= MAX_MESSAGE_BYTES, "{}", r.message.len());
    assert!(r.message.ends_with("..."));
    assert_eq!(shorten("short", 10), "short");
}
