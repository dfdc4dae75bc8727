//! A real `fleet-operator` process and its HTTP API.
#![allow(clippy::disallowed_methods)] // A harness starts processes and reads clocks.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Result, bail};
use fleet_contracts::resource::{Deployment, RolloutPhase};

use crate::*;

/// A plain HTTP GET: (status, body).
pub fn http_get(url: &str) -> Result<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut r = agent.get(url).call()?;
    Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
}

/// A running `fleet-operator`.
#[derive(Debug)]
pub struct Operator {
    pub url: String,
    /// The admin token the API requires.
    pub token: String,
    pub proc: Proc,
}

/// The lease time of test operators: a standby takes over this long after the leader's last
/// renewal.
pub const LEASE_MS: u64 = 1500;

impl Operator {
    /// Starts `fleet-operator` (instance `e2e`) with `extra` flags added to the test defaults.
    pub async fn start(dir: &Path, nats: &Nats, extra: &[&str]) -> Result<Operator> {
        Operator::start_named(dir, nats, "e2e", extra).await
    }

    /// Starts one more operator, named `instance` in the leadership lease, and waits until its
    /// view has converged (as leader or standby).
    pub async fn start_named(
        dir: &Path,
        nats: &Nats,
        instance: &str,
        extra: &[&str],
    ) -> Result<Operator> {
        let op = Operator::spawn(dir, nats, instance, extra)?;
        let client = op.client();
        eventually("the operator to converge", WAIT, || {
            let status = client.status();
            async move {
                Ok(status
                    .ok()
                    .filter(|s| s.state == fleet_contracts::api::RecoveryState::Converged)
                    .map(drop))
            }
        })
        .await?;
        Ok(op)
    }

    /// Starts an operator process and returns at once (it may still be recovering).
    pub fn spawn(dir: &Path, nats: &Nats, instance: &str, extra: &[&str]) -> Result<Operator> {
        let port = free_port();
        let mut cmd = Command::new(binary("fleet-operator"));
        cmd.args([
            "--nats-url",
            &nats.url(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--resync-secs",
            "2",
            "--instance",
            instance,
            "--lease-ms",
            &LEASE_MS.to_string(),
        ])
        .arg("--identity")
        .arg(&nats.identity)
        .args(extra)
        .env("FLEET_LOG", "info,fleet_operator=debug");
        let log = match instance {
            "e2e" => dir.join("operator.log"),
            other => dir.join(format!("operator-{other}.log")),
        };
        let proc = Proc::spawn(&format!("fleet-operator {instance}"), cmd, log)?;
        let token = std::fs::read_to_string(nats.identity.join("admin.token"))?
            .trim()
            .to_owned();
        Ok(Operator {
            url: format!("http://127.0.0.1:{port}"),
            token,
            proc,
        })
    }

    pub fn client(&self) -> fleetctl::Client {
        fleetctl::Client::new(&self.url, Some(&self.token))
    }

    /// Waits until this operator reports `role` and converged.
    pub async fn wait_role(&self, role: fleet_contracts::api::Role) -> Result<()> {
        let client = self.client();
        eventually(&format!("the operator to be {role:?}"), WAIT, || {
            let status = client.status();
            async move {
                let s = status?;
                Ok(
                    (s.role == role && s.state == fleet_contracts::api::RecoveryState::Converged)
                        .then_some(()),
                )
            }
        })
        .await
    }

    /// Applies a JSON document through the API.
    pub fn apply(&self, doc: &serde_json::Value) -> Result<fleet_contracts::api::ApplyResult> {
        Ok(self.client().apply(doc)?)
    }

    /// Waits until the Deployment's current generation is `phase` on all its devices.
    pub async fn wait_phase(
        &self,
        name: &str,
        generation: u64,
        phase: RolloutPhase,
    ) -> Result<Deployment> {
        self.wait_phase_within(name, generation, phase, WAIT).await
    }

    /// [`Operator::wait_phase`] with its own time limit.
    pub async fn wait_phase_within(
        &self,
        name: &str,
        generation: u64,
        phase: RolloutPhase,
        timeout: Duration,
    ) -> Result<Deployment> {
        let client = self.client();
        eventually(
            &format!("deployment {name} gen {generation} to be {phase:?}"),
            timeout,
            || {
                let got = client.deployment(name);
                async move {
                    let d = got?;
                    let status = d.status.clone().unwrap_or_default();
                    if d.metadata.generation == generation && status.phase == phase {
                        Ok(Some(d))
                    } else {
                        bail!("last seen: {}", fleetctl::render::progress_line(&d))
                    }
                }
            },
        )
        .await
    }
}
