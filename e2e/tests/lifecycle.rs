//! Roll-forward upgrades with a lifecycle policy (plan Ch5), against real podman: the old
//! container gets its stop signal and up to its grace to exit, then SIGKILL unless the policy
//! says not to; the new one starts after.

use anyhow::{Result, bail};
use fleet_contracts::{resource::RolloutPhase, state::Phase};
use fleet_e2e::{PodmanSandbox, TestFleet, WAIT, eventually};

/// `script` runs as the main container; `/data` survives upgrades.
fn app(generation_marker: &str, script: &str, lifecycle: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": "app"},
        "spec": {
            "selector": {"matchLabels": {"role": "lc"}},
            "template": {
                "lifecycle": lifecycle,
                "containers": [{
                    "name": "app",
                    "image": "localhost/fleet-busybox:1",
                    "command": ["/bin/sh", "-c", script],
                    "env": [{"name": "MARKER", "value": generation_marker}],
                    "volumes": [{"name": "data", "mountPath": "/data"}]
                }]
            }
        }
    })
}

/// Exits cleanly on `signal`, recording that it did.
fn graceful(signal: &str) -> String {
    format!(
        "trap 'echo \"$MARKER stopped on {signal}\" >> /data/stops; exit 0' {signal}; sleep 3600 & wait"
    )
}

/// Ignores SIGTERM (and its children do too): only SIGKILL ends it.
const STUBBORN: &str = "trap '' TERM; sleep 3600 & wait; sleep 3600";

/// Runs a v1 that ignores SIGTERM, then applies v2: the upgrade takes `grace` seconds.
async fn start_slow_upgrade(fleet: &TestFleet, grace: u32) -> Result<()> {
    let policy = serde_json::json!({"graceSeconds": grace});
    fleet.operator.apply(&app("v1", STUBBORN, policy.clone()))?;
    fleet
        .operator
        .wait_phase("app", 1, RolloutPhase::Running)
        .await?;
    fleet
        .operator
        .apply(&app("v2", &graceful("TERM"), policy))?;
    Ok(())
}

fn stops(sandbox: &PodmanSandbox) -> Result<String> {
    sandbox.podman(&[
        "exec",
        "fleet-app",
        "sh",
        "-c",
        "cat /data/stops 2>/dev/null || true",
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_stops_the_old_container_with_its_signal_and_it_exits_cleanly() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (sandbox, _agent) = fleet.device("pi-01", &[("role", "lc")]).await?;
    let policy = serde_json::json!({"stopSignal": "SIGINT", "graceSeconds": 20});
    fleet
        .operator
        .apply(&app("v1", &graceful("INT"), policy.clone()))?;
    fleet
        .operator
        .wait_phase("app", 1, RolloutPhase::Running)
        .await?;
    fleet.operator.apply(&app("v2", &graceful("INT"), policy))?;
    fleet
        .operator
        .wait_phase("app", 2, RolloutPhase::Running)
        .await?;
    // v1 got SIGINT and had time to record it before v2 started.
    assert_eq!(stops(&sandbox)?, "v1 stopped on INT\n");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_that_ignores_its_stop_signal_is_killed_after_the_grace() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (sandbox, _agent) = fleet.device("pi-01", &[("role", "lc")]).await?;
    let policy = serde_json::json!({"graceSeconds": 2});
    fleet.operator.apply(&app("v1", STUBBORN, policy.clone()))?;
    fleet
        .operator
        .wait_phase("app", 1, RolloutPhase::Running)
        .await?;
    let v1 = sandbox.containers()?;
    fleet
        .operator
        .apply(&app("v2", &graceful("TERM"), policy))?;
    fleet
        .operator
        .wait_phase("app", 2, RolloutPhase::Running)
        .await?;
    let v2 = sandbox.containers()?;
    assert_eq!((v1.len(), v2.len()), (1, 1));
    assert_ne!(v1[0].id, v2[0].id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn without_sigkill_fallback_a_stubborn_container_keeps_running_and_the_upgrade_fails()
-> Result<()> {
    let fleet = TestFleet::start().await?;
    let (sandbox, _agent) = fleet.device("pi-01", &[("role", "lc")]).await?;
    let policy = serde_json::json!({"graceSeconds": 2, "sigkillFallback": false});
    fleet.operator.apply(&app("v1", STUBBORN, policy.clone()))?;
    fleet
        .operator
        .wait_phase("app", 1, RolloutPhase::Running)
        .await?;
    let v1 = sandbox.containers()?;
    fleet
        .operator
        .apply(&app("v2", &graceful("TERM"), policy))?;
    let d = fleet
        .operator
        .wait_phase("app", 2, RolloutPhase::Failed)
        .await?;
    let report = d.status.unwrap().devices[0].reported.clone().unwrap();
    assert_eq!(report.phase, Phase::Failed);
    assert!(
        report
            .message
            .contains("did not exit within 2s of its stop signal and sigkillFallback is off"),
        "{}",
        report.message
    );
    // The old version runs on: nothing was killed.
    eventually("the old container to be running", WAIT, || async {
        let now = sandbox.containers()?;
        match now.as_slice() {
            [one] if one.id == v1[0].id && one.state == "running" => Ok(Some(())),
            _ => bail!("{now:?}"),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_stop_grace_does_not_make_the_device_look_stale() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (_sandbox, _agent) = fleet.device("pi-01", &[("role", "lc")]).await?;
    // Heartbeats every second: three missed ones would make the device Stale.
    start_slow_upgrade(&fleet, 8).await?;
    let client = fleet.operator.client();
    // Throughout the eight seconds the old container takes to die, the device stays Healthy.
    eventually("v2 to run, the device Healthy all along", WAIT, || async {
        let health = client.device("pi-01")?.status.unwrap_or_default().health;
        if health != fleet_contracts::state::Health::Healthy {
            panic!("the device turned {health} during the upgrade");
        }
        let d = client.deployment("app")?;
        let status = d.status.unwrap_or_default();
        Ok((d.metadata.generation == 2 && status.phase == RolloutPhase::Running).then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_upgrade_of_one_deployment_does_not_hold_up_another() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (_sandbox, _agent) = fleet.device("pi-01", &[("role", "lc")]).await?;
    // The old version ignores its stop signal and has a long grace: its upgrade takes 30 s.
    start_slow_upgrade(&fleet, 30).await?;
    let client = fleet.operator.client();
    let app_phase = || -> Result<(u64, Phase)> {
        let d = client.deployment("app")?;
        let r = d.status.unwrap_or_default().devices[0]
            .reported
            .clone()
            .ok_or_else(|| anyhow::anyhow!("app not reported"))?;
        Ok((r.observed_generation, r.phase))
    };
    eventually("app to be Upgrading", WAIT, || async {
        Ok((app_phase()? == (2, Phase::Upgrading)).then_some(()))
    })
    .await?;
    // Another Deployment applied meanwhile comes up while app is still being stopped.
    let port = fleet_e2e::free_port();
    fleet
        .operator
        .apply(&fleet_e2e::http_deployment("other", "lc", port, "hi"))?;
    fleet
        .operator
        .wait_phase("other", 1, RolloutPhase::Running)
        .await?;
    assert_eq!(
        app_phase()?,
        (2, Phase::Upgrading),
        "app's upgrade should still be waiting for its old container"
    );
    Ok(())
}
