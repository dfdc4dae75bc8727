//! What people and Prometheus read without the token: the status page and `/metrics`.

use super::*;

pub(super) async fn metrics(State(shared): State<Arc<Operator>>) -> impl IntoResponse {
    let mut out = String::new();
    let m = &shared.metrics;
    let counter = |out: &mut String, name: &str, help: &str, v: u64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        );
    };
    counter(
        &mut out,
        "fleet_operator_desired_puts_total",
        "Desired keys written.",
        m.desired_puts.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "fleet_operator_desired_deletes_total",
        "Desired keys deleted.",
        m.desired_deletes.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "fleet_operator_fan_out_errors_total",
        "Failed desired writes.",
        m.fan_out_errors.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "fleet_operator_unreadable_values_total",
        "KV values skipped as unreadable.",
        m.unreadable_values.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "fleet_operator_refused_requests_total",
        "Enrollment and renewal requests refused before any work (a reply subject outside the requester's inbox).",
        m.refused_requests.load(Ordering::Relaxed),
    );
    counter(
        &mut out,
        "fleet_operator_refused_reports_total",
        "Report entries refused (not what their key holds, too large, too many keys).",
        m.refused_reports.load(Ordering::Relaxed),
    );
    let fleet = shared.fleet.read().unwrap();
    let now = now_ms();
    let _ = write!(
        out,
        "# HELP fleet_operator_converged 1 once every KV bucket has been read (and, leading, the desired state written).\n# TYPE fleet_operator_converged gauge\nfleet_operator_converged {}\n# HELP fleet_operator_leader 1 while this operator holds the leadership lease.\n# TYPE fleet_operator_leader gauge\nfleet_operator_leader {}\n",
        u8::from(shared.converged()),
        u8::from(shared.leadership.is_leader())
    );
    out.push_str(
        "# HELP fleet_operator_devices Devices by health.\n# TYPE fleet_operator_devices gauge\n",
    );
    for health in [
        Health::Healthy,
        Health::Stale,
        Health::Offline,
        Health::Unknown,
    ] {
        let n = fleet
            .devices
            .keys()
            .filter(|d| fleet.health(d, now).0 == health)
            .count();
        let _ = writeln!(out, "fleet_operator_devices{{health=\"{health}\"}} {n}");
    }
    let _ = write!(
        out,
        "# HELP fleet_operator_unregistered_devices Devices that report but have no Device record (the store lost it, or a restore predates it): `fleetctl device adopt`.\n# TYPE fleet_operator_unregistered_devices gauge\nfleet_operator_unregistered_devices {}\n",
        fleet.unregistered().count()
    );
    out.push_str("# HELP fleet_operator_deployment_devices Matching devices per Deployment by state.\n# TYPE fleet_operator_deployment_devices gauge\n");
    for d in fleet.deployments.values() {
        let s = fleet.deployment_status(d, now);
        let name = &d.metadata.name;
        for (state, n) in [
            ("desired", s.desired_devices),
            ("running", s.running_devices),
            ("failed", s.failed_devices),
        ] {
            let _ = writeln!(
                out,
                "fleet_operator_deployment_devices{{deployment=\"{name}\",state=\"{state}\"}} {n}"
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// The status page: server-rendered, refreshes itself every few seconds, no JavaScript.
pub(super) async fn page(State(shared): State<Arc<Operator>>) -> Html<String> {
    let status = status_body(&shared);
    let fleet = shared.fleet.read().unwrap();
    let now = now_ms();
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=3>\
         <title>Fleet</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}\
         td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}.banner{padding:.5em;margin-bottom:1em}\
         .recovering{background:#fec}.converged{background:#dfd}.Failed,.Offline{color:#b00}.Stale,.Degraded{color:#a60}\
         .Running,.Healthy,.Complete{color:#070}.Halted{color:#b00}.Unregistered{color:#a0a}</style></head><body><h1>Fleet</h1>",
    );
    match status.state {
        RecoveryState::Converged => {
            h.push_str("<div class='banner converged' id=state>converged</div>")
        }
        RecoveryState::Recovering => {
            let _ = write!(
                h,
                "<div class='banner recovering' id=state>recovering: {}</div>",
                esc(&status.pending.join(", "))
            );
        }
    }
    let _ = write!(
        h,
        "<p id=role>operator {} ({}){}</p>",
        esc(&status.instance),
        if status.role == Role::Leader {
            "leader"
        } else {
            "standby"
        },
        match (&status.role, &status.leader) {
            (Role::Standby, Some(l)) => format!("; the leader is {}", esc(l)),
            (Role::Standby, None) => "; no leader known".to_owned(),
            _ => String::new(),
        }
    );
    if !status.unreadable.is_empty() {
        h.push_str("<div class='banner recovering' id=unreadable>skipped (unreadable, left as they are):<ul>");
        for u in &status.unreadable {
            let _ = write!(h, "<li>{}</li>", esc(u));
        }
        h.push_str("</ul></div>");
    }
    h.push_str("<h2>Deployments</h2><table><tr><th>name</th><th>generation</th><th>phase</th><th>running</th><th>devices</th></tr>");
    for d in fleet.deployments.values() {
        let s = fleet.deployment_status(d, now);
        let phase = format!("{:?}", s.phase);
        let devices = s
            .devices
            .iter()
            .map(|x| {
                let phase = x.reported.as_ref().map_or("-".to_owned(), |r| {
                    format!("{} (gen {})", r.phase, r.observed_generation)
                });
                format!("{}: {}", esc(&x.device), esc(&phase))
            })
            .collect::<Vec<_>>()
            .join("<br>");
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class={phase}>{phase}</td><td>{}/{}</td><td>{devices}</td></tr>",
            esc(&d.metadata.name),
            d.metadata.generation,
            s.running_devices,
            s.desired_devices
        );
    }
    h.push_str("</table><h2>OS upgrades</h2><table id=osupgrades><tr><th>name</th><th>release</th><th>phase</th><th>committed/started/all</th><th>devices</th></tr>");
    for u in fleet.os_upgrades.values() {
        let s = fleet.os_upgrade_status(u, now);
        let phase = format!("{:?}", s.phase);
        let mut devices = s
            .devices
            .iter()
            .map(|x| {
                let said = x
                    .reported
                    .as_ref()
                    .and_then(|r| r.upgrade.as_ref())
                    .map_or("not started".to_owned(), |r| {
                        format!("{}: {}", r.phase, r.message)
                    });
                format!("{}: {}", esc(&x.device), esc(&said))
            })
            .collect::<Vec<_>>()
            .join("<br>");
        if let Some(halted) = &s.halted {
            devices = format!("halted: {}<br>{devices}", esc(halted));
        }
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class={phase}>{phase}</td><td>{}/{}/{}</td><td>{devices}</td></tr>",
            esc(&u.metadata.name),
            esc(&u.spec.release.name),
            s.committed_devices,
            s.started_devices,
            s.desired_devices
        );
    }
    h.push_str("</table><h2>Devices</h2><table><tr><th>name</th><th>health</th><th>last heartbeat</th><th>agent</th><th>os</th><th>release</th><th>labels</th></tr>");
    let unregistered: Vec<Device> = fleet
        .unregistered()
        .filter_map(|name| fleet.unregistered_device(name, now))
        .collect();
    for dev in fleet.devices.values().chain(&unregistered) {
        let s = dev
            .status
            .clone()
            .unwrap_or_else(|| fleet.device_status(dev, now));
        let age = s.heartbeat_age_ms.map_or("never".to_owned(), |ms| {
            format!("{:.1} s ago", ms as f64 / 1000.0)
        });
        let (agent, os) = s.heartbeat.as_ref().map_or(("-".into(), "-".into()), |hb| {
            (hb.agent_version.clone(), hb.os.clone())
        });
        let health = s.shown_health();
        let release = s.os.as_ref().map_or("-".to_owned(), |o| o.release.clone());
        let labels = dev
            .metadata
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(
            h,
            "<tr><td>{}</td><td class={}>{}</td><td>{age}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&dev.metadata.name),
            if s.unregistered {
                "Unregistered".to_owned()
            } else {
                s.health.to_string()
            },
            esc(&health),
            esc(&agent),
            esc(&os),
            esc(&release),
            esc(&labels)
        );
    }
    h.push_str("</table></body></html>");
    Html(h)
}

pub(super) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&#39;")
        .replace('"', "&quot;")
}
