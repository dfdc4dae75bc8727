//! OS upgrades driven by the fleet, on the built image under QEMU aarch64 (TCG), with real apt
//! from a local repository of real packages (`fleet_qemu_tests::apt`), real LVM snapshots and
//! merges, and the real bootguard, check-in and agent.
//!
//! One device and one disk across the scenario, which also proves the device's basics on the
//! way (so they cost no boots of their own): root on the thin LV and the data LV mounted, the
//! initramfs's LVM settings, the agent enrolling and running a workload, and at the end the
//! workload coming back from the agent's cache after a reboot with the network cut. A clean
//! upgrade is applied as an `OsUpgrade`
//! and commits; then a bad one (it boots, but its container runtime is broken, so the
//! workloads never become Ready) rolls back on its own at the check-in deadline, keeps what
//! the workloads wrote to the data LV meanwhile, and halts its campaign; a power cut in
//! probation still commits (the cut boot is counted, not failed); a power cut while apt
//! installs rolls back; an unbootable upgrade (its init exits) rolls back after
//! `bootAttempts` failed boots, finishing its merge after a power cut in it; a hung one is
//! reset by the watchdog and rolled back; a campaign's own check holds the commit through a
//! reboot by hand and a power cut in the commit; a nearly full thin pool is refused before
//! anything is touched. Each step prints its figures (boots, wall time per phase and stage,
//! the workload's downtime across the clean upgrade, watched from the host) for the notes;
//! none is asserted.
#![allow(clippy::disallowed_methods)] // A test times what it watches: it reads the clock.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleet_contracts::{
    resource::OsUpgradePhase,
    spec::OsRelease,
    state::{OsPhase, OsUpgradeReport},
};
use fleet_e2e::{TestFleet, eventually, http_deployment};
use fleet_qemu_tests::{
    apt::{AptRepo, Package},
    scenario::{
        BOOT, GUEST, agent_journal, boot_to_ssh, deploy, device, enrolled, import_example_image,
        initramfs_tolerates_what_a_crash_leaves, join_fleet, reaches_nats, reboot, system_running,
    },
    vm::{Exit, Network, Vm},
};

const DEVICE: &str = "pi-u1";
/// How long one upgrade may take here (a few boots under TCG).
const LONG: Duration = Duration::from_secs(20 * 60);
const MARKER: &str = "fleet-test-marker";
/// A containers.conf drop-in naming a runtime that does not exist: every container start
/// fails, so the workloads never become Ready after the upgrade's reboot.
const BROKEN_RUNTIME: &str = "/etc/containers/containers.conf.d/zz-fleet-test-broken.conf";

fn marker(version: &str) -> Package {
    Package::new(MARKER, version).file("/usr/share/fleet-test/marker", &format!("{version}\n"))
}

fn upgrade(name: &str, release: &OsRelease, deadline_secs: u32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "OsUpgrade",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"role": "pi"}},
            "release": release,
            "checkInDeadlineSeconds": deadline_secs,
            "bootAttempts": 3,
        }
    })
}

/// Keeps the device powered through the upgrade, booting it again whenever it reboots itself,
/// until its report on `upgrade` reaches `want`. Returns the report and the boots it took.
async fn follow(
    fleet: &TestFleet,
    vm: &mut Vm,
    upgrade: &str,
    want: OsPhase,
    timeout: Duration,
) -> Result<(OsUpgradeReport, usize)> {
    let client = fleet.operator.client();
    let start = Instant::now();
    let mut boots = 0;
    let mut said: Option<(OsPhase, String)> = None;
    loop {
        if !vm.running() {
            let exit = vm.wait_exit(Duration::from_secs(5))?;
            ensure!(
                exit == Exit::Reboot,
                "a boot ended with {exit:?} during the upgrade"
            );
            boots += 1;
            vm.boot(Network::Connected)?;
        }
        let report = client
            .device(DEVICE)
            .ok()
            .and_then(|d| d.status?.os?.upgrade)
            .filter(|u| u.upgrade == upgrade);
        if let Some(u) = report {
            // Every phase and stage, timed: the figures of snapshot, apt and reboot.
            let now = (u.phase, u.message.clone());
            if said.as_ref() != Some(&now) {
                eprintln!(
                    "{:>6.1?}: {upgrade} {} ({})",
                    start.elapsed(),
                    u.phase,
                    u.message
                );
                said = Some(now);
            }
            if u.phase == want {
                return Ok((u, boots));
            }
            if u.phase.is_final() {
                bail!("{upgrade} ended {} ({}), not {want}", u.phase, u.message);
            }
        }
        if start.elapsed() > timeout {
            let journal = if vm.running() {
                agent_journal(vm)
            } else {
                String::new()
            };
            bail!("{upgrade} did not reach {want} within {timeout:?}; last {said:?}\n{journal}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Waits until `http://127.0.0.1:8080/` inside the guest says `greeting`.
async fn serves(vm: &Vm, greeting: &str) -> Result<()> {
    eventually(
        &format!("the guest's workload to say {greeting:?}"),
        GUEST,
        || async {
            let (code, body) = vm.ssh_status("curl -sf --max-time 5 http://127.0.0.1:8080/")?;
            if code == 0 && body.trim() == greeting {
                Ok(Some(()))
            } else {
                bail!("curl exit {code}: {}", body.trim())
            }
        },
    )
    .await
}

/// The bootguard's state file, read from the stopped device's boot partition.
fn boot_state(vm: &Vm) -> Result<String> {
    Ok(String::from_utf8_lossy(&vm.read_boot_file("rollback/state")?).into_owned())
}

/// The workload watched from the host through the forwarded port, every 100 ms, until
/// [`Downtime::end`]: the longest stretch it did not answer with its greeting.
struct Downtime {
    stop: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<Duration>>,
}

impl Downtime {
    fn watch(port: u16, greeting: &'static str) -> Downtime {
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let (mut longest, mut down_since) = (Duration::ZERO, None::<Instant>);
                while !stop.load(Ordering::Relaxed) {
                    if answers(port, greeting) {
                        if let Some(since) = down_since.take() {
                            longest = longest.max(since.elapsed());
                        }
                    } else if down_since.is_none() {
                        down_since = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                longest.max(down_since.map_or(Duration::ZERO, |s| s.elapsed()))
            }
        });
        Downtime {
            stop,
            watcher: Some(watcher),
        }
    }

    fn end(mut self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        let watcher = self.watcher.take().expect("ended once");
        watcher.join().expect("the downtime watcher")
    }
}

impl Drop for Downtime {
    /// A test that fails before [`Downtime::end`] stops the watcher too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One plain HTTP GET of `/` on the host's `port`: whether the body holds `greeting`.
fn answers(port: u16, greeting: &str) -> bool {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut conn) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut body = String::new();
    conn.write_all(b"GET / HTTP/1.0\r\nHost: pi\r\n\r\n")
        .is_ok()
        && conn.read_to_string(&mut body).is_ok()
        && body.contains(greeting)
}

fn guest(vm: &Vm, command: &str) -> Result<String> {
    Ok(vm.ssh(command)?.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_upgrades_its_os_through_the_fleet_and_undoes_every_bad_upgrade_on_its_own()
-> Result<()> {
    let fleet = TestFleet::start().await?;
    let (dir, mut vm) = device("os-upgrade")?;
    let port = join_fleet(&vm, &fleet, DEVICE, &[("role", "pi")])?;
    let repo = AptRepo::start(
        &dir.0.join("apt"),
        &[
            marker("2"),
            marker("3").file(
                BROKEN_RUNTIME,
                "[engine]\nruntime = \"fleet-test-missing\"\n",
            ),
            marker("4"),
            marker("5"),
            // Its init exits: the kernel panics (and reboots) in every boot of it.
            Package {
                postinst: Some(
                    "#!/bin/sh\nset -e\n[ \"$1\" = configure ] || exit 0\n\
                     ln -sf /bin/false /usr/sbin/init\n\
                     echo '# fleet-test-6 was here' >> /boot/firmware/config.txt\n"
                        .into(),
                ),
                ..marker("6")
            },
            // Its init never starts systemd: the boot hangs.
            Package {
                postinst: Some(
                    "#!/bin/sh\nset -e\n[ \"$1\" = configure ] || exit 0\n\
                     printf '#!/bin/sh\\nexec sleep infinity\\n' > /usr/sbin/fleet-test-hang\n\
                     chmod 755 /usr/sbin/fleet-test-hang\n\
                     ln -sf fleet-test-hang /usr/sbin/init\n"
                        .into(),
                ),
                ..marker("7")
            },
            marker("8"),
        ],
    )?;
    let powered_on = Instant::now();
    boot_to_ssh(&mut vm, Network::Connected)?;
    // The layout: root on the thin LV, the data LV under /var/lib/fleet and, bound from it,
    // /var/lib/containers.
    let root = guest(&vm, "findmnt -no SOURCE /")?;
    ensure!(root == "/dev/mapper/vg0-root", "root is {root:?}");
    let lvs = vm.ssh("lvs --noheadings -o lv_name,segtype,pool_lv vg0")?;
    ensure!(
        lvs.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["root", "thin", "pool"]),
        "root is not a thin LV of the pool: {lvs}"
    );
    let data = guest(&vm, "findmnt -no SOURCE /var/lib/fleet")?;
    ensure!(
        data == "/dev/mapper/vg0-data",
        "/var/lib/fleet is on {data:?}"
    );
    let containers = guest(&vm, "findmnt -no SOURCE /var/lib/containers")?;
    ensure!(
        containers.starts_with("/dev/mapper/vg0-data"),
        "/var/lib/containers is on {containers:?}"
    );
    system_running(&vm)?;
    initramfs_tolerates_what_a_crash_leaves(&vm)?;
    enrolled(&fleet, &vm, DEVICE).await?;
    eprintln!(
        "power-on to agent enrolled and reporting: {:?} (first boot, TCG)",
        powered_on.elapsed()
    );

    // The device reports the release the image was built as (written beside the image).
    let image_release: OsRelease = serde_json::from_slice(
        &std::fs::read(fleet_qemu_tests::image().with_extension("release.json"))
            .context("the image's release.json")?,
    )?;
    ensure!(
        image_release.packages.contains_key("lvm2"),
        "the image's release lists no lvm2"
    );
    // As written, it is an OsUpgrade's release that the operator accepts.
    if let Err(errors) =
        fleet_contracts::resource::Resource::from_user(upgrade("image", &image_release, 600))
    {
        bail!("the image's release.json is refused: {errors:?}");
    }
    let client = fleet.operator.client();
    eventually("the device to report its release", GUEST, || async {
        let os = client.device(DEVICE)?.status.and_then(|s| s.os);
        match os {
            Some(os) if os.release == image_release.name => Ok(Some(())),
            other => bail!("{other:?}"),
        }
    })
    .await?;
    import_example_image(&vm)?;
    deploy(
        &fleet,
        &vm,
        &http_deployment("hello", "pi", 8080, "hello from a pi"),
    )
    .await?;
    serves(&vm, "hello from a pi").await?;
    ensure!(
        reaches_nats(&vm, &port)?,
        "the guest cannot reach the host's NATS with its network up"
    );

    // A clean upgrade: apt from the local repository, a reboot, the check-in, the commit.
    let good = OsRelease {
        name: "fleet-test-2".into(),
        sources: vec![repo.source()],
        packages: [(MARKER.to_owned(), "2".to_owned())].into(),
        full_upgrade: false,
    };
    ensure!(
        answers(vm.http_port, "hello from a pi"),
        "the workload does not answer through the forwarded port"
    );
    let downtime = Downtime::watch(vm.http_port, "hello from a pi");
    let t = Instant::now();
    fleet.operator.apply(&upgrade("spring", &good, 300))?;
    let (done, boots) = follow(
        &fleet,
        &mut vm,
        "spring",
        OsPhase::Committed,
        Duration::from_secs(20 * 60),
    )
    .await?;
    vm.wait_ssh(GUEST)?;
    serves(&vm, "hello from a pi").await?;
    eprintln!(
        "clean upgrade: committed after {boots} boot(s), {:?} from apply ({}); the workload \
         did not answer for {:?} at most",
        t.elapsed(),
        done.message,
        downtime.end()
    );
    ensure!(guest(&vm, "cat /etc/fleet/release")? == "fleet-test-2");
    ensure!(guest(&vm, "cat /usr/share/fleet-test/marker")? == "2");
    let lvs = guest(&vm, "lvs --noheadings -o lv_name vg0")?;
    ensure!(
        !lvs.contains("root_preupgrade"),
        "the snapshot is left: {lvs}"
    );
    ensure!(
        guest(&vm, "fleet-bootguard status")?.contains("phase=idle"),
        "the boot partition is not idle"
    );
    serves(&vm, "hello from a pi").await?;
    let campaign = client.os_upgrade("spring")?.status.unwrap_or_default();
    ensure!(
        campaign.phase == OsUpgradePhase::Complete && campaign.committed_devices == 1,
        "{campaign:?}"
    );
    let release = client
        .device(DEVICE)?
        .status
        .and_then(|s| s.os)
        .map(|o| o.release);
    ensure!(release.as_deref() == Some("fleet-test-2"), "{release:?}");

    // A bad upgrade: it boots, but its container runtime is broken, so the workload never
    // becomes Ready and the check-in fails at its deadline. What the workloads' data LV gets
    // meanwhile stays; what root gets goes with the rollback.
    let bad = OsRelease {
        name: "fleet-test-3".into(),
        packages: [(MARKER.to_owned(), "3".to_owned())].into(),
        ..good.clone()
    };
    let t = Instant::now();
    fleet.operator.apply(&upgrade("summer", &bad, 100))?;
    follow(
        &fleet,
        &mut vm,
        "summer",
        OsPhase::Probation,
        Duration::from_secs(20 * 60),
    )
    .await?;
    vm.wait_ssh(GUEST)?;
    ensure!(
        guest(&vm, &format!("test -e {BROKEN_RUNTIME} && echo broken"))? == "broken",
        "the bad upgrade is not what booted"
    );
    vm.ssh("echo kept > /var/lib/fleet/written-in-probation && echo gone > /root/written-in-probation && sync")?;
    let (rolled, boots) = follow(
        &fleet,
        &mut vm,
        "summer",
        OsPhase::RolledBack,
        Duration::from_secs(20 * 60),
    )
    .await?;
    eprintln!(
        "bad upgrade: rolled back after {boots} boot(s), {:?} from apply ({})",
        t.elapsed(),
        rolled.message
    );
    ensure!(
        rolled.message.contains("no check-in within 100s") && rolled.message.contains("Ready"),
        "the reason does not say which check failed: {}",
        rolled.message
    );
    vm.wait_ssh(GUEST)?;
    ensure!(guest(&vm, "cat /etc/fleet/release")? == "fleet-test-2");
    ensure!(guest(&vm, "cat /usr/share/fleet-test/marker")? == "2");
    ensure!(
        guest(&vm, &format!("test -e {BROKEN_RUNTIME} || echo absent"))? == "absent",
        "the bad upgrade's file survived the rollback"
    );
    ensure!(guest(&vm, "cat /var/lib/fleet/written-in-probation")? == "kept");
    ensure!(
        guest(&vm, "test -e /root/written-in-probation || echo absent")? == "absent",
        "root kept what the bad upgrade wrote"
    );
    serves(&vm, "hello from a pi").await?;
    let campaign = client.os_upgrade("summer")?.status.unwrap_or_default();
    ensure!(
        campaign.phase == OsUpgradePhase::Halted && campaign.failed_devices == 1,
        "{campaign:?}"
    );
    let described = fleet_qemu_tests::scenario::fleetctl_describe_device(&fleet, DEVICE)?;
    ensure!(
        described.contains("Release:     fleet-test-2") && described.contains("RolledBack"),
        "{described}"
    );

    // Power cut in the upgraded system's first boot, once the bootguard counted it: the
    // device comes back, that boot is counted, not failed, and the next boot's check-in
    // commits. (Cut in the initramfs, the one moment of probation a test can hit every time;
    // a cut later in probation takes the same path.)
    let cut_in_probation = OsRelease {
        name: "fleet-test-4".into(),
        packages: [(MARKER.to_owned(), "4".to_owned())].into(),
        ..good.clone()
    };
    let t = Instant::now();
    fleet
        .operator
        .apply(&upgrade("t3-cut-in-probation", &cut_in_probation, 300))?;
    let exit = vm.wait_exit(LONG)?;
    ensure!(
        exit == Exit::Reboot,
        "the upgrade's reboot ended with {exit:?}"
    );
    vm.boot(Network::Connected)?;
    vm.wait_console("state pending (boot 1 of 3)", BOOT)?;
    vm.power_cut();
    vm.boot(Network::Connected)?;
    let (done, _) = follow(
        &fleet,
        &mut vm,
        "t3-cut-in-probation",
        OsPhase::Committed,
        LONG,
    )
    .await?;
    eprintln!(
        "power cut in probation: committed {:?} from apply ({})",
        t.elapsed(),
        done.message
    );
    ensure!(
        done.message.ends_with("after 2 boots"),
        "the bootguard did not count the cut boot: {}",
        done.message
    );
    vm.wait_ssh(GUEST)?;
    ensure!(guest(&vm, "cat /usr/share/fleet-test/marker")? == "4");

    // Power cut while apt installs (or before the reboot): what boots is half upgraded; the
    // driver sees the restart and asks for the rollback, the bootguard merges.
    let cut_in_apt = OsRelease {
        name: "fleet-test-5".into(),
        packages: [(MARKER.to_owned(), "5".to_owned())].into(),
        ..good.clone()
    };
    let t = Instant::now();
    fleet
        .operator
        .apply(&upgrade("t4-cut-in-apt", &cut_in_apt, 300))?;
    follow(&fleet, &mut vm, "t4-cut-in-apt", OsPhase::Upgrading, LONG).await?;
    vm.power_cut();
    vm.boot(Network::Connected)?;
    let (rolled, boots) =
        follow(&fleet, &mut vm, "t4-cut-in-apt", OsPhase::RolledBack, LONG).await?;
    eprintln!(
        "power cut in apt: rolled back after {} boot(s), {:?} from apply ({})",
        boots + 1,
        t.elapsed(),
        rolled.message
    );
    ensure!(
        rolled
            .message
            .contains("restarted while the upgrade was being installed"),
        "{}",
        rolled.message
    );
    vm.wait_ssh(GUEST)?;
    ensure!(guest(&vm, "cat /etc/fleet/release")? == "fleet-test-4");
    ensure!(guest(&vm, "cat /usr/share/fleet-test/marker")? == "4");
    serves(&vm, "hello from a pi").await?;

    // A hard fail: the upgraded root is unbootable (its init exits, the kernel panics and
    // reboots), so no boot ever reaches the check-in; after `bootAttempts` (2) boots the
    // bootguard rolls back. The rollback's merge is cut by a power cut; the next boot finishes
    // it. The package also changes config.txt, which the rollback restores.
    let config_before = guest(&vm, "cat /boot/firmware/config.txt")?;
    let unbootable = OsRelease {
        name: "fleet-test-6".into(),
        packages: [(MARKER.to_owned(), "6".to_owned())].into(),
        ..good.clone()
    };
    let t = Instant::now();
    let mut campaign = upgrade("t5-unbootable", &unbootable, 300);
    campaign["spec"]["bootAttempts"] = serde_json::json!(2);
    fleet.operator.apply(&campaign)?;
    let exit = vm.wait_exit(LONG)?;
    ensure!(
        exit == Exit::Reboot,
        "the upgrade's reboot ended with {exit:?}"
    );
    for attempt in 1..=2 {
        vm.boot(Network::Connected)?;
        vm.wait_console(&format!("state pending (boot {attempt} of 2)"), BOOT)?;
        let exit = vm.wait_exit(BOOT)?;
        ensure!(
            matches!(exit, Exit::Reboot | Exit::WatchdogReset),
            "unbootable boot {attempt} ended with {exit:?}"
        );
    }
    vm.boot(Network::Connected)?;
    vm.wait_console("merging snapshot root_preupgrade into root", BOOT)?;
    vm.power_cut();
    let left = boot_state(&vm)?;
    eprintln!("power cut in the rollback's merge left: {left}");
    ensure!(
        left.contains("phase=rolling-back"),
        "the cut did not land in the rollback: {left}"
    );
    vm.boot(Network::Connected)?;
    let (rolled, boots) =
        follow(&fleet, &mut vm, "t5-unbootable", OsPhase::RolledBack, LONG).await?;
    eprintln!(
        "unbootable upgrade (hard fail) with a cut in its merge: rolled back after {} boot(s), \
         {:?} from apply ({})",
        boots + 4,
        t.elapsed(),
        rolled.message
    );
    ensure!(
        rolled
            .message
            .contains("2 boots without a successful check-in (limit 2)"),
        "{}",
        rolled.message
    );
    vm.wait_ssh(GUEST)?;
    ensure!(guest(&vm, "cat /usr/share/fleet-test/marker")? == "4");
    ensure!(guest(&vm, "readlink /usr/sbin/init")? != "/bin/false");
    ensure!(
        guest(&vm, "cat /boot/firmware/config.txt")? == config_before,
        "config.txt was not restored"
    );
    let lvs = guest(&vm, "lvs --noheadings -o lv_name vg0")?;
    ensure!(
        !lvs.contains("root_preupgrade"),
        "the snapshot is left after the rollback: {lvs}"
    );
    ensure!(guest(&vm, "fleet-bootguard status")?.contains("phase=idle"));
    serves(&vm, "hello from a pi").await?;

    // A hang in the upgraded boot: its init never starts systemd, so nothing takes the
    // watchdog over from the bootguard and the board is reset. With `bootAttempts: 1` the
    // reset boot is the one that rolls back.
    let hangs = OsRelease {
        name: "fleet-test-7".into(),
        packages: [(MARKER.to_owned(), "7".to_owned())].into(),
        ..good.clone()
    };
    let t = Instant::now();
    let mut campaign = upgrade("t6-hangs", &hangs, 300);
    campaign["spec"]["bootAttempts"] = serde_json::json!(1);
    fleet.operator.apply(&campaign)?;
    let exit = vm.wait_exit(LONG)?;
    ensure!(
        exit == Exit::Reboot,
        "the upgrade's reboot ended with {exit:?}"
    );
    vm.boot(Network::Connected)?;
    vm.wait_console("state pending (boot 1 of 1)", BOOT)?;
    let exit = vm.wait_exit(BOOT)?;
    ensure!(
        exit == Exit::WatchdogReset,
        "the hung boot ended with {exit:?}, not a watchdog reset"
    );
    vm.boot(Network::Connected)?;
    let (rolled, boots) = follow(&fleet, &mut vm, "t6-hangs", OsPhase::RolledBack, LONG).await?;
    eprintln!(
        "hung upgrade: reset by the watchdog, rolled back after {} boot(s), {:?} from apply ({})",
        boots + 3,
        t.elapsed(),
        rolled.message
    );
    ensure!(
        rolled
            .message
            .contains("1 boots without a successful check-in (limit 1)"),
        "{}",
        rolled.message
    );
    vm.wait_ssh(GUEST)?;
    ensure!(guest(&vm, "cat /usr/share/fleet-test/marker")? == "4");
    serves(&vm, "hello from a pi").await?;

    // The campaign's own check holds the commit; meanwhile the device is rebooted by hand
    // (counted, not failed); then the check passes and the commit is cut by a power cut once
    // it began. The next boot finishes it.
    let held = OsRelease {
        name: "fleet-test-8".into(),
        packages: [(MARKER.to_owned(), "8".to_owned())].into(),
        ..good.clone()
    };
    let t = Instant::now();
    let mut campaign = upgrade("t7-held", &held, 900);
    campaign["spec"]["checks"] = serde_json::json!([
        {"name": "go-ahead", "command": ["/usr/bin/test", "-e", "/var/lib/fleet/go-ahead"]}
    ]);
    fleet.operator.apply(&campaign)?;
    follow(&fleet, &mut vm, "t7-held", OsPhase::Probation, LONG).await?;
    vm.wait_ssh(GUEST)?;
    eventually(
        "the check-in to wait for the campaign's check",
        GUEST,
        || async {
            let log = vm.ssh("journalctl -b -u fleet-checkin --no-pager -o cat")?;
            if log.contains("checks failing: go-ahead (exit 1)") {
                Ok(Some(()))
            } else {
                bail!("{log}")
            }
        },
    )
    .await?;
    let _ = vm.ssh_status("systemctl reboot");
    let exit = vm.wait_exit(GUEST)?;
    ensure!(
        exit == Exit::Reboot,
        "the reboot by hand ended with {exit:?}"
    );
    vm.boot(Network::Connected)?;
    vm.wait_console("state pending (boot 2 of 3)", BOOT)?;
    vm.wait_ssh(GUEST)?;
    // The go-ahead and the watch in one command: it returns once the bootguard has written
    // `committing` (and fails after 5 min if it never does).
    vm.ssh(
        "touch /var/lib/fleet/go-ahead && timeout 300 sh -c \
         'until grep -q ^phase=committing /boot/firmware/rollback/state; do sleep 0.05; done'",
    )?;
    vm.power_cut();
    let left = boot_state(&vm)?;
    eprintln!("power cut in the commit left: {left}");
    ensure!(
        left.contains("phase=committing"),
        "the cut did not land in the commit: {left}"
    );
    vm.boot(Network::Connected)?;
    let (done, _) = follow(&fleet, &mut vm, "t7-held", OsPhase::Committed, LONG).await?;
    eprintln!(
        "held by its check, rebooted by hand, commit cut: committed {:?} from apply ({})",
        t.elapsed(),
        done.message
    );
    ensure!(
        done.message.ends_with("after 2 boots"),
        "the reboot by hand was not counted as one boot: {}",
        done.message
    );
    vm.wait_ssh(GUEST)?;
    ensure!(guest(&vm, "cat /usr/share/fleet-test/marker")? == "8");
    ensure!(guest(&vm, "fleet-bootguard status")?.contains("phase=idle"));
    let lvs = guest(&vm, "lvs --noheadings -o lv_name vg0")?;
    ensure!(
        !lvs.contains("root_preupgrade"),
        "the snapshot is left: {lvs}"
    );
    serves(&vm, "hello from a pi").await?;

    // A thin pool nearly full: refused with its numbers, before anything is touched.
    vm.ssh(
        "set -e; p=$(lvs --noheadings -o data_percent vg0/pool | tr -d ' '); \
         size=$(lvs --noheadings --units m --nosuffix -o lv_size vg0/pool | tr -d ' '); \
         need=$(awk -v p=$p -v s=$size 'BEGIN { n = (0.85 - p / 100) * s; print (n > 0 ? int(n) : 0) }'); \
         dd if=/dev/urandom of=/var/tmp/fill bs=1M count=$need status=none; sync",
    )?;
    let fill = guest(&vm, "lvs --noheadings -o data_percent vg0/pool")?;
    let full_pool = OsRelease {
        name: "fleet-test-9".into(),
        packages: [(MARKER.to_owned(), "2".to_owned())].into(),
        ..good.clone()
    };
    let state_before = guest(&vm, "fleet-bootguard status")?;
    fleet
        .operator
        .apply(&upgrade("t8-full-pool", &full_pool, 300))?;
    let (refused, _) = follow(&fleet, &mut vm, "t8-full-pool", OsPhase::Refused, LONG).await?;
    ensure!(
        refused
            .message
            .contains("% full (data); an upgrade needs it below 80%"),
        "{} (pool at {fill}%)",
        refused.message
    );
    ensure!(
        guest(&vm, "fleet-bootguard status")? == state_before,
        "the boot partition changed"
    );
    let lvs = guest(&vm, "lvs --noheadings -o lv_name vg0")?;
    ensure!(
        !lvs.contains("root_preupgrade"),
        "a snapshot was taken: {lvs}"
    );
    ensure!(guest(&vm, "cat /etc/fleet/release")? == "fleet-test-8");

    eprintln!(
        "apt repository: {} files served",
        repo.served.load(std::sync::atomic::Ordering::Relaxed)
    );

    // After a reboot with the network cut, the workload comes back from the agent's cache on
    // the data LV. (Coming back after a reboot with the network up, every step above and the
    // crash tests show.)
    reboot(&mut vm)?;
    boot_to_ssh(&mut vm, Network::Cut)?;
    serves(&vm, "hello from a pi").await?;
    ensure!(
        !reaches_nats(&vm, &port)?,
        "the guest reached the host's NATS although its network was cut"
    );
    vm.power_cut();
    dir.passed();
    Ok(())
}
