//! The operator's HTTP API as a component: the real router of an operator started in this
//! process (`fleet_operator::start`) against a real nats-server, called without a TCP
//! listener (tower's `oneshot`). The middle rung between the handlers' unit tests and the
//! full-process tests: auth refusals, the mapping of errors to status codes and bodies, and
//! each route's happy path, with a hollow device (the agent's own enrollment and sync code,
//! no podman) where a route needs an enrolled one. Logs and exec need a device that runs
//! podman (`logs_exec.rs`); adopting and releasing need a device the store lost
//! (`store_loss.rs`).

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use axum::{
    Router,
    body::Body,
    http::{Method, Request, StatusCode, header},
};
use fleet_contracts::api::{ErrorBody, RecoveryState, Role};
use fleet_e2e::{Hollow, Nats, WAIT, device_doc, eventually, http_deployment};
use fleet_operator::controller::Operator;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

/// An operator started in this process, its router, and the admin token.
struct Api {
    router: Router,
    token: String,
    operator: Arc<Operator>,
    nats: Nats,
    dir: tempfile::TempDir,
}

/// One answer: its status and its body (JSON when it is JSON, else a string).
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    body: Value,
}

impl Answer {
    /// The API's error body, for a 4xx or 5xx answer.
    fn error(&self) -> ErrorBody {
        serde_json::from_value(self.body.clone())
            .unwrap_or_else(|e| panic!("not an error body ({e}): {}", self.body))
    }
}

impl Api {
    async fn start() -> Result<Api> {
        let dir = tempfile::Builder::new().prefix("fleet-api-").tempdir()?;
        let nats = Nats::start(dir.path()).await?;
        let config = fleet_operator::Config {
            nats_url: nats.url(),
            identity_dir: nats.identity.clone(),
            listen: "127.0.0.1:0".parse()?,
            resync: Duration::from_secs(30),
            device_jwt_ttl: Duration::from_secs(3600),
            instance: "api-test".into(),
            lease_ttl: Duration::from_millis(1500),
            kv_replicas: 1,
        };
        let started = fleet_operator::start(&config).await?;
        let api = Api {
            token: started.operator.identity.admin_token().to_owned(),
            router: started.router,
            operator: started.operator,
            nats,
            dir,
        };
        eventually("the operator converged and leading", WAIT, || async {
            let status = api.get("/api/v1/status").await?;
            let converged = status.body["state"] == json!(RecoveryState::Converged)
                && status.body["role"] == json!(Role::Leader);
            Ok(converged.then_some(()))
        })
        .await?;
        Ok(api)
    }

    /// `authorization`: the whole `Authorization` header, if any.
    async fn call(
        &self,
        method: Method,
        uri: &str,
        authorization: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> Result<Answer> {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(body.map_or_else(Body::empty, Body::from))?;
        let response = self.router.clone().oneshot(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok(Answer { status, body })
    }

    /// The right `Authorization` header.
    fn bearer(&self) -> String {
        format!("Bearer {}", self.token)
    }

    async fn get(&self, uri: &str) -> Result<Answer> {
        self.call(Method::GET, uri, Some(&self.bearer()), None)
            .await
    }

    async fn post(&self, uri: &str, body: &Value) -> Result<Answer> {
        self.call(
            Method::POST,
            uri,
            Some(&self.bearer()),
            Some(serde_json::to_vec(body)?),
        )
        .await
    }

    async fn delete(&self, uri: &str) -> Result<Answer> {
        self.call(Method::DELETE, uri, Some(&self.bearer()), None)
            .await
    }

    /// The names of the deployments the API lists.
    async fn deployments(&self) -> Result<Vec<String>> {
        let list = self.get("/api/v1/deployments").await?;
        if list.status != StatusCode::OK {
            bail!("listing deployments: {list:?}");
        }
        Ok(list
            .body
            .as_array()
            .context("a list")?
            .iter()
            .map(|d| d["metadata"]["name"].as_str().unwrap_or("?").to_owned())
            .collect())
    }
}

/// Every route behind the token, with a body where it takes one.
fn guarded_routes() -> Vec<(Method, &'static str, Option<Value>)> {
    let deployment = http_deployment("web", "edge", 18080, "v1");
    let who = json!({"by": "attacker", "reason": "x"});
    vec![
        (Method::GET, "/api/v1/status", None),
        (Method::POST, "/api/v1/apply", Some(deployment)),
        (Method::GET, "/api/v1/deployments", None),
        (Method::GET, "/api/v1/deployments/web", None),
        (Method::DELETE, "/api/v1/deployments/web", None),
        (Method::GET, "/api/v1/devices", None),
        (Method::GET, "/api/v1/devices/pi-01", None),
        (Method::DELETE, "/api/v1/devices/pi-01", None),
        (
            Method::GET,
            "/api/v1/deployments/web/logs?device=pi-01",
            None,
        ),
        (
            Method::POST,
            "/api/v1/deployments/web/exec",
            Some(json!({"device": "pi-01", "command": ["id"], "by": "attacker"})),
        ),
        (
            Method::POST,
            "/api/v1/deployments/web/rollout/resume",
            Some(who.clone()),
        ),
        (
            Method::POST,
            "/api/v1/devices/pi-01/adopt",
            Some(json!({"by": "attacker"})),
        ),
        (
            Method::POST,
            "/api/v1/devices/pi-01/release",
            Some(who.clone()),
        ),
        (Method::GET, "/api/v1/backup", None),
        (Method::POST, "/api/v1/restore", Some(json!({}))),
        (
            Method::POST,
            "/api/v1/devices/pi-01/blacklist",
            Some(who.clone()),
        ),
        (Method::POST, "/api/v1/devices/pi-01/unblacklist", Some(who)),
        (Method::GET, "/api/v1/enrollment-tokens", None),
        (
            Method::POST,
            "/api/v1/enrollment-tokens",
            Some(json!({"labels": {"role": "edge"}})),
        ),
        (Method::DELETE, "/api/v1/enrollment-tokens/abc", None),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_api_route_refuses_a_missing_or_wrong_token_and_changes_nothing() -> Result<()> {
    let api = Api::start().await?;
    api.post("/api/v1/apply", &device_doc("pi-01", &[("role", "edge")]))
        .await?;
    let before = api.get("/api/v1/backup").await?;
    let t = &api.token;
    let refused = [
        None,
        Some(String::new()),
        Some("Bearer ".to_owned()),
        Some(format!("Bearer {t}x")),
        Some(format!("Bearer {}", &t[..t.len() - 1])),
        Some(format!("Basic {t}")),
        Some(t.clone()),
        Some(format!("Bearer  {t}")),
    ];
    for token in refused.iter().map(Option::as_deref) {
        for (method, uri, body) in guarded_routes() {
            let body = body.map(|b| serde_json::to_vec(&b)).transpose()?;
            let answer = api.call(method.clone(), uri, token, body).await?;
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{method} {uri} with {token:?}: {answer:?}"
            );
            assert!(
                answer
                    .error()
                    .error
                    .starts_with("missing or wrong admin token"),
                "{answer:?}"
            );
        }
    }
    // Nothing changed anywhere: the store is as before, value for value.
    let after = api.get("/api/v1/backup").await?;
    assert_eq!(before.body["buckets"], after.body["buckets"]);
    assert!(api.deployments().await?.is_empty());
    // What stays open is read-only.
    for uri in ["/", "/metrics"] {
        let answer = api.call(Method::GET, uri, None, None).await?;
        assert_eq!(answer.status, StatusCode::OK, "{uri}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_map_to_status_codes_with_a_body_that_names_the_field() -> Result<()> {
    let api = Api::start().await?;
    let before = api.get("/api/v1/backup").await?;
    // An invalid document: 422, every field at fault named.
    let mut bad = http_deployment("web", "edge", 18080, "v1");
    bad["spec"]["template"]["containers"][0]["image"] = json!("");
    bad["spec"]["template"]["containers"][0]["ports"][0]["containerPort"] = json!(8080);
    bad["metadata"]["name"] = json!("Web_1");
    let answer = api.post("/api/v1/apply", &bad).await?;
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{answer:?}"
    );
    let fields: Vec<String> = answer
        .error()
        .fields
        .iter()
        .map(|f| f.path.clone())
        .collect();
    assert!(fields.contains(&"metadata.name".to_owned()), "{fields:?}");
    assert!(
        fields.contains(&"spec.template.containers[0].image".to_owned()),
        "{fields:?}"
    );
    // A body that is not JSON: 400, saying where it broke.
    let answer = api
        .call(
            Method::POST,
            "/api/v1/apply",
            Some(&api.bearer()),
            Some(b"{\"kind\": ".to_vec()),
        )
        .await?;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{answer:?}");
    // A body over the limit: 413 before it is read whole.
    let huge = vec![b' '; fleet_contracts::document::MAX_BODY_BYTES + 1];
    let answer = api
        .call(
            Method::POST,
            "/api/v1/apply",
            Some(&api.bearer()),
            Some(huge),
        )
        .await?;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE, "{answer:?}");
    // What is not there: 404 naming it.
    for uri in ["/api/v1/deployments/nothing", "/api/v1/devices/nothing"] {
        let answer = api.get(uri).await?;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{uri}: {answer:?}");
        assert!(answer.error().error.contains("nothing"), "{answer:?}");
    }
    let answer = api.delete("/api/v1/deployments/nothing").await?;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{answer:?}");
    // A name that could never be one: 400 naming the field, before any lookup.
    let answer = api.get("/api/v1/deployments/a.b").await?;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{answer:?}");
    assert!(answer.error().error.contains("name"), "{answer:?}");
    // Logs of a device that does not exist: refused before anything is sent to NATS.
    let answer = api
        .get("/api/v1/deployments/nothing/logs?device=pi-01")
        .await?;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{answer:?}");
    assert!(answer.error().error.contains("nothing"), "{answer:?}");
    // Nothing was stored by any of it: the store is as before, value for value.
    let after = api.get("/api/v1/backup").await?;
    assert_eq!(before.body["buckets"], after.body["buckets"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_route_answers_its_happy_path() -> Result<()> {
    let api = Api::start().await?;
    // Apply: created, then unchanged, then configured.
    let device = device_doc("pi-01", &[("role", "edge")]);
    let deployment = http_deployment("web", "edge", 18080, "v1");
    for (doc, outcome) in [
        (&device, "created"),
        (&deployment, "created"),
        (&deployment, "unchanged"),
    ] {
        let answer = api.post("/api/v1/apply", doc).await?;
        assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
        assert_eq!(answer.body["outcome"], json!(outcome), "{answer:?}");
    }
    let v2 = http_deployment("web", "edge", 18080, "v2");
    let answer = api.post("/api/v1/apply", &v2).await?;
    assert_eq!(answer.body["outcome"], json!("configured"), "{answer:?}");
    assert_eq!(answer.body["generation"], json!(2), "{answer:?}");
    // Reads come from the operator's view, which follows the store through a watch: wait for
    // generation 2 there.
    eventually("the view shows what was applied", WAIT, || async {
        let web = api.get("/api/v1/deployments/web").await?;
        Ok((web.body["metadata"]["generation"] == json!(2)).then_some(()))
    })
    .await?;
    assert_eq!(api.deployments().await?, ["web"]);
    let web = api.get("/api/v1/deployments/web").await?;
    assert_eq!(web.status, StatusCode::OK);
    assert_eq!(web.body["metadata"]["generation"], json!(2));
    assert_eq!(web.body["status"]["desiredDevices"], json!(1), "{web:?}");
    let devices = api.get("/api/v1/devices").await?;
    assert_eq!(devices.body[0]["metadata"]["name"], json!("pi-01"));
    let pi = api.get("/api/v1/devices/pi-01").await?;
    assert_eq!(pi.body["metadata"]["labels"]["role"], json!("edge"));
    let status = api.get("/api/v1/status").await?;
    assert_eq!(status.body["deployments"], json!(1));
    assert_eq!(status.body["instance"], json!("api-test"));
    // Enrollment tokens: the secret once, then listed without it, then revoked.
    let created = api
        .post(
            "/api/v1/enrollment-tokens",
            &json!({"labels": {"role": "edge"}}),
        )
        .await?;
    assert_eq!(created.status, StatusCode::OK, "{created:?}");
    let id = created.body["info"]["id"]
        .as_str()
        .context("an id")?
        .to_owned();
    assert!(created.body["token"].as_str().is_some_and(|t| t.len() > 20));
    let listed = api.get("/api/v1/enrollment-tokens").await?;
    assert_eq!(listed.body[0]["id"], json!(id));
    assert!(
        !listed
            .body
            .to_string()
            .contains(created.body["token"].as_str().unwrap())
    );
    let revoked = api
        .delete(&format!("/api/v1/enrollment-tokens/{id}"))
        .await?;
    assert!(revoked.status.is_success(), "{revoked:?}");
    let listed = api.get("/api/v1/enrollment-tokens").await?;
    assert_eq!(listed.body[0]["revoked"], json!(true), "{listed:?}");
    // Backup: every bucket, the store it came from.
    let backup = api.get("/api/v1/backup").await?;
    assert_eq!(backup.status, StatusCode::OK);
    assert_eq!(backup.body["kind"], json!("FleetBackup"));
    assert!(
        backup.body["buckets"]["fleet-resources"]
            .as_object()
            .is_some_and(|b| b.contains_key("deployment.web")),
        "{}",
        backup.body["buckets"]
    );
    // The page and the metrics show what the view holds.
    let page = api.call(Method::GET, "/", None, None).await?;
    assert!(
        page.body.as_str().is_some_and(|p| p.contains("web")),
        "{page:?}"
    );
    let metrics = api.call(Method::GET, "/metrics", None, None).await?;
    assert!(
        metrics
            .body
            .as_str()
            .is_some_and(|m| m.contains("fleet_operator_converged 1")),
        "{metrics:?}"
    );
    // Delete: gone from the store and from the view.
    let deleted = api.delete("/api/v1/deployments/web").await?;
    assert!(deleted.status.is_success(), "{deleted:?}");
    eventually("the deployment is gone", WAIT, || async {
        let deployments = api.deployments().await?;
        Ok(deployments.is_empty().then_some(()))
    })
    .await?;
    assert!(api.operator.leadership.is_leader());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn device_and_store_routes_answer_their_happy_paths() -> Result<()> {
    let api = Api::start().await?;
    let created = api
        .post(
            "/api/v1/enrollment-tokens",
            &json!({"labels": {"role": "edge"}}),
        )
        .await?;
    let token = created.body["token"].as_str().context("a token")?;
    let _device = Hollow::enroll(
        &api.dir.path().join("pi-01"),
        &api.nats,
        "pi-01",
        token,
        true,
    )
    .await?;
    eventually("pi-01 enrolled and heard from", WAIT, || async {
        let pi = api.get("/api/v1/devices/pi-01").await?;
        Ok((pi.body["status"]["health"] == json!("Healthy")).then_some(()))
    })
    .await?;
    // Blacklist and back.
    let who = json!({"by": "ops", "reason": "lost in transit"});
    let answer = api.post("/api/v1/devices/pi-01/blacklist", &who).await?;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.body["blacklisted"], json!(true), "{answer:?}");
    let pi = api.get("/api/v1/devices/pi-01").await?;
    assert_eq!(pi.body["status"]["blacklist"]["by"], json!("ops"), "{pi:?}");
    let answer = api.post("/api/v1/devices/pi-01/unblacklist", &who).await?;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.body["blacklisted"], json!(false), "{answer:?}");
    // Release: it holds nothing, and the refusal says so (releasing what a device holds from
    // an earlier store is `store_loss.rs`).
    let answer = api
        .post("/api/v1/devices/pi-01/release", &json!({"by": "ops"}))
        .await?;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{answer:?}");
    assert!(
        answer.error().error.contains("no held deployments"),
        "{answer:?}"
    );
    // Resume a rollout: recorded for the Deployment's generation.
    let mut staged = http_deployment("web", "edge", 18080, "v1");
    staged["spec"]["rollout"] = json!({"waveSize": 1});
    assert_eq!(
        api.post("/api/v1/apply", &staged).await?.status,
        StatusCode::OK
    );
    eventually("the view has web", WAIT, || async {
        Ok((api.deployments().await? == ["web"]).then_some(()))
    })
    .await?;
    let answer = api
        .post(
            "/api/v1/deployments/web/rollout/resume",
            &json!({"by": "ops"}),
        )
        .await?;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.body["generation"], json!(1), "{answer:?}");
    assert_eq!(answer.body["by"], json!("ops"), "{answer:?}");
    // Restore the store's own backup: same fleet, a later epoch.
    let backup = api.get("/api/v1/backup").await?;
    let restored = api.post("/api/v1/restore", &backup.body).await?;
    assert_eq!(restored.status, StatusCode::OK, "{restored:?}");
    assert_eq!(
        restored.body["store"]["fleetId"], backup.body["store"]["fleetId"],
        "{restored:?}"
    );
    assert!(
        restored.body["store"]["epoch"].as_u64() > backup.body["store"]["epoch"].as_u64(),
        "{restored:?} after {}",
        backup.body["store"]
    );
    // Delete the device: its record goes, and the view follows. Writes are refused (409,
    // "try again") until the restore has derived the desired state again.
    eventually(
        "the device deleted once the restore is done",
        WAIT,
        || async {
            let answer = api.delete("/api/v1/devices/pi-01").await?;
            if answer.status == StatusCode::CONFLICT {
                assert!(answer.error().error.contains("restore"), "{answer:?}");
                return Ok(None);
            }
            assert!(answer.status.is_success(), "{answer:?}");
            Ok(Some(()))
        },
    )
    .await?;
    eventually("pi-01 is gone from the records", WAIT, || async {
        let pi = api.get("/api/v1/devices/pi-01").await?;
        Ok((pi.status == StatusCode::NOT_FOUND).then_some(()))
    })
    .await?;
    Ok(())
}
