//! A real `fleet-agent` process on its own podman sandbox.
#![allow(clippy::disallowed_methods)] // A harness starts processes and reads clocks.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::*;

/// A running `fleet-agent` on its own podman sandbox.
#[derive(Debug)]
pub struct Agent {
    pub device: String,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    log: PathBuf,
    pub proc: Option<Proc>,
}

impl Agent {
    /// Writes the agent's config (1 s heartbeat and resync, so tests see changes quickly) and
    /// starts it.
    pub fn start(
        dir: &Path,
        device: &str,
        nats: &Nats,
        token: &str,
        podman: &PodmanSandbox,
    ) -> Result<Agent> {
        Agent::start_with(dir, device, nats, token, podman, 1, 1)
    }

    /// Like [`Agent::start`] with the heartbeat and resync intervals in seconds.
    pub fn start_with(
        dir: &Path,
        device: &str,
        nats: &Nats,
        token: &str,
        podman: &PodmanSandbox,
        heartbeat_secs: u64,
        resync_secs: u64,
    ) -> Result<Agent> {
        let (nats_url, ca) = (nats.url(), nats.ca());
        let state_dir = dir.join(format!("agent-{device}"));
        let config = dir.join(format!("agent-{device}.toml"));
        std::fs::write(
            &config,
            format!(
                "device_id = {device:?}\nnats_url = {nats_url:?}\nstate_dir = {:?}\n\
                 heartbeat_interval_secs = {heartbeat_secs}\nresync_interval_secs = {resync_secs}\n\
                 enrollment_token = {token:?}\nnats_ca_file = {:?}\n\
                 os_upgrades = false\nboot_dir = {:?}\nrelease_file = {:?}\n\
                 [podman]\nroot = {:?}\nrunroot = {:?}\nruntime = \"runc\"\n",
                state_dir.display().to_string(),
                ca.display().to_string(),
                state_dir.join("boot").display().to_string(),
                state_dir.join("release").display().to_string(),
                podman.root.display().to_string(),
                podman.runroot.display().to_string(),
            ),
        )?;
        let mut agent = Agent {
            device: device.to_owned(),
            config,
            state_dir,
            log: dir.join(format!("agent-{device}.log")),
            proc: None,
        };
        agent.restart()?;
        Ok(agent)
    }

    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
        let mut cmd = Command::new(binary("fleet-agent"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("FLEET_LOG", "info,fleet_agent=debug");
        self.proc = Some(Proc::spawn(
            &format!("fleet-agent {}", self.device),
            cmd,
            self.log.clone(),
        )?);
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}
