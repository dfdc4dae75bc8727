//! Init containers against real podman (plan Ch6): ordered, run to completion before every
//! fresh main container, sharing the Deployment's volumes; a failure names the container, its
//! exit code and the tail of its output.

use anyhow::{Result, bail};
use fleet_contracts::{resource::RolloutPhase, state::Phase};
use fleet_e2e::{PodmanSandbox, TestFleet, WAIT, eventually};

/// A Deployment whose main container only stays up if `/data/init` exists, after `inits`.
fn deployment(inits: serde_json::Value, marker: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": "app"},
        "spec": {
            "selector": {"matchLabels": {"role": "init"}},
            "template": {
                "initContainers": inits,
                "containers": [{
                    "name": "app",
                    "image": "localhost/fleet-busybox:1",
                    "command": ["/bin/sh", "-c", "test -f /data/init || exit 9; trap 'exit 0' TERM; sleep 3600 & wait"],
                    "env": [{"name": "MARKER", "value": marker}],
                    "volumes": [{"name": "data", "mountPath": "/data"}]
                }]
            }
        }
    })
}

fn init(name: &str, script: &str) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "image": "localhost/fleet-busybox:1",
        "command": ["/bin/sh", "-c", script],
        "volumes": [{"name": "data", "mountPath": "/data"}],
        "timeoutSeconds": 30
    })
}

async fn file_in_main(sandbox: &PodmanSandbox, path: &str, expected: &str) -> Result<()> {
    eventually(&format!("{path} to read {expected:?}"), WAIT, || async {
        let got = sandbox.podman(&["exec", "fleet-app", "cat", path])?;
        if got == expected {
            Ok(Some(()))
        } else {
            bail!("{got:?}")
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn init_containers_run_in_order_before_every_fresh_main_container() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (sandbox, _agent) = fleet.device("pi-01", &[("role", "init")]).await?;
    let inits = serde_json::json!([
        init(
            "one",
            "mkdir -p /data && touch /data/init && echo one >> /data/order"
        ),
        init("two", "echo two >> /data/order"),
    ]);
    fleet.operator.apply(&deployment(inits.clone(), "v1"))?;
    fleet
        .operator
        .wait_phase("app", 1, RolloutPhase::Running)
        .await?;
    file_in_main(&sandbox, "/data/order", "one\ntwo\n").await?;
    // No init container is left behind.
    let names: Vec<String> = sandbox
        .containers()?
        .into_iter()
        .flat_map(|c| c.names)
        .collect();
    assert_eq!(names, ["fleet-app"]);

    // A new main container (an upgrade) runs them again, on the same volume: they must be
    // idempotent, and this one (append) visibly is not.
    fleet.operator.apply(&deployment(inits, "v2"))?;
    fleet
        .operator
        .wait_phase("app", 2, RolloutPhase::Running)
        .await?;
    file_in_main(&sandbox, "/data/order", "one\ntwo\none\ntwo\n").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_init_container_fails_the_deployment_with_its_name_code_and_output() -> Result<()>
{
    let fleet = TestFleet::start().await?;
    let (sandbox, _agent) = fleet.device("pi-01", &[("role", "init")]).await?;
    let inits = serde_json::json!([
        init("prepare", "mkdir -p /data && touch /data/init"),
        init("migrate", "echo 'schema v7 not found' >&2; exit 3"),
    ]);
    fleet.operator.apply(&deployment(inits, "v1"))?;
    let d = fleet
        .operator
        .wait_phase("app", 1, RolloutPhase::Failed)
        .await?;
    let report = d.status.unwrap().devices[0].reported.clone().unwrap();
    assert_eq!(report.phase, Phase::Failed);
    assert_eq!(
        report.message,
        "init container \"migrate\" exited with code 3: schema v7 not found"
    );
    // The main container was never created.
    assert!(
        sandbox.containers()?.is_empty(),
        "{:?}",
        sandbox.containers()?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_init_container_that_overruns_its_timeout_fails_the_deployment() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (sandbox, _agent) = fleet.device("pi-01", &[("role", "init")]).await?;
    let mut slow = init("wait-for-db", "echo waiting; sleep 600");
    slow["timeoutSeconds"] = 5.into();
    fleet
        .operator
        .apply(&deployment(serde_json::json!([slow]), "v1"))?;
    let d = fleet
        .operator
        .wait_phase("app", 1, RolloutPhase::Failed)
        .await?;
    let report = d.status.unwrap().devices[0].reported.clone().unwrap();
    assert_eq!(
        report.message,
        "init container \"wait-for-db\" did not finish within 5s: waiting"
    );
    // Nothing is left running.
    eventually("the overrun init container to be removed", WAIT, || async {
        Ok(sandbox.containers()?.is_empty().then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_warns_about_init_containers_that_are_not_idempotent() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let inits = serde_json::json!([init("setup", "mkdir /data && echo 1 > /data/state")]);
    let result = fleet.operator.apply(&deployment(inits, "v1"))?;
    let warnings = result.warnings.join("\n");
    assert!(
        warnings.contains("init container \"setup\": `mkdir` without -p"),
        "{warnings}"
    );
    assert!(
        warnings.contains("init container \"setup\": `>` rewrites the file"),
        "{warnings}"
    );
    // Advice, not a refusal: it was applied.
    assert_eq!(
        fleet
            .operator
            .client()
            .deployment("app")?
            .metadata
            .generation,
        1
    );
    Ok(())
}
