//! The device's own scenarios on the built image, under QEMU aarch64 (TCG): the layout and the
//! agent across reboots and a cut network, the watchdog, the bootguard's rollback. One emulated
//! Pi per test, each booted a few times. A boot to SSH takes about a minute here, so the
//! timeouts are generous; every wait is for a state, never a fixed sleep.
#![allow(clippy::disallowed_methods)] // A test times what it watches: it reads the clock.

use anyhow::{Result, bail, ensure};
use fleet_e2e::{TestFleet, eventually, http_deployment};
use fleet_qemu_tests::{
    scenario::{
        BOOT, GUEST, boot_to_ssh, deploy, device, enrolled, import_example_image, join_fleet,
        reboot, system_running,
    },
    vm::{Exit, Network, Vm},
};

/// Whether the guest can open a TCP connection to the host's NATS (10.0.2.2:`port`).
fn reaches_nats(vm: &Vm, port: &str) -> Result<bool> {
    let (code, _) = vm.ssh_status(&format!(
        "timeout 5 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}'"
    ))?;
    Ok(code == 0)
}

/// The initramfs the device boots (the one `config.txt` names) carries LVM settings that let
/// a thin pool with leaked blocks activate, and the tools of the pool's self-repair and the
/// boot partition's check. Read by the image's own `lvmconfig` from the unpacked initramfs.
fn initramfs_tolerates_what_a_crash_leaves(vm: &Vm) -> Result<()> {
    let said = vm.ssh(
        r#"set -e
i=/boot/firmware/$(awk '$1 == "initramfs" {print $2; exit}' /boot/firmware/config.txt)
d=$(mktemp -d); unmkinitramfs "$i" $d
root=$d/main; [ -d $root/etc ] || root=$d
for f in usr/sbin/fleet-bootguard usr/sbin/thin_check usr/sbin/thin_repair usr/sbin/fsck.fat; do
  [ -e $root/$f ] || echo "missing $f"
done
LVM_SYSTEM_DIR=$root/etc/lvm lvmconfig global/thin_check_options
rm -rf $d"#,
    )?;
    ensure!(
        !said.contains("missing"),
        "the initramfs lacks tools: {said}"
    );
    ensure!(
        said.contains(
            r#"thin_check_options=["-q","--clear-needs-check-flag","--ignore-non-fatal-errors"]"#
        ),
        "the initramfs's LVM treats a leaked block as fatal: {said}"
    );
    Ok(())
}

/// Waits until `http://127.0.0.1:port/` inside the guest says `greeting`.
async fn guest_http_says(vm: &Vm, port: u16, greeting: &str) -> Result<()> {
    eventually(
        &format!("the guest's port {port} to say {greeting:?}"),
        GUEST,
        || async {
            let (code, body) =
                vm.ssh_status(&format!("curl -sf --max-time 5 http://127.0.0.1:{port}/"))?;
            if code == 0 && body.trim() == greeting {
                Ok(Some(()))
            } else {
                bail!("curl exit {code}: {}", body.trim())
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_boots_on_lvm_and_its_agent_runs_a_workload_across_reboots_and_without_network()
-> Result<()> {
    let fleet = TestFleet::start().await?;
    let (dir, mut vm) = device("agent")?;
    // The first-boot settings on the card's FAT, as a user writes them after flashing.
    let port = join_fleet(&vm, &fleet, "pi-q1", &[("role", "pi")])?;

    let powered_on = std::time::Instant::now();
    boot_to_ssh(&mut vm, Network::Connected)?;
    // The layout: root on the thin LV, the data LV under /var/lib/fleet and, bound from it,
    // /var/lib/containers.
    let root = vm.ssh("findmnt -no SOURCE /")?;
    ensure!(root.trim() == "/dev/mapper/vg0-root", "root is {root:?}");
    let lvs = vm.ssh("lvs --noheadings -o lv_name,segtype,pool_lv vg0")?;
    ensure!(
        lvs.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["root", "thin", "pool"]),
        "root is not a thin LV of the pool: {lvs}"
    );
    let data = vm.ssh("findmnt -no SOURCE /var/lib/fleet")?;
    ensure!(
        data.trim() == "/dev/mapper/vg0-data",
        "/var/lib/fleet is on {data:?}"
    );
    let containers = vm.ssh("findmnt -no SOURCE /var/lib/containers")?;
    ensure!(
        containers.trim().starts_with("/dev/mapper/vg0-data"),
        "/var/lib/containers is on {containers:?}"
    );
    system_running(&vm)?;
    initramfs_tolerates_what_a_crash_leaves(&vm)?;

    // The agent enrolled and reports in.
    enrolled(&fleet, &vm, "pi-q1").await?;
    eprintln!(
        "power-on to agent enrolled and reporting: {:?} (first boot, TCG)",
        powered_on.elapsed()
    );
    import_example_image(&vm)?;
    deploy(
        &fleet,
        &vm,
        &http_deployment("hello", "pi", 8080, "hello from a pi"),
    )
    .await?;
    guest_http_says(&vm, 8080, "hello from a pi").await?;

    ensure!(
        reaches_nats(&vm, &port)?,
        "the guest cannot reach the host's NATS with its network up"
    );

    // After a reboot with the network cut, the workload comes back from the agent's cache on
    // the data LV. (Coming back after a reboot with the network up, the crash tests show after
    // every kind of crash.)
    reboot(&mut vm)?;
    boot_to_ssh(&mut vm, Network::Cut)?;
    guest_http_says(&vm, 8080, "hello from a pi").await?;
    ensure!(
        !reaches_nats(&vm, &port)?,
        "the guest reached the host's NATS although its network was cut"
    );
    vm.power_cut();
    dir.passed();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hung_device_is_reset_by_the_hardware_watchdog() -> Result<()> {
    let (dir, mut vm) = device("watchdog")?;
    boot_to_ssh(&mut vm, Network::Connected)?;
    // The bootguard armed it in the initramfs; systemd pets it now.
    let console = vm.console();
    ensure!(
        console.contains("fleet-bootguard: watchdog /dev/watchdog0 armed"),
        "the initramfs did not arm the watchdog"
    );
    let state =
        vm.ssh("cat /sys/class/watchdog/watchdog0/state /sys/class/watchdog/watchdog0/identity")?;
    ensure!(state.contains("active"), "watchdog0: {state}");
    // A kernel that hangs instead of rebooting: no panic reboot, nothing pets the watchdog.
    let _ = vm.ssh_status("sysctl -w kernel.panic=0 && echo c > /proc/sysrq-trigger");
    let exit = vm.wait_exit(GUEST)?;
    ensure!(
        exit == Exit::WatchdogReset,
        "expected a watchdog reset, got {exit:?}"
    );
    // The board comes back up to a running system. (Its bootstatus cannot tell: with
    // `-action reboot=shutdown` every boot is a fresh QEMU, so the harness's QMP event is the
    // proof of the reset.)
    boot_to_ssh(&mut vm, Network::Connected)?;
    system_running(&vm)?;
    // The reset left the boot partition marked not cleanly unmounted; the initramfs checked it
    // with fsck.fat before the bootguard wrote to it, and recorded that.
    let checks = vm.ssh("cat /boot/firmware/rollback/checks")?;
    ensure!(
        checks.contains("fat_repairs=1") && checks.contains("fsck.fat fixed the boot partition"),
        "the boot partition's check is not recorded: {checks}"
    );
    vm.power_cut();
    dir.passed();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bootguard_merges_the_snapshot_after_too_many_failed_boots() -> Result<()> {
    let (dir, mut vm) = device("bootguard")?;
    boot_to_ssh(&mut vm, Network::Connected)?;
    let config_before = vm.ssh("cat /boot/firmware/config.txt")?;
    // An "upgrade": armed (known-good boot files saved, pending, snapshot of root), then a
    // new config.txt and a root that cannot boot: no init, and no shell for the initramfs to
    // fall back to.
    vm.ssh("fleet-bootguard arm --upgrade-id qemu-1")?;
    let lvs = vm.ssh("lvs --noheadings -o lv_name vg0")?;
    ensure!(lvs.contains("root_preupgrade"), "no snapshot: {lvs}");
    vm.ssh(
        "echo '# upgraded' >> /boot/firmware/config.txt && \
         echo marker > /etc/fleet-upgraded && \
         ln -sf /nonexistent /usr/sbin/init && ln -sf /nonexistent /usr/bin/sh && sync",
    )?;
    reboot(&mut vm)?;
    // Boots 1 to 3 of the upgrade fail (the initramfs finds no init and panics, panic=10
    // reboots; a hang would be ended by the watchdog the bootguard armed); the fourth rolls
    // back and reboots; the fifth is the old system.
    for attempt in 1..=3 {
        vm.boot(Network::Connected)?;
        vm.wait_console(&format!("state pending (boot {attempt} of 3)"), BOOT)?;
        let exit = vm.wait_exit(BOOT)?;
        ensure!(
            matches!(exit, Exit::Reboot | Exit::WatchdogReset),
            "failed boot {attempt} ended with {exit:?}"
        );
        eprintln!("failed boot {attempt}: {exit:?}");
    }
    vm.boot(Network::Connected)?;
    vm.wait_console("merging snapshot root_preupgrade into root", BOOT)?;
    let exit = vm.wait_exit(BOOT)?;
    ensure!(
        exit == Exit::Reboot,
        "the rollback boot ended with {exit:?}"
    );
    boot_to_ssh(&mut vm, Network::Connected)?;
    let status = vm.ssh("fleet-bootguard status")?;
    ensure!(status.contains("phase=idle"), "{status}");
    ensure!(
        status.contains("3 boots without a successful check-in"),
        "the reason is not recorded: {status}"
    );
    ensure!(
        vm.ssh_status("test -e /etc/fleet-upgraded")?.0 != 0,
        "the upgraded root is still there"
    );
    let lvs = vm.ssh("lvs --noheadings -o lv_name vg0")?;
    ensure!(
        !lvs.contains("root_preupgrade"),
        "the snapshot is still there: {lvs}"
    );
    let config_after = vm.ssh("cat /boot/firmware/config.txt")?;
    ensure!(
        config_after == config_before,
        "config.txt was not restored: {config_after}"
    );
    let events = vm.ssh("cat /boot/firmware/rollback/events")?;
    eprintln!("rollback/events:\n{events}");
    vm.power_cut();
    dir.passed();
    Ok(())
}
