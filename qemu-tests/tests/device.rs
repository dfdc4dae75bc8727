//! The device's own scenarios on the built image, under QEMU aarch64 (TCG): the watchdog and
//! the bootguard's rollback of an upgrade armed by hand. (The layout, the agent and a reboot
//! with the network cut are proven on the way through the OS upgrades, `os_upgrade.rs`.) One emulated
//! Pi per test, each booted a few times. A boot to SSH takes about a minute here, so the
//! timeouts are generous; every wait is for a state, never a fixed sleep.
#![allow(clippy::disallowed_methods)] // A test times what it watches: it reads the clock.

use anyhow::{Result, ensure};
use fleet_qemu_tests::{
    scenario::{BOOT, GUEST, boot_to_ssh, device, reboot, system_running},
    vm::{Exit, Network},
};

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
