//! The device scenarios of issue 3 on the built image, under QEMU aarch64 (TCG): one emulated
//! Pi per test, each booted a few times. A boot to SSH takes about a minute here, so the
//! timeouts are generous; every wait is for a state, never a fixed sleep.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use fleet_contracts::{resource::RolloutPhase, state::Health};
use fleet_e2e::{Fleet, eventually, http_deployment};
use fleet_qemu_tests::vm::{Exit, Network, Vm};

/// A boot's time limit, and the limit to see something happen in the guest.
const BOOT: Duration = Duration::from_secs(8 * 60);
const GUEST: Duration = Duration::from_secs(5 * 60);

/// A folder for one device; removed when the test passes, kept (with consoles) when it fails.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Result<Dir> {
        let dir = std::env::temp_dir().join(format!("fleet-qemu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Dir(dir))
    }

    fn passed(self) {
        if std::env::var_os("FLEET_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn device(name: &str) -> Result<(Dir, Vm)> {
    let dir = Dir::new(name)?;
    let vm = Vm::new(&fleet_qemu_tests::image(), &dir.0)?;
    Ok((dir, vm))
}

/// Boots and waits for SSH; prints how long it took.
fn boot_to_ssh(vm: &mut Vm, network: Network) -> Result<Duration> {
    vm.boot(network)?;
    let took = vm.wait_ssh(BOOT)?;
    eprintln!("boot {}: SSH after {took:?}", vm.exits.len() + 1);
    Ok(took)
}

/// `systemctl reboot` and the boot that ends with it.
fn reboot(vm: &mut Vm) -> Result<()> {
    let _ = vm.ssh_status("systemctl reboot");
    let exit = vm.wait_exit(GUEST)?;
    ensure!(exit == Exit::Reboot, "expected a reboot, got {exit:?}");
    Ok(())
}

/// Imports the example HTTP image into the guest's podman from the guest's own busybox (no
/// registry is reachable), like scripts/example-image.sh does on the host.
fn import_example_image(vm: &Vm) -> Result<()> {
    vm.ssh(
        r#"set -e
r=$(mktemp -d); mkdir -p $r/bin $r/www $r/tmp $r/etc
cp /usr/bin/busybox $r/bin/busybox
for lib in $(ldd /usr/bin/busybox | grep -o '/[^ ]*'); do mkdir -p $r$(dirname $lib); cp -L $lib $r$lib; done
for a in $($r/bin/busybox --list); do [ $a = busybox ] || ln -sf busybox $r/bin/$a; done
echo 'root:x:0:0:root:/:/bin/sh' > $r/etc/passwd; echo 'root:x:0:' > $r/etc/group
tar -C $r -c . | podman import -q \
  --change 'ENV GREETING="hello from fleet"' \
  --change 'CMD ["/bin/sh", "-c", "echo \"$GREETING\" > /www/index.html; trap \"exit 0\" TERM; httpd -f -v -p 8080 -h /www & wait"]' \
  - localhost/fleet-example-http:1
rm -rf $r"#,
    )
    .map(drop)
}

/// Whether the guest can open a TCP connection to the host's NATS (10.0.2.2:`port`).
fn reaches_nats(vm: &Vm, port: &str) -> Result<bool> {
    let (code, _) = vm.ssh_status(&format!(
        "timeout 5 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}'"
    ))?;
    Ok(code == 0)
}

/// The agent's last journal lines, for a failure message.
fn agent_journal(vm: &Vm) -> String {
    match vm.ssh_status("journalctl -u fleet-agent -n 40 --no-pager") {
        Ok((_, text)) => format!("fleet-agent's journal in the guest:\n{text}"),
        Err(e) => format!("(no journal: {e})"),
    }
}

/// Waits until `http://127.0.0.1:port/` inside the guest says `greeting`.
async fn guest_http_says(vm: &Vm, port: u16, greeting: &str) -> Result<()> {
    eventually(
        &format!("the guest's port {port} to say {greeting:?}"),
        GUEST,
        || async {
            let (code, body) = vm.ssh_status(&format!("curl -sf http://127.0.0.1:{port}/"))?;
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
    let fleet = Fleet::start().await?;
    let (dir, mut vm) = device("agent")?;
    // The first-boot settings on the card's FAT, as a user writes them after flashing.
    let token = fleet.enrollment_token(&[("role", "pi")])?;
    let port = fleet
        .nats
        .url()
        .rsplit(':')
        .next()
        .context("NATS URL")?
        .to_owned();
    let agent_toml = format!(
        "device_id = \"pi-q1\"\nnats_url = \"nats://10.0.2.2:{port}\"\n\
         nats_ca_file = \"/boot/firmware/fleet/ca.pem\"\n\
         enrollment_token_file = \"/boot/firmware/fleet/enrollment-token\"\n\
         state_dir = \"/var/lib/fleet/agent\"\n"
    );
    vm.write_boot_files(&[
        ("fleet/agent.toml", agent_toml.as_bytes()),
        ("fleet/ca.pem", &std::fs::read(fleet.nats.ca())?),
        ("fleet/enrollment-token", token.as_bytes()),
    ])?;

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
    ensure!(
        vm.ssh("systemctl is-system-running --wait || true")?.trim() == "running",
        "the system is degraded: {}",
        vm.ssh("systemctl --failed --no-legend || true")?
    );

    // The agent enrolled and reports in.
    let client = fleet.operator.client();
    eventually("pi-q1 to enroll and report healthy", GUEST, || async {
        let d = client.device("pi-q1")?;
        match d.status.map(|s| s.health) {
            Some(Health::Healthy) => Ok(Some(())),
            other => bail!("health {other:?}"),
        }
    })
    .await
    .map_err(|e| e.context(agent_journal(&vm)))?;
    eprintln!(
        "power-on to agent enrolled and reporting: {:?} (first boot, TCG)",
        powered_on.elapsed()
    );
    import_example_image(&vm)?;
    let generation = fleet
        .operator
        .apply(&http_deployment("hello", "pi", 8080, "hello from a pi"))?
        .generation;
    eventually("hello to run on the device", GUEST, || async {
        let d = client.deployment("hello")?;
        let s = d.status.unwrap_or_default();
        if d.metadata.generation == generation && s.phase == RolloutPhase::Running {
            Ok(Some(()))
        } else {
            bail!("{:?}", s.phase)
        }
    })
    .await
    .map_err(|e| e.context(agent_journal(&vm)))?;
    guest_http_says(&vm, 8080, "hello from a pi").await?;

    ensure!(
        reaches_nats(&vm, &port)?,
        "the guest cannot reach the host's NATS with its network up"
    );

    // After a reboot the workload comes back.
    reboot(&mut vm)?;
    boot_to_ssh(&mut vm, Network::Connected)?;
    guest_http_says(&vm, 8080, "hello from a pi").await?;

    // And after a boot with the network cut: from the agent's cache on the data LV.
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
    // The board comes back up. (Its bootstatus cannot tell: with `-action reboot=shutdown`
    // every boot is a fresh QEMU, so the harness's QMP event is the proof of the reset.)
    boot_to_ssh(&mut vm, Network::Connected)?;
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
