//! What `fleetctl` prints for people: tables, `describe` pages and progress lines, as pure
//! functions of what the API returned (and the time, passed in), unit-tested below.

use fleet_contracts::{
    resource::{Deployment, Device, OsUpgrade, RolloutPhase},
    state::{EnrollmentToken, HealthFlag, OsReport, Phase},
};

/// `web gen 2: 1/3 running; pi-02 Creating; pi-03 Failed (reason)`.
pub fn progress_line(d: &Deployment) -> String {
    let s = d.status.clone().unwrap_or_default();
    let mut line = format!(
        "{} gen {}: {}/{} running",
        d.metadata.name, d.metadata.generation, s.running_devices, s.desired_devices
    );
    if let Some(r) = &s.rollout {
        line.push_str(&format!(
            " (rollout: {}/{} updated, waves of {})",
            r.updated_devices, s.desired_devices, r.wave_size
        ));
        if let Some(h) = &r.halted {
            line.push_str(&format!(" HALTED: {h}"));
        }
        if let Some(w) = &r.waiting {
            line.push_str(&format!(" waiting: {w}"));
        }
    }
    if s.phase == RolloutPhase::NoDevices {
        line.push_str(" (no device matches the selector)");
    }
    for dev in &s.devices {
        match &dev.reported {
            Some(r) if r.observed_generation == d.metadata.generation => {
                if !matches!(r.phase, Phase::Ready | Phase::Completed) {
                    line.push_str(&format!("; {} {}", dev.device, r.phase));
                    if !r.message.is_empty() {
                        line.push_str(&format!(" ({})", shown(&r.message)));
                    }
                }
            }
            Some(r) => line.push_str(&format!(
                "; {} still on gen {}",
                dev.device, r.observed_generation
            )),
            None => line.push_str(&format!(
                "; {} not reported ({})",
                dev.device, dev.device_health
            )),
        }
    }
    line
}

pub fn failure_reasons(d: &Deployment) -> String {
    let s = d.status.clone().unwrap_or_default();
    let halted = s.rollout.as_ref().and_then(|r| r.halted.clone());
    s.devices
        .iter()
        .filter_map(|dev| {
            let r = dev.reported.as_ref()?;
            (r.phase == Phase::Failed && r.observed_generation == d.metadata.generation)
                .then(|| format!("  {}: {}", dev.device, shown(&r.message)))
        })
        .chain(halted.map(|h| format!("  rollout halted: {h}")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Formats rows as aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_owned()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// `1.5s`, `3m20s`, `2h5m`.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{:.1}s", ms as f64 / 1000.0),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

pub fn deployments_table(list: &[Deployment]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            let s = d.status.clone().unwrap_or_default();
            let image = d
                .spec
                .template
                .containers
                .first()
                .map_or("-".to_owned(), |c| c.image.clone());
            vec![
                d.metadata.name.clone(),
                d.metadata.generation.to_string(),
                format!("{:?}", s.phase),
                format!("{}/{}", s.running_devices, s.desired_devices),
                image,
            ]
        })
        .collect();
    table(&["NAME", "GEN", "PHASE", "RUNNING", "IMAGE"], &rows)
}

pub fn devices_table(list: &[Device]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            let s = d.status.clone().unwrap_or_default();
            let labels = d
                .metadata
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let health = s.shown_health();
            vec![
                d.metadata.name.clone(),
                health,
                s.heartbeat_age_ms.map_or("never".into(), age),
                s.heartbeat
                    .as_ref()
                    .map_or("-".into(), |h| shown(&h.agent_version)),
                s.os.as_ref().map_or("-".into(), os_release),
                s.deployments.len().to_string(),
                labels,
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "HEALTH",
            "HEARTBEAT",
            "AGENT",
            "RELEASE",
            "DEPLOYMENTS",
            "LABELS",
        ],
        &rows,
    )
}

/// The release a device runs, with its upgrade's phase while one is under way.
fn os_release(os: &OsReport) -> String {
    match os.upgrade.as_ref().filter(|u| !u.phase.is_final()) {
        Some(u) => format!(
            "{} ({} to {})",
            shown(&os.release),
            u.phase,
            shown(&u.to_release)
        ),
        None => shown(&os.release),
    }
}

pub fn os_upgrades_table(list: &[OsUpgrade]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|u| {
            let s = u.status.clone().unwrap_or_default();
            vec![
                u.metadata.name.clone(),
                u.metadata.generation.to_string(),
                format!("{:?}", s.phase),
                u.spec.release.name.clone(),
                format!(
                    "{}/{}/{}",
                    s.committed_devices, s.started_devices, s.desired_devices
                ),
                s.failed_devices.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "GEN",
            "PHASE",
            "RELEASE",
            "COMMITTED/STARTED/ALL",
            "FAILED",
        ],
        &rows,
    )
}

pub fn describe_os_upgrade(u: &OsUpgrade) -> String {
    let s = u.status.clone().unwrap_or_default();
    let mut out = format!(
        "Name:        {}\nGeneration:  {}\nPhase:       {:?} ({} committed, {} failed, {} started of {})\n\
         Release:     {} ({} pinned package(s){})\nSelector:    {}\n\
         Waves:       {} canary(ies), then {}; halt after {} failure(s)\n\
         Check-in:    within {}s of boot, {} boot(s) at most\n",
        u.metadata.name,
        u.metadata.generation,
        s.phase,
        s.committed_devices,
        s.failed_devices,
        s.started_devices,
        s.desired_devices,
        u.spec.release.name,
        u.spec.release.packages.len(),
        if u.spec.release.full_upgrade {
            ", full upgrade"
        } else {
            ""
        },
        u.spec
            .selector
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
        u.spec.canaries,
        u.spec
            .wave_size
            .map_or("all the rest at once".into(), |n| format!("{n} at a time")),
        u.spec.halt_after_failures,
        u.spec.check_in_deadline_seconds,
        u.spec.boot_attempts,
    );
    for c in &u.spec.checks {
        out.push_str(&format!(
            "  and check {}: {}\n",
            c.name,
            shown(&c.command.join(" "))
        ));
    }
    if let Some(h) = &s.halted {
        out.push_str(&format!("Halted:      {}\n", shown(h)));
    }
    out.push_str("\nDevices:\n");
    let rows: Vec<Vec<String>> = s
        .devices
        .iter()
        .map(|d| {
            let wave = d.wave.map_or("-".into(), |w| {
                if w == 0 {
                    "canary".into()
                } else {
                    w.to_string()
                }
            });
            match d
                .reported
                .as_ref()
                .and_then(|r| r.upgrade.as_ref().map(|u| (r, u)))
            {
                Some((r, up)) => vec![
                    d.device.clone(),
                    wave,
                    up.phase.to_string(),
                    shown(&r.release),
                    shown(&up.message),
                ],
                None => vec![
                    d.device.clone(),
                    wave,
                    "-".into(),
                    "-".into(),
                    "not started".into(),
                ],
            }
        })
        .collect();
    out.push_str(&table(
        &["DEVICE", "WAVE", "PHASE", "RELEASE", "MESSAGE"],
        &rows,
    ));
    out
}

pub fn describe_deployment(d: &Deployment) -> String {
    let s = d.status.clone().unwrap_or_default();
    let mut out = format!(
        "Name:        {}\nGeneration:  {}\nPhase:       {:?} ({}/{} running, {} failed)\nSelector:    {}\n",
        d.metadata.name,
        d.metadata.generation,
        s.phase,
        s.running_devices,
        s.desired_devices,
        s.failed_devices,
        d.spec
            .selector
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    for c in &d.spec.template.containers {
        out.push_str(&format!("Container:   {} ({})\n", c.name, c.image));
        for p in &c.ports {
            out.push_str(&format!(
                "  port       {}:{}/{}\n",
                p.effective_host_port(),
                p.container_port,
                p.protocol.as_str()
            ));
        }
    }
    out.push_str(&format!(
        "Restart:     {:?}\n\nDevices:\n",
        d.spec.template.restart_policy
    ));
    let rows: Vec<Vec<String>> = s
        .devices
        .iter()
        .map(|dev| match &dev.reported {
            Some(r) => vec![
                dev.device.clone(),
                dev.device_health.to_string(),
                r.phase.to_string(),
                r.observed_generation.to_string(),
                r.container_id.as_deref().map_or("-".into(), |id| {
                    shown(&id.chars().take(12).collect::<String>())
                }),
                shown(&r.message),
            ],
            None => vec![
                dev.device.clone(),
                dev.device_health.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "not reported yet".into(),
            ],
        })
        .collect();
    out.push_str(&table(
        &["DEVICE", "HEALTH", "PHASE", "GEN", "CONTAINER", "MESSAGE"],
        &rows,
    ));
    out
}

/// `fleetctl describe device`; `now_ms` dates the blacklist records.
pub fn describe_device(d: &Device, now_ms: u64) -> String {
    let s = d.status.clone().unwrap_or_default();
    let mut out = format!(
        "Name:        {}\nHealth:      {}{}\nHeartbeat:   {}\nLabels:      {}\n",
        d.metadata.name,
        s.health,
        if s.unregistered {
            " (Unregistered: no Device record; `fleetctl device adopt`)"
        } else {
            ""
        },
        s.heartbeat_age_ms
            .map_or("never".into(), |ms| format!("{} ago", age(ms))),
        d.metadata
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    if let Some(os) = &s.os {
        out.push_str(&format!("Release:     {}\n", shown(&os.release)));
        if let Some(u) = &os.upgrade {
            out.push_str(&format!(
                "OS upgrade:  {} (generation {}): {}, {} to {}: {}\n",
                shown(&u.upgrade),
                u.generation,
                u.phase,
                shown(&u.from_release),
                shown(&u.to_release),
                shown(&u.message)
            ));
        }
    }
    if let Some(hb) = &s.heartbeat {
        out.push_str(&format!(
            "Agent:       {}\nOS:          {}\nUptime:      {}\n",
            shown(&hb.agent_version),
            shown(&hb.os),
            age(hb.uptime_secs * 1000)
        ));
        for f in &hb.health_flags {
            let said = match f {
                HealthFlag::StoreChanged { cached, found } => format!(
                    "store changed: holding. Its workloads came from {cached}; this store is \
                     {found}. It changes nothing until adopted (`fleetctl device adopt`)"
                ),
                HealthFlag::HeldDeployments { deployments } => format!(
                    "holds {} from an earlier store, running as they were: apply them again, \
                     or `fleetctl device release` removes them",
                    deployments.join(", ")
                ),
                other => format!("{other:?}"),
            };
            out.push_str(&format!("Flag:        {said}\n"));
        }
        if hb.dropped_requests > 0 {
            out.push_str(&format!(
                "Dropped:     {} message(s) on its request subjects that were not the operator's\n",
                hb.dropped_requests
            ));
        }
        if let Some(st) = &hb.storage {
            out.push_str(&format!(
                "Storage:     thin pool repaired {} time(s), boot partition fixed after {} unclean shutdown(s)\n",
                st.pool_repairs, st.fat_repairs
            ));
            if !st.last_pool.is_empty() {
                out.push_str(&format!("  pool:      {}\n", shown(&st.last_pool)));
            }
            if !st.last_fat.is_empty() {
                out.push_str(&format!("  boot:      {}\n", shown(&st.last_fat)));
            }
        }
    }
    if let Some(b) = &s.blacklist {
        let ago = age(now_ms.saturating_sub(b.at_ms));
        out.push_str(&format!(
            "Blacklisted: by {} {ago} ago: {}\n",
            b.by, b.reason
        ));
    }
    if let Some(u) = &s.last_unblacklist {
        let ago = age(now_ms.saturating_sub(u.at_ms));
        out.push_str(&format!(
            "Unblacklisted: by {} {ago} ago: {}\n",
            u.by, u.reason
        ));
    }
    out.push_str(&format!(
        "Deployments: {}\n",
        if s.deployments.is_empty() {
            "-".into()
        } else {
            s.deployments.join(", ")
        }
    ));
    out
}

/// `fleetctl enroll-token list`: each token's state at `now_ms`.
pub fn tokens_table(tokens: &[EnrollmentToken], now_ms: u64) -> String {
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let state = t.refusal(now_ms).map_or("usable".to_owned(), |_| {
                if t.revoked {
                    "revoked".into()
                } else if t.used_by.is_some() {
                    "used".into()
                } else {
                    "expired".into()
                }
            });
            vec![
                t.id.clone(),
                state,
                t.used_by.clone().unwrap_or_else(|| "-".into()),
                labels(&t.labels),
            ]
        })
        .collect();
    table(&["ID", "STATE", "USED BY", "LABELS"], &rows)
}

/// Text a device sent (a message, its OS name), as it may be printed on a terminal: control
/// characters (an escape sequence that would move the cursor, recolour or retitle the
/// terminal, a newline that would fake another line) are shown escaped, `\u{1b}`.
pub fn shown(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// `k=v,k2=v2`.
fn labels(labels: &fleet_contracts::Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_and_ages() {
        let t = table(
            &["NAME", "PHASE"],
            &[
                vec!["web".into(), "Running".into()],
                vec!["longer-name".into(), "-".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME         PHASE\nweb          Running\nlonger-name  -"
        );
        assert_eq!(age(1500), "1.5s");
        assert_eq!(age(200_000), "3m20s");
        assert_eq!(age(7_500_000), "2h5m");
    }

    fn deployment() -> Deployment {
        serde_json::from_value(json!({
            "apiVersion": "fleet.dev/v1", "kind": "Deployment",
            "metadata": {"name": "web", "generation": 2},
            "spec": {
                "selector": {"matchLabels": {"role": "edge"}},
                "template": {"containers": [{"name": "web", "image": "localhost/http:2",
                    "ports": [{"containerPort": 8080, "hostPort": 18080}]}]}
            },
            "status": {
                "phase": "Progressing", "desiredDevices": 3, "runningDevices": 1,
                "failedDevices": 1,
                "devices": [
                    {"device": "pi-01", "deviceHealth": "Healthy", "reported": {
                        "schema": 1, "deployment": "web", "observed_generation": 2,
                        "phase": "Ready", "container_id": "0123456789abcdef", "since_ms": 1}},
                    {"device": "pi-02", "deviceHealth": "Healthy", "reported": {
                        "schema": 1, "deployment": "web", "observed_generation": 2,
                        "phase": "Failed", "message": "image not found", "since_ms": 1}},
                    {"device": "pi-03", "deviceHealth": "Offline", "reported": null}
                ],
                "rollout": {"updatedDevices": 2, "waveSize": 1, "halted": "pi-02 failed"}
            }
        }))
        .unwrap()
    }

    fn device() -> Device {
        serde_json::from_value(json!({
            "apiVersion": "fleet.dev/v1", "kind": "Device",
            "metadata": {"name": "pi-01", "labels": {"role": "edge", "site": "a"}},
            "status": {
                "health": "Healthy", "heartbeatAgeMs": 1500, "deployments": ["web"],
                "heartbeat": {
                    "schema": 1, "device": "pi-01", "agent_version": "0.1.0",
                    "os": "Debian GNU/Linux 13 (trixie)", "uptime_secs": 200,
                    "sent_at_ms": 5, "interval_ms": 10000, "deployments": 1,
                    "health_flags": [{"heldDeployments": {"deployments": ["old"]}}],
                    "storage": {"pool_repairs": 1, "pool_repair_boots": 0,
                        "last_pool": "pool repaired", "fat_repairs": 0},
                    "dropped_requests": 3
                },
                "blacklist": {"by": "ops", "at_ms": 1_000, "reason": "stolen"},
                "os": {"schema": 1, "release": "fleet-pi-1", "upgrade": {
                    "upgrade": "spring", "generation": 2, "phase": "Upgrading",
                    "fromRelease": "fleet-pi-1", "toRelease": "fleet-pi-2",
                    "message": "apt-get install: 3 pinned package(s)", "sinceMs": 1}}
            }
        }))
        .unwrap()
    }

    #[test]
    fn deployment_table_progress_and_description() {
        let d = deployment();
        assert_eq!(
            deployments_table(std::slice::from_ref(&d)),
            "NAME  GEN  PHASE        RUNNING  IMAGE\n\
             web   2    Progressing  1/3      localhost/http:2"
        );
        assert_eq!(
            progress_line(&d),
            "web gen 2: 1/3 running (rollout: 2/3 updated, waves of 1) HALTED: pi-02 failed; \
             pi-02 Failed (image not found); pi-03 not reported (Offline)"
        );
        assert_eq!(
            failure_reasons(&d),
            "  pi-02: image not found\n  rollout halted: pi-02 failed"
        );
        let described = describe_deployment(&d);
        assert!(
            described.starts_with(
                "Name:        web\nGeneration:  2\nPhase:       Progressing (1/3 running, 1 failed)\n\
                 Selector:    role=edge\nContainer:   web (localhost/http:2)\n  port       18080:8080/tcp\n"
            ),
            "{described}"
        );
        assert!(
            described.ends_with(
                "Restart:     Always\n\nDevices:\n\
                 DEVICE  HEALTH   PHASE   GEN  CONTAINER     MESSAGE\n\
                 pi-01   Healthy  Ready   2    0123456789ab\n\
                 pi-02   Healthy  Failed  2    -             image not found\n\
                 pi-03   Offline  -       -    -             not reported yet"
            ),
            "{described}"
        );
    }

    #[test]
    fn device_table_and_description() {
        let d = device();
        assert_eq!(
            devices_table(std::slice::from_ref(&d)),
            "NAME   HEALTH   HEARTBEAT  AGENT  RELEASE                               DEPLOYMENTS  LABELS\n\
             pi-01  Healthy  1.5s       0.1.0  fleet-pi-1 (Upgrading to fleet-pi-2)  1            role=edge,site=a"
        );
        let described = describe_device(&d, 61_000);
        assert_eq!(
            described,
            "Name:        pi-01\nHealth:      Healthy\nHeartbeat:   1.5s ago\n\
             Labels:      role=edge,site=a\nRelease:     fleet-pi-1\n\
             OS upgrade:  spring (generation 2): Upgrading, fleet-pi-1 to fleet-pi-2: \
             apt-get install: 3 pinned package(s)\nAgent:       0.1.0\n\
             OS:          Debian GNU/Linux 13 (trixie)\nUptime:      3m20s\n\
             Flag:        holds old from an earlier store, running as they were: apply them \
             again, or `fleetctl device release` removes them\n\
             Dropped:     3 message(s) on its request subjects that were not the operator's\n\
             Storage:     thin pool repaired 1 time(s), boot partition fixed after 0 unclean \
             shutdown(s)\n  pool:      pool repaired\n\
             Blacklisted: by ops 1m0s ago: stolen\nDeployments: web\n"
        );
    }

    #[test]
    fn os_upgrade_table_and_description() {
        let u: OsUpgrade = serde_json::from_value(json!({
            "apiVersion": "fleet.dev/v1", "kind": "OsUpgrade",
            "metadata": {"name": "spring", "generation": 2},
            "spec": {
                "selector": {"matchLabels": {"role": "pi"}},
                "release": {"name": "fleet-pi-2", "sources": ["deb http://x/ ./"],
                    "packages": {"a": "1", "b": "2"}},
                "canaries": 1, "waveSize": 2, "haltAfterFailures": 1,
                "checkInDeadlineSeconds": 600, "bootAttempts": 3,
                "checks": [{"name": "db", "command": ["/usr/bin/pg_isready", "-h", "127.0.0.1"]}]
            },
            "status": {
                "phase": "Halted", "desiredDevices": 3, "startedDevices": 1,
                "committedDevices": 0, "failedDevices": 1,
                "halted": "1 of haltAfterFailures 1 devices failed: pi-01 RolledBack: x",
                "devices": [
                    {"device": "pi-01", "wave": 0, "reported": {"schema": 1, "release": "fleet-pi-1",
                        "upgrade": {"upgrade": "spring", "generation": 2, "phase": "RolledBack",
                            "fromRelease": "fleet-pi-1", "toRelease": "fleet-pi-2",
                            "message": "rolled back: \u{1b}[2Jx", "sinceMs": 1}}},
                    {"device": "pi-02", "wave": null, "reported": null}
                ]
            }
        }))
        .unwrap();
        assert_eq!(
            os_upgrades_table(std::slice::from_ref(&u)),
            "NAME    GEN  PHASE   RELEASE     COMMITTED/STARTED/ALL  FAILED\n\
             spring  2    Halted  fleet-pi-2  0/1/3                  1"
        );
        assert_eq!(
            describe_os_upgrade(&u),
            "Name:        spring\nGeneration:  2\n\
             Phase:       Halted (0 committed, 1 failed, 1 started of 3)\n\
             Release:     fleet-pi-2 (2 pinned package(s))\nSelector:    role=pi\n\
             Waves:       1 canary(ies), then 2 at a time; halt after 1 failure(s)\n\
             Check-in:    within 600s of boot, 3 boot(s) at most\n\
             \x20 and check db: /usr/bin/pg_isready -h 127.0.0.1\n\
             Halted:      1 of haltAfterFailures 1 devices failed: pi-01 RolledBack: x\n\n\
             Devices:\n\
             DEVICE  WAVE    PHASE       RELEASE     MESSAGE\n\
             pi-01   canary  RolledBack  fleet-pi-1  rolled back: \\u{1b}[2Jx\n\
             pi-02   -       -           -           not started"
        );
    }

    #[test]
    fn what_a_device_sent_cannot_drive_the_terminal() {
        let mut d = device();
        let hb = d.status.as_mut().unwrap().heartbeat.as_mut().unwrap();
        hb.os = "\u{1b}]0;owned\u{7}Debian\nFlag:        fake".into();
        hb.agent_version = "\u{1b}[2J0.1".into();
        let described = describe_device(&d, 0);
        assert!(!described.contains('\u{1b}'), "{described:?}");
        assert!(
            described.contains("OS:          \\u{1b}]0;owned\\u{7}Debian\\u{a}Flag:        fake\n"),
            "{described}"
        );
        assert!(!devices_table(&[d]).contains('\u{1b}'), "the table too");
        let mut dep = deployment();
        let reported = dep.status.as_mut().unwrap().devices[1]
            .reported
            .as_mut()
            .unwrap();
        reported.message = "bad\u{1b}[31m".into();
        for text in [
            progress_line(&dep),
            failure_reasons(&dep),
            describe_deployment(&dep),
        ] {
            assert!(text.contains("bad\\u{1b}[31m"), "{text}");
        }
    }

    #[test]
    fn token_states() {
        let token =
            |id: &str, used_by: Option<&str>, revoked: bool, expires_ms: u64| EnrollmentToken {
                schema: 1,
                id: id.into(),
                labels: [("role".to_owned(), "edge".to_owned())].into(),
                created_ms: 0,
                expires_ms,
                used_by: used_by.map(Into::into),
                used_ms: None,
                revoked,
                user_key: None,
            };
        let tokens = [
            token("t1", None, false, 2_000),
            token("t2", Some("pi-01"), false, 2_000),
            token("t3", None, true, 2_000),
            token("t4", None, false, 500),
        ];
        assert_eq!(
            tokens_table(&tokens, 1_000),
            "ID  STATE    USED BY  LABELS\n\
             t1  usable   -        role=edge\n\
             t2  used     pi-01    role=edge\n\
             t3  revoked  -        role=edge\n\
             t4  expired  -        role=edge"
        );
    }
}
