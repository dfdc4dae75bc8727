//! The device's own scenarios on the built image, under QEMU aarch64 (TCG): the watchdog
//! resets a hung kernel once systemd owns it. (The layout, the agent, a reboot with the network
//! cut and the bootguard's rollbacks, after failed boots, a hang and cuts, are proven on the
//! way through the OS upgrades, `os_upgrade.rs`.) One emulated Pi per test. A boot to SSH takes about a minute here, so the
//! timeouts are generous; every wait is for a state, never a fixed sleep.
#![allow(clippy::disallowed_methods)] // A test times what it watches: it reads the clock.

use anyhow::{Result, ensure};
use fleet_qemu_tests::{
    scenario::{GUEST, boot_to_ssh, device, system_running},
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
