//! Security by default, proven by trying: with a real nats-server in JWT mode and two enrolled
//! devices A and B, device A's credentials reach no JetStream at all (not even its own keys:
//! it asks the operator), nor B's subjects, nor anyone's inbox; forged credentials and spent
//! tokens are refused. Each attempt asserts the server's permission error; each has a positive
//! control where one makes sense (A gets its own state through the operator), so a broken
//! setup cannot pass silently.

use anyhow::{Context, Result};
use async_nats::{HeaderMap, jetstream::consumer::push::OrderedConfig};
use fleet_agent::identity::{self, IdentityError};
use fleet_contracts::names::{self, DESIRED_BUCKET, REPORTED_BUCKET, RESOURCES_BUCKET};
use fleet_e2e::{
    TestFleet, WAIT, eventually,
    raw::{self, Conn},
};
use nkeys::KeyPair;

/// Two enrolled devices and a Deployment on both, so each has a desired key.
struct Setup {
    fleet: TestFleet,
    a: (KeyPair, String),
    b: (KeyPair, String),
}

async fn setup() -> Result<Setup> {
    let fleet = TestFleet::start().await?;
    let a = raw::enroll(&fleet, "dev-a", &[("role", "iso")]).await?;
    let b = raw::enroll(&fleet, "dev-b", &[("role", "iso")]).await?;
    let mut doc = fleet_e2e::http_deployment("web", "iso", 1, "x");
    doc["spec"]["template"]["containers"][0]["ports"] = serde_json::json!([]);
    fleet.operator.apply(&doc)?;
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let desired = js.get_key_value(DESIRED_BUCKET).await?;
    eventually("desired keys for both devices", WAIT, || async {
        let a = desired.get("dev-a.web").await?;
        let b = desired.get("dev-b.web").await?;
        Ok((a.is_some() && b.is_some()).then_some(()))
    })
    .await?;
    Ok(Setup { fleet, a, b })
}

async fn connect(fleet: &TestFleet, device: &str, creds: &(KeyPair, String)) -> Result<Conn> {
    raw::device(fleet, device, &creds.0, &creds.1).await
}

/// A direct get of `key` in `bucket`, the way a device reads a key.
async fn direct_get(conn: &Conn, bucket: &str, key: &str) -> Result<async_nats::Message> {
    let subject = format!(
        "$JS.API.DIRECT.GET.{}.{}",
        names::kv_stream(bucket),
        names::kv_subject(bucket, key)
    );
    Ok(conn.client.request(subject, "".into()).await?)
}

/// Asks the operator for `device`'s desired state on `conn`, the way the agent does.
async fn sync(conn: &Conn, device: &str) -> Result<fleet_contracts::rpc::SyncReply> {
    let reply = conn
        .client
        .request(names::sync_subject(device), "{\"schema\":1}".into())
        .await?;
    Ok(serde_json::from_slice(&reply.payload)?)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_gets_its_own_desired_state_and_no_one_elses() -> Result<()> {
    let s = setup().await?;
    let mut a = connect(&s.fleet, "dev-a", &s.a).await?;
    // Control: the operator answers with its own desired state.
    match sync(&a, "dev-a").await? {
        fleet_contracts::rpc::SyncReply::Desired { desired, .. } => {
            assert_eq!(desired.keys().collect::<Vec<_>>(), ["web"]);
        }
        other => anyhow::bail!("{other:?}"),
    }
    assert!(sync(&a, "dev-b").await.is_err());
    a.violation("Publish to \"fleet.sync.dev-b\"").await?;
    // JetStream is out of its reach, its own keys included.
    for device in ["dev-a", "dev-b"] {
        assert!(
            direct_get(&a, DESIRED_BUCKET, &format!("{device}.web"))
                .await
                .is_err()
        );
        a.violation(&format!(
            "Publish to \"$JS.API.DIRECT.GET.KV_fleet-desired.$KV.fleet-desired.{device}.web\""
        ))
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_create_any_consumer() -> Result<()> {
    let s = setup().await?;
    let mut a = connect(&s.fleet, "dev-a", &s.a).await?;
    let js = a.js();
    for device in ["dev-a", "dev-b"] {
        let config = OrderedConfig {
            name: Some("dev-a".into()),
            filter_subject: names::device_filter(DESIRED_BUCKET, device),
            deliver_subject: a.client.new_inbox(),
            ..Default::default()
        };
        assert!(
            js.create_consumer_on_stream(config, names::kv_stream(DESIRED_BUCKET))
                .await
                .is_err()
        );
        a.violation(&format!(
            "Publish to \"$JS.API.CONSUMER.CREATE.KV_fleet-desired.dev-a.$KV.fleet-desired.{device}.>\""
        ))
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_create_an_unfiltered_watch_over_the_bucket() -> Result<()> {
    let s = setup().await?;
    let mut a = connect(&s.fleet, "dev-a", &s.a).await?;
    let unfiltered = OrderedConfig {
        deliver_subject: a.client.new_inbox(),
        ..Default::default()
    };
    assert!(
        a.js()
            .create_consumer_on_stream(unfiltered, names::kv_stream(DESIRED_BUCKET))
            .await
            .is_err()
    );
    a.violation("Publish to \"$JS.API.CONSUMER.CREATE.KV_fleet-desired\"")
        .await?;
    // Nor can it use async-nats' KV helpers, which need the stream's info (all key names).
    assert!(a.js().get_key_value(DESIRED_BUCKET).await.is_err());
    a.violation("Publish to \"$JS.API.STREAM.INFO.KV_fleet-desired\"")
        .await
}

/// Sends one report entry of `device`'s on `conn`, the way the agent does.
async fn report(
    conn: &Conn,
    device: &str,
    key: &str,
    value: serde_json::Value,
) -> Result<fleet_contracts::rpc::ReportReply> {
    let request = fleet_contracts::rpc::ReportRequest {
        schema: 1,
        entries: vec![fleet_contracts::rpc::ReportEntry {
            key: key.into(),
            value: Some(value),
        }],
    };
    let reply = conn
        .client
        .request(
            names::report_subject(device),
            serde_json::to_vec(&request)?.into(),
        )
        .await?;
    Ok(serde_json::from_slice(&reply.payload)?)
}

fn status(deployment: &str, message: &str) -> serde_json::Value {
    serde_json::json!({"schema": 1, "deployment": deployment, "observed_generation": 1,
        "phase": "Ready", "message": message, "since_ms": 1})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_write_another_devices_reported_keys() -> Result<()> {
    let s = setup().await?;
    let mut a = connect(&s.fleet, "dev-a", &s.a).await?;
    let b = connect(&s.fleet, "dev-b", &s.b).await?;
    // Controls: each device's report lands under its own key.
    for (conn, device) in [(&a, "dev-a"), (&b, "dev-b")] {
        let reply = report(conn, device, "web", status("web", device)).await?;
        assert!(
            matches!(&reply, fleet_contracts::rpc::ReportReply::Stored { refused } if refused.is_empty()),
            "{reply:?}"
        );
    }
    // A cannot ask on B's report subject...
    assert!(
        report(&a, "dev-b", "web", status("web", "by a"))
            .await
            .is_err()
    );
    a.violation("Publish to \"fleet.report.dev-b\"").await?;
    // ...nor name B's key in its own report...
    let reply = report(&a, "dev-a", "dev-b.web", status("dev-b.web", "by a")).await?;
    assert!(
        matches!(&reply, fleet_contracts::rpc::ReportReply::Stored { refused } if refused.contains_key("dev-b.web")),
        "{reply:?}"
    );
    // ...nor write the bucket itself, not even its own key.
    for device in ["dev-a", "dev-b"] {
        let write = a
            .js()
            .publish(
                names::kv_subject(REPORTED_BUCKET, &format!("{device}.web")),
                "{}".into(),
            )
            .await?;
        assert!(write.await.is_err(), "a direct write was acknowledged");
        a.violation(&format!("Publish to \"$KV.fleet-reported.{device}.web\""))
            .await?;
    }
    let reported = async_nats::jetstream::new(s.fleet.nats.client().await?)
        .get_key_value(REPORTED_BUCKET)
        .await?;
    let value = reported.get("dev-b.web").await?.context("dev-b.web")?;
    let value: serde_json::Value = serde_json::from_slice(&value)?;
    assert_eq!(value["message"], "dev-b");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_write_any_desired_key() -> Result<()> {
    let s = setup().await?;
    let mut a = connect(&s.fleet, "dev-a", &s.a).await?;
    let js = a.js();
    // Not even its own: desired state is the operator's alone.
    let write = js
        .publish(
            names::kv_subject(DESIRED_BUCKET, "dev-a.web"),
            "{\"evil\":1}".into(),
        )
        .await?;
    assert!(write.await.is_err());
    a.violation("Publish to \"$KV.fleet-desired.dev-a.web\"")
        .await?;
    let mut headers = HeaderMap::new();
    headers.insert("KV-Operation", "DEL");
    let delete = js
        .publish_with_headers(
            names::kv_subject(DESIRED_BUCKET, "dev-b.web"),
            headers,
            "".into(),
        )
        .await?;
    assert!(delete.await.is_err());
    a.violation("Publish to \"$KV.fleet-desired.dev-b.web\"")
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_serve_another_devices_logs_or_exec_subjects() -> Result<()> {
    let s = setup().await?;
    let mut a = connect(&s.fleet, "dev-a", &s.a).await?;
    // Control: its own request subjects are allowed.
    let _own = a.client.subscribe("fleet.dev.dev-a.logs").await?;
    let _logs = a.client.subscribe("fleet.dev.dev-b.logs").await?;
    a.violation("Subscription to \"fleet.dev.dev-b.logs\"")
        .await?;
    let _exec = a.client.subscribe("fleet.dev.dev-b.exec").await?;
    a.violation("Subscription to \"fleet.dev.dev-b.exec\"")
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_read_the_resources_bucket() -> Result<()> {
    let s = setup().await?;
    let mut a = connect(&s.fleet, "dev-a", &s.a).await?;
    assert!(
        direct_get(&a, RESOURCES_BUCKET, "deployment.web")
            .await
            .is_err()
    );
    a.violation(
        "Publish to \"$JS.API.DIRECT.GET.KV_fleet-resources.$KV.fleet-resources.deployment.web\"",
    )
    .await?;
    let _sub = a.client.subscribe("$KV.fleet-resources.>").await?;
    a.violation("Subscription to \"$KV.fleet-resources.>\"")
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_read_other_inboxes() -> Result<()> {
    let s = setup().await?;
    let mut a = connect(&s.fleet, "dev-a", &s.a).await?;
    let _all = a.client.subscribe("_INBOX.>").await?;
    a.violation("Subscription to \"_INBOX.>\"").await?;
    let _b = a.client.subscribe("_INBOX.dev.dev-b.>").await?;
    a.violation("Subscription to \"_INBOX.dev.dev-b.>\"")
        .await?;
    let _ctl = a.client.subscribe("_INBOX.ctl.>").await?;
    a.violation("Subscription to \"_INBOX.ctl.>\"").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_jwt_signed_by_a_foreign_key_is_refused() -> Result<()> {
    let s = setup().await?;
    // Claims copied from a real device JWT, re-signed by a key the account never listed.
    let real: fleet_operator::identity::jwt::Claims<fleet_operator::identity::jwt::UserNats> =
        fleet_operator::identity::jwt::decode(&s.a.1)?;
    let forger = KeyPair::new_account();
    let user = KeyPair::new_user();
    let claims = fleet_operator::identity::jwt::Claims {
        iss: forger.public_key(),
        sub: user.public_key(),
        ..real
    };
    let forged = fleet_operator::identity::jwt::encode(&claims, &forger)?;
    let err = connect(&s.fleet, "dev-a", &(user, forged))
        .await
        .err()
        .context("a forged JWT connected")?;
    assert!(
        format!("{err:#}").contains("authorization violation"),
        "{err:#}"
    );
    Ok(())
}

async fn enroll_err(fleet: &TestFleet, device: &str, token: &str) -> IdentityError {
    identity::enroll(
        &fleet.nats.url(),
        &fleet.nats.ca(),
        device,
        &KeyPair::new_user(),
        token,
    )
    .await
    .expect_err("enrollment succeeded")
}

#[tokio::test(flavor = "multi_thread")]
async fn used_expired_and_revoked_enrollment_tokens_are_refused() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let client = fleet.operator.client();

    // A used token's NATS user is revoked as soon as it has its answer: it cannot even ask.
    let used = fleet.enrollment_token(&[])?;
    identity::enroll(
        &fleet.nats.url(),
        &fleet.nats.ca(),
        "first",
        &KeyPair::new_user(),
        &used,
    )
    .await?;
    let err = enroll_err(&fleet, "second", &used).await;
    assert!(matches!(&err, IdentityError::TokenRevoked { .. }), "{err}");
    assert!(!err.is_transient(), "a revoked token is not retried: {err}");

    let revoked = client.create_enrollment_token(&Default::default())?;
    client.revoke_enrollment_token(&revoked.info.id)?;
    let err = enroll_err(&fleet, "third", &revoked.token).await;
    assert!(matches!(&err, IdentityError::TokenRevoked { .. }), "{err}");

    let short = client.create_enrollment_token(&fleet_contracts::api::CreateEnrollmentToken {
        ttl_secs: Some(1),
        ..Default::default()
    })?;
    // Wait until the token's own expiry time has passed, then use it.
    eventually("the token to expire", WAIT, || {
        let expires = short.info.expires_ms;
        async move { Ok((fleet_operator::controller::now_ms() > expires).then_some(())) }
    })
    .await?;
    let err = enroll_err(&fleet, "fourth", &short.token).await;
    assert!(
        matches!(&err, IdentityError::TokenExpired { id, .. } if *id == short.info.id),
        "{err}"
    );

    let err = enroll_err(&fleet, "fifth", "SUAM:not-a-token").await;
    assert!(matches!(err, IdentityError::BadToken(_)), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn re_enrolling_a_device_with_a_new_key_is_refused_until_an_admin_deletes_it() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let key = KeyPair::new_user();
    let first = fleet.enrollment_token(&[])?;
    identity::enroll(&fleet.nats.url(), &fleet.nats.ca(), "pi-07", &key, &first).await?;
    // A device that lost its answer (a crash before saving it) asks again with a new token and
    // its own key: answered, it is the same device.
    let again = fleet.enrollment_token(&[])?;
    identity::enroll(&fleet.nats.url(), &fleet.nats.ca(), "pi-07", &key, &again).await?;

    let second = fleet.enrollment_token(&[])?;
    let err = enroll_err(&fleet, "pi-07", &second).await;
    assert!(
        matches!(&err, IdentityError::Refused(r) if r == fleet_operator::enroll::ENROLLMENT_REFUSED),
        "{err}"
    );
    // The refused attempt did not spend the token.
    fleet.operator.client().delete("devices", "pi-07")?;
    identity::enroll(
        &fleet.nats.url(),
        &fleet.nats.ca(),
        "pi-07",
        &KeyPair::new_user(),
        &second,
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_independent_client_with_a_devices_credentials_cannot_read_another_devices_keys()
-> Result<()> {
    let s = setup().await?;
    let creds = s.fleet.path().join("dev-a.creds");
    std::fs::write(
        &creds,
        fleet_operator::identity::jwt::creds_file(&s.a.1, &s.a.0.seed()?),
    )?;
    let python = fleet_e2e::tool_path("venv/bin/python");
    #[allow(clippy::disallowed_methods)] // The test runs the independent client.
    let out = std::process::Command::new(python)
        .arg(fleet_e2e::workspace().join("e2e/py/foreign_read.py"))
        .args([
            &s.fleet.nats.url(),
            &s.fleet.nats.ca().display().to_string(),
            &creds.display().to_string(),
            "dev-a",
            "dev-b",
        ])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nats-py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value =
        serde_json::from_str(&stdout).with_context(|| stdout.to_string())?;
    // Control: nats-py gets the device's own desired state from the operator.
    assert_eq!(result["sync"]["ok"], true, "{result}");
    assert!(
        result["sync"]["data"]
            .as_str()
            .unwrap_or_default()
            .contains("\"deployment\":\"web\""),
        "{result}"
    );
    // But no key from JetStream, its own or the other device's, directly or through the KV
    // helper.
    assert_eq!(result["own"]["ok"], false, "{result}");
    assert_eq!(result["other"]["ok"], false, "{result}");
    assert_eq!(result["kv_helper"]["ok"], false, "{result}");
    // nats-py reports the server's error in lower case.
    let violations: Vec<String> = result["violations"]
        .as_array()
        .context("violations")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_lowercase))
        .collect();
    for subject in [
        "$js.api.direct.get.kv_fleet-desired.$kv.fleet-desired.dev-b.web",
        "$js.api.stream.info.kv_fleet-desired",
    ] {
        let expected = format!("permissions violation for publish to \"{subject}\"");
        assert!(
            violations.iter().any(|v| v.contains(&expected)),
            "{expected} not in {violations:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_does_not_pin_the_fleet_ca_cannot_connect() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let creds = std::fs::read_to_string(fleet.nats.identity.join("operator.creds"))?;
    // Valid credentials, but no trust in the fleet's CA: the TLS handshake must fail.
    let err = async_nats::ConnectOptions::with_credentials(&creds)?
        .connect(fleet.nats.url())
        .await
        .err()
        .context("connected without pinning the fleet CA")?;
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    // Control: the same credentials with the CA pinned connect.
    fleet.nats.client().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_refuses_calls_without_the_admin_token() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let url = &fleet.operator.url;
    for token in [None, Some("not-the-token")] {
        let client = fleetctl::Client::new(url, token);
        for err in [
            client.deployments().unwrap_err(),
            client
                .create_enrollment_token(&Default::default())
                .unwrap_err(),
            client
                .apply(&fleet_e2e::http_deployment("web", "x", 8080, "x"))
                .unwrap_err(),
        ] {
            assert!(
                matches!(&err, fleetctl::CtlError::Api { status: 401, message, .. } if message.starts_with("missing or wrong admin token")),
                "{err}"
            );
        }
    }
    // Nothing was created by the refused calls; the right token works.
    assert!(fleet.operator.client().deployments()?.is_empty());
    assert!(fleet.operator.client().enrollment_tokens()?.is_empty());
    // The read-only status page stays open.
    assert_eq!(fleet_e2e::http_get(&format!("{url}/"))?.0, 200);
    Ok(())
}
