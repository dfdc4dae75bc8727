//! Blacklist and un-blacklist against a real nats-server in JWT mode and a real agent: the
//! device is cut off at once and stays out, its workloads keep running, and lifting the
//! blacklist lets it back in to converge what changed meanwhile.
#![allow(clippy::disallowed_methods)] // A test times what it watches: it reads the clock.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use fleet_agent::identity::{self, IdentityError};
use fleet_contracts::resource::RolloutPhase;
use fleet_e2e::{TestFleet, WAIT, eventually};
use nkeys::KeyPair;
use tokio::sync::mpsc;

fn job(generation_marker: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": "job"},
        "spec": {
            "selector": {"matchLabels": {"role": "q"}},
            "template": {"containers": [{
                "name": "job",
                "image": "localhost/fleet-busybox:1",
                "command": ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 3600 & wait"],
                "env": [{"name": "MARKER", "value": generation_marker}]
            }]}
        }
    })
}

#[derive(Debug)]
enum Seen {
    Disconnected(Instant),
    ServerError(String),
}

#[tokio::test(flavor = "multi_thread")]
async fn blacklist_cuts_a_device_off_at_once_and_unblacklist_lets_it_back() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (sandbox, agent) = fleet.device("pi-01", &[("role", "q")]).await?;
    let api = fleet.operator.client();
    fleet.operator.apply(&job("one"))?;
    fleet
        .operator
        .wait_phase("job", 1, RolloutPhase::Running)
        .await?;
    let before = sandbox.containers()?;

    // Watch the cut from a connection holding the device's own credentials.
    let seed = std::fs::read_to_string(agent.state_dir.join("identity/device.nk"))?;
    let jwt = std::fs::read_to_string(agent.state_dir.join("identity/device.jwt"))?;
    let key = std::sync::Arc::new(KeyPair::from_seed(seed.trim())?);
    let connect = |tx: Option<mpsc::UnboundedSender<Seen>>| {
        let key = key.clone();
        async_nats::ConnectOptions::with_jwt(jwt.trim().to_owned(), move |nonce| {
            let key = key.clone();
            async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
        })
        .add_root_certificates(fleet.nats.ca())
        .require_tls(true)
        .custom_inbox_prefix("_INBOX.dev.pi-01")
        .max_reconnects(Some(0))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let seen = match event {
                    async_nats::Event::Disconnected => Seen::Disconnected(Instant::now()),
                    async_nats::Event::ServerError(e) => Seen::ServerError(e.to_string()),
                    _ => return,
                };
                if let Some(tx) = tx {
                    let _ = tx.send(seen);
                }
            }
        })
        .connect(fleet.nats.url())
    };
    let (tx, mut seen) = mpsc::unbounded_channel();
    let _observer = connect(Some(tx)).await?;

    let sent = Instant::now();
    let result = api.blacklist("pi-01", true, "tester", "reported stolen")?;
    let answered = sent.elapsed();
    assert!(result.blacklisted);
    assert!(
        result
            .message
            .contains("Its containers keep running (quarantine, not removal)"),
        "{}",
        result.message
    );

    let mut server_errors = Vec::new();
    let disconnected_at = tokio::time::timeout(WAIT, async {
        loop {
            match seen.recv().await {
                Some(Seen::Disconnected(at)) => return Ok(at),
                Some(Seen::ServerError(e)) => server_errors.push(e),
                None => bail!("observer closed"),
            }
        }
    })
    .await
    .context("the device's connection was not closed")??;
    eprintln!(
        "blacklist: API answered in {answered:?}; the device's connection closed {:?} after the command",
        disconnected_at.duration_since(sent)
    );
    assert!(
        server_errors.iter().any(|e| e.contains("Revoked")),
        "{server_errors:?}"
    );

    // It cannot come back with its JWT, nor enroll again.
    let err = connect(None)
        .await
        .err()
        .context("a blacklisted device reconnected")?;
    assert!(err.to_string().contains("authorization violation"), "{err}");
    let token = fleet.enrollment_token(&[])?;
    let err = identity::enroll(
        &fleet.nats.url(),
        &fleet.nats.ca(),
        "pi-01",
        &KeyPair::new_user(),
        &token,
    )
    .await
    .unwrap_err();
    // Refused without saying why (the operator's log says it): a requester learns nothing
    // about which devices exist or are blacklisted.
    assert!(
        matches!(&err, IdentityError::Refused(r) if r == fleet_operator::enroll::ENROLLMENT_REFUSED),
        "{err}"
    );

    // Quarantine, not removal: the workload runs on, untouched.
    assert_eq!(sandbox.containers()?, before);
    let status = api.device("pi-01")?.status.unwrap_or_default();
    let record = status.blacklist.context("no blacklist record")?;
    assert_eq!(
        (record.by.as_str(), record.reason.as_str()),
        ("tester", "reported stolen")
    );

    // A change made while it is out reaches it once it is let back in.
    fleet.operator.apply(&job("two"))?;
    let result = api.blacklist("pi-01", false, "tester", "found it")?;
    assert!(!result.blacklisted);
    fleet
        .operator
        .wait_phase("job", 2, RolloutPhase::Running)
        .await?;
    let status = api.device("pi-01")?.status.unwrap_or_default();
    assert!(status.blacklist.is_none());
    assert_eq!(
        status.last_unblacklist.map(|a| a.reason),
        Some("found it".to_owned())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blacklist_survives_a_nats_server_restart() -> Result<()> {
    let mut fleet = TestFleet::start().await?;
    let key = KeyPair::new_user();
    let token = fleet.enrollment_token(&[])?;
    let jwt = identity::enroll(&fleet.nats.url(), &fleet.nats.ca(), "pi-09", &key, &token).await?;
    fleet
        .operator
        .client()
        .blacklist("pi-09", true, "tester", "gone")?;
    fleet.nats.restart().await?;
    let key = std::sync::Arc::new(key);
    let attempt = || {
        let key = key.clone();
        async_nats::ConnectOptions::with_jwt(jwt.clone(), move |nonce| {
            let key = key.clone();
            async move { key.sign(&nonce).map_err(async_nats::AuthError::new) }
        })
        .add_root_certificates(fleet.nats.ca())
        .require_tls(true)
        .connect(fleet.nats.url())
    };
    let err = attempt()
        .await
        .err()
        .context("the blacklisted device connected after a restart")?;
    assert!(err.to_string().contains("authorization violation"), "{err}");
    // Control: lifting it works after the restart too (the operator reconnected by itself).
    eventually("the operator to lift the blacklist", WAIT, || async {
        Ok(fleet
            .operator
            .client()
            .blacklist("pi-09", false, "tester", "back")
            .ok()
            .map(drop))
    })
    .await?;
    attempt().await?;
    Ok(())
}
