//! OS upgrade campaigns against the real operator and real agents on this host (each with its
//! own podman storage). The agents run with `os_upgrades = false` (they are on the test
//! machine, not on a device), so each refuses an upgrade before touching anything: a refusal
//! is a failed device for its campaign. What a device does with an upgrade it accepts (apt,
//! the reboot, the check-in, the rollback) is proven under QEMU in
//! `qemu-tests/tests/os_upgrade.rs`.
#![allow(clippy::disallowed_methods)] // It runs fleetctl as a person would.

use anyhow::{Context, Result, bail, ensure};
use fleet_contracts::{
    names,
    resource::OsUpgradePhase,
    rpc::{ReportEntry, ReportReply, ReportRequest},
    state::OsPhase,
};
use fleet_e2e::{
    TestFleet, WAIT, eventually, raw,
    store::{settled, snapshot, unchanged},
};

fn campaign(halt_after: u32) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "OsUpgrade",
        "metadata": {"name": "spring"},
        "spec": {
            "selector": {"matchLabels": {"role": "fleet"}},
            "release": {
                "name": "fleet-e2e-2",
                "sources": ["deb [trusted=yes] http://127.0.0.1:9/ ./"],
                "packages": {"fleet-test-marker": "2"}
            },
            "canaries": 1,
            "waveSize": 1,
            "haltAfterFailures": halt_after
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_campaign_halts_after_its_canary_fails_and_no_other_device_gets_the_upgrade() -> Result<()>
{
    let fleet = TestFleet::start().await?;
    let mut devices = Vec::new();
    for name in ["pi-a", "pi-b", "pi-c"] {
        devices.push(fleet.device(name, &[("role", "fleet")]).await?);
    }
    let client = fleet.operator.client();
    // Every agent reports the release it runs (none named here) from its start.
    eventually("every device to report its release", WAIT, || async {
        let reported = client
            .devices()?
            .iter()
            .filter(|d| {
                d.status
                    .as_ref()
                    .and_then(|s| s.os.as_ref())
                    .is_some_and(|os| os.release == "unknown" && os.upgrade.is_none())
            })
            .count();
        Ok((reported == 3).then_some(()))
    })
    .await?;

    fleet.operator.apply(&campaign(1))?;
    let halted = eventually("the campaign to halt", WAIT, || async {
        let u = client.os_upgrade("spring")?;
        let s = u.status.context("no status")?;
        match s.phase {
            OsUpgradePhase::Halted => Ok(Some(s)),
            OsUpgradePhase::Progressing => Ok(None),
            other => bail!("{other:?}: {s:?}"),
        }
    })
    .await?;
    assert_eq!(
        (
            halted.started_devices,
            halted.failed_devices,
            halted.committed_devices
        ),
        (1, 1, 0)
    );
    let reason = halted.halted.clone().unwrap();
    assert!(
        reason.starts_with(
            "1 of haltAfterFailures 1 devices failed: pi-a Refused: OS upgrades are off"
        ),
        "{reason}"
    );
    let canary = &halted.devices[0];
    assert_eq!((canary.device.as_str(), canary.wave), ("pi-a", Some(0)));
    let report = canary
        .reported
        .as_ref()
        .and_then(|r| r.upgrade.as_ref())
        .context("no canary report")?;
    assert_eq!(report.phase, OsPhase::Refused);
    assert_eq!(
        (report.from_release.as_str(), report.to_release.as_str()),
        ("unknown", "fleet-e2e-2")
    );
    // Only the canary was given the upgrade; the others never hear of it, and stay so.
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let desired = js.get_key_value(names::DESIRED_BUCKET).await?;
    assert!(desired.get(names::os_key("pi-a")).await?.is_some());
    for dev in ["pi-b", "pi-c"] {
        assert!(
            desired.get(names::os_key(dev)).await?.is_none(),
            "{dev} was given the upgrade"
        );
        let os = client.device(dev)?.status.and_then(|s| s.os);
        assert!(os.is_some_and(|o| o.upgrade.is_none()), "{dev}");
    }
    // fleetctl shows the same.
    let out = std::process::Command::new(fleet_e2e::binary("fleetctl"))
        .args([
            "--server",
            &fleet.operator.url,
            "describe",
            "osupgrade",
            "spring",
        ])
        .env("FLEET_TOKEN", &fleet.operator.token)
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Phase:       Halted"), "{text}");
    assert!(text.contains("pi-a    canary  Refused"), "{text}");
    assert!(text.contains("pi-b    -       -"), "{text}");

    // A new generation that tolerates the failures goes on, a device at a time, and every
    // device refuses it in turn.
    fleet.operator.apply(&campaign(3))?;
    let done = eventually("the new generation to reach every device", WAIT, || async {
        let s = client.os_upgrade("spring")?.status.context("no status")?;
        Ok((s.failed_devices == 3).then_some(s))
    })
    .await?;
    assert_eq!(
        done.phase,
        OsUpgradePhase::Halted,
        "3 failures reach the threshold of 3"
    );
    assert_eq!(done.started_devices, 3);
    drop(devices);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_report_an_os_upgrade_the_operator_would_show_as_something_else()
-> Result<()> {
    let fleet = TestFleet::start().await?;
    let (key, jwt) = raw::enroll(&fleet, "dev-x", &[("role", "x")]).await?;
    let conn = raw::device(&fleet, "dev-x", &key, &jwt).await?;
    let before = settled(&fleet).await?;
    let good = || {
        serde_json::json!({"schema": 1, "release": "fleet-pi-1", "upgrade": {
            "upgrade": "spring", "generation": 1, "phase": "Probation",
            "fromRelease": "fleet-pi-1", "toRelease": "fleet-pi-2",
            "message": "boot 1", "sinceMs": 1}})
    };
    let hostile = [
        ("/release", serde_json::json!("\u{1b}]0;owned\u{7}")),
        ("/upgrade/upgrade", serde_json::json!("other.device")),
        ("/upgrade/toRelease", serde_json::json!("a\nb")),
        ("/upgrade/message", serde_json::json!("x".repeat(4096))),
        ("/upgrade/phase", serde_json::json!(42)),
    ];
    for (field, bad) in hostile {
        let mut value = good();
        *value.pointer_mut(field).unwrap() = bad;
        let request = ReportRequest {
            schema: 1,
            entries: vec![ReportEntry {
                key: names::OS_KEY.into(),
                value: Some(value),
            }],
        };
        let reply = conn
            .client
            .request(
                names::report_subject("dev-x"),
                serde_json::to_vec(&request)?.into(),
            )
            .await?;
        match serde_json::from_slice(&reply.payload)? {
            ReportReply::Stored { refused } => ensure!(
                refused.contains_key(names::OS_KEY),
                "{field}: not refused ({refused:?})"
            ),
            other => bail!("{field}: {other:?}"),
        }
    }
    unchanged(&before, &snapshot(&fleet).await?)?;
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let reported = js.get_key_value(names::REPORTED_BUCKET).await?;
    ensure!(
        reported.get(names::os_key("dev-x")).await?.is_none(),
        "a hostile OS report was stored"
    );
    Ok(())
}
