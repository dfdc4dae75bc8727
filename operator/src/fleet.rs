//! The operator's in-memory view of the fleet, rebuilt from NATS KV alone, and the pure
//! functions over it: fan-out (which desired keys must exist, with which bytes) and
//! aggregation (per-Deployment and per-Device status, device health).
//!
//! Nothing here does I/O; [`crate::controller`] feeds it from KV watches and acts on it.

use std::collections::{BTreeMap, BTreeSet};

use fleet_contracts::{
    names::{self, DeviceKey},
    resource::{
        Deployment, DeploymentStatus, Device, DeviceDeploymentStatus, DeviceStatus, OsUpgrade,
        RolloutPhase,
    },
    state::{
        Adoption, DesiredDeployment, DeviceIdentity, Health, Heartbeat, OsReport, Phase,
        ReportedDeployment, StoreIdentity, StoreRef,
    },
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
    /// The desired bucket as last seen: key -> value and when NATS stored it.
    pub desired: BTreeMap<String, Stored>,
    /// The desired bucket's stream sequence read up to: how current `desired` is, told to a
    /// device with its desired state.
    pub desired_revision: u64,
    /// Enrolled devices' identity records (`fleet-enrollment` `device.<name>`).
    pub identities: BTreeMap<String, DeviceIdentity>,
    /// `fleetctl rollout resume` decisions, per Deployment.
    pub resumes: BTreeMap<String, fleet_contracts::state::RolloutResume>,
    /// `<bucket>/<key>` of values this operator cannot read, and why: reported in the status,
    /// and the desired keys of an unreadable Device or Deployment are left alone.
    pub unreadable: BTreeMap<String, String>,
    /// Which store this is (`fleet-resources` `fleet.store`), once read.
    pub store: Option<StoreIdentity>,
    /// Admins' decisions for devices holding workloads of another store, per device.
    pub adoptions: BTreeMap<String, Adoption>,
    /// OS upgrade campaigns, by name ([`crate::campaign`]).
    pub os_upgrades: BTreeMap<String, OsUpgrade>,
    /// Each device's OS report (`<device>._os`).
    pub os_reports: BTreeMap<String, OsReport>,
}

/// A desired value and when NATS stored it (the server's clock): when a staged rollout gave
/// the device this generation. Kept in KV, so a restarted or standby operator judges pauses
/// and deadlines exactly as the one that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub bytes: Vec<u8>,
    pub at_ms: u64,
}

/// Where a staged rollout stands, derived from the desired and reported state.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rollout {
    /// Devices that have the current generation (or get it now: they run nothing older).
    pub updated: BTreeSet<String>,
    /// Devices admitted in this round (the next wave).
    pub admit: Vec<String>,
    pub wave: usize,
    pub halted: Option<String>,
    /// Why no device is admitted although the last wave is Ready (`maxUnavailable`).
    pub waiting: Option<String>,
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
    ///
    /// A Deployment with a rollout policy gives the current generation only to the devices
    /// its rollout has reached ([`Fleet::rollout`]); the others keep the bytes they have.
    pub fn wanted_desired(&self, now_ms: u64) -> BTreeMap<String, Vec<u8>> {
        let mut wanted = BTreeMap::new();
        for d in self.deployments.values() {
            let bytes = desired_bytes(d);
            let rollout = d
                .spec
                .rollout
                .as_ref()
                .map(|_| self.rollout(d, &bytes, now_ms));
            for dev in self.matching_devices(d) {
                let key = names::deployment_key(&dev.metadata.name, &d.metadata.name);
                let value = match &rollout {
                    Some(r)
                        if !r.updated.contains(&dev.metadata.name)
                            && !r.admit.contains(&dev.metadata.name) =>
                    {
                        self.desired
                            .get(&key)
                            .map_or_else(|| bytes.clone(), |x| x.bytes.clone())
                    }
                    _ => bytes.clone(),
                };
                wanted.insert(key, value);
            }
        }
        wanted.extend(self.wanted_os(now_ms));
        wanted
    }

    /// Where the staged rollout of `d`'s current generation (`bytes`) stands at `now_ms`.
    pub fn rollout(&self, d: &Deployment, bytes: &[u8], now_ms: u64) -> Rollout {
        let Some(policy) = &d.spec.rollout else {
            return Rollout::default();
        };
        let (name, generation) = (&d.metadata.name, d.metadata.generation);
        let devices: Vec<&str> = self
            .matching_devices(d)
            .map(|x| x.metadata.name.as_str())
            .collect();
        let mut r = Rollout {
            wave: policy.wave(devices.len()),
            ..Default::default()
        };
        let mut waiting = Vec::new();
        for &dev in &devices {
            match self.desired.get(&names::deployment_key(dev, name)) {
                Some(current) if current.bytes != bytes => waiting.push(dev),
                _ => {
                    r.updated.insert(dev.to_owned());
                }
            }
        }
        let deadline_ms = u64::from(policy.progress_deadline_seconds) * 1000;
        let resumed_at = self
            .resumes
            .get(name)
            .filter(|x| x.generation == generation)
            .map(|x| x.at_ms);
        let mut all_ready = true;
        for dev in &r.updated {
            let admitted_at = self
                .desired
                .get(&names::deployment_key(dev, name))
                .map(|x| x.at_ms);
            if let Some(resumed) = resumed_at {
                // Waved through by an operator: devices given the generation before the resume
                // no longer hold the rollout back.
                if admitted_at.is_none_or(|at| at <= resumed) {
                    continue;
                }
            }
            let report = self
                .reported
                .get(dev)
                .and_then(|m| m.get(name))
                .filter(|x| x.observed_generation == generation);
            match report.map(|x| x.phase) {
                Some(Phase::Ready | Phase::Completed) => continue,
                Some(Phase::Failed) => {
                    let message = report.map_or("", |x| x.message.as_str());
                    r.halted = Some(format!("{dev} failed: {message}"));
                }
                _ => {
                    if let Some(at) = admitted_at
                        && now_ms.saturating_sub(at) > deadline_ms
                    {
                        let why = report.map_or("not reported".to_owned(), |x| {
                            format!("{}: {}", x.phase, x.message)
                        });
                        r.halted = Some(format!(
                            "{dev} not Ready within {}s ({why})",
                            policy.progress_deadline_seconds
                        ));
                    }
                }
            }
            all_ready = false;
            if r.halted.is_some() {
                break;
            }
        }
        let last_wave = r
            .updated
            .iter()
            .filter_map(|dev| self.desired.get(&names::deployment_key(dev, name)))
            .map(|x| x.at_ms)
            .max();
        let paused =
            last_wave.is_some_and(|at| now_ms < at + u64::from(policy.pause_seconds) * 1000);
        if r.halted.is_none() && all_ready && !paused {
            let mut room = r.wave;
            if let Some(max) = policy.max_unavailable {
                let unavailable: Vec<&str> = devices
                    .iter()
                    .copied()
                    .filter(|dev| !self.available(dev, name, now_ms))
                    .collect();
                room = room.min((max as usize).saturating_sub(unavailable.len()));
                if room == 0 && !waiting.is_empty() {
                    r.waiting = Some(format!(
                        "{} of maxUnavailable {max} devices unavailable: {}",
                        unavailable.len(),
                        unavailable.join(", ")
                    ));
                }
            }
            // Healthy devices first: an offline one would only hold the wave up.
            waiting.sort_by_key(|dev| self.health(dev, now_ms).0 != Health::Healthy);
            r.admit = waiting.into_iter().take(room).map(str::to_owned).collect();
        }
        r
    }

    /// Whether `device` is Healthy and reports `deployment` Ready (or Completed), whatever
    /// the generation.
    fn available(&self, device: &str, deployment: &str, now_ms: u64) -> bool {
        let ready = self
            .reported
            .get(device)
            .and_then(|m| m.get(deployment))
            .is_some_and(|x| matches!(x.phase, Phase::Ready | Phase::Completed));
        ready && self.health(device, now_ms).0 == Health::Healthy
    }

    /// The store the desired bucket was last completely derived from (its
    /// [`names::DESIRED_STORE_KEY`]).
    pub fn desired_store(&self) -> Option<StoreRef> {
        let stored = self.desired.get(names::DESIRED_STORE_KEY)?;
        serde_json::from_slice(&stored.bytes).ok()
    }

    /// The store devices may be told their desired state comes from: known, not being
    /// restored, and the desired bucket derived from it whole. `None` means: answer no device
    /// yet (it would take a partial or stale desired state for this store's).
    pub fn answering_store(&self) -> Option<StoreRef> {
        let store = self.store.as_ref().filter(|s| !s.restoring)?;
        (self.desired_store().as_ref() == Some(&store.store)).then(|| store.store.clone())
    }

    /// Devices that report (a heartbeat) but have no Device record: enrolled in a store that
    /// was lost or restored from before they enrolled. Shown as `Unregistered` until adopted.
    pub fn unregistered(&self) -> impl Iterator<Item = &str> + '_ {
        self.heartbeats
            .keys()
            .filter(|d| !self.devices.contains_key(*d))
            .map(String::as_str)
    }

    /// The writes that bring the desired bucket in line; empty when it already is.
    ///
    /// A desired key is never deleted because of a resource this operator cannot read (a newer
    /// schema, a corrupt value): its device or Deployment is unknown, not gone.
    ///
    /// Once every device key is written, the store marker ([`names::DESIRED_STORE_KEY`]) is
    /// set to the store's identity, in a pass of its own: a device is told it has this
    /// store's desired state only when the bucket holds all of it (never during a restore).
    pub fn fan_out(&self, now_ms: u64) -> FanOut {
        // While a restore writes the resources, nothing is derived from them half written.
        if self.store.as_ref().is_some_and(|s| s.restoring) {
            return FanOut::default();
        }
        let work = self.fan_out_devices(now_ms);
        if !work.put.is_empty() || !work.delete.is_empty() {
            return work;
        }
        match &self.store {
            Some(store)
                if !store.restoring && self.desired_store().as_ref() != Some(&store.store) =>
            {
                let bytes = serde_json::to_vec(&store.store).expect("serializes");
                FanOut {
                    put: vec![(names::DESIRED_STORE_KEY.to_owned(), bytes)],
                    delete: vec![],
                }
            }
            _ => work,
        }
    }

    fn fan_out_devices(&self, now_ms: u64) -> FanOut {
        let wanted = self.wanted_desired(now_ms);
        let put = wanted
            .iter()
            .filter(|(k, v)| self.desired.get(*k).is_none_or(|x| &x.bytes != *v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let unreadable = |key: String| {
            self.unreadable
                .contains_key(&format!("{}/{key}", names::RESOURCES_BUCKET))
        };
        let delete = self
            .desired
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .filter(|k| match names::parse_device_key(k) {
                Some(DeviceKey::Deployment { device, deployment }) => {
                    !unreadable(format!("device.{device}"))
                        && !unreadable(format!("deployment.{deployment}"))
                }
                // An OS upgrade no campaign names any more: the device keeps its own record
                // of what it made, and needs no key for it. While any campaign is unreadable
                // the keys stay: it may be the one naming them.
                Some(DeviceKey::Os { device }) => {
                    let any_campaign = format!("{}/osupgrade.", names::RESOURCES_BUCKET);
                    !unreadable(format!("device.{device}"))
                        && !self.unreadable.keys().any(|k| k.starts_with(&any_campaign))
                }
                _ => false,
            })
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
            Some(DeviceKey::Os { device }) => match value {
                None => {
                    self.os_reports.remove(device);
                }
                Some(bytes) => {
                    let report: OsReport = serde_json::from_slice(bytes)
                        .map_err(|e| format!("unreadable OS report {key}: {e}"))?;
                    self.os_reports.insert(device.to_owned(), report);
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
        if d.spec.rollout.is_some() {
            let r = self.rollout(d, &desired_bytes(d), now_ms);
            status.rollout = Some(fleet_contracts::resource::RolloutStatus {
                updated_devices: r.updated.len(),
                wave_size: r.wave,
                halted: r.halted,
                waiting: r.waiting,
            });
        }
        let halted = status.rollout.as_ref().is_some_and(|r| r.halted.is_some());
        status.phase = if status.desired_devices == 0 {
            RolloutPhase::NoDevices
        } else if halted {
            RolloutPhase::Halted
        } else if status.failed_devices > 0 {
            RolloutPhase::Failed
        } else if status.running_devices == status.desired_devices {
            RolloutPhase::Running
        } else {
            RolloutPhase::Progressing
        };
        status
    }

    /// A device that reports but has no record, as the API shows it: no labels, status
    /// `unregistered`.
    pub fn unregistered_device(&self, name: &str, now_ms: u64) -> Option<Device> {
        if self.devices.contains_key(name) || !self.heartbeats.contains_key(name) {
            return None;
        }
        let mut device = Device {
            api_version: fleet_contracts::API_VERSION.into(),
            kind: "Device".into(),
            metadata: fleet_contracts::resource::Metadata {
                name: name.to_owned(),
                ..Default::default()
            },
            spec: Default::default(),
            status: None,
        };
        let mut status = self.device_status(&device, now_ms);
        status.deployments.clear();
        status.unregistered = true;
        device.status = Some(status);
        Some(device)
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
            unregistered: false,
            os: self.os_reports.get(&dev.metadata.name).cloned(),
        }
    }
}

/// The canonical desired value of a Deployment's current generation.
fn desired_bytes(d: &Deployment) -> Vec<u8> {
    let value = DesiredDeployment::new(
        &d.metadata.name,
        d.metadata.generation,
        d.spec.template.clone(),
    );
    serde_json::to_vec(&value).expect("desired state serializes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_contracts::{
        SCHEMA_VERSION,
        resource::{DeploymentSpec, LabelSelector, Metadata},
        spec::{Container, PodTemplate},
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
                rollout: None,
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

    /// What the desired watch would hold after these puts, stored at `at_ms`.
    fn stored(puts: Vec<(String, Vec<u8>)>, at_ms: u64) -> BTreeMap<String, Stored> {
        puts.into_iter()
            .map(|(k, bytes)| (k, Stored { bytes, at_ms }))
            .collect()
    }

    fn keys(v: &[(String, Vec<u8>)]) -> Vec<&str> {
        v.iter().map(|(k, _)| k.as_str()).collect()
    }

    #[test]
    fn fan_out_follows_selectors_and_writes_only_differences() {
        let mut f = fleet();
        let out = f.fan_out(0);
        assert_eq!(keys(&out.put), ["a.web", "b.web"]);
        assert!(out.delete.is_empty());
        // Once the bucket holds those bytes, nothing more is written.
        f.desired = stored(out.put, 0);
        assert_eq!(f.fan_out(0), FanOut::default());
        // Device b stops matching; a stray key from a deleted Deployment is cleaned up.
        f.devices.insert("b".into(), device("b", "core"));
        f.desired
            .extend(stored(vec![("c.old".into(), b"{}".to_vec())], 0));
        let out = f.fan_out(0);
        assert!(out.put.is_empty());
        assert_eq!(out.delete, ["b.web", "c.old"]);
        // A new generation rewrites each device's key.
        f.deployments
            .insert("web".into(), deployment("web", "edge", "img:2", 2));
        assert_eq!(keys(&f.fan_out(0).put), ["a.web"]);
    }

    #[test]
    fn desired_keys_of_an_unreadable_resource_are_left_alone() {
        let mut f = fleet();
        f.desired = stored(f.fan_out(0).put, 0);
        // The Deployment's value turned unreadable (a newer schema, say): after a restart the
        // operator knows its key but not its spec.
        f.deployments.clear();
        f.unreadable.insert(
            "fleet-resources/deployment.web".into(),
            "unknown field".into(),
        );
        assert_eq!(f.fan_out(0), FanOut::default());
        // Likewise a Device that cannot be read keeps what it runs.
        let mut f = fleet();
        f.desired = stored(f.fan_out(0).put, 0);
        f.devices.remove("a");
        f.unreadable
            .insert("fleet-resources/device.a".into(), "bad".into());
        assert_eq!(f.fan_out(0), FanOut::default());
        // Once readable again (here: really gone), the cleanup happens.
        f.unreadable.clear();
        assert_eq!(f.fan_out(0).delete, ["a.web"]);
    }

    #[test]
    fn the_store_marker_follows_every_device_key_and_waits_out_a_restore() {
        let mut f = fleet();
        let store = |epoch| StoreRef {
            fleet_id: "f".into(),
            epoch,
        };
        f.store = Some(StoreIdentity {
            schema: SCHEMA_VERSION,
            store: store(1),
            restoring: false,
            created_ms: 0,
        });
        // Device keys first; no device is answered meanwhile.
        let out = f.fan_out(0);
        assert_eq!(keys(&out.put), ["a.web", "b.web"]);
        assert_eq!(f.answering_store(), None);
        f.desired = stored(out.put, 0);
        // Then, in a pass of its own, the marker; from then on devices are answered.
        let out = f.fan_out(0);
        assert_eq!(keys(&out.put), [names::DESIRED_STORE_KEY]);
        f.desired.extend(stored(out.put, 0));
        assert_eq!(f.answering_store(), Some(store(1)));
        assert_eq!(f.fan_out(0), FanOut::default());
        // A restore under way: nobody is answered and the marker waits, even once the keys
        // match.
        f.store.as_mut().unwrap().store = store(2);
        f.store.as_mut().unwrap().restoring = true;
        assert_eq!(f.answering_store(), None);
        assert_eq!(f.fan_out(0), FanOut::default());
        // Nor is anything derived from resources half restored.
        f.deployments
            .insert("web".into(), deployment("web", "edge", "img:2", 2));
        assert_eq!(f.fan_out(0), FanOut::default());
        f.desired = stored(f.fan_out_devices(0).put, 0);
        f.desired.extend(stored(
            vec![(
                names::DESIRED_STORE_KEY.to_owned(),
                serde_json::to_vec(&store(1)).unwrap(),
            )],
            0,
        ));
        f.store.as_mut().unwrap().restoring = false;
        assert_eq!(f.answering_store(), None);
        assert_eq!(keys(&f.fan_out(0).put), [names::DESIRED_STORE_KEY]);
        // The marker is no device's key: fan-out never deletes it.
        assert!(f.fan_out(0).delete.is_empty());
    }

    #[test]
    fn a_device_that_reports_without_a_record_is_unregistered() {
        let mut f = fleet();
        let hb = |device: &str| SeenHeartbeat {
            heartbeat: serde_json::from_value(serde_json::json!({
                "schema": 1, "device": device, "agent_version": "x", "os": "x",
                "uptime_secs": 1, "sent_at_ms": 1, "interval_ms": 1000, "deployments": 0
            }))
            .unwrap(),
            stored_at_ms: 1,
        };
        f.heartbeats.insert("a".into(), hb("a"));
        f.heartbeats.insert("ghost".into(), hb("ghost"));
        assert_eq!(f.unregistered().collect::<Vec<_>>(), ["ghost"]);
        let ghost = f.unregistered_device("ghost", 2).unwrap();
        let status = ghost.status.unwrap();
        assert!(status.unregistered && status.deployments.is_empty());
        assert!(status.heartbeat.is_some());
        assert_eq!(f.unregistered_device("a", 2), None);
        assert_eq!(f.unregistered_device("nobody", 2), None);
    }

    #[test]
    fn fan_out_bytes_are_deterministic() {
        assert_eq!(fleet().wanted_desired(0), fleet().wanted_desired(0));
        let v: DesiredDeployment =
            serde_json::from_slice(&fleet().wanted_desired(0)["a.web"]).unwrap();
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
            storage: None,
            dropped_requests: 0,
            public_key: String::new(),
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

    /// A fleet of three devices running `web` generation 1 everywhere, now at generation 2
    /// with waves of one.
    fn rolling() -> Fleet {
        let mut f = Fleet::default();
        for n in ["a", "b", "c"] {
            f.devices.insert(n.into(), device(n, "edge"));
        }
        let v1 = deployment("web", "edge", "img:1", 1);
        let v1_bytes = desired_bytes(&v1);
        for n in ["a", "b", "c"] {
            f.desired
                .extend(stored(vec![(format!("{n}.web"), v1_bytes.clone())], 0));
        }
        let mut v2 = deployment("web", "edge", "img:2", 2);
        v2.spec.rollout = Some(fleet_contracts::resource::RolloutPolicy {
            wave_size: Some(1),
            wave_percent: None,
            pause_seconds: 10,
            progress_deadline_seconds: 60,
            max_unavailable: None,
        });
        f.deployments.insert("web".into(), v2);
        f
    }

    /// Applies the fan-out as if the writes succeeded.
    fn step(f: &mut Fleet, now: u64) -> Vec<String> {
        let out = f.fan_out(now);
        let keys = out.put.iter().map(|(k, _)| k.clone()).collect();
        f.desired.extend(stored(out.put, now));
        keys
    }

    #[test]
    fn a_staged_rollout_advances_wave_by_wave_on_ready_devices_after_the_pause() {
        let mut f = rolling();
        assert_eq!(step(&mut f, 0), ["a.web"]);
        // Nothing more until a reports the new generation Ready.
        assert!(step(&mut f, 1_000).is_empty());
        f.apply_reported("a.web", Some(&report(Phase::Degraded, 2)), 0)
            .unwrap();
        assert!(
            step(&mut f, 2_000).is_empty(),
            "running but not ready must not advance"
        );
        f.apply_reported("a.web", Some(&report(Phase::Ready, 2)), 0)
            .unwrap();
        assert!(
            step(&mut f, 5_000).is_empty(),
            "the pause holds the next wave"
        );
        assert_eq!(step(&mut f, 10_000), ["b.web"]);
        f.apply_reported("b.web", Some(&report(Phase::Ready, 2)), 0)
            .unwrap();
        assert_eq!(step(&mut f, 20_000), ["c.web"]);
        let d = f.deployments["web"].clone();
        assert_eq!(
            f.deployment_status(&d, 20_000)
                .rollout
                .unwrap()
                .updated_devices,
            3
        );
    }

    #[test]
    fn a_failure_or_a_missed_deadline_halts_the_rollout() {
        let mut f = rolling();
        step(&mut f, 0);
        f.apply_reported("a.web", Some(&report(Phase::Failed, 2)), 0)
            .unwrap();
        assert!(step(&mut f, 60_000).is_empty());
        let d = f.deployments["web"].clone();
        let status = f.deployment_status(&d, 60_000);
        assert_eq!(status.phase, RolloutPhase::Halted);
        assert_eq!(
            status.rollout.unwrap().halted.as_deref(),
            Some("a failed: ")
        );

        let mut f = rolling();
        step(&mut f, 0);
        f.apply_reported("a.web", Some(&report(Phase::Degraded, 2)), 0)
            .unwrap();
        assert!(
            f.deployment_status(&d, 60_000)
                .rollout
                .unwrap()
                .halted
                .is_none()
        );
        let halted = f
            .deployment_status(&d, 60_001)
            .rollout
            .unwrap()
            .halted
            .unwrap();
        assert_eq!(halted, "a not Ready within 60s (Degraded: )");
        // The other devices keep generation 1.
        assert_eq!(
            f.desired["b.web"].bytes,
            desired_bytes(&deployment("web", "edge", "img:1", 1))
        );
    }

    fn heartbeat(f: &mut Fleet, device: &str, at_ms: u64) {
        let hb = Heartbeat {
            schema: 1,
            device: device.into(),
            agent_version: "0".into(),
            os: "x".into(),
            uptime_secs: 0,
            sent_at_ms: at_ms,
            interval_ms: 1000,
            health_flags: vec![],
            deployments: 1,
            last_reconcile_ms: None,
            storage: None,
            dropped_requests: 0,
            public_key: String::new(),
        };
        let key = format!("{device}._info");
        f.apply_reported(&key, Some(&serde_json::to_vec(&hb).unwrap()), at_ms)
            .unwrap();
    }

    #[test]
    fn max_unavailable_shrinks_a_wave_and_waits_while_too_many_devices_are_down() {
        let mut f = rolling();
        let web = f.deployments.get_mut("web").unwrap();
        let policy = web.spec.rollout.as_mut().unwrap();
        (
            policy.wave_size,
            policy.pause_seconds,
            policy.max_unavailable,
        ) = (Some(2), 0, Some(1));
        for n in ["a", "b", "c"] {
            f.apply_reported(&format!("{n}.web"), Some(&report(Phase::Ready, 1)), 0)
                .unwrap();
        }
        // c is silent (no heartbeat): one device down already, none more may go.
        heartbeat(&mut f, "a", 0);
        heartbeat(&mut f, "b", 0);
        assert!(step(&mut f, 0).is_empty());
        let d = f.deployments["web"].clone();
        let status = f.deployment_status(&d, 0).rollout.unwrap();
        assert_eq!(
            status.waiting.as_deref(),
            Some("1 of maxUnavailable 1 devices unavailable: c")
        );
        // c is back: a wave of 2 shrinks to 1, and only one device is upgraded at a time.
        heartbeat(&mut f, "c", 1_000);
        assert_eq!(step(&mut f, 1_000), ["a.web"]);
        f.apply_reported("a.web", Some(&report(Phase::Ready, 2)), 0)
            .unwrap();
        heartbeat(&mut f, "a", 2_000);
        heartbeat(&mut f, "b", 2_000);
        heartbeat(&mut f, "c", 2_000);
        assert_eq!(step(&mut f, 2_000), ["b.web"]);
    }

    #[test]
    fn healthy_devices_get_a_wave_before_offline_ones() {
        let mut f = rolling();
        heartbeat(&mut f, "b", 0);
        heartbeat(&mut f, "c", 0);
        // a never sent a heartbeat: it comes last.
        assert_eq!(step(&mut f, 0), ["b.web"]);
    }

    #[test]
    fn devices_without_the_deployment_get_the_new_generation_at_once() {
        let mut f = rolling();
        f.desired.clear();
        let mut keys = step(&mut f, 0);
        keys.sort();
        assert_eq!(keys, ["a.web", "b.web", "c.web"]);
    }
}
