//! Hostile and mistaken documents through both doors a person has, the HTTP API (raw bodies)
//! and `fleetctl apply`: every one refused with its field's path, and nothing stored anywhere
//! (the whole NATS store is compared before and after). The classes: values podman would read
//! as options or separators, NUL bytes, CR/LF in a probe path, duplicate and merge keys, YAML
//! `.nan`, unclean and duplicate paths, `maxUnavailable: 0`, out-of-range and mistyped values,
//! resources above the size limit, names that would leave their URL segment. A byte order mark
//! is the one thing that must be accepted.

use std::path::Path;

use anyhow::{Result, ensure};
use fleet_contracts::document::{MAX_BODY_BYTES, MAX_RESOURCE_BYTES};
use fleet_e2e::{
    TestFleet, http_deployment,
    store::{settled, snapshot, unchanged},
};
use serde_json::{Value, json};

/// A document refused: its JSON text, the HTTP status, and what both doors must say.
struct Case {
    what: &'static str,
    json: String,
    status: u16,
    says: String,
}

const C: &str = "spec.template.containers[0]";

/// A valid Deployment with `edit` applied, as a case.
fn edited(what: &'static str, edit: impl FnOnce(&mut Value), status: u16, says: &str) -> Case {
    let mut doc = http_deployment("web", "web", 18080, "hi");
    edit(&mut doc);
    Case {
        what,
        json: doc.to_string(),
        status,
        says: says.to_owned(),
    }
}

fn container(doc: &mut Value) -> &mut Value {
    &mut doc["spec"]["template"]["containers"][0]
}

fn cases() -> Vec<Case> {
    let big = "x".repeat(MAX_RESOURCE_BYTES * 3);
    vec![
        edited("an image podman would read as an option", |d| container(d)["image"] = json!("--privileged"), 422,
            &format!("{C}.image: must not start with '-'")),
        edited("a mount path with podman's volume separator", |d| container(d)["volumes"] = json!([{"name": "d", "mountPath": "/data:O"}]), 422,
            &format!("{C}.volumes[0].mountPath: must not contain ':'")),
        edited("a host path that adds a second mount", |d| container(d)["volumes"] = json!([{"name": "d", "mountPath": "/x", "hostPath": "/etc:/evil"}]), 422,
            &format!("{C}.volumes[0].hostPath: must not contain ':'")),
        edited("a NUL in an env value", |d| container(d)["env"][0]["value"] = json!("a\0b"), 422,
            &format!("{C}.env[0].value: must not contain a NUL byte")),
        edited("a NUL in the command", |d| container(d)["command"] = json!(["sh", "-c", "x\0"]), 422,
            &format!("{C}.command[2]: must not contain a NUL byte")),
        edited("a NUL in the image", |d| container(d)["image"] = json!("alpine\0:1"), 422,
            &format!("{C}.image: must not contain a NUL byte")),
        edited("CR/LF in a probe path", |d| container(d)["probes"] = json!([{"name": "h", "httpGet": {"port": 8080, "path": "/a\r\nX-Evil: 1"}}]), 422,
            &format!("{C}.probes[0].httpGet.path: must be visible ASCII")),
        edited("a mount over the container's root", |d| container(d)["volumes"] = json!([{"name": "d", "mountPath": "/"}]), 422,
            &format!("{C}.volumes[0].mountPath: must not be /")),
        edited("/data beside /data/", |d| container(d)["volumes"] = json!([{"name": "d", "mountPath": "/data"}, {"name": "e", "mountPath": "/data/"}]), 422,
            &format!("{C}.volumes[1].mountPath: must be a clean path")),
        edited("maxUnavailable 0", |d| d["spec"]["rollout"] = json!({"waveSize": 1, "maxUnavailable": 0}), 422,
            "spec.rollout.maxUnavailable: must be at least 1"),
        edited("a port out of range", |d| container(d)["ports"][0]["containerPort"] = json!(70000), 422,
            &format!("{C}.ports[0].containerPort: 70000 is out of range (1-65535)")),
        edited("a negative grace", |d| d["spec"]["template"]["lifecycle"] = json!({"graceSeconds": -1}), 422,
            "spec.template.lifecycle.graceSeconds: -1 is out of range"),
        edited("an unknown restart policy", |d| d["spec"]["template"]["restartPolicy"] = json!("Sometimes"), 422,
            "spec.template.restartPolicy: unknown value \"Sometimes\""),
        edited("an unknown protocol", |d| container(d)["ports"][0]["protocol"] = json!("SCTP"), 422,
            &format!("{C}.ports[0].protocol: unknown value \"SCTP\"")),
        Case {
            what: "a duplicate kind",
            json: r#"{"apiVersion": "fleet.dev/v1", "kind": "Device", "kind": "Deployment", "metadata": {"name": "web"}}"#.into(),
            status: 422,
            says: "kind: appears twice in this mapping".into(),
        },
        Case {
            what: "a duplicate nested key",
            json: http_deployment("web", "web", 18080, "hi").to_string().replacen(
                "\"image\":", "\"image\":\"localhost/x:1\",\"image\":", 1),
            status: 422,
            says: format!("{C}.image: appears twice in this mapping"),
        },
        edited("a resource above the size limit", |d| container(d)["env"][0]["value"] = json!(big), 413,
            &format!("bytes as stored; a resource may be at most {MAX_RESOURCE_BYTES} bytes (it is one NATS message; this NATS server's max_payload is 1048576 bytes)")),
    ]
}

/// A raw POST of `body` to the apply endpoint: (status, body).
fn post(fleet: &TestFleet, body: &[u8]) -> Result<(u16, String)> {
    request(fleet, "POST", "/api/v1/apply", body)
}

fn request(fleet: &TestFleet, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{}{path}", fleet.operator.url);
    let auth = format!("Bearer {}", fleet.operator.token);
    let mut response = match method {
        "POST" => agent
            .post(&url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(body)?,
        _ => agent.delete(&url).header("Authorization", &auth).call()?,
    };
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string()?;
    // An error body is JSON: its message, unescaped, is what a person reads.
    let said = match serde_json::from_str::<fleet_contracts::api::ErrorBody>(&text) {
        Ok(e) => e.error,
        Err(_) => text,
    };
    Ok((status, said))
}

/// Announces an apply body of `length` bytes with `Expect: 100-continue` and returns the
/// operator's answer: one too large must be refused before a byte of it is sent.
fn announce(fleet: &TestFleet, length: usize) -> Result<String> {
    use std::io::{Read, Write};
    let address = fleet.operator.url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address)?;
    // A bound on a broken operator, not a wait for anything.
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        stream,
        "POST /api/v1/apply HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {length}\r\n\
         Expect: 100-continue\r\nConnection: close\r\n\r\n",
        fleet.operator.token
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// `fleetctl` with `args`: (exit code, stdout, stderr).
fn fleetctl(fleet: &TestFleet, args: &[&str]) -> Result<(i32, String, String)> {
    #[allow(clippy::disallowed_methods)] // The test runs the real CLI.
    let out = std::process::Command::new(fleet_e2e::binary("fleetctl"))
        .env("FLEET_SERVER", &fleet.operator.url)
        .env("FLEET_TOKEN", &fleet.operator.token)
        .args(args)
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn apply_file(fleet: &TestFleet, file: &Path) -> Result<(i32, String, String)> {
    fleetctl(fleet, &["apply", "-f", &file.display().to_string()])
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_documents_are_refused_through_both_doors_naming_the_field_and_nothing_changes()
-> Result<()> {
    let fleet = TestFleet::start().await?;
    // Something to be wrecked: a Deployment whose name a hostile delete could reach.
    fleet
        .operator
        .apply(&http_deployment("web", "web", 18080, "kept"))?;
    let before = settled(&fleet).await?;

    let mut failures = Vec::new();
    for (i, case) in cases().iter().enumerate() {
        let (status, body) = post(&fleet, case.json.as_bytes())?;
        if status != case.status || !body.contains(&case.says) {
            failures.push(format!(
                "HTTP, {}: {status} {body} (want {} with {:?})",
                case.what, case.status, case.says
            ));
        }
        // JSON is YAML: the same text, as a file a person applies.
        let file = fleet.path().join(format!("case-{i}.yaml"));
        std::fs::write(&file, &case.json)?;
        let (code, _, stderr) = apply_file(&fleet, &file)?;
        let expected = if case.status == 413 {
            format!("at most {MAX_RESOURCE_BYTES} bytes per resource")
        } else {
            case.says.clone()
        };
        if code != 1 || !stderr.contains(&expected) || !stderr.contains("nothing was applied") {
            failures.push(format!(
                "fleetctl, {}: exit {code}: {stderr} (want {expected:?})",
                case.what
            ));
        }
    }

    // What only YAML can say.
    for (what, yaml, says) in [
        (
            "a .nan port",
            "apiVersion: fleet.dev/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    containers:\n    - ports:\n      - hostPort: .nan\n",
            "spec.template.containers[0].ports[0].hostPort: NaN is not a number",
        ),
        (
            "a merge key",
            "base: &b {name: web}\napiVersion: fleet.dev/v1\nkind: Device\nmetadata:\n  <<: *b\n",
            "metadata.<<: YAML merge keys are not supported",
        ),
        (
            "a duplicate key in YAML",
            "apiVersion: fleet.dev/v1\nkind: Device\nmetadata: {name: web}\nkind: Deployment\n",
            "kind: appears twice in this mapping",
        ),
    ] {
        let file = fleet.path().join("yaml-only.yaml");
        std::fs::write(&file, yaml)?;
        let (code, _, stderr) = apply_file(&fleet, &file)?;
        if code != 1 || !stderr.contains(says) {
            failures.push(format!(
                "fleetctl, {what}: exit {code}: {stderr} (want {says:?})"
            ));
        }
    }

    // A batch with one invalid document applies none of them.
    let mut good = http_deployment("batch-good", "web", 18081, "x");
    good["metadata"]["name"] = json!("batch-good");
    let file = fleet.path().join("batch.yaml");
    std::fs::write(&file, format!("{good}\n---\n{}\n", cases()[0].json))?;
    let (code, _, stderr) = apply_file(&fleet, &file)?;
    if code != 1 || !stderr.contains("nothing was applied: 1 of 2 document(s) are invalid") {
        failures.push(format!(
            "fleetctl, a batch with one bad document: exit {code}: {stderr}"
        ));
    }

    // A body far above the limit: the operator refuses it unread, fleetctl before sending.
    let mut huge = http_deployment("huge", "web", 18082, "x");
    container(&mut huge)["env"][0]["value"] = json!("x".repeat(20 << 20));
    let huge = huge.to_string();
    let answer = announce(&fleet, huge.len()).unwrap_or_else(|e| format!("no answer: {e}"));
    if !answer.starts_with("HTTP/1.1 413")
        || !answer.contains(&format!("larger than {MAX_BODY_BYTES} bytes"))
    {
        failures.push(format!("HTTP, a 20 MB body: {answer}"));
    }
    let file = fleet.path().join("huge.json");
    std::fs::write(&file, &huge)?;
    let (code, _, stderr) = apply_file(&fleet, &file)?;
    if code != 1
        || !stderr.contains(&format!(
            "bytes as stored; the operator accepts at most {MAX_RESOURCE_BYTES} bytes per resource"
        ))
        || stderr.contains("Broken pipe")
    {
        failures.push(format!("fleetctl, a 20 MB file: exit {code}: {stderr}"));
    }

    // Names that would leave their URL segment: refused, and `web` is not deleted.
    for name in ["web?x=1", "web#x", "*", "../devices/web"] {
        let (code, _, stderr) = fleetctl(&fleet, &["delete", "deployments", name])?;
        if code == 0 || !stderr.contains("invalid name") {
            failures.push(format!("fleetctl delete {name:?}: exit {code}: {stderr}"));
        }
    }
    for path in [
        "/api/v1/deployments/*",
        "/api/v1/deployments/%2A",
        "/api/v1/deployments/web%3Fx=1",
    ] {
        let (status, body) = request(&fleet, "DELETE", path, b"")?;
        if status != 400 || !body.contains("invalid name") {
            failures.push(format!("HTTP DELETE {path}: {status} {body}"));
        }
    }

    unchanged(&before, &snapshot(&fleet).await?)?;
    ensure!(failures.is_empty(), "{}", failures.join("\n"));

    // A byte order mark (Windows editors write one) is accepted through both doors.
    let with_bom = |name: &str| {
        format!(
            "\u{feff}{}",
            fleet_e2e::device_doc(name, &[("role", "bom")])
        )
    };
    let (status, body) = post(&fleet, with_bom("bom-http").as_bytes())?;
    ensure!(status == 200, "a body with a BOM: {status} {body}");
    let file = fleet.path().join("bom.yaml");
    std::fs::write(&file, with_bom("bom-file"))?;
    let (code, stdout, stderr) = apply_file(&fleet, &file)?;
    ensure!(code == 0, "a file with a BOM: {stdout}{stderr}");
    let client = fleet.operator.client();
    ensure!(
        client.device("bom-http").is_ok() && client.device("bom-file").is_ok(),
        "the documents with a BOM were not stored"
    );
    ensure!(
        client.deployment("web")?.spec.template.containers[0].env[0].value == "kept",
        "the Deployment a hostile name pointed at changed"
    );
    Ok(())
}
