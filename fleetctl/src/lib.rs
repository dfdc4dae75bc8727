//! The library behind `fleetctl`: reading resource files (YAML or JSON, one or many documents,
//! a file or a folder), talking to the operator's HTTP API, and printing results for people.
//!
//! It never talks to NATS: the operator's API is the only way in, so its validation and
//! authorization apply to the CLI too.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use fleet_contracts::{
    api::{ApplyResult, CreateEnrollmentToken, CreatedEnrollmentToken, ErrorBody, OperatorStatus},
    document,
    resource::{Deployment, Device, OsUpgrade, Resource, RolloutPhase},
    state::EnrollmentToken,
};
use serde::de::DeserializeOwned;

pub mod clock;
pub mod render;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path} holds no .yaml, .yml or .json files")]
    EmptyDir { path: PathBuf },
    #[error(
        "cannot reach the operator at {url}: {message}\n  is it running? (set --server or FLEET_SERVER)"
    )]
    Unreachable { url: String, message: String },
    #[error("{message}")]
    Api {
        status: u16,
        message: String,
        fields: Vec<String>,
    },
    #[error("unexpected answer from the operator: {0}")]
    Protocol(String),
    /// A local file could not be read or written, or is not what it should be.
    #[error("{0}")]
    Io(String),
}

/// One resource document read from a file.
#[derive(Debug, Clone)]
pub struct Document {
    /// `file` or `file#n` for the n-th document of a multi-document file.
    pub source: String,
    pub value: serde_json::Value,
}

/// Reads every document in a file, or in every `.yaml`/`.yml`/`.json` file of a folder
/// (sorted by name, not recursive).
pub fn load_documents(path: &Path) -> Result<Vec<Document>, CtlError> {
    let meta = std::fs::metadata(path).map_err(|source| CtlError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        return load_file(path);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|source| CtlError::Read {
            path: path.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(CtlError::EmptyDir {
            path: path.to_owned(),
        });
    }
    let mut docs = Vec::new();
    for f in files {
        docs.extend(load_file(&f)?);
    }
    Ok(docs)
}

fn load_file(path: &Path) -> Result<Vec<Document>, CtlError> {
    let text = std::fs::read_to_string(path).map_err(|source| CtlError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_documents(&text, path)
}

/// Parses YAML (JSON is YAML too) strictly ([`fleet_contracts::document`]: no duplicate keys,
/// no merge keys, no `.nan`, no NUL); every error carries the file, the document, the field's
/// path and, where YAML knows it, the line. A leading byte order mark is skipped.
pub fn parse_documents(text: &str, path: &Path) -> Result<Vec<Document>, CtlError> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    let text = document::without_bom(text);
    // First the syntax, said as such with its line; then what a resource must not hold.
    for de in serde_yaml_ng::Deserializer::from_str(text) {
        serde::de::IgnoredAny::deserialize(de).map_err(|e| CtlError::Parse {
            path: path.to_owned(),
            message: format!("not valid YAML: {e}"),
        })?;
    }
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = document::from_deserializer(de).map_err(|e| CtlError::Parse {
            path: path.to_owned(),
            message: if e.path.is_empty() {
                format!("not valid YAML: {}", e.message)
            } else {
                format!("document {}: {e}", i + 1)
            },
        })?;
        if value.is_null() {
            continue; // An empty document, e.g. a trailing `---`.
        }
        docs.push(Document {
            source: format!("{}#{}", path.display(), i + 1),
            value,
        });
    }
    if docs.is_empty() {
        return Err(CtlError::Parse {
            path: path.to_owned(),
            message: "holds no resource".into(),
        });
    }
    Ok(docs)
}

/// What is wrong with each document of a batch, checked before any is sent: each must be a
/// valid resource ([`Resource::from_user`], the operator's own check), within
/// [`document::MAX_RESOURCE_BYTES`], and no resource may appear twice. Empty when all are fine.
pub fn check_documents(docs: &[Document]) -> Vec<(String, Vec<String>)> {
    let mut problems = Vec::new();
    let mut seen: std::collections::BTreeMap<(String, String), &str> = Default::default();
    for doc in docs {
        let mut why = Vec::new();
        match Resource::from_user(doc.value.clone()) {
            Ok(r) => {
                // Measured as the operator measures it: as stored, defaults filled in.
                let size = r.to_stored_json().len();
                if size > document::MAX_RESOURCE_BYTES {
                    why.push(format!(
                        "the resource is {size} bytes as stored; the operator accepts at most {} bytes per resource",
                        document::MAX_RESOURCE_BYTES
                    ));
                }
                let key = (r.kind().to_lowercase(), r.metadata().name.clone());
                if let Some(first) = seen.insert(key.clone(), &doc.source) {
                    why.push(format!(
                        "{}/{} is also in {first}; give each resource once",
                        key.0, key.1
                    ));
                }
            }
            Err(fields) => {
                let size = doc.value.to_string().len();
                if size > document::MAX_RESOURCE_BYTES {
                    why.push(format!(
                        "the document is {size} bytes; the operator accepts at most {} bytes per resource",
                        document::MAX_RESOURCE_BYTES
                    ));
                }
                why.extend(fields.iter().map(ToString::to_string));
            }
        }
        if !why.is_empty() {
            problems.push((doc.source.clone(), why));
        }
    }
    problems
}

/// `s` as one URL path segment or query value: everything but letters, digits, `-` and `_`
/// percent-encoded, so a `?`, `#` or `/` in a name stays part of the name (and the operator
/// refuses it) instead of ending the path, and `.` or `..` is never a dot segment.
pub fn segment(s: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet =
        &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_');
    percent_encoding::utf8_percent_encode(s, KEEP).to_string()
}

/// A client of the operator's HTTP API.
#[derive(Debug)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    /// `Authorization: Bearer <token>` for the API.
    authorization: Option<String>,
}

impl Client {
    /// A client of the operator at `base`, authenticating with the admin `token`.
    pub fn new(base: &str, token: Option<&str>) -> Client {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_owned(),
            agent,
            authorization: token.map(|t| format!("Bearer {}", t.trim())),
        }
    }

    fn auth<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(value) => request.header("Authorization", value),
            None => request,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn answer<T: DeserializeOwned>(
        &self,
        url: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, CtlError> {
        let mut response = result.map_err(|e| CtlError::Unreachable {
            url: url.to_owned(),
            message: e.to_string(),
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| CtlError::Protocol(e.to_string()))?;
        if status >= 400 {
            return Err(match serde_json::from_str::<ErrorBody>(&text) {
                Ok(body) => CtlError::Api {
                    status,
                    message: body.error,
                    fields: body.fields.iter().map(ToString::to_string).collect(),
                },
                Err(_) => CtlError::Api {
                    status,
                    message: format!("HTTP {status}: {text}"),
                    fields: vec![],
                },
            });
        }
        if text.is_empty() {
            // DELETE answers 204 with no body.
            return serde_json::from_str("null").map_err(|e| CtlError::Protocol(e.to_string()));
        }
        serde_json::from_str(&text).map_err(|e| CtlError::Protocol(format!("{e}: {text}")))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, CtlError> {
        let url = self.url(path);
        self.answer(&url, self.auth(self.agent.get(&url)).call())
    }

    pub fn apply(&self, doc: &serde_json::Value) -> Result<ApplyResult, CtlError> {
        let url = self.url("/api/v1/apply");
        self.answer(&url, self.auth(self.agent.post(&url)).send_json(doc))
    }

    pub fn status(&self) -> Result<OperatorStatus, CtlError> {
        self.get("/api/v1/status")
    }

    pub fn deployments(&self) -> Result<Vec<Deployment>, CtlError> {
        self.get("/api/v1/deployments")
    }

    pub fn deployment(&self, name: &str) -> Result<Deployment, CtlError> {
        self.get(&format!("/api/v1/deployments/{}", segment(name)))
    }

    pub fn os_upgrades(&self) -> Result<Vec<OsUpgrade>, CtlError> {
        self.get("/api/v1/osupgrades")
    }

    pub fn os_upgrade(&self, name: &str) -> Result<OsUpgrade, CtlError> {
        self.get(&format!("/api/v1/osupgrades/{}", segment(name)))
    }

    pub fn devices(&self) -> Result<Vec<Device>, CtlError> {
        self.get("/api/v1/devices")
    }

    pub fn device(&self, name: &str) -> Result<Device, CtlError> {
        self.get(&format!("/api/v1/devices/{}", segment(name)))
    }

    pub fn create_enrollment_token(
        &self,
        req: &CreateEnrollmentToken,
    ) -> Result<CreatedEnrollmentToken, CtlError> {
        let url = self.url("/api/v1/enrollment-tokens");
        self.answer(&url, self.auth(self.agent.post(&url)).send_json(req))
    }

    pub fn enrollment_tokens(&self) -> Result<Vec<EnrollmentToken>, CtlError> {
        self.get("/api/v1/enrollment-tokens")
    }

    pub fn revoke_enrollment_token(&self, id: &str) -> Result<EnrollmentToken, CtlError> {
        let url = self.url(&format!("/api/v1/enrollment-tokens/{}", segment(id)));
        self.answer(&url, self.auth(self.agent.delete(&url)).call())
    }

    /// The last `tail` lines of a Deployment's container on `device`.
    pub fn logs(
        &self,
        deployment: &str,
        device: &str,
        tail: u32,
    ) -> Result<fleet_contracts::rpc::LogsReply, CtlError> {
        self.get(&format!(
            "/api/v1/deployments/{}/logs?device={}&tail={tail}",
            segment(deployment),
            segment(device)
        ))
    }

    /// Follows a Deployment's log on `device`: the last `tail` lines, then new ones as they
    /// come, handed to `line` until it returns false or the device ends the session (whose
    /// reason comes as a last line starting with `-- `).
    pub fn follow_logs(
        &self,
        deployment: &str,
        device: &str,
        tail: u32,
        mut line: impl FnMut(&str) -> bool,
    ) -> Result<(), CtlError> {
        use std::io::BufRead;
        // No overall timeout: a follow lasts as long as the reader wants.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let url = self.url(&format!(
            "/api/v1/deployments/{}/logs?device={}&tail={tail}&follow=true",
            segment(deployment),
            segment(device)
        ));
        let mut request = agent.get(&url);
        if let Some(value) = &self.authorization {
            request = request.header("Authorization", value);
        }
        let response = request.call().map_err(|e| CtlError::Unreachable {
            url: url.clone(),
            message: e.to_string(),
        })?;
        if response.status().as_u16() >= 400 {
            return self.answer::<()>(&url, Ok(response));
        }
        let reader = std::io::BufReader::new(response.into_body().into_reader());
        for l in reader.lines() {
            let l = l.map_err(|e| CtlError::Protocol(e.to_string()))?;
            if !line(&l) {
                break;
            }
        }
        Ok(())
    }

    /// Runs `command` once in a Deployment's container on `device` (audited as `by`).
    pub fn exec(
        &self,
        deployment: &str,
        cmd: &fleet_contracts::api::ExecCommand,
    ) -> Result<fleet_contracts::rpc::ExecReply, CtlError> {
        let url = self.url(&format!("/api/v1/deployments/{}/exec", segment(deployment)));
        self.answer(&url, self.auth(self.agent.post(&url)).send_json(cmd))
    }

    /// Continues a halted rollout past the devices holding it back now.
    pub fn resume_rollout(
        &self,
        deployment: &str,
        by: &str,
    ) -> Result<fleet_contracts::state::RolloutResume, CtlError> {
        let url = self.url(&format!(
            "/api/v1/deployments/{}/rollout/resume",
            segment(deployment)
        ));
        let req = fleet_contracts::api::BlacklistRequest {
            by: by.to_owned(),
            reason: String::new(),
        };
        self.answer(&url, self.auth(self.agent.post(&url)).send_json(&req))
    }

    /// Blacklists (`on`) or un-blacklists a device.
    pub fn blacklist(
        &self,
        device: &str,
        on: bool,
        by: &str,
        reason: &str,
    ) -> Result<fleet_contracts::api::BlacklistResult, CtlError> {
        let action = if on { "blacklist" } else { "unblacklist" };
        let url = self.url(&format!("/api/v1/devices/{}/{action}", segment(device)));
        let req = fleet_contracts::api::BlacklistRequest {
            by: by.to_owned(),
            reason: reason.to_owned(),
        };
        self.answer(&url, self.auth(self.agent.post(&url)).send_json(&req))
    }

    /// Adopts a device that reports but has no record, or holds on another store.
    pub fn adopt(
        &self,
        device: &str,
        request: &fleet_contracts::api::AdoptRequest,
    ) -> Result<fleet_contracts::api::AdoptResult, CtlError> {
        let url = self.url(&format!("/api/v1/devices/{}/adopt", segment(device)));
        self.answer(&url, self.auth(self.agent.post(&url)).send_json(request))
    }

    /// Lets a device remove the deployments it holds from an earlier store.
    pub fn release(
        &self,
        device: &str,
        by: &str,
    ) -> Result<fleet_contracts::api::AdoptResult, CtlError> {
        let url = self.url(&format!("/api/v1/devices/{}/release", segment(device)));
        let req = fleet_contracts::api::BlacklistRequest {
            by: by.to_owned(),
            reason: String::new(),
        };
        self.answer(&url, self.auth(self.agent.post(&url)).send_json(&req))
    }

    /// Every bucket's values but the lease.
    pub fn backup(&self) -> Result<fleet_contracts::api::Backup, CtlError> {
        self.get("/api/v1/backup")
    }

    /// Restores a backup (a new epoch of its fleet; see docs/store-loss.md).
    pub fn restore(
        &self,
        backup: &fleet_contracts::api::Backup,
    ) -> Result<fleet_contracts::api::RestoreResult, CtlError> {
        let url = self.url("/api/v1/restore");
        self.answer(&url, self.auth(self.agent.post(&url)).send_json(backup))
    }

    /// Deletes `kind` (`deployments` or `devices`) `name`.
    pub fn delete(&self, kind: &str, name: &str) -> Result<(), CtlError> {
        let url = self.url(&format!("/api/v1/{kind}/{}", segment(name)));
        self.answer::<()>(&url, self.auth(self.agent.delete(&url)).call())
    }

    /// Waits until the Deployment runs its current generation on every matching device, calling
    /// `progress` with a line whenever the picture changes. Fails with the devices' reasons.
    pub fn wait_running(
        &self,
        name: &str,
        timeout: Duration,
        mut progress: impl FnMut(&str),
    ) -> Result<Deployment, WaitError> {
        let deadline = clock::now() + timeout;
        let mut last = String::new();
        loop {
            // While the operator recovers it answers 503; keep waiting through that.
            match self.deployment(name) {
                Ok(d) => {
                    let line = render::progress_line(&d);
                    if line != last {
                        progress(&line);
                        last = line;
                    }
                    let status = d.status.clone().unwrap_or_default();
                    match status.phase {
                        RolloutPhase::Running => return Ok(d),
                        RolloutPhase::Failed | RolloutPhase::Halted => {
                            return Err(WaitError::Failed(render::failure_reasons(&d)));
                        }
                        _ => {}
                    }
                }
                Err(CtlError::Api { status: 503, .. }) => {}
                Err(e) => return Err(WaitError::Ctl(e)),
            }
            if clock::now() >= deadline {
                return Err(WaitError::TimedOut {
                    after: timeout,
                    last,
                });
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("{0}")]
    Ctl(CtlError),
    #[error("failed:\n{0}")]
    Failed(String),
    #[error("not running after {after:?}; last: {last}")]
    TimedOut { after: Duration, last: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    /// What YAML allows and a resource must not hold: each refused where it is, by path.
    fn yaml_that_would_lose_or_smuggle_a_value_is_refused() {
        let err = |text: &str| {
            parse_documents(text, Path::new("f.yaml"))
                .unwrap_err()
                .to_string()
        };
        let dup = "kind: Deployment\nkind: Device\n";
        assert!(
            err(dup).starts_with(
                "f.yaml: document 1: kind: appears twice in this mapping; give each key once"
            ),
            "{}",
            err(dup)
        );
        let nested =
            "spec:\n  template:\n    containers:\n    - name: a\n      image: x\n      image: y\n";
        assert!(
            err(nested).starts_with(
                "f.yaml: document 1: spec.template.containers[0].image: appears twice"
            ),
            "{}",
            err(nested)
        );
        for nan in [".nan", ".inf", "-.inf", ".NaN"] {
            let text = format!("spec:\n  ports:\n  - hostPort: {nan}\n");
            assert!(
                err(&text).starts_with("f.yaml: document 1: spec.ports[0].hostPort: ")
                    && err(&text).contains("is not a number this field can hold"),
                "{nan}: {}",
                err(&text)
            );
        }
        let merge = "base: &b {name: a}\nmetadata:\n  <<: *b\n";
        assert!(
            err(merge)
                .starts_with("f.yaml: document 1: metadata.<<: YAML merge keys are not supported"),
            "{}",
            err(merge)
        );
        let nul = "metadata: {name: \"a\\0b\"}\n";
        assert!(
            err(nul).starts_with("f.yaml: document 1: metadata.name: must not contain a NUL byte"),
            "{}",
            err(nul)
        );
        let second = "kind: Device\n---\nkind: Device\nkind: Device\n";
        assert!(
            err(second).starts_with("f.yaml: document 2: kind: appears twice"),
            "{}",
            err(second)
        );
        // A byte order mark (as Windows editors write) is not part of the document.
        let docs = parse_documents("\u{feff}kind: Device\n", Path::new("f.yaml")).unwrap();
        assert_eq!(docs[0].value["kind"], "Device");
    }

    /// Random text, and hostile documents written as YAML and then garbled, never panic the
    /// reader or the batch check.
    #[test]
    fn random_yaml_never_panics_the_reader() {
        use proptest::{
            prelude::*,
            test_runner::{Config, TestRunner},
        };
        let garbled = (
            fleet_contracts::testing::hostile_deployment(),
            prop::collection::vec((any::<usize>(), any::<char>()), 0..4),
        )
            .prop_map(|(doc, edits)| {
                let mut text: Vec<char> = serde_yaml_ng::to_string(&doc).unwrap().chars().collect();
                for (at, c) in edits {
                    let i = at % text.len();
                    text[i] = c;
                }
                text.into_iter().collect::<String>()
            });
        let text = prop_oneof![
            "\\PC{0,200}",
            "[-:{}\\[\\]&*!|>'\" \n#<a-z0-9.]{0,200}",
            garbled
        ];
        TestRunner::new(Config {
            cases: 1000,
            failure_persistence: None,
            ..Config::default()
        })
        .run(&text, |text| {
            if let Ok(docs) = parse_documents(&text, Path::new("f.yaml")) {
                let _ = check_documents(&docs);
            }
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_batch_is_checked_whole_before_anything_is_sent() {
        let text = "apiVersion: fleet.dev/v1\nkind: Device\nmetadata: {name: a}\n---\n\
                    apiVersion: fleet.dev/v1\nkind: Device\nmetadata: {name: B}\n---\n\
                    apiVersion: fleet.dev/v1\nkind: Device\nmetadata: {name: a}\n";
        let docs = parse_documents(text, Path::new("f.yaml")).unwrap();
        let problems = check_documents(&docs);
        assert_eq!(
            problems,
            [
                (
                    "f.yaml#2".to_owned(),
                    vec!["metadata.name: must contain only lower-case letters, digits and '-', found 'B'".to_owned()]
                ),
                (
                    "f.yaml#3".to_owned(),
                    vec!["device/a is also in f.yaml#1; give each resource once".to_owned()]
                ),
            ]
        );
        // Valid but too large as stored: said with its stored size.
        let mut big = fleet_contracts::testing::full_deployment();
        big["spec"]["template"]["containers"][0]["env"][0]["value"] =
            "y".repeat(document::MAX_RESOURCE_BYTES).into();
        let problems = check_documents(&[Document {
            source: "big".into(),
            value: big,
        }]);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].1[0].starts_with("the resource is 52")
                && problems[0].1[0].ends_with(
                    "bytes as stored; the operator accepts at most 524288 bytes per resource"
                ),
            "{problems:?}"
        );
        // Invalid and too large: both are said.
        let big = serde_json::json!({"apiVersion": "fleet.dev/v1", "kind": "Device",
            "metadata": {"name": "a", "labels": {"x": "y".repeat(document::MAX_RESOURCE_BYTES)}}});
        let problems = check_documents(&[Document {
            source: "big".into(),
            value: big,
        }]);
        assert!(
            problems[0].1[0].starts_with("the document is 52")
                && problems[0].1[1].starts_with("metadata.labels.x: label values are at most 63"),
            "{problems:?}"
        );
    }

    #[test]
    fn names_cannot_leave_their_url_segment() {
        assert_eq!(segment("web"), "web");
        assert_eq!(segment("web?x=1"), "web%3Fx%3D1");
        assert_eq!(segment("web#x"), "web%23x");
        assert_eq!(segment("../devices/a"), "%2E%2E%2Fdevices%2Fa");
        assert_eq!(segment(".."), "%2E%2E");
        assert_eq!(segment("*"), "%2A");
    }

    #[test]
    fn multi_document_yaml_and_errors_with_lines() {
        let text =
            "kind: Device\nmetadata: {name: a}\n---\nkind: Device\nmetadata: {name: b}\n---\n";
        let docs = parse_documents(text, Path::new("f.yaml")).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].source, "f.yaml#2");
        assert_eq!(docs[1].value["metadata"]["name"], "b");
        let err = parse_documents("kind: Device\n  metadata: [\n", Path::new("bad.yaml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("bad.yaml: not valid YAML:") && err.contains("line 2"),
            "{err}"
        );
        let err = parse_documents("", Path::new("e.yaml"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "e.yaml: holds no resource");
    }

    #[test]
    fn folders_load_sorted_yaml_and_json_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b.yaml"), "kind: B\n").unwrap();
        std::fs::write(dir.path().join("a.json"), "{\"kind\": \"A\"}").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let docs = load_documents(dir.path()).unwrap();
        let kinds: Vec<_> = docs
            .iter()
            .map(|d| d.value["kind"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["A", "B"]);
        let empty = tempfile::tempdir().unwrap();
        assert!(
            load_documents(empty.path())
                .unwrap_err()
                .to_string()
                .contains("holds no .yaml")
        );
    }
}
