//! Operator restart and recovery from NATS KV alone, one test per scenario of
//! `docs/operator-recovery-scenarios.md`, against real nats-server and operator processes,
//! with real agents or hollow devices (enrolled, speaking the agent's own protocol code).
#![allow(clippy::disallowed_methods)] // A test times what it watches: it reads the clock.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use fleet_contracts::{
    api::{RecoveryState, Role},
    names,
    resource::RolloutPhase,
    state::{DesiredDeployment, Health, Phase},
};
use fleet_e2e::{Hollow, Operator, TestFleet, WAIT, eventually, free_port, http_deployment};
use futures::StreamExt;

fn device_doc(name: &str, role: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Device",
        "metadata": {"name": name, "labels": {"role": role}}
    })
}

fn job(name: &str, role: &str, version: &str) -> serde_json::Value {
    fleet_e2e::busybox_deployment(name, role, version)
}

/// Every value of the desired bucket, decoded.
async fn desired_bucket(fleet: &TestFleet) -> Result<BTreeMap<String, DesiredDeployment>> {
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let kv = js.get_key_value(names::DESIRED_BUCKET).await?;
    let mut keys = kv.keys().await?;
    let mut all = BTreeMap::new();
    while let Some(key) = keys.next().await {
        let key = key?;
        if key == names::DESIRED_STORE_KEY {
            continue;
        }
        if let Some(bytes) = kv.get(&key).await? {
            all.insert(key, serde_json::from_slice(&bytes)?);
        }
    }
    Ok(all)
}

/// Restarts the test operator (instance `e2e`) after it was killed, and waits until it
/// has converged.
async fn restart(fleet: &mut TestFleet) -> Result<()> {
    fleet.operator = Operator::start(fleet.path(), &fleet.nats, &[]).await?;
    fleet.operator.wait_role(Role::Leader).await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_killed_mid_fan_out_writes_exactly_the_declared_state_after_restart()
-> Result<()> {
    let mut fleet = TestFleet::start().await?;
    const DEVICES: usize = 2000;
    // Devices registered straight into KV (pipelined), as the API would store them.
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let resources = js.get_key_value(names::RESOURCES_BUCKET).await?;
    let puts = (0..DEVICES).map(|i| {
        let mut doc = device_doc(&format!("d{i:04}"), "edge");
        doc["metadata"]["generation"] = 1.into();
        let resources = resources.clone();
        async move {
            let key = names::resource_key("Device", doc["metadata"]["name"].as_str().unwrap());
            let bytes = serde_json::to_vec(&doc).expect("JSON serializes");
            resources.put(key, bytes.into()).await
        }
    });
    for put in futures::future::join_all(puts).await {
        put?;
    }
    let client = fleet.operator.client();
    eventually("the operator to know every device", WAIT, || async {
        Ok((client.status()?.devices == DEVICES).then_some(()))
    })
    .await?;

    // Kill the operator as soon as the first key of a new generation lands, until one kill
    // catches the fan-out half done; after every kill the restarted operator must leave
    // exactly one key per device, all at the newest generation.
    let desired = js.get_key_value(names::DESIRED_BUCKET).await?;
    let mut caught_mid_way = false;
    for generation in 1..=5u64 {
        let mut watch = desired.watch(">").await?;
        fleet
            .operator
            .apply(&job("web", "edge", &format!("v{generation}")))?;
        tokio::time::timeout(WAIT, async {
            while let Some(entry) = watch.next().await {
                let value: DesiredDeployment = serde_json::from_slice(&entry?.value)?;
                if value.generation == generation {
                    return Ok(());
                }
            }
            bail!("the desired watch ended")
        })
        .await
        .context("no desired key of the new generation")??;
        fleet.operator.proc.kill();
        let at_kill = desired_bucket(&fleet)
            .await?
            .values()
            .filter(|d| d.generation == generation)
            .count();
        eprintln!(
            "generation {generation}: {at_kill} of {DEVICES} keys written when the operator died"
        );

        restart(&mut fleet).await?;
        let now = desired_bucket(&fleet).await?;
        assert_eq!(now.len(), DEVICES, "exactly one key per device");
        for i in 0..DEVICES {
            let d = &now[&names::deployment_key(&format!("d{i:04}"), "web")];
            assert_eq!((d.deployment.as_str(), d.generation), ("web", generation));
        }
        if at_kill < DEVICES {
            caught_mid_way = true;
            break;
        }
    }
    assert!(caught_mid_way, "no kill landed in the middle of a fan-out");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_deleted_while_the_operator_was_down_is_removed_from_the_device() -> Result<()>
{
    let mut fleet = TestFleet::start().await?;
    let (sandbox, _agent) = fleet.device("pi-01", &[("role", "demo")]).await?;
    fleet
        .operator
        .apply(&http_deployment("hello", "demo", free_port(), "hi"))?;
    fleet
        .operator
        .wait_phase("hello", 1, RolloutPhase::Running)
        .await?;
    fleet.operator.proc.kill();
    // Deleted behind the operator's back (another operator, or `nats kv del`).
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let resources = js.get_key_value(names::RESOURCES_BUCKET).await?;
    resources
        .delete(names::resource_key("Deployment", "hello"))
        .await?;

    restart(&mut fleet).await?;
    eventually(
        "the stale desired key, its container and report to go",
        WAIT,
        || async {
            let desired = desired_bucket(&fleet).await?;
            let containers = sandbox.containers()?;
            let reported = js.get_key_value(names::REPORTED_BUCKET).await?;
            let report = reported
                .get(names::deployment_key("pi-01", "hello"))
                .await?;
            if desired.is_empty() && containers.is_empty() && report.is_none() {
                Ok(Some(()))
            } else {
                bail!(
                    "desired {:?}, containers {containers:?}, report {}",
                    desired.keys(),
                    report.is_some()
                )
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_offline_during_the_restart_keeps_its_last_report_and_turns_offline() -> Result<()>
{
    let mut fleet = TestFleet::start().await?;
    let online = Hollow::start(&fleet, "pi-on", &[("role", "edge")], true).await?;
    let offline = Hollow::start(&fleet, "pi-off", &[("role", "edge")], true).await?;
    fleet.operator.apply(&job("web", "edge", "v1"))?;
    fleet
        .operator
        .wait_phase("web", 1, RolloutPhase::Running)
        .await?;
    drop(offline);
    fleet.operator.proc.kill();

    restart(&mut fleet).await?;
    let client = fleet.operator.client();
    // Converged without waiting for the silent device: its last report comes from KV.
    let status = client.deployment("web")?.status.context("no status")?;
    let off = status
        .devices
        .iter()
        .find(|d| d.device == "pi-off")
        .context("pi-off not listed")?;
    let report = off.reported.as_ref().context("pi-off's report lost")?;
    assert_eq!(
        (report.phase, report.observed_generation),
        (Phase::Ready, 1)
    );
    // And its silence shows: stale, then offline, while the other stays healthy.
    eventually("pi-off to go offline", WAIT, || async {
        let off = client.device("pi-off")?.status.unwrap_or_default().health;
        let on = client.device("pi-on")?.status.unwrap_or_default().health;
        if on != Health::Healthy {
            bail!("pi-on is {on}");
        }
        Ok((off == Health::Offline).then_some(()))
    })
    .await?;
    drop(online);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_standby_takes_over_a_rolling_deploy_without_repeating_or_skipping_a_wave() -> Result<()>
{
    let mut fleet = TestFleet::start().await?;
    let standby = Operator::start_named(fleet.path(), &fleet.nats, "standby", &[]).await?;
    standby.wait_role(Role::Standby).await?;
    assert_eq!(standby.client().status()?.leader.as_deref(), Some("e2e"));
    // From here on `fleet.operator` is the standby; `leader` is the first operator.
    let mut leader = std::mem::replace(&mut fleet.operator, standby);

    let ids = ["pi-a", "pi-b", "pi-c"];
    let mut devices = Vec::new();
    for name in ids {
        devices.push(Hollow::start(&fleet, name, &[("role", "edge")], false).await?);
    }
    let rolling = |version: &str| {
        let mut doc = job("svc", "edge", version);
        doc["spec"]["rollout"] =
            serde_json::json!({"waveSize": 1, "pauseSeconds": 0, "progressDeadlineSeconds": 6});
        doc
    };
    // Version 1 goes everywhere at once (nothing runs yet). Devices report only when told.
    leader.apply(&rolling("v1"))?;
    let generations = || async {
        let desired = desired_bucket(&fleet).await?;
        Ok::<_, anyhow::Error>(
            ids.iter()
                .map(|n| {
                    desired
                        .get(&names::deployment_key(n, "svc"))
                        .map(|d| d.generation)
                })
                .collect::<Vec<_>>(),
        )
    };
    let wait_generations = |want: Vec<Option<u64>>| async move {
        eventually(&format!("desired generations {want:?}"), WAIT, || async {
            let got = generations().await?;
            if got == want {
                Ok(Some(()))
            } else {
                bail!("{got:?}")
            }
        })
        .await
    };
    wait_generations(vec![Some(1); 3]).await?;
    for d in &devices {
        d.report("svc", 1, Phase::Ready);
    }
    // Version 2: the leader admits the first wave only.
    leader.apply(&rolling("v2"))?;
    wait_generations(vec![Some(2), Some(1), Some(1)]).await?;
    devices[0].report("svc", 2, Phase::Ready);
    wait_generations(vec![Some(2), Some(2), Some(1)]).await?;

    // The leader dies mid-rollout; the standby takes over.
    leader.proc.kill();
    fleet.operator.wait_role(Role::Leader).await?;
    // It continues where the rollout stands: pi-b's wave is not Ready yet, so pi-c waits...
    let settled = fleet.operator.client().status()?;
    assert_eq!(settled.state, RecoveryState::Converged);
    assert_eq!(generations().await?, vec![Some(2), Some(2), Some(1)]);
    // ...and pi-b's deadline runs from when the first leader admitted it (kept in KV), so the
    // new leader halts the rollout on time.
    let halted = fleet
        .operator
        .wait_phase("svc", 2, RolloutPhase::Halted)
        .await?;
    let reason = halted.status.and_then(|s| s.rollout).and_then(|r| r.halted);
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.starts_with("pi-b not Ready within 6s")),
        "{reason:?}"
    );
    assert_eq!(generations().await?, vec![Some(2), Some(2), Some(1)]);
    // pi-b comes up late after all: the rollout goes on.
    devices[1].report("svc", 2, Phase::Ready);
    wait_generations(vec![Some(2); 3]).await?;
    devices[2].report("svc", 2, Phase::Ready);
    fleet
        .operator
        .wait_phase("svc", 2, RolloutPhase::Running)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn when_the_leader_dies_the_standby_leads_within_the_lease_and_no_write_is_lost() -> Result<()>
{
    let mut fleet = TestFleet::start().await?;
    let _devices = [
        Hollow::start(&fleet, "pi-a", &[("role", "edge")], true).await?,
        Hollow::start(&fleet, "pi-b", &[("role", "edge")], true).await?,
    ];
    let standby = Operator::start_named(fleet.path(), &fleet.nats, "standby", &[]).await?;
    standby.wait_role(Role::Standby).await?;
    let mut leader = std::mem::replace(&mut fleet.operator, standby);
    // The last write the dying leader acknowledged must reach every device.
    let generation = leader.apply(&job("web", "edge", "v1"))?.generation;
    leader.proc.kill();
    let killed = std::time::Instant::now();
    fleet.operator.wait_role(Role::Leader).await?;
    eprintln!(
        "standby leading {:?} after the leader died (lease {} ms)",
        killed.elapsed(),
        fleet_e2e::LEASE_MS
    );
    fleet
        .operator
        .wait_phase("web", generation, RolloutPhase::Running)
        .await?;
    // And the new leader keeps serving writes.
    let next = fleet.operator.apply(&job("web", "edge", "v2"))?.generation;
    fleet
        .operator
        .wait_phase("web", next, RolloutPhase::Running)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_nats_restart_the_operator_keeps_leading_and_converges_new_writes() -> Result<()> {
    let mut fleet = TestFleet::start().await?;
    let _device = Hollow::start(&fleet, "pi-a", &[("role", "edge")], true).await?;
    fleet.operator.apply(&job("web", "edge", "v1"))?;
    fleet
        .operator
        .wait_phase("web", 1, RolloutPhase::Running)
        .await?;
    fleet.nats.restart().await?;
    fleet.operator.wait_role(Role::Leader).await?;
    // Writes may be refused while the operator re-reads KV; once taken they converge.
    let client = fleet.operator.client();
    let generation = eventually("the API to take a write again", WAIT, || async {
        Ok(client
            .apply(&job("web", "edge", "v2"))
            .ok()
            .map(|r| r.generation))
    })
    .await?;
    assert_eq!(generation, 2);
    fleet
        .operator
        .wait_phase("web", 2, RolloutPhase::Running)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_resource_is_reported_and_skipped_and_its_devices_keep_their_state()
-> Result<()> {
    let mut fleet = TestFleet::start().await?;
    let device = Hollow::start(&fleet, "pi-a", &[("role", "edge")], true).await?;
    fleet.operator.apply(&job("web", "edge", "v1"))?;
    fleet
        .operator
        .wait_phase("web", 1, RolloutPhase::Running)
        .await?;
    fleet.operator.proc.kill();
    // A value from a newer schema (or a corrupt one) replaces the Deployment.
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let resources = js.get_key_value(names::RESOURCES_BUCKET).await?;
    let newer = br#"{"apiVersion":"fleet.dev/v9","kind":"Deployment","metadata":{"name":"web"},"spec":{"pods":3}}"#;
    resources
        .put(
            names::resource_key("Deployment", "web"),
            newer.to_vec().into(),
        )
        .await?;

    // Converged means a fan-out pass ran on the complete view and found nothing to change.
    restart(&mut fleet).await?;
    let client = fleet.operator.client();
    let status = client.status()?;
    assert_eq!(status.unreadable.len(), 1, "{:?}", status.unreadable);
    assert!(
        status.unreadable[0].starts_with("fleet-resources/deployment.web: "),
        "{:?}",
        status.unreadable
    );
    let desired = desired_bucket(&fleet).await?;
    assert_eq!(
        desired
            .get(&names::deployment_key("pi-a", "web"))
            .map(|d| d.generation),
        Some(1),
        "the device's desired state was touched"
    );
    assert_eq!(device.desired().get("web").map(|d| d.generation), Some(1));
    let page = fleet_e2e::http_get(&format!("{}/", fleet.operator.url))?.1;
    assert!(page.contains("fleet-resources/deployment.web"), "{page}");
    // An apply over it is refused rather than guessing; nothing is overwritten.
    let err = client
        .apply(&job("web", "edge", "v2"))
        .expect_err("applied over an unreadable value");
    assert!(err.to_string().contains("cannot be read"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_is_replaced_and_steps_down_when_it_wakes() -> Result<()> {
    let mut fleet = TestFleet::start().await?;
    let _device = Hollow::start(&fleet, "pi-a", &[("role", "edge")], true).await?;
    let standby = Operator::start_named(fleet.path(), &fleet.nats, "standby", &[]).await?;
    standby.wait_role(Role::Standby).await?;
    let mut leader = std::mem::replace(&mut fleet.operator, standby);
    // The leader freezes (a stopped VM, a long GC pause): it cannot renew its lease.
    leader.proc.send_signal("STOP");
    fleet.operator.wait_role(Role::Leader).await?;
    let generation = fleet.operator.apply(&job("web", "edge", "v1"))?.generation;
    fleet
        .operator
        .wait_phase("web", generation, RolloutPhase::Running)
        .await?;
    // It wakes up: its lease is gone, so it stands by and names the new leader.
    leader.proc.send_signal("CONT");
    let client = leader.client();
    eventually("the woken operator to stand by", WAIT, || async {
        let s = client.status()?;
        Ok((s.role == Role::Standby && s.leader.as_deref() == Some("standby")).then_some(()))
    })
    .await?;
    assert_eq!(fleet.operator.client().status()?.role, Role::Leader);
    Ok(())
}
