//! Crash safety on the built image under QEMU aarch64 (TCG): a device running a workload that
//! writes all the time is crashed again and again at random moments, in the three ways a Pi in
//! the field dies (a kernel crash, a hang the hardware watchdog ends, the power pulled), and
//! must come back to a running system with its workload every time. Then a block of its thin
//! pool is leaked on purpose (what a crash leaves by chance: it must boot as it is), and then
//! its pool's metadata is damaged beyond that: the bootguard must repair it from the spare
//! area, and the record must reach the operator.
//!
//! One VM's disk is reused across all the boots (the scenario is the sequence). What each
//! crash left is judged from outside too: after every crash the host's own `thin_check` reads
//! the pool's metadata from the stopped device's disk.
#![allow(clippy::disallowed_methods)] // A test times what it watches: it reads the clock.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fleet_e2e::{TestFleet, churn::Rng, eventually};
use fleet_qemu_tests::{
    pool,
    scenario::{
        GUEST, agent_journal, boot_to_ssh, deploy, device, enrolled, fleetctl_describe_device,
        import_example_image, join_fleet, power_off, system_running,
    },
    vm::{Exit, Network, Vm},
};

/// How many crashes in a row.
const CRASHES: usize = 20;
/// The longest random wait, after the workload is back, before the next crash.
const MAX_WAIT_MS: u64 = 8_000;

/// The three ways a device dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// `sysrq c`: the kernel panics and (`panic=10`) reboots.
    KernelPanic,
    /// `sysrq c` with `kernel.panic=0`: the kernel hangs until the watchdog resets the board.
    WatchdogReset,
    /// QEMU is killed: the power is pulled.
    PowerCut,
}

const KINDS: [Crash; 3] = [Crash::KernelPanic, Crash::WatchdogReset, Crash::PowerCut];

/// A workload that writes all the time: a counter and a log on a named volume (the data LV)
/// and files of 256 KiB, a new one every round with the oldest removed, on a host path on root
/// (the thin LV), so the pool keeps allocating.
fn writer() -> serde_json::Value {
    let script = r#"trap 'exit 0' TERM
i=$(cat /data/count 2>/dev/null || echo 0)
while :; do
  i=$((i+1))
  echo "$i" >> /data/log
  echo "$i" > /data/count.new && mv /data/count.new /data/count
  dd if=/dev/urandom of=/rootfs/blob.$i bs=64k count=4 2>/dev/null
  rm -f /rootfs/blob.$((i-64))
  echo "$i" > /rootfs/count
  sleep 0.2
done"#;
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": "writer"},
        "spec": {
            "selector": {"matchLabels": {"role": "crash"}},
            "template": {"containers": [{
                "name": "writer",
                "image": "localhost/fleet-example-http:1",
                "command": ["/bin/sh", "-c", script],
                "volumes": [
                    {"name": "writer-data", "mountPath": "/data"},
                    {"name": "rootfs", "mountPath": "/rootfs", "hostPath": "/srv/crash"}
                ]
            }]}
        }
    })
}

/// The writer's two counters (data LV, root), read in the guest.
fn counters(vm: &Vm) -> Result<(u64, u64)> {
    let out = vm.ssh(
        "cat \"$(podman inspect fleet-writer --format \
         '{{range .Mounts}}{{if eq .Destination \"/data\"}}{{.Source}}{{end}}{{end}}')/count\" \
         /srv/crash/count",
    )?;
    let n: Vec<u64> = out
        .split_whitespace()
        .map(|w| w.parse().with_context(|| format!("counter {w:?}")))
        .collect::<Result<_>>()?;
    let [data, root] = n[..] else {
        bail!("expected two counters, got {out:?}")
    };
    Ok((data, root))
}

/// Waits until the writer runs again and both its counters move past where they were.
async fn workload_back(vm: &Vm, before: (u64, u64)) -> Result<(u64, u64)> {
    eventually(
        "the writer to write again on the data LV and on root",
        GUEST,
        || async {
            let now = counters(vm)?;
            if now.0 > before.0 && now.1 > before.1 {
                Ok(Some(now))
            } else {
                bail!("counters {now:?}, before the crash {before:?}")
            }
        },
    )
    .await
    .map_err(|e| e.context(agent_journal(vm)))
}

/// Crashes the running device in `kind`'s way and waits until that boot has ended.
fn crash(vm: &mut Vm, kind: Crash) -> Result<()> {
    match kind {
        Crash::PowerCut => vm.power_cut(),
        Crash::KernelPanic | Crash::WatchdogReset => {
            let panic = if kind == Crash::KernelPanic { 10 } else { 0 };
            let _ = vm.ssh_status(&format!(
                "sysctl -qw kernel.panic={panic} && echo c > /proc/sysrq-trigger"
            ));
            let exit = vm.wait_exit(GUEST)?;
            // A panicked kernel reboots after 10 s (`panic=10`), unless the watchdog, which
            // nothing pets any more, resets the board first; a hung one only the watchdog ends.
            let expected = match kind {
                Crash::KernelPanic => matches!(exit, Exit::Reboot | Exit::WatchdogReset),
                _ => exit == Exit::WatchdogReset,
            };
            ensure!(expected, "{kind:?} ended the boot with {exit:?}");
        }
    }
    Ok(())
}

/// The pool's data and metadata use, in percent, as LVM reports them.
fn pool_use(vm: &Vm) -> Result<String> {
    Ok(vm
        .ssh("lvs --noheadings -o data_percent,metadata_percent vg0/pool")?
        .split_whitespace()
        .collect::<Vec<_>>()
        .join("% data, ")
        + "% metadata")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_crashed_at_random_moments_always_comes_back_and_repairs_its_damaged_pool()
-> Result<()> {
    let fleet = TestFleet::start().await?;
    let (dir, mut vm) = device("crash")?;
    join_fleet(&vm, &fleet, "pi-crash", &[("role", "crash")])?;
    let mut rng = Rng::seeded("FLEET_CRASH_SEED", "crash");

    // The device joins, and runs the writer.
    boot_to_ssh(&mut vm, Network::Connected)?;
    enrolled(&fleet, &vm, "pi-crash").await?;
    import_example_image(&vm)?;
    vm.ssh("mkdir -p /srv/crash")?;
    deploy(&fleet, &vm, &writer()).await?;
    let meta = pool::locate(&vm, "vg0", "pool_tmeta")?;
    let mut last = workload_back(&vm, (0, 0)).await?;
    let use_before = pool_use(&vm)?;

    let mut leaked = Vec::new();
    let mut boot_times = Vec::new();
    let mut kinds = Vec::new();
    for n in 1..=CRASHES {
        let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
        let wait = Duration::from_millis(rng.below(MAX_WAIT_MS));
        // A random moment while the writer writes (the guest keeps running meanwhile).
        tokio::time::sleep(wait).await;
        crash(&mut vm, kind)?;
        let verdict = pool::check(&vm, meta)?;
        eprintln!(
            "crash {n}/{CRASHES}: {kind:?} after {wait:?}; host thin_check: {}",
            if verdict.clean {
                "clean".to_owned()
            } else {
                verdict.said.replace('\n', "; ")
            }
        );
        if verdict.leaks {
            leaked.push(n);
        }
        kinds.push(kind);
        let took = boot_to_ssh(&mut vm, Network::Connected)?;
        boot_times.push(took);
        system_running(&vm).with_context(|| format!("after crash {n} ({kind:?})"))?;
        last = workload_back(&vm, last)
            .await
            .with_context(|| format!("after crash {n} ({kind:?})"))?;
    }
    let checks = vm.ssh("cat /boot/firmware/rollback/checks 2>/dev/null || true")?;
    ensure!(
        !checks.contains("pool_repairs=") || checks.contains("pool_repairs=0"),
        "a crash needed a pool repair (the leak tolerance is not enough?): {checks}"
    );
    let use_after = pool_use(&vm)?;
    let mean = boot_times.iter().sum::<Duration>() / boot_times.len() as u32;
    eprintln!(
        "{CRASHES} crashes ({} kernel panics, {} watchdog resets, {} power cuts): every one \
         came back; {} left leaked blocks (crashes {leaked:?}), none needed a repair",
        kinds.iter().filter(|k| **k == Crash::KernelPanic).count(),
        kinds.iter().filter(|k| **k == Crash::WatchdogReset).count(),
        kinds.iter().filter(|k| **k == Crash::PowerCut).count(),
        leaked.len(),
    );
    eprintln!("pool use: {use_before} before the crashes, {use_after} after");
    eprintln!("storage check record after the crashes:\n{checks}");

    // A clean shutdown, then a leaked block made on purpose (what the crashes above leave only
    // by chance): the pool activates as it is, no repair needed. The boot's time is the one
    // after a clean shutdown, to compare with those after a crash.
    power_off(&mut vm)?;
    let verdict = pool::check(&vm, meta)?;
    ensure!(verdict.activates, "a clean shutdown left: {}", verdict.said);
    let leaked_block = pool::leak(&vm, meta)?;
    let verdict = pool::check(&vm, meta)?;
    ensure!(
        verdict.leaks && verdict.activates,
        "the leak made on purpose is not a plain leak: {}",
        verdict.said
    );
    eprintln!(
        "leaked data block {leaked_block} on purpose; host thin_check: {}",
        verdict.said.replace('\n', "; ")
    );
    let clean_boot = boot_to_ssh(&mut vm, Network::Connected)
        .context("the device does not boot with a leaked block in its pool")?;
    eprintln!(
        "boot to SSH: {clean_boot:?} after a clean shutdown, {mean:?} on average after a crash \
         (max {:?})",
        boot_times.iter().max().unwrap()
    );
    system_running(&vm)?;
    last = workload_back(&vm, last).await?;
    let record = vm.ssh("cat /boot/firmware/rollback/checks 2>/dev/null || true")?;
    ensure!(
        !record.contains("pool_repair") || record.contains("pool_repairs=0"),
        "a leaked block led to a repair: {record}"
    );

    // Damage beyond what --ignore-non-fatal-errors lets through: the bootguard repairs the
    // pool from its spare metadata area on the next boot, and the record reaches the operator.
    power_off(&mut vm)?;
    let block = pool::damage(&vm, meta)?;
    let verdict = pool::check(&vm, meta)?;
    ensure!(
        !verdict.activates,
        "the damage (metadata space map index, block {block}) is not fatal: {}",
        verdict.said
    );
    eprintln!(
        "damaged block {block}; host thin_check: {}",
        verdict.said.replace('\n', "; ")
    );
    let repair_start = Instant::now();
    boot_to_ssh(&mut vm, Network::Connected)?;
    let repair_boot = repair_start.elapsed();
    ensure!(
        vm.console().contains("fleet-bootguard: pool pool repaired"),
        "the console does not say the pool was repaired"
    );
    system_running(&vm)?;
    last = workload_back(&vm, last).await?;
    let record = vm.ssh("cat /boot/firmware/rollback/checks")?;
    ensure!(
        record.contains("pool_repairs=1"),
        "the repair is not recorded: {record}"
    );
    let lvs = vm.ssh("lvs -a --noheadings -o lv_name vg0")?;
    ensure!(
        lvs.contains("pool_meta0"),
        "the unrepaired metadata is not kept: {lvs}"
    );
    eventually("the operator to show the pool's repair", GUEST, || async {
        let out = fleetctl_describe_device(&fleet, "pi-crash")?;
        if out.contains("thin pool repaired 1 time(s)") && out.contains("repaired with lvconvert") {
            Ok(Some(out))
        } else {
            bail!("fleetctl describe device pi-crash:\n{out}")
        }
    })
    .await
    .map(|out| eprintln!("fleetctl describe device pi-crash:\n{out}"))?;
    eprintln!("boot with the repair to SSH: {repair_boot:?}; last counters {last:?}");
    vm.power_cut();
    dir.passed();
    Ok(())
}
