//! OS upgrade campaigns ([`OsUpgrade`]), as pure functions over the fleet view: which devices a
//! campaign has reached (their desired `<device>._os` holds its current value), which it
//! reaches next (the canaries, then a wave once every device before it has ended), when it
//! halts (`haltAfterFailures` devices rolled back or refused), and its status.
//!
//! A device belongs to one campaign at a time: the first by name that selects it and that the
//! device has not ended yet. So a second campaign for the same devices waits for the first,
//! and a device never gets two upgrades at once. The device itself decides everything that
//! happens on it (it makes each upgrade once, checks in, rolls back); the operator only says
//! which upgrade is next and counts the outcomes.

use std::collections::{BTreeMap, BTreeSet};

use fleet_contracts::{
    SCHEMA_VERSION, names,
    resource::{DeviceOsStatus, OsUpgrade, OsUpgradePhase, OsUpgradeStatus},
    state::{DesiredOs, Health, OsPhase, OsUpgradeReport},
};

use crate::fleet::Fleet;

/// Where one campaign stands.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Campaign {
    /// The devices the campaign selects and owns, in the order it reaches them.
    pub devices: Vec<String>,
    /// Devices that have the campaign's current value.
    pub started: BTreeSet<String>,
    /// Devices given it in this round.
    pub admit: Vec<String>,
    pub committed: usize,
    pub failed: usize,
    pub halted: Option<String>,
}

/// The canonical desired value of `u`'s current generation.
pub fn desired_bytes(u: &OsUpgrade) -> Vec<u8> {
    let value = DesiredOs {
        schema: SCHEMA_VERSION,
        upgrade: u.metadata.name.clone(),
        generation: u.metadata.generation,
        release: u.spec.release.clone(),
        check_in_deadline_seconds: u.spec.check_in_deadline_seconds,
        boot_attempts: u.spec.boot_attempts,
        checks: u.spec.checks.clone(),
    };
    serde_json::to_vec(&value).expect("desired values serialize")
}

impl Fleet {
    /// The device's report on `u`'s current generation, if it sent one.
    fn os_report_on(&self, device: &str, u: &OsUpgrade) -> Option<&OsUpgradeReport> {
        self.os_reports
            .get(device)
            .and_then(|r| r.upgrade.as_ref())
            .filter(|r| r.upgrade == u.metadata.name && r.generation == u.metadata.generation)
    }

    /// How `u`'s current generation went on `device` so far: its current report's phase, or
    /// how it ended if the device has moved on to another upgrade since.
    fn os_phase_of(&self, device: &str, u: &OsUpgrade) -> Option<OsPhase> {
        if let Some(r) = self.os_report_on(device, u) {
            return Some(r.phase);
        }
        self.os_reports.get(device).and_then(|r| {
            r.history
                .iter()
                .rev()
                .find(|o| o.upgrade == u.metadata.name && o.generation == u.metadata.generation)
                .map(|o| o.phase)
        })
    }

    /// The campaign `device` belongs to: the one whose upgrade it was given and has not ended
    /// (a campaign created later never takes a device from the one it is making), else the
    /// first by name that selects it and that it has not ended.
    pub fn os_owner(&self, device: &str) -> Option<&OsUpgrade> {
        let labels = &self.devices.get(device)?.metadata.labels;
        let open = |u: &&OsUpgrade| {
            u.spec.selector.matches(labels)
                && !self.os_phase_of(device, u).is_some_and(OsPhase::is_final)
        };
        let holding = self.desired.get(&names::os_key(device)).and_then(|held| {
            self.os_upgrades
                .values()
                .filter(open)
                .find(|u| desired_bytes(u) == held.bytes)
        });
        holding.or_else(|| self.os_upgrades.values().find(open))
    }

    /// Where campaign `u` stands.
    pub fn campaign(&self, u: &OsUpgrade, now_ms: u64) -> Campaign {
        let bytes = desired_bytes(u);
        let name = &u.metadata.name;
        let selected: Vec<&str> = self
            .devices
            .values()
            .filter(|d| u.spec.selector.matches(&d.metadata.labels))
            .map(|d| d.metadata.name.as_str())
            .collect();
        let mut c = Campaign::default();
        let mut waiting = Vec::new();
        for dev in selected {
            let has_it = self
                .desired
                .get(&names::os_key(dev))
                .is_some_and(|x| x.bytes == bytes);
            let phase = self.os_phase_of(dev, u);
            let ended = phase.is_some_and(OsPhase::is_final);
            // A device this campaign already reached stays counted in it; one it has not
            // reached may belong to an earlier campaign first.
            if !has_it && !ended && self.os_owner(dev).map(|o| &o.metadata.name) != Some(name) {
                continue;
            }
            c.devices.push(dev.to_owned());
            match phase {
                Some(OsPhase::Committed) => c.committed += 1,
                Some(p) if p.is_failure() => c.failed += 1,
                _ => {}
            }
            if has_it || ended {
                c.started.insert(dev.to_owned());
            } else {
                waiting.push(dev);
            }
        }
        if c.failed >= u.spec.halt_after_failures as usize {
            let failures: Vec<String> = c
                .devices
                .iter()
                .filter_map(|d| {
                    let phase = self.os_phase_of(d, u).filter(|p| p.is_failure())?;
                    let message = self.os_report_on(d, u).map_or("", |r| r.message.as_str());
                    Some(format!("{d} {phase}: {message}"))
                })
                .collect();
            c.halted = Some(format!(
                "{} of haltAfterFailures {} devices failed: {}",
                c.failed,
                u.spec.halt_after_failures,
                failures.join("; ")
            ));
            return c;
        }
        let all_ended = c
            .started
            .iter()
            .all(|d| self.os_phase_of(d, u).is_some_and(OsPhase::is_final));
        if !all_ended || waiting.is_empty() {
            return c;
        }
        let room = if c.started.is_empty() && u.spec.canaries > 0 {
            u.spec.canaries as usize
        } else {
            u.spec.wave_size.map_or(usize::MAX, |n| n.max(1) as usize)
        };
        // Healthy devices first: an offline one would only hold the wave up.
        waiting.sort_by_key(|dev| (self.health(dev, now_ms).0 != Health::Healthy, *dev));
        c.admit = waiting.into_iter().take(room).map(str::to_owned).collect();
        c
    }

    /// Every `<device>._os` desired key that must exist, and its bytes: the value of the
    /// campaign that owns the device, once it reached or admits it; otherwise the device keeps
    /// what it has (an upgrade it has made, or an earlier generation it may be making).
    pub fn wanted_os(&self, now_ms: u64) -> BTreeMap<String, Vec<u8>> {
        let mut wanted = BTreeMap::new();
        for u in self.os_upgrades.values() {
            let bytes = desired_bytes(u);
            let c = self.campaign(u, now_ms);
            for dev in &c.devices {
                let key = names::os_key(dev);
                let owner = self.os_owner(dev).map(|o| &o.metadata.name);
                let reached = c.admit.contains(dev)
                    || (c.started.contains(dev) && owner == Some(&u.metadata.name));
                if reached {
                    wanted.insert(key, bytes.clone());
                } else if let Some(current) = self.desired.get(&key) {
                    wanted.entry(key).or_insert_with(|| current.bytes.clone());
                }
            }
        }
        wanted
    }

    pub fn os_upgrade_status(&self, u: &OsUpgrade, now_ms: u64) -> OsUpgradeStatus {
        let c = self.campaign(u, now_ms);
        let canaries = u.spec.canaries as usize;
        // The wave of each started device, by the order the campaign reached it.
        let mut order: Vec<(&String, u64)> = c
            .started
            .iter()
            .map(|d| {
                let at = self.desired.get(&names::os_key(d)).map_or(0, |x| x.at_ms);
                (d, at)
            })
            .collect();
        order.sort_by_key(|(d, at)| (*at, (*d).clone()));
        let waves: BTreeMap<&String, u32> = order
            .iter()
            .enumerate()
            .map(|(i, (d, _))| {
                let wave = if i < canaries {
                    0
                } else {
                    let size = u.spec.wave_size.map_or(usize::MAX, |n| n.max(1) as usize);
                    1 + ((i - canaries) / size) as u32
                };
                (*d, wave)
            })
            .collect();
        let devices: Vec<DeviceOsStatus> = c
            .devices
            .iter()
            .map(|d| DeviceOsStatus {
                device: d.clone(),
                wave: waves.get(d).copied(),
                reported: self.os_reports.get(d).cloned().filter(|r| {
                    r.upgrade.as_ref().is_some_and(|x| {
                        x.upgrade == u.metadata.name && x.generation == u.metadata.generation
                    })
                }),
            })
            .collect();
        let phase = if c.devices.is_empty() {
            OsUpgradePhase::NoDevices
        } else if c.halted.is_some() {
            OsUpgradePhase::Halted
        } else if c.committed + c.failed == c.devices.len() {
            OsUpgradePhase::Complete
        } else {
            OsUpgradePhase::Progressing
        };
        OsUpgradeStatus {
            phase,
            desired_devices: c.devices.len(),
            started_devices: c.started.len(),
            committed_devices: c.committed,
            failed_devices: c.failed,
            halted: c.halted,
            devices,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Stored;
    use fleet_contracts::{
        resource::{Device, LabelSelector, Metadata, OsUpgradeSpec},
        spec::OsRelease,
        state::{OsOutcome, OsReport},
    };

    fn device(name: &str) -> Device {
        Device {
            api_version: fleet_contracts::API_VERSION.into(),
            kind: "Device".into(),
            metadata: Metadata {
                name: name.into(),
                labels: [("role".to_owned(), "pi".to_owned())].into(),
                generation: 1,
            },
            spec: Default::default(),
            status: None,
        }
    }

    fn upgrade(name: &str, canaries: u32, wave_size: Option<u32>, halt: u32) -> OsUpgrade {
        OsUpgrade {
            api_version: fleet_contracts::API_VERSION.into(),
            kind: "OsUpgrade".into(),
            metadata: Metadata {
                name: name.into(),
                labels: Default::default(),
                generation: 1,
            },
            spec: OsUpgradeSpec {
                selector: LabelSelector {
                    match_labels: [("role".to_owned(), "pi".to_owned())].into(),
                },
                release: OsRelease {
                    name: "r2".into(),
                    sources: vec!["deb http://x/ ./".into()],
                    packages: [("fleet-os-marker".to_owned(), "2".to_owned())].into(),
                    full_upgrade: false,
                },
                canaries,
                wave_size,
                halt_after_failures: halt,
                check_in_deadline_seconds: 600,
                boot_attempts: 3,
                checks: vec![],
            },
            status: None,
        }
    }

    fn fleet(devices: &[&str], upgrades: &[OsUpgrade]) -> Fleet {
        let mut f = Fleet::default();
        for d in devices {
            f.devices.insert((*d).into(), device(d));
        }
        for u in upgrades {
            f.os_upgrades.insert(u.metadata.name.clone(), u.clone());
        }
        f
    }

    /// Writes what `wanted_os` asks for, as the controller does; returns the devices given it.
    fn step(f: &mut Fleet, now: u64) -> Vec<String> {
        let mut given = Vec::new();
        for (key, bytes) in f.wanted_os(now) {
            if f.desired.get(&key).is_none_or(|x| x.bytes != bytes) {
                given.push(key.split('.').next().unwrap().to_owned());
                f.desired.insert(key, Stored { bytes, at_ms: now });
            }
        }
        given
    }

    /// The device's report, as the agent sends it: the previous upgrade, once ended, moves to
    /// the history when another one starts.
    fn report(f: &mut Fleet, device: &str, upgrade: &str, phase: OsPhase) {
        let mut history = Vec::new();
        if let Some(old) = f.os_reports.get(device) {
            history = old.history.clone();
            if let Some(u) = old.upgrade.as_ref().filter(|u| u.upgrade != upgrade) {
                history.push(OsOutcome {
                    upgrade: u.upgrade.clone(),
                    generation: u.generation,
                    phase: u.phase,
                });
            }
        }
        f.os_reports.insert(
            device.into(),
            OsReport {
                schema: 1,
                history,
                release: "r1".into(),
                upgrade: Some(OsUpgradeReport {
                    upgrade: upgrade.into(),
                    generation: 1,
                    phase,
                    from_release: "r1".into(),
                    to_release: "r2".into(),
                    message: format!("{phase}"),
                    since_ms: 0,
                }),
            },
        );
    }

    #[test]
    fn the_canary_goes_first_then_waves_once_every_device_before_has_ended() {
        let u = upgrade("up", 1, Some(2), 2);
        let mut f = fleet(&["a", "b", "c", "d", "e"], std::slice::from_ref(&u));
        assert_eq!(step(&mut f, 1), ["a"]);
        assert_eq!(
            step(&mut f, 2),
            Vec::<String>::new(),
            "the canary has not ended"
        );
        report(&mut f, "a", "up", OsPhase::Probation);
        assert_eq!(step(&mut f, 3), Vec::<String>::new());
        report(&mut f, "a", "up", OsPhase::Committed);
        assert_eq!(step(&mut f, 4), ["b", "c"]);
        report(&mut f, "b", "up", OsPhase::Committed);
        assert_eq!(step(&mut f, 5), Vec::<String>::new(), "c has not ended");
        // One failure is below the threshold of 2: the campaign goes on.
        report(&mut f, "c", "up", OsPhase::RolledBack);
        assert_eq!(step(&mut f, 6), ["d", "e"]);
        let s = f.os_upgrade_status(&u, 7);
        assert_eq!(s.phase, OsUpgradePhase::Progressing);
        assert_eq!((s.committed_devices, s.failed_devices), (2, 1));
        let waves: Vec<_> = s
            .devices
            .iter()
            .map(|d| (d.device.as_str(), d.wave))
            .collect();
        assert_eq!(
            waves,
            [
                ("a", Some(0)),
                ("b", Some(1)),
                ("c", Some(1)),
                ("d", Some(2)),
                ("e", Some(2))
            ]
        );
        report(&mut f, "d", "up", OsPhase::Committed);
        report(&mut f, "e", "up", OsPhase::Committed);
        assert_eq!(f.os_upgrade_status(&u, 8).phase, OsUpgradePhase::Complete);
    }

    #[test]
    fn a_failed_canary_halts_the_campaign_and_no_other_device_is_started() {
        let u = upgrade("up", 1, None, 1);
        let mut f = fleet(&["a", "b", "c"], std::slice::from_ref(&u));
        assert_eq!(step(&mut f, 1), ["a"]);
        report(&mut f, "a", "up", OsPhase::RolledBack);
        assert_eq!(step(&mut f, 2), Vec::<String>::new());
        let s = f.os_upgrade_status(&u, 3);
        assert_eq!(s.phase, OsUpgradePhase::Halted);
        assert!(s.halted.unwrap().contains("a RolledBack"));
        assert_eq!(s.started_devices, 1);
        assert!(!f.desired.contains_key("b._os") && !f.desired.contains_key("c._os"));
    }

    #[test]
    fn a_device_takes_one_campaign_at_a_time() {
        let first = upgrade("a-first", 0, None, 1);
        let second = upgrade("b-second", 0, None, 1);
        let mut f = fleet(&["x"], &[first.clone(), second.clone()]);
        assert_eq!(step(&mut f, 1), ["x"]);
        assert_eq!(f.desired["x._os"].bytes, desired_bytes(&first));
        report(&mut f, "x", "a-first", OsPhase::Upgrading);
        assert_eq!(
            step(&mut f, 2),
            Vec::<String>::new(),
            "x is busy with the first"
        );
        assert_eq!(
            f.os_upgrade_status(&second, 2).phase,
            OsUpgradePhase::NoDevices
        );
        report(&mut f, "x", "a-first", OsPhase::Committed);
        assert_eq!(step(&mut f, 3), ["x"]);
        assert_eq!(f.desired["x._os"].bytes, desired_bytes(&second));
        report(&mut f, "x", "b-second", OsPhase::Preparing);
        assert_eq!(
            step(&mut f, 4),
            Vec::<String>::new(),
            "the second keeps the device"
        );
        assert_eq!(f.desired["x._os"].bytes, desired_bytes(&second));
        // The first still counts its device as committed.
        assert_eq!(
            f.os_upgrade_status(&first, 3).phase,
            OsUpgradePhase::Complete
        );
    }

    /// Whatever the names' order, the campaign a device ended does not take its key back
    /// from the one it moved on to.
    #[test]
    fn a_later_campaign_named_first_still_gets_the_device() {
        let done = upgrade("zz-done", 0, None, 1);
        let mut f = fleet(&["x"], std::slice::from_ref(&done));
        assert_eq!(step(&mut f, 1), ["x"]);
        report(&mut f, "x", "zz-done", OsPhase::Committed);
        let next = upgrade("aa-next", 0, None, 1);
        f.os_upgrades.insert("aa-next".into(), next.clone());
        assert_eq!(step(&mut f, 2), ["x"]);
        assert_eq!(f.desired["x._os"].bytes, desired_bytes(&next));
        report(&mut f, "x", "aa-next", OsPhase::Preparing);
        assert_eq!(step(&mut f, 3), Vec::<String>::new());
        assert_eq!(f.desired["x._os"].bytes, desired_bytes(&next));
        report(&mut f, "x", "aa-next", OsPhase::Committed);
        assert_eq!(step(&mut f, 4), Vec::<String>::new(), "nothing new to make");
        assert_eq!(
            f.os_upgrade_status(&done, 4).phase,
            OsUpgradePhase::Complete
        );
        assert_eq!(
            f.os_upgrade_status(&next, 4).phase,
            OsUpgradePhase::Complete
        );
    }

    /// A campaign created while a device makes another one's upgrade waits for it.
    #[test]
    fn a_new_campaign_does_not_take_a_device_from_the_one_it_is_making() {
        let running = upgrade("b-running", 0, None, 1);
        let mut f = fleet(&["x"], std::slice::from_ref(&running));
        assert_eq!(step(&mut f, 1), ["x"]);
        report(&mut f, "x", "b-running", OsPhase::Upgrading);
        let newer = upgrade("a-newer", 0, None, 1);
        f.os_upgrades.insert("a-newer".into(), newer.clone());
        assert_eq!(step(&mut f, 2), Vec::<String>::new(), "x keeps its upgrade");
        assert_eq!(f.desired["x._os"].bytes, desired_bytes(&running));
        assert_eq!(f.os_upgrade_status(&running, 2).started_devices, 1);
        assert_eq!(
            f.os_upgrade_status(&newer, 2).phase,
            OsUpgradePhase::NoDevices
        );
        report(&mut f, "x", "b-running", OsPhase::Committed);
        assert_eq!(step(&mut f, 3), ["x"]);
        assert_eq!(f.desired["x._os"].bytes, desired_bytes(&newer));
    }
}
