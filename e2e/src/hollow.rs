//! [`Hollow`] devices: enrolled, speaking the agent's protocol with the agent's own code,
//! without podman; many of them stand in for a large fleet.
#![allow(clippy::disallowed_methods)] // A harness starts processes and reads clocks.

use std::{path::Path, time::Duration};

use anyhow::Result;

use crate::*;

/// A device without podman: it enrolls and connects exactly as an agent does, follows its
/// desired keys through the agent's own consumer code, sends heartbeats and reports through the
/// agent's outbox. It reports what the test tells it, or, `auto_ready`, every desired
/// generation `Ready` as soon as it arrives (and removes the reports of removed ones).
#[derive(Debug)]
pub struct Hollow {
    pub name: String,
    outbox: fleet_agent::sync::Outbox,
    desired: std::sync::Arc<
        std::sync::Mutex<
            std::collections::BTreeMap<String, fleet_contracts::state::DesiredDeployment>,
        >,
    >,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Hollow {
    pub async fn start(
        fleet: &TestFleet,
        name: &str,
        labels: &[(&str, &str)],
        auto_ready: bool,
    ) -> Result<Hollow> {
        let token = fleet.enrollment_token(labels)?;
        Hollow::enroll(
            &fleet.path().join("hollow").join(name),
            &fleet.nats,
            name,
            &token,
            auto_ready,
        )
        .await
    }

    /// Enrolls with `token` (state kept in `state_dir`) and starts following.
    pub async fn enroll(
        state_dir: &Path,
        nats: &Nats,
        name: &str,
        token: &str,
        auto_ready: bool,
    ) -> Result<Hollow> {
        use fleet_agent::{identity, sync};
        use fleet_contracts::{names, state::Phase};
        std::fs::create_dir_all(state_dir)?;
        let key = identity::load_or_create_key(state_dir)?;
        let jwt = identity::enroll(&nats.url(), &nats.ca(), name, &key, token).await?;
        identity::save_jwt(state_dir, &jwt)?;
        let options = identity::connect_options(state_dir, key);
        let (client, connections) = sync::connect(options, &nats.url(), &nats.ca(), name).await?;
        let (client_tx, client_rx) = tokio::sync::oneshot::channel();
        let _ = client_tx.send(client.clone());
        let outbox = sync::outbox(client_rx, name.to_owned());
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let mut tasks = vec![tokio::spawn(sync::follow_desired(
            client,
            name.to_owned(),
            tx,
            connections,
            Duration::from_secs(60),
        ))];
        let desired = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
        let (map, out, device) = (desired.clone(), outbox.clone(), name.to_owned());
        tasks.push(tokio::spawn(async move {
            // The agent's own rule for answers from another store (`fleet_agent::store`).
            let mut stores = fleet_agent::store::StoreState::default();
            let mut running = None;
            while let Some(event) = rx.recv().await {
                let Some(all) = stores.take(&event, running.as_ref()) else {
                    continue;
                };
                running = Some(all.clone());
                let mut map = map.lock().unwrap();
                let before: Vec<String> = map.keys().cloned().collect();
                *map = all
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v.ok()?)))
                    .collect();
                if !auto_ready {
                    continue;
                }
                for gone in before.iter().filter(|k| !map.contains_key(*k)) {
                    out.delete(names::deployment_key(&device, gone));
                }
                for (deployment, d) in map.iter() {
                    let bytes = hollow_report(deployment, d.generation, Phase::Ready);
                    out.put(names::deployment_key(&device, deployment), bytes);
                }
            }
        }));
        let (out, device) = (outbox.clone(), name.to_owned());
        let count = desired.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let deployments = count.lock().unwrap().len() as u32;
                out.put(
                    names::info_key(&device),
                    hollow_heartbeat(&device, 1000, deployments),
                );
            }
        }));
        Ok(Hollow {
            name: name.to_owned(),
            outbox,
            desired,
            tasks,
        })
    }

    /// The desired state as this device last received it: deployment -> value.
    pub fn desired(
        &self,
    ) -> std::collections::BTreeMap<String, fleet_contracts::state::DesiredDeployment> {
        self.desired.lock().unwrap().clone()
    }

    /// Reports `deployment` at `generation` in `phase`.
    pub fn report(&self, deployment: &str, generation: u64, phase: fleet_contracts::state::Phase) {
        self.outbox.put(
            fleet_contracts::names::deployment_key(&self.name, deployment),
            hollow_report(deployment, generation, phase),
        );
    }
}

/// The bytes of a device's report on `deployment`, as a hollow device sends it.
pub fn hollow_report(
    deployment: &str,
    generation: u64,
    phase: fleet_contracts::state::Phase,
) -> Vec<u8> {
    let report = fleet_contracts::state::ReportedDeployment {
        schema: fleet_contracts::SCHEMA_VERSION,
        deployment: deployment.to_owned(),
        observed_generation: generation,
        phase,
        message: String::new(),
        container_id: None,
        since_ms: 0,
    };
    serde_json::to_vec(&report).expect("a report serializes")
}

/// The bytes of a hollow device's heartbeat.
pub fn hollow_heartbeat(device: &str, interval_ms: u64, deployments: u32) -> Vec<u8> {
    let hb = fleet_contracts::state::Heartbeat {
        schema: fleet_contracts::SCHEMA_VERSION,
        device: device.to_owned(),
        agent_version: "hollow".into(),
        os: "none".into(),
        uptime_secs: 0,
        sent_at_ms: 0,
        interval_ms,
        health_flags: vec![],
        deployments,
        last_reconcile_ms: None,
        storage: None,
        dropped_requests: 0,
        public_key: String::new(),
    };
    serde_json::to_vec(&hb).expect("a heartbeat serializes")
}

impl Drop for Hollow {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
