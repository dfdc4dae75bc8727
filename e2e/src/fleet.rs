//! [`TestFleet`]: everything one test needs, started together.
#![allow(clippy::disallowed_methods)] // A harness starts processes and reads clocks.

use std::path::Path;

use anyhow::Result;

use crate::*;

/// Everything one test needs: a temp folder, NATS, the operator, and helpers.
#[derive(Debug)]
pub struct TestFleet {
    pub nats: Nats,
    pub operator: Operator,
    // Last, so processes stop before their folder goes.
    pub dir: tempfile::TempDir,
}

impl TestFleet {
    pub async fn start() -> Result<TestFleet> {
        TestFleet::start_with(&[]).await
    }

    /// Like [`TestFleet::start`], with extra `fleet-operator` flags.
    pub async fn start_with(operator_flags: &[&str]) -> Result<TestFleet> {
        let dir = test_dir()?;
        let nats = Nats::start(dir.path()).await?;
        let operator = Operator::start(dir.path(), &nats, operator_flags).await?;
        Ok(TestFleet {
            nats,
            operator,
            dir,
        })
    }

    /// Like [`TestFleet::start`], on a cluster of `size` NATS servers, each KV bucket with `size`
    /// replicas.
    pub async fn start_cluster(size: usize) -> Result<TestFleet> {
        let dir = test_dir()?;
        let nats = Nats::start_cluster(dir.path(), size).await?;
        let replicas = size.to_string();
        let operator = Operator::start(dir.path(), &nats, &["--kv-replicas", &replicas]).await?;
        Ok(TestFleet {
            nats,
            operator,
            dir,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A one-time enrollment token whose device gets `labels`.
    pub fn enrollment_token(&self, labels: &[(&str, &str)]) -> Result<String> {
        let req = fleet_contracts::api::CreateEnrollmentToken {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ttl_secs: Some(600),
        };
        Ok(self.operator.client().create_enrollment_token(&req)?.token)
    }

    /// A podman sandbox and an agent for `device`, enrolled with a token carrying `labels`.
    pub async fn device(
        &self,
        device: &str,
        labels: &[(&str, &str)],
    ) -> Result<(PodmanSandbox, Agent)> {
        let sandbox = PodmanSandbox::new(&self.path().join(device))?;
        let token = self.enrollment_token(labels)?;
        let agent = Agent::start(self.path(), device, &self.nats, &token, &sandbox)?;
        Ok((sandbox, agent))
    }
}
