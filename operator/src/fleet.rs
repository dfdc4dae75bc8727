//! The operator's in-memory view of the fleet, rebuilt from NATS KV alone, and the pure
//! functions over it: fan-out (which desired keys must exist, with which bytes) and
//! aggregation (per-Deployment and per-Device status, device health).
//!
//! Nothing here does I/O; [`crate::controller`] feeds it from KV watches and acts on it.

use std::collections::BTreeMap;

use fleet_contracts::{
    api::DeviceIdentity,
    names::{self, DeviceKey},
    resource::{
        Deployment, DeploymentStatus, Device, DeviceDeploymentStatus, DeviceStatus, RolloutPhase,
    },
    state::{DesiredDeployment, Health, Heartbeat, Phase, ReportedDeployment},
};

/// Missed heartbeat intervals before a device is stale, and before it is offline.
pub const STALE_AFTER_INTERVALS: u64 = 3;
pub const OFFLINE_AFTER_INTERVALS: u64 = 12;

/// A heartbeat and when NATS stored it (the server's clock, not the device's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenHeartbeat {
    pub heartbeat: Heartbeat,
    pub stored_at_ms: u64,
}

#[derive(Debug, Default)]
pub struct Fleet {
    pub deployments: BTreeMap<String, Deployment>,
    pub devices: BTreeMap<String, Device>,
    /// `device -> deployment -> report`.
    pub reported: BTreeMap<String, BTreeMap<String, ReportedDeployment>>,
    pub heartbeats: BTreeMap<String, SeenHeartbeat>,
    /// The desired bucket as last seen: key -> value bytes.
    pub desired: BTreeMap<String, Vec<u8>>,
    /// Enrolled devices' identity records (`fleet-enrollment` `device.<name>`).
    pub identities: BTreeMap<String, DeviceIdentity>,
}

/// What the desired bucket must change to match the resources.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FanOut {
    pub put: Vec<(String, Vec<u8>)>,
    pub delete: Vec<String>,
}

impl Fleet {
    /// Devices a Deployment selects, by name.
    pub fn matching_devices<'a>(
        &'a self,
        d: &'a Deployment,
    ) -> impl Iterator<Item = &'a Device> + 'a {
        self.devices
            .values()
            .filter(|dev| d.spec.selector.matches(&dev.metadata.labels))
    }

    /// Every desired key that must exist and its exact bytes.
    ///
    /// The bytes are canonical (struct field order, sorted maps), so two operators computing
    /// this from the same resources write identical values.
    pub fn wanted_desired(&self) -> BTreeMap<String, Vec<u8>> {
        let mut wanted = BTreeMap::new();
        for d in self.deployments.values() {
            let value = DesiredDeployment::new(
                &d.metadata.name,
                d.metadata.generation,
                d.spec.template.clone(),
            );
            let bytes = serde_json::to_vec(&value).expect("desired state serializes");
            for dev in self.matching_devices(d) {
                wanted.insert(
                    names::deployment_key(&dev.metadata.name, &d.metadata.name),
                    bytes.clone(),
                );
            }
        }
        wanted
    }

    /// The writes that bring the desired bucket in line; empty when it already is.
    pub fn fan_out(&self) -> FanOut {
        let wanted = self.wanted_desired();
        let put = wanted
            .iter()
            .filter(|(k, v)| self.desired.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let delete = self
            .desired
            .keys()
            .filter(|k| !wanted.contains_key(*k) && names::parse_device_key(k).is_some())
            .cloned()
            .collect();
        FanOut { put, delete }
    }

    /// Applies a reported-bucket entry (`None` value for a delete).
    pub fn apply_reported(
        &mut self,
        key: &str,
        value: Option<&[u8]>,
        stored_at_ms: u64,
    ) -> Result<(), String> {
        match names::parse_device_key(key) {
            Some(DeviceKey::Info { device }) => match value {
                None => {
                    self.heartbeats.remove(device);
                }
                Some(bytes) => {
                    let heartbeat: Heartbeat = serde_json::from_slice(bytes)
                        .map_err(|e| format!("unreadable heartbeat {key}: {e}"))?;
                    self.heartbeats.insert(
                        device.to_owned(),
                        SeenHeartbeat {
                            heartbeat,
                            stored_at_ms,
                        },
                    );
                }
            },
            Some(DeviceKey::Deployment { device, deployment }) => match value {
                None => {
                    if let Some(m) = self.reported.get_mut(device) {
                        m.remove(deployment);
                        if m.is_empty() {
                            self.reported.remove(device);
                        }
                    }
                }
                Some(bytes) => {
                    let report: ReportedDeployment = serde_json::from_slice(bytes)
                        .map_err(|e| format!("unreadable report {key}: {e}"))?;
                    self.reported
                        .entry(device.to_owned())
                        .or_default()
                        .insert(deployment.to_owned(), report);
                }
            },
            None => return Err(format!("ignoring reported key {key:?}: not a Fleet key")),
        }
        Ok(())
    }

    pub fn health(&self, device: &str, now_ms: u64) -> (Health, Option<u64>) {
        let Some(seen) = self.heartbeats.get(device) else {
            return (Health::Unknown, None);
        };
        let age = now_ms.saturating_sub(seen.stored_at_ms);
        let interval = seen.heartbeat.interval_ms.max(1);
        let health = if age <= interval * STALE_AFTER_INTERVALS {
            Health::Healthy
        } else if age <= interval * OFFLINE_AFTER_INTERVALS {
            Health::Stale
        } else {
            Health::Offline
        };
        (health, Some(age))
    }

    pub fn deployment_status(&self, d: &Deployment, now_ms: u64) -> DeploymentStatus {
        let generation = d.metadata.generation;
        let mut status = DeploymentStatus::default();
        for dev in self.matching_devices(d) {
            let name = &dev.metadata.name;
            let reported = self
                .reported
                .get(name)
                .and_then(|m| m.get(&d.metadata.name))
                .cloned();
            if let Some(r) = reported
                .as_ref()
                .filter(|r| r.observed_generation == generation)
            {
                match r.phase {
                    Phase::Ready | Phase::Completed => status.running_devices += 1,
                    Phase::Failed => status.failed_devices += 1,
                    _ => {}
                }
            }
            status.devices.push(DeviceDeploymentStatus {
                device: name.clone(),
                reported,
                device_health: self.health(name, now_ms).0,
            });
        }
        status.desired_devices = status.devices.len();
        status.phase = if status.desired_devices == 0 {
            RolloutPhase::NoDevices
        } else if status.failed_devices > 0 {
            RolloutPhase::Failed
        } else if status.running_devices == status.desired_devices {
            RolloutPhase::Running
        } else {
            RolloutPhase::Progressing
        };
        status
    }

    pub fn device_status(&self, dev: &Device, now_ms: u64) -> DeviceStatus {
        let (health, age) = self.health(&dev.metadata.name, now_ms);
        DeviceStatus {
            health,
            heartbeat: self
                .heartbeats
                .get(&dev.metadata.name)
                .map(|s| s.heartbeat.clone()),
            heartbeat_age_ms: age,
            deployments: self
                .deployments
                .values()
                .filter(|d| d.spec.selector.matches(&dev.metadata.labels))
                .map(|d| d.metadata.name.clone())
                .collect(),
            blacklist: self
                .identities
                .get(&dev.metadata.name)
                .and_then(|i| i.blacklist.clone()),
            last_unblacklist: self
                .identities
                .get(&dev.metadata.name)
                .and_then(|i| i.last_unblacklist.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_contracts::{
        SCHEMA_VERSION,
        resource::{Container, DeploymentSpec, LabelSelector, Metadata, PodTemplate},
    };

    fn device(name: &str, role: &str) -> Device {
        Device {
            api_version: "fleet.dev/v1".into(),
            kind: "Device".into(),
            metadata: Metadata {
                name: name.into(),
                labels: [("role".into(), role.into())].into(),
                generation: 1,
            },
            spec: Default::default(),
            status: None,
        }
    }

    fn deployment(name: &str, role: &str, image: &str, generation: u64) -> Deployment {
        Deployment {
            api_version: "fleet.dev/v1".into(),
            kind: "Deployment".into(),
            metadata: Metadata {
                name: name.into(),
                labels: Default::default(),
                generation,
            },
            spec: DeploymentSpec {
                selector: LabelSelector {
                    match_labels: [("role".into(), role.into())].into(),
                },
                template: PodTemplate::single(Container::new(name, image)),
            },
            status: None,
        }
    }

    fn fleet() -> Fleet {
        let mut f = Fleet::default();
        for (n, r) in [("a", "edge"), ("b", "edge"), ("c", "core")] {
            f.devices.insert(n.into(), device(n, r));
        }
        f.deployments
            .insert("web".into(), deployment("web", "edge", "img:1", 1));
        f
    }

    fn keys(v: &[(String, Vec<u8>)]) -> Vec<&str> {
        v.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn fan_out_follows_selectors_and_writes_only_differences() {
        let mut f = fleet();
        let out = f.fan_out();
        assert_eq!(keys(&out.put), ["a.web", "b.web"]);
        assert!(out.delete.is_empty());
        // Once the bucket holds those bytes, nothing more is written.
        f.desired = out.put.into_iter().collect();
        assert_eq!(f.fan_out(), FanOut::default());
        // Device b stops matching; a stray key from a deleted Deployment is cleaned up.
        f.devices.insert("b".into(), device("b", "core"));
        f.desired.insert("c.old".into(), b"{}".to_vec());
        let out = f.fan_out();
        assert!(out.put.is_empty());
        assert_eq!(out.delete, ["b.web", "c.old"]);
        // A new generation rewrites each device's key.
        f.deployments
            .insert("web".into(), deployment("web", "edge", "img:2", 2));
        assert_eq!(keys(&f.fan_out().put), ["a.web"]);
    }

    #[test]
    fn fan_out_bytes_are_deterministic() {
        assert_eq!(fleet().wanted_desired(), fleet().wanted_desired());
        let v: DesiredDeployment =
            serde_json::from_slice(&fleet().wanted_desired()["a.web"]).unwrap();
        assert_eq!(
            (v.deployment.as_str(), v.generation, v.schema),
            ("web", 1, SCHEMA_VERSION)
        );
    }

    fn report(phase: Phase, generation: u64) -> Vec<u8> {
        serde_json::to_vec(&ReportedDeployment {
            schema: 1,
            deployment: "web".into(),
            observed_generation: generation,
            phase,
            message: String::new(),
            container_id: None,
            since_ms: 0,
        })
        .unwrap()
    }

    #[test]
    fn deployment_status_counts_only_the_current_generation() {
        let mut f = fleet();
        let d = f.deployments["web"].clone();
        assert_eq!(f.deployment_status(&d, 0).phase, RolloutPhase::Progressing);
        f.apply_reported("a.web", Some(&report(Phase::Ready, 1)), 0)
            .unwrap();
        f.apply_reported("b.web", Some(&report(Phase::Ready, 0)), 0)
            .unwrap();
        let s = f.deployment_status(&d, 0);
        assert_eq!(
            (s.phase, s.running_devices, s.desired_devices),
            (RolloutPhase::Progressing, 1, 2)
        );
        f.apply_reported("b.web", Some(&report(Phase::Ready, 1)), 0)
            .unwrap();
        assert_eq!(f.deployment_status(&d, 0).phase, RolloutPhase::Running);
        f.apply_reported("b.web", Some(&report(Phase::Failed, 1)), 0)
            .unwrap();
        assert_eq!(f.deployment_status(&d, 0).phase, RolloutPhase::Failed);
        f.apply_reported("b.web", None, 0).unwrap();
        assert!(f.reported["a"].contains_key("web"));
        assert!(!f.reported.contains_key("b"));
        let none = deployment("none", "nowhere", "img", 1);
        assert_eq!(f.deployment_status(&none, 0).phase, RolloutPhase::NoDevices);
    }

    #[test]
    fn health_from_heartbeat_age() {
        let mut f = fleet();
        assert_eq!(f.health("a", 0), (Health::Unknown, None));
        let hb = Heartbeat {
            schema: 1,
            device: "a".into(),
            agent_version: "0".into(),
            os: "x".into(),
            uptime_secs: 0,
            sent_at_ms: 0,
            interval_ms: 1000,
            health_flags: vec![],
            deployments: 0,
            last_reconcile_ms: None,
        };
        f.apply_reported("a._info", Some(&serde_json::to_vec(&hb).unwrap()), 10_000)
            .unwrap();
        assert_eq!(f.health("a", 13_000).0, Health::Healthy);
        assert_eq!(f.health("a", 13_001).0, Health::Stale);
        assert_eq!(f.health("a", 22_000).0, Health::Stale);
        assert_eq!(f.health("a", 22_001), (Health::Offline, Some(12_001)));
        assert!(f.apply_reported("a._info", Some(b"garbage"), 0).is_err());
        assert!(f.apply_reported("nonsense", Some(b"{}"), 0).is_err());
    }
}
