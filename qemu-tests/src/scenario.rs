//! What every device scenario does: a folder per device (kept with its consoles when the test
//! fails), the first-boot settings that join a device to a test fleet, a boot to SSH, the
//! example image imported into the guest's podman, and the agent's journal for failure
//! messages. Every wait is for a state, never a fixed sleep.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use fleet_contracts::{resource::RolloutPhase, state::Health};
use fleet_e2e::{TestFleet, eventually};

use crate::vm::{Exit, Network, Vm};

/// A boot's time limit, and the limit to see something happen in the guest.
pub const BOOT: Duration = Duration::from_secs(8 * 60);
pub const GUEST: Duration = Duration::from_secs(5 * 60);

/// A folder for one device; removed when the test passes, kept (with consoles) when it fails.
#[derive(Debug)]
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(name: &str) -> Result<Dir> {
        let dir = std::env::temp_dir().join(format!("fleet-qemu-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Dir(dir))
    }

    pub fn passed(self) {
        if std::env::var_os("FLEET_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A new device from the built image, in its own folder.
pub fn device(name: &str) -> Result<(Dir, Vm)> {
    let dir = Dir::new(name)?;
    let vm = Vm::new(&crate::image(), &dir.0)?;
    Ok((dir, vm))
}

/// Writes the first-boot settings onto the card's FAT, as a user does after flashing: the
/// agent joins `fleet` as `device_id` with a fresh token carrying `labels`. Returns the host's
/// NATS port (the guest reaches it as 10.0.2.2).
pub fn join_fleet(
    vm: &Vm,
    fleet: &TestFleet,
    device_id: &str,
    labels: &[(&str, &str)],
) -> Result<String> {
    let token = fleet.enrollment_token(labels)?;
    let port = fleet
        .nats
        .url()
        .rsplit(':')
        .next()
        .context("NATS URL")?
        .to_owned();
    let agent_toml = format!(
        "device_id = \"{device_id}\"\nnats_url = \"nats://10.0.2.2:{port}\"\n\
         nats_ca_file = \"/boot/firmware/fleet/ca.pem\"\n\
         enrollment_token_file = \"/boot/firmware/fleet/enrollment-token\"\n\
         state_dir = \"/var/lib/fleet/agent\"\n"
    );
    vm.write_boot_files(&[
        ("fleet/agent.toml", agent_toml.as_bytes()),
        ("fleet/ca.pem", &std::fs::read(fleet.nats.ca())?),
        ("fleet/enrollment-token", token.as_bytes()),
    ])?;
    Ok(port)
}

/// Boots and waits for SSH; prints how long it took.
pub fn boot_to_ssh(vm: &mut Vm, network: Network) -> Result<Duration> {
    vm.boot(network)?;
    let took = vm.wait_ssh(BOOT)?;
    eprintln!("boot {}: SSH after {took:?}", vm.exits.len() + 1);
    Ok(took)
}

/// `systemctl reboot` and the boot that ends with it.
pub fn reboot(vm: &mut Vm) -> Result<()> {
    let _ = vm.ssh_status("systemctl reboot");
    let exit = vm.wait_exit(GUEST)?;
    ensure!(exit == Exit::Reboot, "expected a reboot, got {exit:?}");
    Ok(())
}

/// `systemctl poweroff` and the boot that ends with it: a clean shutdown.
pub fn power_off(vm: &mut Vm) -> Result<()> {
    let _ = vm.ssh_status("systemctl poweroff");
    let exit = vm.wait_exit(GUEST)?;
    ensure!(exit == Exit::PowerOff, "expected a power-off, got {exit:?}");
    Ok(())
}

/// Waits until systemd has finished the boot and nothing failed.
pub fn system_running(vm: &Vm) -> Result<()> {
    let state = vm.ssh("systemctl is-system-running --wait || true")?;
    ensure!(
        state.trim() == "running",
        "the system is {}: failed units: {}",
        state.trim(),
        vm.ssh("systemctl --failed --no-legend || true")?.trim()
    );
    Ok(())
}

/// Imports the example HTTP image into the guest's podman from the guest's own busybox (no
/// registry is reachable), like scripts/example-image.sh does on the host.
pub fn import_example_image(vm: &Vm) -> Result<()> {
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

/// The agent's last journal lines, for a failure message.
pub fn agent_journal(vm: &Vm) -> String {
    match vm.ssh_status("journalctl -u fleet-agent -n 40 --no-pager") {
        Ok((_, text)) => format!("fleet-agent's journal in the guest:\n{text}"),
        Err(e) => format!("(no journal: {e})"),
    }
}

/// Waits until `device` has enrolled and reports healthy; returns how long that took.
pub async fn enrolled(fleet: &TestFleet, vm: &Vm, device: &str) -> Result<Duration> {
    let start = Instant::now();
    let client = fleet.operator.client();
    eventually(
        &format!("{device} to enroll and report healthy"),
        GUEST,
        || async {
            let d = client.device(device)?;
            match d.status.map(|s| s.health) {
                Some(Health::Healthy) => Ok(Some(())),
                other => bail!("health {other:?}"),
            }
        },
    )
    .await
    .map_err(|e| e.context(agent_journal(vm)))?;
    Ok(start.elapsed())
}

/// Applies `doc` (a Deployment) and waits until the device runs its new generation.
pub async fn deploy(fleet: &TestFleet, vm: &Vm, doc: &serde_json::Value) -> Result<()> {
    let client = fleet.operator.client();
    let generation = fleet.operator.apply(doc)?.generation;
    let name = doc["metadata"]["name"].as_str().unwrap_or("?");
    eventually(&format!("{name} to run on the device"), GUEST, || async {
        let d = client.deployment(name)?;
        let s = d.status.unwrap_or_default();
        if d.metadata.generation == generation && s.phase == RolloutPhase::Running {
            Ok(Some(()))
        } else {
            bail!("{:?}", s.phase)
        }
    })
    .await
    .map_err(|e| e.context(agent_journal(vm)))
}

/// `fleetctl describe device NAME` against the test fleet, as a person would run it.
pub fn fleetctl_describe_device(fleet: &TestFleet, name: &str) -> Result<String> {
    let out = std::process::Command::new(fleet_e2e::binary("fleetctl"))
        .args(["--server", &fleet.operator.url, "describe", "device", name])
        .env("FLEET_TOKEN", &fleet.operator.token)
        .output()
        .context("running fleetctl")?;
    ensure!(
        out.status.success(),
        "fleetctl describe device {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Whether the guest can open a TCP connection to the host's NATS (10.0.2.2:`port`).
pub fn reaches_nats(vm: &Vm, port: &str) -> Result<bool> {
    let (code, _) = vm.ssh_status(&format!(
        "timeout 5 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}'"
    ))?;
    Ok(code == 0)
}

/// The initramfs the device boots (the one `config.txt` names) carries LVM settings that let
/// a thin pool with leaked blocks activate, and the tools of the pool's self-repair and the
/// boot partition's check. Read by the image's own `lvmconfig` from the unpacked initramfs.
pub fn initramfs_tolerates_what_a_crash_leaves(vm: &Vm) -> Result<()> {
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
