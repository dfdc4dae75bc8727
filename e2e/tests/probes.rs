//! Readiness probes against real containers: a Deployment is Ready on a device only when all
//! its probes pass, and a failing probe is named, with why, in the device's status: `Starting`
//! while a new container has not passed them yet, `Degraded` when a ready one fails one later.

use anyhow::{Result, bail};
use fleet_contracts::{api::ExecCommand, resource::RolloutPhase, rpc::ExecReply, state::Phase};
use fleet_e2e::{TestFleet, WAIT, eventually, free_port, http_deployment};

fn with_probes(port: u16, greeting: &str, probes: serde_json::Value) -> serde_json::Value {
    let mut doc = http_deployment("web", "probe", port, greeting);
    doc["spec"]["template"]["containers"][0]["probes"] = probes;
    doc
}

/// Waits until the device reports `phase` for generation `generation` with a message
/// containing `needle`, and returns the message.
async fn device_phase(
    fleet: &TestFleet,
    generation: u64,
    phase: Phase,
    needle: &str,
) -> Result<String> {
    let client = fleet.operator.client();
    eventually(
        &format!("web gen {generation} {phase} ({needle})"),
        WAIT,
        || async {
            let d = client.deployment("web")?;
            let status = d.status.unwrap_or_default();
            let Some(r) = status.devices.first().and_then(|x| x.reported.clone()) else {
                return Ok(None);
            };
            if r.observed_generation == generation && r.phase == phase && r.message.contains(needle)
            {
                Ok(Some(r.message))
            } else {
                bail!("{} {:?} {:?}", r.observed_generation, r.phase, r.message)
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_http_probe_holds_ready_and_is_named_until_a_fix() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (_sandbox, _agent) = fleet.device("pi-01", &[("role", "probe")]).await?;
    let port = free_port();
    let probe = |path: &str| serde_json::json!([{"name": "http", "httpGet": {"port": 8080, "path": path}, "periodSeconds": 1}]);
    fleet
        .operator
        .apply(&with_probes(port, "v2", probe("/healthz")))?;
    let message = device_phase(
        &fleet,
        1,
        Phase::Starting,
        "probe \"http\" (httpGet) failing",
    )
    .await?;
    assert!(message.contains("GET /healthz answered 404"), "{message}");
    // Not Ready anywhere, so the Deployment is not Running either.
    let status = fleet
        .operator
        .client()
        .deployment("web")?
        .status
        .unwrap_or_default();
    assert_eq!(
        (status.phase, status.running_devices),
        (RolloutPhase::Progressing, 0)
    );

    // Roll forward with a probe that passes.
    fleet.operator.apply(&with_probes(port, "v3", probe("/")))?;
    fleet
        .operator
        .wait_phase("web", 2, RolloutPhase::Running)
        .await?;
    device_phase(&fleet, 2, Phase::Ready, "").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tcp_probe_on_a_port_nothing_listens_on_is_named_with_the_reason() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (_sandbox, _agent) = fleet.device("pi-01", &[("role", "probe")]).await?;
    let mut doc = with_probes(
        free_port(),
        "x",
        serde_json::json!([
            {"name": "running", "running": {}},
            {"name": "admin-port", "tcp": {"port": 9090}, "periodSeconds": 1}
        ]),
    );
    let admin = free_port();
    doc["spec"]["template"]["containers"][0]["ports"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"containerPort": 9090, "hostPort": admin}));
    fleet.operator.apply(&doc)?;
    let message = device_phase(
        &fleet,
        1,
        Phase::Starting,
        "probe \"admin-port\" (tcp) failing",
    )
    .await?;
    assert!(message.contains(&format!("port {admin}")), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exec_probe_of_a_missing_binary_fails_clearly_and_a_working_one_passes() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (_sandbox, _agent) = fleet.device("pi-01", &[("role", "probe")]).await?;
    let port = free_port();
    let probes = serde_json::json!([{"name": "check", "exec": {"command": ["/no/such/binary"]}, "periodSeconds": 1}]);
    fleet.operator.apply(&with_probes(port, "x", probes))?;
    let message =
        device_phase(&fleet, 1, Phase::Starting, "probe \"check\" (exec) failing").await?;
    assert!(
        message.contains("/no/such/binary\" exited with code 127"),
        "{message}"
    );

    let probes = serde_json::json!([{"name": "check", "exec": {"command": ["test", "-f", "/www/index.html"]}, "periodSeconds": 1}]);
    fleet.operator.apply(&with_probes(port, "x", probes))?;
    fleet
        .operator
        .wait_phase("web", 2, RolloutPhase::Running)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ready_container_whose_probe_starts_failing_turns_degraded_with_the_probe_named()
-> Result<()> {
    let fleet = TestFleet::start().await?;
    let (_sandbox, _agent) = fleet.device("pi-01", &[("role", "probe")]).await?;
    let probes = serde_json::json!([{"name": "page", "exec": {"command": ["test", "-f", "/www/index.html"]},
                                     "periodSeconds": 1, "failureThreshold": 2}]);
    fleet
        .operator
        .apply(&with_probes(free_port(), "x", probes))?;
    device_phase(&fleet, 1, Phase::Ready, "").await?;
    // The page goes away under the running container: after two failed rounds it is no
    // longer ready, and the status says it was ready before (Degraded, not Starting).
    let rm = ExecCommand {
        device: "pi-01".into(),
        command: vec!["rm".into(), "/www/index.html".into()],
        timeout_secs: 10,
        by: "probe-test".into(),
    };
    let reply = fleet.operator.client().exec("web", &rm)?;
    assert!(
        matches!(reply, ExecReply::Done { exit_code: 0, .. }),
        "{reply:?}"
    );
    let message = device_phase(&fleet, 1, Phase::Degraded, "probe \"page\" (exec) failing").await?;
    assert!(message.contains("exited with code 1"), "{message}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_must_name_a_published_port() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let doc = with_probes(
        free_port(),
        "x",
        serde_json::json!([{"name": "http", "httpGet": {"port": 9999}}, {"name": "both", "tcp": {"port": 8080}, "running": {}}]),
    );
    let err = fleet
        .operator
        .client()
        .apply(&doc)
        .expect_err("accepted a probe of an unpublished port");
    let fleetctl::CtlError::Api { fields, .. } = err else {
        bail!("not an API error: {err}")
    };
    assert_eq!(
        fields,
        [
            "spec.template.containers[0].probes[0].httpGet.port: 9999 is not a containerPort in ports; the agent probes the published port",
            "spec.template.containers[0].probes[1]: must set exactly one of httpGet, tcp, exec, running",
        ]
    );
    Ok(())
}
