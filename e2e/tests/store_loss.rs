//! Losing or restoring the fleet's NATS store never wipes a device's workloads
//! (docs/store-loss.md), with a real nats-server, operator, agent and podman:
//!
//! - the store is wiped and made anew: the device keeps its containers untouched (same ids,
//!   the port still answers), shows as `Unregistered` and holding, is adopted, and converges
//!   on a change applied afterwards;
//! - a restore from an older backup: what the backup holds is not restarted, a Deployment
//!   created after it keeps running (held) until an admin releases it, and after that a real
//!   deletion in the unchanged store still removes containers;
//! - a bad backup is refused naming what is wrong, and nothing changes.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use fleet_contracts::{
    names::{ENROLLMENT_BUCKET, REPORTED_BUCKET, RESOURCES_BUCKET},
    resource::{Device, RolloutPhase},
    state::HealthFlag,
};
use fleet_e2e::{
    ContainerRow, Operator, PodmanSandbox, TestFleet, WAIT, eventually, free_port, http_deployment,
    http_get,
    store::{self, Snapshot},
};

/// The sandbox's containers by name: (id, started at).
fn containers(podman: &PodmanSandbox) -> Result<BTreeMap<String, (String, i64)>> {
    Ok(podman
        .containers()?
        .into_iter()
        .map(
            |ContainerRow {
                 id,
                 names,
                 started_at,
                 ..
             }| (names.join(","), (id, started_at)),
        )
        .collect())
}

fn flags(device: &Device) -> Vec<HealthFlag> {
    device
        .status
        .as_ref()
        .and_then(|s| s.heartbeat.as_ref())
        .map(|h| h.health_flags.clone())
        .unwrap_or_default()
}

fn held(device: &Device) -> Vec<String> {
    flags(device)
        .into_iter()
        .find_map(|f| match f {
            HealthFlag::HeldDeployments { deployments } => Some(deployments),
            _ => None,
        })
        .unwrap_or_default()
}

fn holding(device: &Device) -> bool {
    flags(device)
        .iter()
        .any(|f| matches!(f, HealthFlag::StoreChanged { .. }))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wiped_store_leaves_the_workloads_running_and_the_device_is_adopted() -> Result<()> {
    let mut fleet = TestFleet::start().await?;
    let (podman, agent) = fleet.device("pi-01", &[("role", "web")]).await?;
    let port = free_port();
    fleet
        .operator
        .apply(&http_deployment("hello", "web", port, "before the loss"))?;
    fleet
        .operator
        .wait_phase("hello", 1, RolloutPhase::Running)
        .await?;
    let before = containers(&podman)?;
    ensure!(before.len() == 1, "one container: {before:?}");

    // The store is lost: operator and NATS stop, JetStream's folder goes, both start afresh
    // (the fleet's identity and the device's credentials are files, and stay).
    fleet.operator.proc.stop();
    fleet.nats.stop();
    std::fs::remove_dir_all(fleet.path().join("nats-store")).context("wiping the store")?;
    fleet.nats.restart().await?;
    fleet.operator = Operator::start(fleet.path(), &fleet.nats, &[]).await?;
    let client = fleet.operator.client();

    // The device reconnects, finds another store, and holds: it is seen, unregistered.
    let seen = eventually(
        "pi-01 to show as Unregistered and holding",
        WAIT,
        || async {
            let devices = client.devices()?;
            Ok(devices.into_iter().find(|d| {
                d.metadata.name == "pi-01"
                    && d.status.as_ref().is_some_and(|s| s.unregistered)
                    && holding(d)
            }))
        },
    )
    .await?;
    assert!(seen.metadata.labels.is_empty());
    assert_eq!(containers(&podman)?, before, "the containers were touched");
    let (_, body) = http_get(&format!("http://127.0.0.1:{port}/"))?;
    assert_eq!(body.trim(), "before the loss");
    let (_, metrics) = http_get(&format!("{}/metrics", fleet.operator.url))?;
    assert!(
        metrics.contains("fleet_operator_unregistered_devices 1"),
        "{metrics}"
    );
    let (_, page) = http_get(&format!("{}/", fleet.operator.url))?;
    assert!(page.contains("Unregistered (holding)"), "{page}");

    // An adoption that cannot be is refused, naming why, and changes nothing.
    let quiet = |s: Snapshot| {
        s.without(
            |bucket, _| bucket == REPORTED_BUCKET,
            &["KV_fleet-reported", "KV_fleet-lease"],
        )
    };
    let unchanged_before = quiet(store::snapshot(&fleet).await?);
    let bad_label = client
        .adopt(
            "pi-01",
            &fleet_contracts::api::AdoptRequest {
                by: "e2e".into(),
                labels: [("Bad Key!".to_owned(), "x".to_owned())].into(),
            },
        )
        .unwrap_err()
        .to_string();
    assert!(bad_label.contains("metadata.labels"), "{bad_label}");
    let never_seen = client
        .adopt("pi-99", &fleet_contracts::api::AdoptRequest::default())
        .unwrap_err()
        .to_string();
    assert!(never_seen.contains("has not reported"), "{never_seen}");
    let nothing_held = client.release("pi-01", "e2e").unwrap_err().to_string();
    assert!(
        nothing_held.contains("no held deployments"),
        "{nothing_held}"
    );
    store::unchanged(&unchanged_before, &quiet(store::snapshot(&fleet).await?))?;

    // Adopted: a record with labels, its identity back; what runs stays, held.
    let adopted = client.adopt(
        "pi-01",
        &fleet_contracts::api::AdoptRequest {
            by: "e2e".into(),
            labels: [("role".to_owned(), "web".to_owned())].into(),
        },
    )?;
    eprintln!("adopt: {}", adopted.message);
    eventually(
        "pi-01 to take the new store, holding hello",
        WAIT,
        || async {
            let d = client.device("pi-01")?;
            let registered = d.status.as_ref().is_some_and(|s| !s.unregistered);
            Ok((registered && !holding(&d) && held(&d) == ["hello"]).then_some(()))
        },
    )
    .await?;
    assert_eq!(
        containers(&podman)?,
        before,
        "adoption touched the containers"
    );
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let identities = js.get_key_value(ENROLLMENT_BUCKET).await?;
    ensure!(
        identities.get("device.pi-01").await?.is_some(),
        "the identity record was not restored"
    );

    // A change applied afterwards converges, and manages the held deployment again.
    fleet
        .operator
        .apply(&http_deployment("hello", "web", port, "after adoption"))?;
    fleet
        .operator
        .wait_phase("hello", 1, RolloutPhase::Running)
        .await?;
    eventually("the new greeting", WAIT, || async {
        let (_, body) = http_get(&format!("http://127.0.0.1:{port}/"))?;
        Ok((body.trim() == "after adoption").then_some(()))
    })
    .await?;
    eventually("hello no longer held", WAIT, || async {
        Ok(held(&client.device("pi-01")?).is_empty().then_some(()))
    })
    .await?;
    drop(agent);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_from_an_older_backup_restarts_nothing_and_holds_what_came_after() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (podman, _agent) = fleet.device("pi-01", &[("role", "web")]).await?;
    let client = fleet.operator.client();
    fleet
        .operator
        .apply(&http_deployment("kept", "web", free_port(), "kept"))?;
    fleet
        .operator
        .wait_phase("kept", 1, RolloutPhase::Running)
        .await?;
    let backup = client.backup()?;
    ensure!(
        backup.buckets[RESOURCES_BUCKET].contains_key("deployment.kept"),
        "{backup:?}"
    );
    fleet
        .operator
        .apply(&http_deployment("later", "web", free_port(), "later"))?;
    fleet
        .operator
        .wait_phase("later", 1, RolloutPhase::Running)
        .await?;
    let before = containers(&podman)?;
    ensure!(before.len() == 2, "two containers: {before:?}");

    // A backup with a bad resource is refused whole, naming it; nothing changes.
    let quiet = |s: Snapshot| {
        s.without(
            |bucket, _| bucket == REPORTED_BUCKET,
            &["KV_fleet-reported", "KV_fleet-lease"],
        )
    };
    let unchanged_before = quiet(store::snapshot(&fleet).await?);
    let mut bad = backup.clone();
    bad.buckets
        .get_mut(RESOURCES_BUCKET)
        .unwrap()
        .get_mut("deployment.kept")
        .unwrap()["spec"]["template"]["containers"][0]["image"] = "--privileged".into();
    let refused = client.restore(&bad).unwrap_err().to_string();
    assert!(
        refused.contains("buckets.fleet-resources.deployment.kept") && refused.contains("image"),
        "{refused}"
    );
    store::unchanged(&unchanged_before, &quiet(store::snapshot(&fleet).await?))?;

    let restored = client.restore(&backup)?;
    assert_eq!(restored.store.fleet_id, backup.store.fleet_id);
    assert!(restored.store.epoch > backup.store.epoch, "{restored:?}");
    eventually(
        "pi-01 to hold `later` under the restored store",
        WAIT,
        || async { Ok((held(&client.device("pi-01")?) == ["later"]).then_some(())) },
    )
    .await?;
    let names: Vec<_> = client
        .deployments()?
        .into_iter()
        .map(|d| d.metadata.name)
        .collect();
    assert_eq!(names, ["kept"]);
    fleet
        .operator
        .wait_phase("kept", 1, RolloutPhase::Running)
        .await?;
    assert_eq!(
        containers(&podman)?,
        before,
        "a restore restarted or removed a container"
    );

    // The admin decides: released, `later` goes; `kept` stays as it was.
    let released = client.release("pi-01", "e2e")?;
    assert!(released.message.contains("later"), "{}", released.message);
    let kept = eventually("`later` removed", WAIT, || async {
        let now = containers(&podman)?;
        Ok((now.len() == 1).then_some(now))
    })
    .await?;
    let kept_before: BTreeMap<_, _> = before
        .into_iter()
        .filter(|(name, _)| kept.contains_key(name))
        .collect();
    assert_eq!(kept, kept_before, "`kept` was touched");

    // A real deletion in the unchanged (restored) store still removes the container.
    client.delete("deployments", "kept")?;
    eventually("`kept` removed after its deletion", WAIT, || async {
        Ok(containers(&podman)?.is_empty().then_some(()))
    })
    .await?;
    Ok(())
}
