//! What one compromised device, a leaked enrollment token or a deleted device's old key can
//! do to the fleet: nothing beyond their own keys and subjects. Each test plays the attacker
//! with a raw NATS connection (async-nats and the stolen credentials, no Fleet code), sends the
//! hostile requests, and checks that nothing changed anywhere: every stream's counters and
//! every bucket's keys and values before and after (the operators' lease renews itself and is
//! left out). A positive control shows each time that the attack reached its target and was
//! refused there, rather than lost on the way.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use async_nats::HeaderMap;
use fleet_contracts::{
    names::{self, DESIRED_BUCKET, ENROLLMENT_BUCKET, REPORTED_BUCKET},
    rpc::{EnrollReply, EnrollRequest, ReportEntry, ReportReply, ReportRequest, SyncReply},
    state::Revocations,
};
use fleet_e2e::{
    TestFleet, WAIT,
    churn::Rng,
    eventually, raw,
    store::{settled, snapshot, unchanged},
};
use futures::StreamExt;
use nkeys::KeyPair;

/// Two enrolled devices (keys and JWTs as each holds them), a Deployment on both, a report of
/// each, and the revocations of both spent tokens settled: a fleet at rest.
struct Quiet {
    fleet: TestFleet,
    a: (KeyPair, String),
}

async fn quiet_fleet() -> Result<Quiet> {
    let fleet = TestFleet::start().await?;
    let a = raw::enroll(&fleet, "dev-a", &[("role", "web")]).await?;
    let b = raw::enroll(&fleet, "dev-b", &[("role", "web")]).await?;
    let mut doc = fleet_e2e::http_deployment("web", "web", 1, "x");
    doc["spec"]["template"]["containers"][0]["ports"] = serde_json::json!([]);
    fleet.operator.apply(&doc)?;
    let admin = fleet.nats.client().await?;
    let js = async_nats::jetstream::new(admin);
    let desired = js.get_key_value(DESIRED_BUCKET).await?;
    let enrollment = js.get_key_value(ENROLLMENT_BUCKET).await?;
    eventually(
        "desired keys for both devices and both tokens revoked",
        WAIT,
        || async {
            let keys = desired.get("dev-a.web").await?.is_some()
                && desired.get("dev-b.web").await?.is_some();
            let revoked = match enrollment.get("revocations").await? {
                Some(b) => serde_json::from_slice::<Revocations>(&b)?.keys.len(),
                None => 0,
            };
            Ok((keys && revoked == 2).then_some(()))
        },
    )
    .await?;
    for (name, creds) in [("dev-a", &a), ("dev-b", &b)] {
        let conn = raw::device(&fleet, name, &creds.0, &creds.1).await?;
        report(&conn, name, "web").await?;
    }
    Ok(Quiet { fleet, a })
}

/// Stores a status of `deployment` as `device`, through the operator, the way the agent does.
async fn report(conn: &raw::Conn, device: &str, deployment: &str) -> Result<()> {
    let request = ReportRequest {
        schema: 1,
        entries: vec![ReportEntry {
            key: deployment.into(),
            value: Some(serde_json::json!({"schema": 1, "deployment": deployment,
                "observed_generation": 1, "phase": "Ready", "message": device, "since_ms": 1})),
        }],
    };
    let reply = conn
        .client
        .request(
            names::report_subject(device),
            serde_json::to_vec(&request)?.into(),
        )
        .await?;
    match serde_json::from_slice(&reply.payload)? {
        ReportReply::Stored { refused } if refused.is_empty() => Ok(()),
        other => bail!("{other:?}"),
    }
}

/// Reply subjects an attacker would like the operator to publish to: streams to purge or
/// delete, other devices' keys and request subjects, the revocation list, identity records,
/// other inboxes.
fn hostile_replies() -> Vec<String> {
    vec![
        "$JS.API.STREAM.PURGE.KV_fleet-desired".into(),
        "$JS.API.STREAM.PURGE.KV_fleet-reported".into(),
        "$JS.API.STREAM.PURGE.KV_fleet-resources".into(),
        "$JS.API.STREAM.PURGE.KV_fleet-enrollment".into(),
        "$JS.API.STREAM.DELETE.KV_fleet-audit".into(),
        "$JS.API.CONSUMER.DELETE.KV_fleet-desired.dev-b".into(),
        names::kv_subject(DESIRED_BUCKET, "dev-b.web"),
        names::kv_subject(REPORTED_BUCKET, "dev-b.web"),
        names::kv_subject(ENROLLMENT_BUCKET, "revocations"),
        names::kv_subject(ENROLLMENT_BUCKET, "device.dev-b"),
        names::kv_subject("fleet-resources", "device.dev-b"),
        "fleet.dev.dev-b.exec".into(),
        "fleet.dev.dev-b.logs".into(),
        "_INBOX.dev.dev-b.stolen".into(),
        "_INBOX.ctl.stolen".into(),
        "_INBOX.enroll.someone.x".into(),
    ]
}

/// The operator's `fleet_operator_refused_requests_total`.
fn refused_requests(fleet: &TestFleet) -> Result<u64> {
    let (_, body) = fleet_e2e::http_get(&format!("{}/metrics", fleet.operator.url))?;
    body.lines()
        .find_map(|l| l.strip_prefix("fleet_operator_refused_requests_total "))
        .context("no refused-requests metric")?
        .trim()
        .parse()
        .context("the metric's value")
}

/// Counts what the spy hears on `subject` until `until` completes.
async fn heard_on(
    fleet: &TestFleet,
    subject: &str,
) -> Result<(async_nats::Client, async_nats::Subscriber)> {
    let spy = fleet.nats.spy().await?;
    let sub = spy.subscribe(subject.to_owned()).await?;
    spy.flush().await?;
    Ok((spy, sub))
}

fn drain(sub: &mut async_nats::Subscriber) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(Some(m)) = futures::FutureExt::now_or_never(sub.next()) {
        out.push(format!(
            "{} <- {}",
            m.subject,
            String::from_utf8_lossy(&m.payload)
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_answers_a_device_only_on_its_own_inbox() -> Result<()> {
    let q = quiet_fleet().await?;
    let a = raw::device(&q.fleet, "dev-a", &q.a.0, &q.a.1).await?;
    let (_spy, mut witness) = heard_on(&q.fleet, "fleet.dev.dev-b.>").await?;
    let (_spy2, mut inboxes) = heard_on(&q.fleet, "_INBOX.>").await?;
    let before = snapshot(&q.fleet).await?;
    let refused_before = refused_requests(&q.fleet)?;
    let hostile = hostile_replies();
    let report = serde_json::to_vec(&ReportRequest {
        schema: 1,
        entries: vec![ReportEntry {
            key: "web".into(),
            value: Some(serde_json::json!({"schema": 1, "deployment": "web",
                "observed_generation": 9, "phase": "Failed", "since_ms": 1})),
        }],
    })?;
    let requests = [
        (names::renew_subject("dev-a"), Vec::new()),
        (names::sync_subject("dev-a"), b"{\"schema\":1}".to_vec()),
        (names::report_subject("dev-a"), report),
    ];
    for (subject, body) in &requests {
        for reply in &hostile {
            a.client
                .publish_with_reply(subject.clone(), reply.clone(), body.clone().into())
                .await?;
        }
    }
    // Control: asked properly, on its own inbox, the operator answers (the sync after the
    // hostile requests: sync and reports are answered side by side, so wait for the count).
    let answer = a
        .client
        .request(names::sync_subject("dev-a"), "{}".into())
        .await?;
    let reply: SyncReply = serde_json::from_slice(&answer.payload)?;
    ensure!(
        matches!(reply, SyncReply::Desired { .. }),
        "the control sync: {reply:?}"
    );
    let expected = (hostile.len() * requests.len()) as u64;
    eventually("every hostile request to be refused", WAIT, || async {
        let refused = refused_requests(&q.fleet)? - refused_before;
        Ok((refused == expected).then_some(()))
    })
    .await?;
    unchanged(&before, &snapshot(&q.fleet).await?)?;
    let heard = drain(&mut witness);
    ensure!(heard.is_empty(), "published to dev-b's subjects: {heard:?}");
    // (Stream and bucket subjects among the hostile replies are covered by the store's
    // snapshot; the spy on `_INBOX.>` hears the snapshot's own reads under those subjects.)
    let answers: Vec<String> = drain(&mut inboxes)
        .into_iter()
        .filter(|m| {
            hostile
                .iter()
                .filter(|h| h.starts_with("_INBOX."))
                .any(|h| m.starts_with(&format!("{h} <- ")))
        })
        .collect();
    ensure!(
        answers.is_empty(),
        "answered on foreign inboxes: {answers:?}"
    );
    Ok(())
}

/// What the server publishes on a client's behalf goes where the client's reply subject says:
/// a JetStream API answer, a publish acknowledgement, a direct get's message. Pointed at a
/// bucket's subject, a stream stores it; pointed at a JetStream API subject, the server acts
/// on it (a purge). A device may send none of those requests, whatever the reply.
#[tokio::test(flavor = "multi_thread")]
async fn a_device_cannot_make_the_server_publish_anything_for_it() -> Result<()> {
    let q = quiet_fleet().await?;
    let mut a = raw::device(&q.fleet, "dev-a", &q.a.0, &q.a.1).await?;
    let before = snapshot(&q.fleet).await?;
    let stream = names::kv_stream(DESIRED_BUCKET);
    let jetstream_requests = [
        format!("$JS.API.CONSUMER.DELETE.{stream}.dev-a"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.dev-a.$KV.{DESIRED_BUCKET}.dev-a.>"),
        format!("$JS.API.DIRECT.GET.{stream}.$KV.{DESIRED_BUCKET}.dev-a.web"),
        format!("$JS.API.STREAM.INFO.{stream}"),
        names::kv_subject(REPORTED_BUCKET, "dev-a.web"),
        format!("$JS.FC.{stream}.x"),
    ];
    for subject in &jetstream_requests {
        for reply in [
            "$JS.API.STREAM.PURGE.KV_fleet-enrollment".to_owned(),
            names::kv_subject(ENROLLMENT_BUCKET, "revocations"),
            names::kv_subject(DESIRED_BUCKET, "dev-b.web"),
        ] {
            a.client
                .publish_with_reply(subject.clone(), reply, "{}".into())
                .await?;
        }
        a.violation(&format!("Publish to \"{subject}\"")).await?;
    }
    // Control: the same device's own requests to the operator work.
    report(&a, "dev-a", "web").await?;
    let skip = |b: &str, k: &str| b == REPORTED_BUCKET && k == "dev-a.web";
    unchanged(
        &before.without(skip, &["KV_fleet-reported"]),
        &snapshot(&q.fleet)
            .await?
            .without(skip, &["KV_fleet-reported"]),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unused_enrollment_token_is_answered_only_on_its_own_inbox() -> Result<()> {
    let q = quiet_fleet().await?;
    let token = q.fleet.enrollment_token(&[("role", "web")])?;
    let holder = raw::token_holder(&q.fleet, &token).await?;
    let id = token_id(&token)?;
    let before = snapshot(&q.fleet).await?;
    let request = serde_json::to_vec(&EnrollRequest {
        schema: 1,
        device: "evil".into(),
        public_key: KeyPair::new_user().public_key(),
    })?;
    let hostile = hostile_replies();
    let refused_before = refused_requests(&q.fleet)?;
    for reply in &hostile {
        holder
            .client
            .publish_with_reply(
                names::enroll_subject(&id),
                reply.clone(),
                request.clone().into(),
            )
            .await?;
    }
    holder.client.flush().await?;
    eventually("the hostile enrollments to be refused", WAIT, || async {
        let n = refused_requests(&q.fleet)? - refused_before;
        Ok((n == hostile.len() as u64).then_some(()))
    })
    .await?;
    // Nothing was enrolled and the token is not spent.
    unchanged(&before, &snapshot(&q.fleet).await?)?;
    // Control: the token still enrolls a device, asked properly.
    raw::enroll_with(&q.fleet, "good", &token).await?;
    Ok(())
}

fn token_id(token: &str) -> Result<String> {
    let (_, jwt) = token.split_once(':').context("token")?;
    let claims: fleet_operator::identity::jwt::Claims<fleet_operator::identity::jwt::UserNats> =
        fleet_operator::identity::jwt::decode(jwt)?;
    Ok(claims.name)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_used_or_revoked_enrollment_token_cannot_even_connect() -> Result<()> {
    let q = quiet_fleet().await?;
    let used = q.fleet.enrollment_token(&[])?;
    raw::enroll_with(&q.fleet, "dev-c", &used).await?;
    let revoked = q
        .fleet
        .operator
        .client()
        .create_enrollment_token(&Default::default())?;
    // Control: connected before it is revoked...
    let live = raw::token_holder(&q.fleet, &revoked.token).await?;
    q.fleet
        .operator
        .client()
        .revoke_enrollment_token(&revoked.info.id)?;
    // ...cut off at once when it is.
    eventually("the revoked token's connection to close", WAIT, || async {
        Ok(
            (live.client.connection_state() != async_nats::connection::State::Connected)
                .then_some(()),
        )
    })
    .await?;
    for token in [&used, &revoked.token] {
        let err = raw::token_holder(&q.fleet, token)
            .await
            .err()
            .context("a spent token connected")?;
        ensure!(
            format!("{err:#}").contains("authorization violation"),
            "{err:#}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rollup_header_purges_nothing() -> Result<()> {
    let q = quiet_fleet().await?;
    let mut a = raw::device(&q.fleet, "dev-a", &q.a.0, &q.a.1).await?;
    let before = snapshot(&q.fleet).await?;
    for (rollup, operation) in [("all", None), ("sub", None), ("all", Some("PURGE"))] {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Rollup", rollup);
        if let Some(op) = operation {
            headers.insert("KV-Operation", op);
        }
        let ack = a
            .js()
            .publish_with_headers(
                names::kv_subject(REPORTED_BUCKET, "dev-a.web"),
                headers,
                "{}".into(),
            )
            .await?
            .await;
        ensure!(ack.is_err(), "a rollup was accepted");
        a.violation("Publish to \"$KV.fleet-reported.dev-a.web\"")
            .await?;
    }
    unchanged(&before, &snapshot(&q.fleet).await?)?;
    // And should a device ever reach the bucket again, its stream refuses rollups anyway.
    let admin = async_nats::jetstream::new(q.fleet.nats.client().await?);
    let config = admin
        .get_stream(names::kv_stream(REPORTED_BUCKET))
        .await?
        .cached_info()
        .config
        .clone();
    ensure!(
        !config.allow_rollup,
        "the reported bucket's stream allows rollups"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_device_is_cut_off_and_its_old_key_never_reaches_the_new_one() -> Result<()> {
    let q = quiet_fleet().await?;
    let old = raw::device(&q.fleet, "dev-a", &q.a.0, &q.a.1).await?;
    q.fleet.operator.client().delete("devices", "dev-a")?;
    eventually("the deleted device's connection to close", WAIT, || async {
        Ok(
            (old.client.connection_state() != async_nats::connection::State::Connected)
                .then_some(()),
        )
    })
    .await?;
    let admin = async_nats::jetstream::new(q.fleet.nats.client().await?);
    let reported = admin.get_key_value(REPORTED_BUCKET).await?;
    ensure!(
        reported.get("dev-a.web").await?.is_none(),
        "the deleted device's reports are still there"
    );
    ensure!(
        reported.get("dev-b.web").await?.is_some(),
        "another device's reports went with it"
    );
    let refused = |what: &'static str| {
        let (fleet, key, jwt) = (&q.fleet, &q.a.0, q.a.1.clone());
        async move {
            let err = raw::device(fleet, "dev-a", key, &jwt)
                .await
                .err()
                .with_context(|| format!("the old key connected {what}"))?;
            ensure!(
                format!("{err:#}").contains("authorization violation"),
                "{what}: {err:#}"
            );
            Ok::<_, anyhow::Error>(())
        }
    };
    refused("after the delete").await?;
    // The id enrolls again with a new key; the old key reaches nothing of it.
    let new = raw::enroll(&q.fleet, "dev-a", &[("role", "web")]).await?;
    let conn = raw::device(&q.fleet, "dev-a", &new.0, &new.1).await?;
    report(&conn, "dev-a", "web").await?;
    refused("after the id enrolled again").await?;
    let api = q.fleet.operator.client();
    api.blacklist("dev-a", true, "tester", "test")?;
    api.blacklist("dev-a", false, "tester", "test")?;
    refused("after the new device was blacklisted and let back in").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_can_create_no_consumer_and_delete_none() -> Result<()> {
    let q = quiet_fleet().await?;
    let mut a = raw::device(&q.fleet, "dev-a", &q.a.0, &q.a.1).await?;
    let admin = async_nats::jetstream::new(q.fleet.nats.client().await?);
    let stream = names::kv_stream(DESIRED_BUCKET);
    let count = || async {
        Ok::<_, anyhow::Error>(
            admin
                .get_stream(&stream)
                .await?
                .info()
                .await?
                .state
                .consumer_count,
        )
    };
    let before = count().await?;
    let inbox = a.client.clone();
    let consumer = |name: &str, durable: bool| async_nats::jetstream::consumer::push::Config {
        name: Some(name.to_owned()),
        durable_name: durable.then(|| name.to_owned()),
        filter_subject: names::device_filter(DESIRED_BUCKET, "dev-a"),
        // Where the server would deliver: another device's exec subject.
        deliver_subject: if durable {
            "fleet.dev.dev-b.exec".into()
        } else {
            inbox.new_inbox()
        },
        ..Default::default()
    };
    let js = a.js();
    for name in ["dev-a", "probe", "dev-b"] {
        for durable in [false, true] {
            ensure!(
                js.create_consumer_on_stream(consumer(name, durable), &stream)
                    .await
                    .is_err(),
                "consumer {name} (durable {durable}) was created"
            );
            a.violation(&format!(
                "Publish to \"$JS.API.CONSUMER.CREATE.KV_fleet-desired.{name}."
            ))
            .await?;
        }
        ensure!(
            js.delete_consumer_from_stream(name, &stream).await.is_err(),
            "deleted consumer {name}"
        );
        a.violation(&format!(
            "Publish to \"$JS.API.CONSUMER.DELETE.KV_fleet-desired.{name}\""
        ))
        .await?;
    }
    ensure!(count().await? == before, "a consumer was made");
    Ok(())
}

/// A device answers only what is a well-formed operator request answering to the operator's
/// inbox: were something other than the operator ever to reach its request subjects (a bug, a
/// server that delivers where it should not), its answers still go nowhere but there.
#[tokio::test(flavor = "multi_thread")]
async fn requests_to_a_device_that_are_not_the_operators_are_dropped_there() -> Result<()> {
    let fleet = TestFleet::start().await?;
    let (_sandbox, _agent) = fleet.device("dev-b", &[("role", "web")]).await?;
    let api = fleet.operator.client();
    eventually("dev-b to report in", WAIT, || async {
        Ok(api
            .device("dev-b")?
            .status
            .and_then(|s| s.heartbeat)
            .map(drop))
    })
    .await?;
    let (_spy, mut heard) = heard_on(&fleet, ">").await?;
    // The operator's own connection may publish on dev-b's request subjects: it sends what an
    // attacker would like a device to answer to.
    let operator = fleet.nats.client().await?;
    let exec = serde_json::to_vec(&fleet_contracts::rpc::ExecRequest {
        schema: 1,
        deployment: "web".into(),
        command: vec!["id".into()],
        timeout_secs: 5,
    })?;
    let sent = [
        (
            "fleet.dev.dev-b.exec",
            "$JS.API.STREAM.PURGE.KV_fleet-desired",
            exec.clone(),
        ),
        (
            "fleet.dev.dev-b.exec",
            "$KV.fleet-desired.dev-b.web",
            exec.clone(),
        ),
        (
            "fleet.dev.dev-b.logs",
            "_INBOX.dev.dev-a.x",
            b"{\"deployment\":\"web\",\"tail\":1}".to_vec(),
        ),
        (
            "fleet.dev.dev-b.exec",
            "_INBOX.ctl.x",
            b"{\"not\":\"a request\"}".to_vec(),
        ),
        ("fleet.dev.dev-b.exec", "_INBOX.ctl.y", b"\x00\xff".to_vec()),
    ];
    for (subject, reply, body) in &sent {
        operator
            .publish_with_reply(subject.to_string(), reply.to_string(), body.clone().into())
            .await?;
    }
    operator.flush().await?;
    eventually("dev-b to report the dropped requests", WAIT, || async {
        let dropped = api
            .device("dev-b")?
            .status
            .and_then(|s| s.heartbeat)
            .map_or(0, |h| h.dropped_requests);
        if dropped >= sent.len() as u64 {
            Ok(Some(()))
        } else {
            bail!("dropped_requests {dropped}")
        }
    })
    .await?;
    let answers: Vec<String> = drain(&mut heard)
        .into_iter()
        .filter(|m| {
            sent.iter()
                .any(|(_, reply, _)| m.starts_with(&format!("{reply} <- ")))
        })
        .collect();
    ensure!(answers.is_empty(), "dev-b answered: {answers:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn names_are_checked_at_the_api_before_anything_reaches_nats() -> Result<()> {
    let q = quiet_fleet().await?;
    let before = snapshot(&q.fleet).await?;
    let long = "a".repeat(10_000);
    // As they travel in a URL: `%2E%2E` is `..`, `%2A` is `*`, and so on.
    let bad = [
        long.as_str(),
        "%2E%2E",
        "a.b",
        "a%2Eb",
        "%2A",
        "%3E",
        "A",
        "a%20b",
        "-a",
        "%C3%A9",
        "a%00b",
    ];
    let url = &q.fleet.operator.url;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let auth = format!("Bearer {}", q.fleet.operator.token);
    for name in bad {
        for (method, path) in [
            ("GET", format!("/api/v1/devices/{name}")),
            ("DELETE", format!("/api/v1/devices/{name}")),
            ("DELETE", format!("/api/v1/deployments/{name}")),
            ("POST", format!("/api/v1/devices/{name}/blacklist")),
            ("POST", format!("/api/v1/devices/{name}/unblacklist")),
            ("DELETE", format!("/api/v1/enrollment-tokens/{name}")),
            ("GET", format!("/api/v1/deployments/web/logs?device={name}")),
        ] {
            let full = format!("{url}{path}");
            let response = match method {
                "GET" => agent.get(&full).header("Authorization", &auth).call(),
                "DELETE" => agent.delete(&full).header("Authorization", &auth).call(),
                _ => agent
                    .post(&full)
                    .header("Authorization", &auth)
                    .send("{\"by\":\"x\",\"reason\":\"y\"}"),
            };
            let (status, body) = match response {
                Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string()?),
                Err(e) => bail!("{method} {path}: {e}"),
            };
            let shown: String = name.chars().take(20).collect();
            ensure!(
                status == 400 && body.contains("invalid") && body.contains("must"),
                "{method} {shown}: {status} {body}"
            );
        }
    }
    unchanged(&before, &snapshot(&q.fleet).await?)?;
    // Control: the operator's NATS connection is intact, valid names work.
    ensure!(q.fleet.operator.client().device("dev-b")?.metadata.name == "dev-b");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn enrollment_refusals_say_the_same_whatever_the_reason() -> Result<()> {
    let q = quiet_fleet().await?;
    let api = q.fleet.operator.client();
    api.blacklist("dev-b", true, "tester", "stolen")?;
    let mut said = Vec::new();
    // The id is taken by another key; the id is blacklisted; the token's record is gone.
    for device in ["dev-a", "dev-b"] {
        let token = q.fleet.enrollment_token(&[])?;
        said.push(refusal(&q.fleet, device, &token).await?);
    }
    let token = q.fleet.enrollment_token(&[])?;
    async_nats::jetstream::new(q.fleet.nats.client().await?)
        .get_key_value(ENROLLMENT_BUCKET)
        .await?
        .delete(format!("token.{}", token_id(&token)?))
        .await?;
    said.push(refusal(&q.fleet, "dev-new", &token).await?);
    for s in &said {
        ensure!(s == fleet_operator::enroll::ENROLLMENT_REFUSED, "{said:?}");
    }
    Ok(())
}

async fn refusal(fleet: &TestFleet, device: &str, token: &str) -> Result<String> {
    match fleet_agent::identity::enroll(
        &fleet.nats.url(),
        &fleet.nats.ca(),
        device,
        &KeyPair::new_user(),
        token,
    )
    .await
    {
        Err(fleet_agent::identity::IdentityError::Refused(r)) => Ok(r),
        other => bail!("enrolling {device}: {other:?}"),
    }
}

/// How many random requests the hostile device sends (`FLEET_FUZZ_REQUESTS` overrides).
fn fuzz_requests() -> usize {
    std::env::var("FLEET_FUZZ_REQUESTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(3000)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_device_throwing_thousands_of_random_requests_changes_nothing_but_its_own_keys()
-> Result<()> {
    let q = quiet_fleet().await?;
    let mut a = raw::device(&q.fleet, "dev-a", &q.a.0, &q.a.1).await?;
    let before = snapshot(&q.fleet).await?;
    let mut rng = Rng::seeded("FLEET_FUZZ_SEED", "fuzz");
    let hostile = hostile_replies();
    let desired_stream = names::kv_stream(DESIRED_BUCKET);
    let requests = fuzz_requests();
    for n in 0..requests {
        if n % 500 == 0 {
            eprintln!("request {n}");
        }
        let subject = match rng.below(16) {
            0 => names::renew_subject("dev-a"),
            1 | 2 => names::sync_subject("dev-a"),
            3..=5 => names::report_subject("dev-a"),
            6 => names::report_subject("dev-b"),
            7 => names::enroll_subject(&rng.token()),
            8 => names::kv_subject(REPORTED_BUCKET, &format!("dev-a.{}", rng.token())),
            9 => names::kv_subject(DESIRED_BUCKET, "dev-a.web"),
            10 => format!(
                "$JS.API.CONSUMER.CREATE.{desired_stream}.dev-a.$KV.{DESIRED_BUCKET}.dev-a.>"
            ),
            11 => format!("$JS.API.CONSUMER.DELETE.{desired_stream}.dev-a"),
            12 => format!(
                "$JS.API.DIRECT.GET.{desired_stream}.$KV.{DESIRED_BUCKET}.dev-a.{}",
                rng.token()
            ),
            13 => format!("$JS.FC.{desired_stream}.{}", rng.token()),
            _ => rng.pick(&hostile).clone(),
        };
        let mut headers = HeaderMap::new();
        for _ in 0..rng.below(3) {
            let (name, value) = match rng.below(7) {
                0 => ("Nats-Rollup", rng.pick(&["all", "sub", "x"]).to_string()),
                1 => (
                    "Nats-Expected-Stream",
                    rng.pick(&["KV_fleet-reported", "KV_fleet-desired", "x"])
                        .to_string(),
                ),
                2 => ("Nats-Expected-Last-Sequence", rng.below(100).to_string()),
                3 => (
                    "Nats-Expected-Last-Subject-Sequence",
                    rng.below(100).to_string(),
                ),
                4 => ("Nats-Msg-Id", rng.token()),
                5 => ("KV-Operation", rng.pick(&["DEL", "PURGE"]).to_string()),
                _ => ("Nats-TTL", rng.pick(&["1s", "never"]).to_string()),
            };
            headers.insert(name, value.as_str());
        }
        let body: Vec<u8> = match rng.below(6) {
            0 => vec![],
            1 => rng.bytes(512),
            2 => serde_json::to_vec(&serde_json::json!({
                "schema": 1, "device": rng.pick(&["dev-a", "dev-b", "*", ">"]),
                "public_key": KeyPair::new_user().public_key(),
            }))?,
            3 => serde_json::to_vec(&serde_json::json!({
                "stream_name": desired_stream,
                "config": {
                    "name": "dev-a",
                    "durable_name": rng.pick(&["dev-a", "x"]),
                    "deliver_subject": rng.pick(&hostile),
                    "filter_subject": format!("$KV.{DESIRED_BUCKET}.{}.>", rng.pick(&["dev-a", "dev-b"])),
                }
            }))?,
            4 => {
                // A report, sometimes well-formed, with keys that try to leave the device's.
                let key = rng
                    .pick(&["web", "_info", "dev-b.web", "..", "_os", "*", ">", "web.x"])
                    .to_string();
                let key = if rng.below(2) == 0 { key } else { rng.token() };
                let value = match rng.below(4) {
                    0 => None,
                    1 => Some(serde_json::json!({"schema": 1, "deployment": key,
                        "observed_generation": rng.below(9), "phase": "Ready", "since_ms": 1})),
                    2 => Some(
                        serde_json::json!({"schema": 1, "device": rng.pick(&["dev-a", "dev-b"]),
                        "agent_version": "x", "os": "x", "uptime_secs": 1, "sent_at_ms": 1,
                        "interval_ms": 1, "deployments": 0}),
                    ),
                    _ => Some(serde_json::Value::String(
                        "x".repeat(rng.below(70_000) as usize),
                    )),
                };
                serde_json::to_vec(&ReportRequest {
                    schema: 1,
                    entries: vec![ReportEntry { key, value }],
                })?
            }
            _ => serde_json::to_vec(&serde_json::json!({
                "schema": 1, "device": "dev-b", "deployment": "web", "phase": "Ready",
                "filter": "$KV.fleet-reported.>", "purge": true,
            }))?,
        };
        let reply = match rng.below(3) {
            0 => None,
            1 => Some(a.client.new_inbox()),
            _ => Some(rng.pick(&hostile).clone()),
        };
        match reply {
            Some(r) => {
                a.client
                    .publish_with_reply_and_headers(subject, r, headers, body.into())
                    .await?
            }
            None => {
                a.client
                    .publish_with_headers(subject, headers, body.into())
                    .await?
            }
        }
    }
    a.client.flush().await?;
    eprintln!(
        "sent {requests} random requests; server errors: {}",
        a.errors().len()
    );
    // Everything sent before has been handled once the responders answer again and the store
    // stops changing.
    let answer = a
        .client
        .request(names::renew_subject("dev-a"), "".into())
        .await
        .context("the operator's responder no longer answers")?;
    serde_json::from_slice::<EnrollReply>(&answer.payload)?;
    // Reports are handled side by side: one more, answered, and then the store at rest.
    report(&a, "dev-a", "web").await?;
    settled(&q.fleet).await?;
    // Its own reported keys and its own identity record (renewals move its JWT's expiry) may
    // change; nothing else may.
    let own = |bucket: &str, key: &str| {
        (bucket == REPORTED_BUCKET && key.starts_with("dev-a."))
            || (bucket == ENROLLMENT_BUCKET && key == "device.dev-a")
    };
    let moving = ["KV_fleet-reported", "KV_fleet-enrollment"];
    unchanged(
        &before.without(own, &moving),
        &snapshot(&q.fleet).await?.without(own, &moving),
    )?;
    q.fleet
        .operator
        .wait_role(fleet_contracts::api::Role::Leader)
        .await
        .context("the operator is not converged after the barrage")?;
    Ok(())
}
