//! The README's commands in their order, on one state folder: `scripts/local-fleet.sh`, then
//! the HA line (`FLEET_NATS_CLUSTER=3 FLEET_STANDBY=1`), then the single-node one again. The
//! HA fleet is a separate fleet with its own state (`$FLEET_STATE/ha`), so each run comes up
//! with the example running, and the single-node fleet comes back as it was.
//!
//! Runs the script as a user would (it bootstraps, builds and uses the host's podman), on
//! ports of its own; the example Deployment's port (18080) is the README's.
#![allow(clippy::disallowed_methods)] // A test times what it watches: it reads the clock.

use std::{process::Command, time::Duration};

use anyhow::{Result, bail, ensure};
use fleet_e2e::{Proc, eventually, http_get, workspace};

/// Runs the script until the fleet is up and the example answers, then stops it with Ctrl-C.
async fn run(state: &std::path::Path, log: &str, ha: bool) -> Result<String> {
    #[allow(clippy::disallowed_methods)] // The test runs the README's script.
    let mut cmd = Command::new("bash");
    cmd.arg(workspace().join("scripts/local-fleet.sh"))
        .env("FLEET_STATE", state)
        .env("FLEET_NATS_PORT", "24222")
        .env("FLEET_NATS_ROUTE_PORT", "26222")
        .env("FLEET_NATS_MONITOR_PORT", "28222")
        .env("FLEET_HTTP_PORT", "28080");
    if ha {
        cmd.env("FLEET_NATS_CLUSTER", "3").env("FLEET_STANDBY", "1");
    }
    let log = state.parent().unwrap().join(log);
    let mut script = Proc::spawn("local-fleet.sh", cmd, log.clone())?;
    // Until the script says the fleet is up, or ends (then its log says why).
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    let up = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("The local fleet is running") {
            break text;
        }
        if !script.is_running() || std::time::Instant::now() > deadline {
            bail!("the local fleet did not come up:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Not at once on a restart: `--wait` is satisfied by the device's report from the last
    // run while the agent makes the container again (the script removed it on Ctrl-C).
    let answer = eventually(
        "the example to answer",
        Duration::from_secs(120),
        || async {
            Ok(http_get("http://127.0.0.1:18080/")
                .ok()
                .map(|(_, body)| body))
        },
    )
    .await;
    let body = match answer {
        Ok(body) => body,
        Err(e) => {
            script.signal_and_wait("INT");
            let text = std::fs::read_to_string(&log)?;
            bail!("{e}:\n{text}");
        }
    };
    ensure!(body.contains("hello"), "the example answers {body:?}");
    script.signal_and_wait("INT");
    let text = std::fs::read_to_string(&log)?;
    ensure!(text.contains("stopped; state kept"), "{text}");
    Ok(up)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_commands_switch_between_one_server_and_ha_on_one_state_folder() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("fleet-local-switch-")
        .tempdir()?;
    let state = dir.path().join("state");
    let single = run(&state, "single.log", false).await?;
    ensure!(
        single.contains("creating a one-time enrollment token"),
        "{single}"
    );
    let ha = run(&state, "ha.log", true).await?;
    ensure!(
        ha.contains("the HA fleet is a separate fleet")
            && ha.contains("creating a one-time enrollment token"),
        "{ha}"
    );
    ensure!(state.join("ha/agent/identity/device.jwt").exists());
    // Back to the single server: the same fleet as before, its device enrolled already.
    let again = run(&state, "single-again.log", false).await?;
    ensure!(
        !again.contains("creating a one-time enrollment token"),
        "the single-node device enrolled again: {again}"
    );
    Ok(())
}
