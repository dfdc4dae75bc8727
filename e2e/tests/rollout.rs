//! A staged rollout across three devices (three agents on one host, each with its own podman
//! storage): a new version that fails its probe halts after the first wave, the other devices
//! keep the old version, and a fix rolls out to all, wave by wave.

use anyhow::{Context, Result, bail};
use fleet_contracts::{
    names,
    resource::RolloutPhase,
    state::{DesiredDeployment, Phase},
};
use fleet_e2e::{TestFleet, WAIT, eventually};

/// Version `v` of a service whose exec probe passes only when `healthy`.
fn service(v: &str, healthy: bool) -> serde_json::Value {
    let ok = if healthy { "touch /tmp/ok; " } else { "" };
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": "svc"},
        "spec": {
            "selector": {"matchLabels": {"role": "fleet"}},
            "rollout": {"waveSize": 1, "pauseSeconds": 0, "progressDeadlineSeconds": 10},
            "template": {
                "lifecycle": {"graceSeconds": 2},
                "containers": [{
                    "name": "svc",
                    "image": "localhost/fleet-busybox:1",
                    "command": ["/bin/sh", "-c", format!("{ok}trap 'exit 0' TERM; sleep 3600 & wait")],
                    "env": [{"name": "VERSION", "value": v}],
                    "probes": [{"name": "ok-file", "exec": {"command": ["test", "-f", "/tmp/ok"]},
                                "periodSeconds": 1, "failureThreshold": 1}]
                }]
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_halts_on_a_failing_probe_after_the_first_wave_and_a_fix_rolls_out_everywhere()
-> Result<()> {
    let fleet = TestFleet::start().await?;
    let mut devices = Vec::new();
    for name in ["pi-a", "pi-b", "pi-c"] {
        devices.push(fleet.device(name, &[("role", "fleet")]).await?);
    }
    fleet.operator.apply(&service("v1", true))?;
    fleet
        .operator
        .wait_phase("svc", 1, RolloutPhase::Running)
        .await?;

    // v2 fails its probe: the first wave (pi-a) gets it, misses its deadline, and the rollout
    // halts with the reason; pi-b and pi-c stay on v1.
    fleet.operator.apply(&service("v2", false))?;
    let d = fleet
        .operator
        .wait_phase("svc", 2, RolloutPhase::Halted)
        .await?;
    let rollout = d
        .status
        .clone()
        .unwrap()
        .rollout
        .context("no rollout status")?;
    assert_eq!(rollout.updated_devices, 1);
    let halted = rollout.halted.unwrap();
    assert!(
        halted.starts_with("pi-a not Ready within 10s (Starting: probe \"ok-file\" (exec) failing"),
        "{halted}"
    );
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let desired = js.get_key_value(names::DESIRED_BUCKET).await?;
    for (device, generation) in [("pi-a", 2), ("pi-b", 1), ("pi-c", 1)] {
        let bytes = desired
            .get(names::deployment_key(device, "svc"))
            .await?
            .context("no desired key")?;
        let value: DesiredDeployment = serde_json::from_slice(&bytes)?;
        assert_eq!(value.generation, generation, "{device}");
    }
    for dev in &d.status.unwrap().devices[1..] {
        let r = dev.reported.clone().context("no report")?;
        assert_eq!(
            (r.observed_generation, r.phase),
            (1, Phase::Ready),
            "{}",
            dev.device
        );
    }

    // An operator waves pi-a through: the next wave (pi-b) gets v2, and halts the rollout again.
    let resumed = fleet.operator.client().resume_rollout("svc", "tester")?;
    assert_eq!(resumed.generation, 2);
    eventually("the rollout to halt again at pi-b", WAIT, || async {
        let d = fleet.operator.client().deployment("svc")?;
        let r = d
            .status
            .and_then(|s| s.rollout)
            .context("no rollout status")?;
        match r.halted {
            Some(h) if r.updated_devices == 2 && h.starts_with("pi-b not Ready") => Ok(Some(())),
            other => bail!("{} updated, halted: {other:?}", r.updated_devices),
        }
    })
    .await?;

    // The fix rolls out to every device.
    fleet.operator.apply(&service("v3", true))?;
    fleet
        .operator
        .wait_phase("svc", 3, RolloutPhase::Running)
        .await?;
    eventually("every device on v3 and Ready", WAIT, || async {
        let d = fleet.operator.client().deployment("svc")?;
        let s = d.status.unwrap_or_default();
        let ready = s
            .devices
            .iter()
            .filter(|x| {
                x.reported
                    .as_ref()
                    .is_some_and(|r| r.observed_generation == 3 && r.phase == Phase::Ready)
            })
            .count();
        if ready == 3 {
            Ok(Some(()))
        } else {
            bail!("{ready} of 3 ready")
        }
    })
    .await?;
    drop(devices);
    Ok(())
}
