//! The local fleet end to end: real nats-server, real fleet-operator and fleet-agent processes,
//! real podman (each agent on its own storage). One test per behaviour of the local fleet.
#![allow(clippy::disallowed_methods)] // A test times what it watches: it reads the clock.

use anyhow::{Result, bail};
use fleet_contracts::{
    names,
    resource::RolloutPhase,
    state::{Health, Heartbeat, Phase, ReportedDeployment},
};
use fleet_e2e::{
    ContainerRow, PodmanSandbox, TestFleet, WAIT, eventually, free_port, http_deployment, http_get,
};

/// Waits until the sandbox holds exactly one container for `deployment`, running, and returns it.
async fn running_container(sandbox: &PodmanSandbox, deployment: &str) -> Result<ContainerRow> {
    eventually(
        &format!("one running container for {deployment}"),
        WAIT,
        || async {
            let rows: Vec<ContainerRow> = sandbox
                .containers()?
                .into_iter()
                .filter(|c| {
                    c.labels
                        .as_ref()
                        .and_then(|l| l.get("fleet.deployment"))
                        .map(String::as_str)
                        == Some(deployment)
                })
                .collect();
            match rows.as_slice() {
                [one] if one.state == "running" => Ok(Some(one.clone())),
                _ => bail!("containers: {rows:?}"),
            }
        },
    )
    .await
}

async fn http_says(port: u16, expected: &str) -> Result<()> {
    let url = format!("http://127.0.0.1:{port}/");
    eventually(&format!("{url} to say {expected:?}"), WAIT, || {
        let url = url.clone();
        async move {
            let (status, body) = http_get(&url)?;
            if status == 200 && body.trim() == expected {
                Ok(Some(()))
            } else {
                bail!("{status} {body:?}")
            }
        }
    })
    .await
}

async fn kv_get(fleet: &TestFleet, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let kv = js.get_key_value(bucket).await?;
    Ok(kv.get(key).await?.map(|b| b.to_vec()))
}

async fn heartbeat(fleet: &TestFleet, device: &str) -> Result<Option<Heartbeat>> {
    Ok(
        match kv_get(fleet, names::REPORTED_BUCKET, &names::info_key(device)).await? {
            Some(bytes) => Some(serde_json::from_slice(&bytes)?),
            None => None,
        },
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test(flavor = "multi_thread")]
async fn apply_runs_the_container_and_its_port_answers() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (sandbox, _agent) = fleet.device("pi-01", &[("role", "web")]).await?;
    let port = free_port();
    let applied = fleet
        .operator
        .apply(&http_deployment("hello", "web", port, "hi there"))?;
    assert_eq!(applied.generation, 1);
    let d = fleet
        .operator
        .wait_phase("hello", 1, RolloutPhase::Running)
        .await?;
    let status = d.status.unwrap();
    assert_eq!((status.running_devices, status.desired_devices), (1, 1));
    let container = running_container(&sandbox, "hello").await?;
    assert_eq!(container.names, ["fleet-hello"]);
    let labels = container.labels.unwrap();
    assert_eq!(labels["fleet.device"], "pi-01");
    assert_eq!(labels["fleet.generation"], "1");
    let reported = status.devices[0].reported.clone().unwrap();
    assert_eq!(
        reported.container_id.as_deref(),
        Some(container.id.as_str())
    );
    http_says(port, "hi there").await?;

    // The status page and the metrics show the same.
    let (code, page) = http_get(&format!("{}/", fleet.operator.url))?;
    assert_eq!(code, 200);
    assert!(page.contains("id=state>converged</div>"), "{page}");
    assert!(
        page.contains("<td>hello</td><td>1</td><td class=Running>Running</td><td>1/1</td>"),
        "{page}"
    );
    let (_, metrics) = http_get(&format!("{}/metrics", fleet.operator.url))?;
    assert!(
        metrics.contains(
            "fleet_operator_deployment_devices{deployment=\"hello\",state=\"running\"} 1"
        ),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn changing_env_or_image_replaces_the_container_and_delete_removes_everything() -> Result<()>
{
    let fleet = TestFleet::start().await?;
    let (sandbox, _agent) = fleet.device("pi-01", &[("role", "web")]).await?;
    let port = free_port();
    fleet
        .operator
        .apply(&http_deployment("hello", "web", port, "v1"))?;
    fleet
        .operator
        .wait_phase("hello", 1, RolloutPhase::Running)
        .await?;
    let v1 = running_container(&sandbox, "hello").await?;
    http_says(port, "v1").await?;

    // New env: a new generation and a new container.
    let applied = fleet
        .operator
        .apply(&http_deployment("hello", "web", port, "v2"))?;
    assert_eq!(applied.generation, 2);
    fleet
        .operator
        .wait_phase("hello", 2, RolloutPhase::Running)
        .await?;
    let v2 = running_container(&sandbox, "hello").await?;
    assert_ne!(v1.id, v2.id);
    http_says(port, "v2").await?;

    // New image (plain busybox serving its own root with httpd).
    let mut doc = http_deployment("hello", "web", port, "v3");
    doc["spec"]["template"]["containers"][0]["image"] = "localhost/fleet-busybox:1".into();
    doc["spec"]["template"]["containers"][0]["command"] = serde_json::json!([
        "/bin/sh",
        "-c",
        "echo v3 > /www/index.html; trap 'exit 0' TERM; httpd -f -p 8080 -h /www & wait"
    ]);
    fleet.operator.apply(&doc)?;
    fleet
        .operator
        .wait_phase("hello", 3, RolloutPhase::Running)
        .await?;
    let v3 = running_container(&sandbox, "hello").await?;
    assert_ne!(v2.id, v3.id);
    http_says(port, "v3").await?;

    // Delete: container, desired key and reported key all go.
    fleet.operator.client().delete("deployments", "hello")?;
    eventually(
        "the container, desired and reported keys to be gone",
        WAIT,
        || async {
            let containers = sandbox.containers()?;
            let desired = kv_get(&fleet, names::DESIRED_BUCKET, "pi-01.hello").await?;
            let reported = kv_get(&fleet, names::REPORTED_BUCKET, "pi-01.hello").await?;
            if containers.is_empty() && desired.is_none() && reported.is_none() {
                Ok(Some(()))
            } else {
                bail!(
                    "containers {containers:?}, desired {}, reported {}",
                    desired.is_some(),
                    reported.is_some()
                )
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_agent_adopts_its_containers_without_restarting_them() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (sandbox, mut agent) = fleet.device("pi-01", &[("role", "web")]).await?;
    let port = free_port();
    fleet
        .operator
        .apply(&http_deployment("hello", "web", port, "still here"))?;
    fleet
        .operator
        .wait_phase("hello", 1, RolloutPhase::Running)
        .await?;
    let before = running_container(&sandbox, "hello").await?;

    agent.kill(); // SIGKILL: no clean shutdown.
    let restarted_at = now_ms();
    agent.restart()?;
    // Wait for the new agent to have finished a whole reconcile pass.
    eventually("a reconcile pass of the restarted agent", WAIT, || async {
        Ok(heartbeat(&fleet, "pi-01")
            .await?
            .filter(|hb| hb.last_reconcile_ms.is_some_and(|t| t > restarted_at))
            .map(drop))
    })
    .await?;
    let after = running_container(&sandbox, "hello").await?;
    assert_eq!(before.id, after.id, "the container was replaced");
    assert_eq!(
        before.started_at, after.started_at,
        "the container was restarted"
    );
    assert_eq!(sandbox.containers()?.len(), 1, "a duplicate appeared");
    http_says(port, "still here").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_a_power_cut_left_unstartable_is_made_again_and_keeps_its_volume() -> Result<()>
{
    let fleet = TestFleet::start().await?;
    let (sandbox, mut agent) = fleet.device("pi-01", &[("role", "web")]).await?;
    let port = free_port();
    let mut doc = http_deployment("hello", "web", port, "made again");
    doc["spec"]["template"]["containers"][0]["volumes"] =
        serde_json::json!([{"name": "data", "mountPath": "/data"}]);
    fleet.operator.apply(&doc)?;
    fleet
        .operator
        .wait_phase("hello", 1, RolloutPhase::Running)
        .await?;
    let before = running_container(&sandbox, "hello").await?;
    sandbox.podman(&["exec", &before.id, "sh", "-c", "echo kept > /data/file"])?;

    // What a power cut soon after podman made a container leaves: podman writes the layer's
    // files without fsync, and one comes back empty (seen on the QEMU crash test's device).
    agent.kill();
    let upper = sandbox.podman(&[
        "inspect",
        &before.id,
        "--format",
        "{{.GraphDriver.Data.UpperDir}}",
    ])?;
    sandbox.podman(&["stop", "--time", "0", &before.id])?;
    let layer = std::path::Path::new(upper.trim())
        .parent()
        .ok_or_else(|| anyhow::anyhow!("no layer folder above {upper:?}"))?;
    std::fs::write(layer.join("lower"), "")?;
    let refused = sandbox.podman(&["start", &before.id]);
    assert!(
        refused.is_err(),
        "podman started the damaged container: {refused:?}"
    );

    agent.restart()?;
    let after = running_container(&sandbox, "hello").await?;
    assert_ne!(before.id, after.id, "the damaged container is still there");
    http_says(port, "made again").await?;
    let kept = sandbox.podman(&["exec", &after.id, "cat", "/data/file"])?;
    assert_eq!(
        kept.trim(),
        "kept",
        "the volume lost what the workload wrote"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn with_nats_down_a_restarted_agent_brings_workloads_back_from_its_cache() -> Result<()> {
    let mut fleet = TestFleet::start().await?;
    let (sandbox, mut agent) = fleet.device("pi-01", &[("role", "web")]).await?;
    let port = free_port();
    fleet
        .operator
        .apply(&http_deployment("hello", "web", port, "cached"))?;
    fleet
        .operator
        .wait_phase("hello", 1, RolloutPhase::Running)
        .await?;
    running_container(&sandbox, "hello").await?;

    // A reboot with no network: the agent stops, the containers are gone, NATS is unreachable.
    agent.kill();
    fleet.nats.stop();
    sandbox.podman(&["rm", "--all", "--force", "--time", "0"])?;
    assert!(sandbox.containers()?.is_empty());
    agent.restart()?;
    running_container(&sandbox, "hello").await?;
    http_says(port, "cached").await?;

    // NATS comes back: the agent reconnects and reports again.
    let back_at = now_ms();
    fleet.nats.restart().await?;
    eventually("a heartbeat after NATS came back", WAIT, || async {
        Ok(heartbeat(&fleet, "pi-01")
            .await
            .ok()
            .flatten()
            .filter(|hb| hb.sent_at_ms > back_at)
            .map(drop))
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_nats_restart_the_agent_reconnects_and_converges_changes() -> Result<()> {
    let mut fleet = TestFleet::start().await?;
    let (sandbox, _agent) = fleet.device("pi-01", &[("role", "web")]).await?;
    let port = free_port();
    fleet
        .operator
        .apply(&http_deployment("hello", "web", port, "before"))?;
    fleet
        .operator
        .wait_phase("hello", 1, RolloutPhase::Running)
        .await?;

    fleet.nats.stop();
    // The workload keeps running while NATS is away.
    http_says(port, "before").await?;
    fleet.nats.restart().await?;
    // Changed as soon as NATS is back, while the agent may still be reconnecting.
    eventually("the operator to accept the change", WAIT, || async {
        Ok(fleet
            .operator
            .apply(&http_deployment("hello", "web", port, "after"))
            .ok())
    })
    .await?;
    fleet
        .operator
        .wait_phase("hello", 2, RolloutPhase::Running)
        .await?;
    running_container(&sandbox, "hello").await?;
    http_says(port, "after").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_device_goes_stale_then_offline() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (_sandbox, mut agent) = fleet.device("pi-01", &[("role", "web")]).await?;
    let client = fleet.operator.client();
    let health = |wanted: Health| {
        let client = &client;
        async move {
            eventually(&format!("pi-01 to be {wanted}"), WAIT, || async {
                let d = client.device("pi-01")?;
                let got = d.status.unwrap_or_default().health;
                if got == wanted {
                    Ok(Some(()))
                } else {
                    bail!("health is {got}")
                }
            })
            .await
        }
    };
    health(Health::Healthy).await?;
    agent.kill();
    health(Health::Stale).await?;
    health(Health::Offline).await?;
    // And it recovers when the agent comes back.
    agent.restart()?;
    health(Health::Healthy).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_image_fails_with_podmans_reason_and_disturbs_nothing_else() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (sandbox, _agent) = fleet.device("pi-01", &[("role", "web")]).await?;
    let port = free_port();
    fleet
        .operator
        .apply(&http_deployment("good", "web", port, "undisturbed"))?;
    fleet
        .operator
        .wait_phase("good", 1, RolloutPhase::Running)
        .await?;
    let good = running_container(&sandbox, "good").await?;

    let mut bad = http_deployment("bad", "web", free_port(), "x");
    bad["spec"]["template"]["containers"][0]["image"] = "localhost/does-not-exist:1".into();
    fleet.operator.apply(&bad)?;
    let d = fleet
        .operator
        .wait_phase("bad", 1, RolloutPhase::Failed)
        .await?;
    let report: ReportedDeployment = d.status.unwrap().devices[0].reported.clone().unwrap();
    assert_eq!(report.phase, Phase::Failed);
    assert!(
        report.message.starts_with("podman create failed: Error: ")
            && report.message.contains("localhost/does-not-exist"),
        "{}",
        report.message
    );
    // The healthy deployment was not touched.
    assert_eq!(running_container(&sandbox, "good").await?.id, good.id);
    http_says(port, "undisturbed").await
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_resources_are_refused_with_the_field_and_nothing_is_stored() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let client = fleet.operator.client();
    let check = |doc: serde_json::Value, expected: &[&str]| {
        let err = client
            .apply(&doc)
            .expect_err("an invalid resource was accepted");
        let fleetctl::CtlError::Api { status, fields, .. } = err else {
            panic!("not an API error: {err}")
        };
        assert_eq!(status, 422);
        assert_eq!(fields, expected);
    };
    let mut doc = http_deployment("web", "web", 8080, "x");
    doc["spec"]["template"]["containers"][0]["image"] = "".into();
    check(
        doc,
        &["spec.template.containers[0].image: must not be empty"],
    );
    let mut doc = http_deployment("web", "web", 8080, "x");
    doc["spec"]["template"]["containers"][0]["imagePullPolicy"] = "Always".into();
    check(
        doc,
        &["spec.template.containers[0].imagePullPolicy: unknown field"],
    );
    let mut doc = http_deployment("web", "web", 8080, "x");
    doc["spec"]["template"]["containers"][0]["ports"] =
        serde_json::json!([{"containerPort": 8080}, {"containerPort": 9090, "hostPort": 8080}]);
    check(
        doc,
        &[
            "spec.template.containers[0].ports[1].hostPort: duplicate host port 8080/tcp (also in ports[0])",
        ],
    );
    assert!(client.deployments()?.is_empty());
    assert_eq!(
        kv_get(&fleet, names::RESOURCES_BUCKET, "deployment.web").await?,
        None
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn fleetctl_reports_malformed_yaml_with_the_line_and_applies_nothing() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let file = fleet.path().join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: fleet.dev/v1\nkind: Deployment\nmetadata:\n  name: [web\n",
    )?;
    #[allow(clippy::disallowed_methods)] // The test runs the real CLI.
    let out = std::process::Command::new(fleet_e2e::binary("fleetctl"))
        .args(["--server", &fleet.operator.url, "apply", "-f"])
        .arg(&file)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("bad.yaml: not valid YAML") && stderr.contains("line"),
        "{stderr}"
    );
    assert!(fleet.operator.client().deployments()?.is_empty());
    Ok(())
}
