//! Resource documents in Kubernetes shape (`apiVersion`, `kind`, `metadata`, `spec`, `status`)
//! and their strict validation.
//!
//! Reading a stored document is lenient (unknown fields ignored, so a newer operator's
//! additions do not break an older reader). Accepting a document from a person is strict:
//! [`Resource::from_user`] rejects unknown fields and invalid values with errors that name the
//! field (`spec.template.containers[0].image: must not be empty`), type and range errors too
//! (`...ports[0].containerPort: 70000 is out of range (1-65535)`, through
//! `serde_path_to_error`). Values that become podman arguments or a request line are checked
//! for what that consumer does with them ([`crate::checks`]). Status is never taken from the
//! user; the operator computes it.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{API_VERSION, FieldError, names::check_name};

/// Labels on a resource, and the labels a selector requires.
pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: Labels,
    /// Bumped by the operator whenever the spec changes; ignored on input.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A workload to run on every device whose labels match the selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: DeploymentSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeploymentStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentSpec {
    pub selector: LabelSelector,
    pub template: PodTemplate,
    /// Roll a new generation out in waves; without it every device gets it at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutPolicy>,
}

/// Staged rollout of a new generation: a wave of devices at a time, the next wave only once
/// every device of the earlier waves reports the new generation `Ready` (its probes pass) and
/// the pause has passed. A device that fails, or is not Ready within the progress deadline,
/// halts the rollout; the remaining devices keep the old generation until a new spec (a fix)
/// or `fleetctl rollout resume`. Devices that run nothing of this Deployment yet get the new
/// generation at once: there is nothing to protect on them. Healthy devices are given the new
/// generation before unhealthy ones (offline, stale).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPolicy {
    /// Devices per wave (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_size: Option<u32>,
    /// Devices per wave as a percentage of the matching devices (rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_percent: Option<u32>,
    #[serde(default)]
    pub pause_seconds: u32,
    #[serde(default = "default_progress_deadline")]
    pub progress_deadline_seconds: u32,
    /// At most this many matching devices may be unavailable (not Ready, or not Healthy)
    /// once a wave is admitted: a wave shrinks to fit, and waits while none fits. Unset: no
    /// limit beyond the wave size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<u32>,
}

fn default_progress_deadline() -> u32 {
    300
}

impl RolloutPolicy {
    /// Devices per wave out of `total`.
    pub fn wave(&self, total: usize) -> usize {
        match (self.wave_size, self.wave_percent) {
            (Some(n), _) => n.max(1) as usize,
            (None, Some(p)) => (total * p as usize).div_ceil(100).max(1),
            (None, None) => total.max(1),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
}

impl LabelSelector {
    /// True when every required label is present with the required value.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// What runs on each device: the part of a Deployment that is sent to devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodTemplate {
    /// Run in order, each to completion, before every fresh main container (first start,
    /// upgrade, reboot). They must be idempotent: they run again and again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub init_containers: Vec<InitContainer>,
    pub containers: Vec<Container>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// How the container is stopped when it is replaced or removed.
    #[serde(default)]
    pub lifecycle: Lifecycle,
}

/// How a container is stopped: `stopSignal`, then up to `graceSeconds` to exit, then SIGKILL
/// unless `sigkillFallback` is off (then a replacement waits, and fails, rather than kill).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    #[serde(default = "default_grace")]
    pub grace_seconds: u32,
    #[serde(default = "default_true")]
    pub sigkill_fallback: bool,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle {
            stop_signal: default_stop_signal(),
            grace_seconds: default_grace(),
            sigkill_fallback: true,
        }
    }
}

fn default_stop_signal() -> String {
    "SIGTERM".into()
}
fn default_grace() -> u32 {
    30
}
fn default_true() -> bool {
    true
}

/// Signals a container may be asked to stop with.
pub const STOP_SIGNALS: &[&str] = &[
    "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGWINCH", "SIGKILL",
];

/// The longest grace a container may be given to stop.
pub const MAX_GRACE_SECONDS: u32 = 3600;

impl PodTemplate {
    /// Advice on init containers that are unlikely to be idempotent. They run again before
    /// every fresh main container, so `mkdir` without `-p` fails the second time and `>`
    /// rewrites a file every time.
    pub fn idempotency_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for c in &self.init_containers {
            let script = c
                .command
                .iter()
                .chain(&c.args)
                .cloned()
                .collect::<Vec<_>>()
                .join(" ");
            let words: Vec<&str> = script
                .split(|ch: char| ch.is_whitespace() || ch == ';' || ch == '&')
                .collect();
            for (i, w) in words.iter().enumerate() {
                if *w == "mkdir"
                    && !words[i + 1..]
                        .iter()
                        .take_while(|a| a.starts_with('-'))
                        .any(|a| a.contains('p'))
                {
                    out.push(format!(
                        "init container {:?}: `mkdir` without -p fails when it runs again (init containers rerun before every fresh main container)",
                        c.name
                    ));
                }
            }
            let truncates = script.match_indices('>').any(|(i, _)| {
                let before = script[..i].chars().last();
                let after = script[i + 1..].chars().next();
                before != Some('>')
                    && after != Some('>')
                    && after != Some('&')
                    && before != Some('2')
                    && before != Some('&')
            });
            if truncates {
                out.push(format!(
                    "init container {:?}: `>` rewrites the file each time it runs; if the main container also writes it, use `>>` or write only when missing",
                    c.name
                ));
            }
        }
        out
    }
}

/// A container that prepares the main one: it must exit 0 within its timeout, or the
/// Deployment fails on the device with its name, exit code and the tail of its output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitContainer {
    pub name: String,
    pub image: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Mounts; a named volume is the same one the main container gets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// How long it may run, in seconds (default 300).
    #[serde(default = "default_init_timeout")]
    pub timeout_seconds: u32,
}

fn default_init_timeout() -> u32 {
    300
}

/// The longest an init container may be given.
pub const MAX_INIT_TIMEOUT_SECONDS: u32 = 3600;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint when set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Replaces the image's default arguments when set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeMount>,
    /// Checks that gate `Ready`: all must pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<Probe>,
}

/// A readiness check, run by the agent on the device. Exactly one of `httpGet`, `tcp`, `exec`,
/// `running` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Probe {
    /// Named in the status when it fails.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecProbe>,
    /// Passes while the container runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<RunningProbe>,
    #[serde(default = "default_period")]
    pub period_seconds: u32,
    #[serde(default = "default_probe_timeout")]
    pub timeout_seconds: u32,
    /// Consecutive failures before a passing probe counts as failing.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
}

fn default_period() -> u32 {
    10
}
fn default_probe_timeout() -> u32 {
    2
}
fn default_failure_threshold() -> u32 {
    3
}

/// `GET http://127.0.0.1:<host port of containerPort><path>` must answer within the timeout
/// with a status in `[statusMin, statusMax]`. The port must be published in `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpGetProbe {
    pub port: u16,
    #[serde(default = "default_path")]
    pub path: String,
    #[serde(default = "default_status_min")]
    pub status_min: u16,
    #[serde(default = "default_status_max")]
    pub status_max: u16,
}

fn default_path() -> String {
    "/".into()
}
fn default_status_min() -> u16 {
    200
}
fn default_status_max() -> u16 {
    399
}

/// A TCP connection to the host port of `port` must open within the timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpProbe {
    pub port: u16,
}

/// The command, run in the container, must exit 0 within the timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecProbe {
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningProbe {}

impl Probe {
    /// What kind of check this is, for messages.
    pub fn kind(&self) -> &'static str {
        match (&self.http_get, &self.tcp, &self.exec, &self.running) {
            (Some(_), ..) => "httpGet",
            (_, Some(_), ..) => "tcp",
            (_, _, Some(_), _) => "exec",
            _ => "running",
        }
    }
}

impl Container {
    /// A container running `image` with its defaults: no command, env, ports or volumes.
    pub fn new(name: &str, image: &str) -> Container {
        Container {
            name: name.to_owned(),
            image: image.to_owned(),
            command: vec![],
            args: vec![],
            env: vec![],
            ports: vec![],
            volumes: vec![],
            probes: vec![],
        }
    }
}

impl PodTemplate {
    /// One container, restarted always: the common case.
    pub fn single(container: Container) -> PodTemplate {
        PodTemplate {
            init_containers: vec![],
            containers: vec![container],
            restart_policy: RestartPolicy::Always,
            lifecycle: Lifecycle::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvVar {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    pub container_port: u16,
    /// The port on the device; defaults to `containerPort`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    #[serde(default)]
    pub protocol: Protocol,
}

impl Port {
    pub fn effective_host_port(&self) -> u16 {
        self.host_port.unwrap_or(self.container_port)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// A mount: a named volume kept on the device's data partition across upgrades, or a host path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
    /// Bind-mount this absolute host path instead of a named volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    /// Keep the container running: restart it whenever it stops.
    #[default]
    Always,
    /// Restart only after a non-zero exit.
    OnFailure,
    /// Run once.
    Never,
}

/// A device of the fleet; its labels decide which Deployments it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    #[serde(default)]
    pub spec: DeviceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {}

/// Computed by the operator from the devices' reports; never stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentStatus {
    /// The aggregate phase: `Running` only when every matching device runs the current
    /// generation.
    pub phase: RolloutPhase,
    pub desired_devices: usize,
    pub running_devices: usize,
    pub failed_devices: usize,
    pub devices: Vec<DeviceDeploymentStatus>,
    /// For a staged rollout: how far it got and why it stopped, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Devices given the current generation so far.
    pub updated_devices: usize,
    pub wave_size: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted: Option<String>,
    /// Why the next wave waits although the last one is Ready (`maxUnavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutPhase {
    /// No device matches the selector.
    NoDevices,
    /// Some devices have not reported the current generation running yet.
    #[default]
    Progressing,
    /// Every matching device runs the current generation.
    Running,
    /// At least one device reports the current generation failed.
    Failed,
    /// A staged rollout stopped: a device of an admitted wave failed or missed its deadline.
    Halted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceDeploymentStatus {
    pub device: String,
    /// `None` until the device has reported on this Deployment.
    pub reported: Option<crate::state::ReportedDeployment>,
    pub device_health: crate::state::Health,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    pub health: crate::state::Health,
    pub heartbeat: Option<crate::state::Heartbeat>,
    /// Milliseconds since the last heartbeat arrived, by the operator's clock.
    pub heartbeat_age_ms: Option<u64>,
    pub deployments: Vec<String>,
    /// Set while the device is blacklisted: who, when, why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blacklist: Option<crate::api::Audit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_unblacklist: Option<crate::api::Audit>,
    /// The device reports but has no Device record: it enrolled in a store that was lost, or
    /// restored from before it enrolled. `fleetctl device adopt` gives it one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unregistered: bool,
}

impl DeviceStatus {
    /// The health as people see it: `Unregistered` for a device without a record, and
    /// `(holding)` after it while the device holds on another store.
    pub fn shown_health(&self) -> String {
        let holding = self.heartbeat.as_ref().is_some_and(|h| {
            h.health_flags
                .iter()
                .any(|f| matches!(f, crate::state::HealthFlag::StoreChanged { .. }))
        });
        let health = if self.unregistered {
            "Unregistered".to_owned()
        } else {
            self.health.to_string()
        };
        if holding {
            format!("{health} (holding)")
        } else {
            health
        }
    }
}

/// Any resource a person can apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    Deployment(Deployment),
    Device(Device),
}

impl Resource {
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Deployment(_) => "Deployment",
            Resource::Device(_) => "Device",
        }
    }

    pub fn metadata(&self) -> &Metadata {
        match self {
            Resource::Deployment(d) => &d.metadata,
            Resource::Device(d) => &d.metadata,
        }
    }

    pub fn metadata_mut(&mut self) -> &mut Metadata {
        match self {
            Resource::Deployment(d) => &mut d.metadata,
            Resource::Device(d) => &mut d.metadata,
        }
    }

    /// The resource as it is stored in KV (compact JSON): what [`crate::document::MAX_RESOURCE_BYTES`]
    /// bounds, measured the same way by `fleetctl` and the operator.
    pub fn to_stored_json(&self) -> Vec<u8> {
        match self {
            Resource::Deployment(d) => serde_json::to_vec(d),
            Resource::Device(d) => serde_json::to_vec(d),
        }
        .expect("resources serialize")
    }

    /// Parses and validates a document a person wrote: unknown fields and invalid values are
    /// errors naming the field. Any `status` and `metadata.generation` given are dropped.
    pub fn from_user(mut doc: serde_json::Value) -> Result<Resource, Vec<FieldError>> {
        // What a strict reading refuses (a NUL byte anywhere), also for a caller that built
        // the value itself.
        crate::document::from_deserializer(&doc).map_err(|e| vec![e])?;
        let Some(obj) = doc.as_object_mut() else {
            return Err(vec![FieldError::new("", "a resource must be a mapping")]);
        };
        obj.remove("status");
        if let Some(meta) = obj.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            meta.remove("generation");
        }
        let kind = match obj.get("kind") {
            Some(serde_json::Value::String(k)) => k.clone(),
            Some(_) => return Err(vec![FieldError::new("kind", "must be a string")]),
            None => {
                return Err(vec![FieldError::new(
                    "kind",
                    "missing; one of Deployment, Device",
                )]);
            }
        };
        let (resource, mut errors) = match kind.as_str() {
            "Deployment" => strict(doc).map(|(d, e)| (Resource::Deployment(d), e))?,
            "Device" => strict(doc).map(|(d, e)| (Resource::Device(d), e))?,
            other => {
                return Err(vec![FieldError::new(
                    "kind",
                    format!("unknown kind {other:?}; one of Deployment, Device"),
                )]);
            }
        };
        errors.extend(resource.validate());
        if errors.is_empty() {
            Ok(resource)
        } else {
            Err(errors)
        }
    }

    /// Every problem with the document's values, in document order.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut v = Validator::default();
        match self {
            Resource::Deployment(d) => {
                v.header(&d.api_version, &d.kind, "Deployment", &d.metadata);
                v.deployment_spec(&d.spec);
            }
            Resource::Device(d) => v.header(&d.api_version, &d.kind, "Device", &d.metadata),
        }
        v.errors
    }
}

/// Deserializes `doc`; unknown fields come back as errors beside the value, so they are
/// reported together with invalid values. A type or range error fails outright, at its path.
fn strict<T: serde::de::DeserializeOwned>(
    doc: serde_json::Value,
) -> Result<(T, Vec<FieldError>), Vec<FieldError>> {
    let mut unknown = Vec::new();
    let mut note = |path: serde_ignored::Path<'_>| {
        unknown.push(FieldError::new(path_string(&path), "unknown field"))
    };
    let parsed: Result<T, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(doc, &mut note));
    match parsed {
        Ok(value) => Ok((value, unknown)),
        Err(e) => Err(vec![typed_error(
            crate::document::path_of(e.path()),
            &e.inner().to_string(),
        )]),
    }
}

/// A `serde_ignored` path written like the documents: `a.b[0].c`.
fn path_string(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", path_string(parent)),
        Path::Map { parent, key } => {
            let p = path_string(parent);
            if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            }
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => path_string(parent),
    }
}

/// serde's message for a value of the wrong type or range, said for a person, at `path`
/// (`...containerPort: 70000 is out of range (1-65535)`).
fn typed_error(path: String, message: &str) -> FieldError {
    let field = path.rsplit(['.', ']']).next().unwrap_or("");
    let join = |path: &str, key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    if let Some(name) = message
        .strip_prefix("missing field `")
        .and_then(|m| m.strip_suffix('`'))
    {
        return FieldError::new(join(&path, name), "is required");
    }
    if let Some(rest) = message.strip_prefix("invalid value: integer `") {
        if let Some((n, ty)) = rest.split_once("`, expected ") {
            let range = match (field, ty) {
                ("containerPort" | "hostPort" | "port", _) => "1-65535".to_owned(),
                ("graceSeconds", _) => format!("0-{MAX_GRACE_SECONDS}"),
                ("timeoutSeconds", _) if path.contains("initContainers") => {
                    format!("1-{MAX_INIT_TIMEOUT_SECONDS}")
                }
                ("wavePercent", _) => "1-100".to_owned(),
                (_, "u16") => format!("0-{}", u16::MAX),
                (_, "u32") => format!("0-{}", u32::MAX),
                (_, "u64") => format!("0-{}", u64::MAX),
                (_, other) => other.to_owned(),
            };
            return FieldError::new(path, format!("{n} is out of range ({range})"));
        }
    }
    if let Some(rest) = message.strip_prefix("invalid type: floating point `") {
        if let Some((n, ty)) = rest.split_once("`, expected ") {
            if ty.starts_with('u') || ty.starts_with('i') {
                return FieldError::new(path, format!("must be a whole number, got {n}"));
            }
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some((v, expected)) = rest.split_once("`, expected ") {
            let expected = expected.replace('`', "");
            return FieldError::new(path, format!("unknown value {v:?}; expected {expected}"));
        }
    }
    FieldError::new(path, message)
}

#[derive(Default)]
struct Validator {
    errors: Vec<FieldError>,
}

impl Validator {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(path, message));
    }

    fn header(&mut self, api_version: &str, kind: &str, want_kind: &str, meta: &Metadata) {
        if api_version != API_VERSION {
            self.err(
                "apiVersion",
                format!("must be {API_VERSION:?}, got {api_version:?}"),
            );
        }
        if kind != want_kind {
            self.err("kind", format!("must be {want_kind:?}"));
        }
        if let Err(e) = check_name(&meta.name) {
            self.err("metadata.name", e);
        }
        self.labels("metadata.labels", &meta.labels);
    }

    fn labels(&mut self, path: &str, labels: &Labels) {
        for (k, v) in labels {
            let key_ok = !k.is_empty()
                && k.len() <= 63
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
            if !key_ok {
                self.err(
                    format!("{path}.{k}"),
                    "label keys are 1-63 characters of letters, digits, '-', '_', '.', '/'",
                );
            }
            let value_ok = v.len() <= 63
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !value_ok {
                self.err(
                    format!("{path}.{k}"),
                    "label values are at most 63 characters of letters, digits, '-', '_', '.'",
                );
            }
        }
    }

    fn deployment_spec(&mut self, spec: &DeploymentSpec) {
        if spec.selector.match_labels.is_empty() {
            self.err(
                "spec.selector.matchLabels",
                "must name at least one label (to target every device, give them all a label)",
            );
        }
        self.labels("spec.selector.matchLabels", &spec.selector.match_labels);
        match spec.template.containers.len() {
            1 => {}
            0 => self.err("spec.template.containers", "must hold one container"),
            n => self.err(
                "spec.template.containers",
                format!("must hold exactly one container (one per Deployment per device), got {n}"),
            ),
        }
        for (i, c) in spec.template.containers.iter().enumerate() {
            self.container(&format!("spec.template.containers[{i}]"), c);
        }
        if let Some(r) = &spec.rollout {
            match (r.wave_size, r.wave_percent) {
                (Some(_), Some(_)) | (None, None) => {
                    self.err("spec.rollout", "set exactly one of waveSize, wavePercent")
                }
                (Some(0), _) => self.err("spec.rollout.waveSize", "must be at least 1"),
                (_, Some(p)) if p == 0 || p > 100 => {
                    self.err("spec.rollout.wavePercent", "must be 1-100")
                }
                _ => {}
            }
            if r.progress_deadline_seconds == 0 {
                self.err("spec.rollout.progressDeadlineSeconds", "must be at least 1");
            }
            if r.max_unavailable == Some(0) {
                self.err(
                    "spec.rollout.maxUnavailable",
                    "must be at least 1: with 0 no wave could ever be admitted (leave it out for no limit)",
                );
            }
        }
        let lc = &spec.template.lifecycle;
        if !STOP_SIGNALS.contains(&lc.stop_signal.as_str()) {
            self.err(
                "spec.template.lifecycle.stopSignal",
                format!("must be one of {}", STOP_SIGNALS.join(", ")),
            );
        }
        if lc.grace_seconds > MAX_GRACE_SECONDS {
            self.err(
                "spec.template.lifecycle.graceSeconds",
                format!("must be at most {MAX_GRACE_SECONDS}"),
            );
        }
        let mut names: BTreeSet<&str> = spec
            .template
            .containers
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        for (i, c) in spec.template.init_containers.iter().enumerate() {
            let path = format!("spec.template.initContainers[{i}]");
            self.init_container(&path, c);
            if !names.insert(&c.name) {
                self.err(
                    format!("{path}.name"),
                    format!("duplicate container name {:?}", c.name),
                );
            }
        }
    }

    fn container(&mut self, path: &str, c: &Container) {
        self.common(path, &c.name, &c.image, &c.env, &c.volumes);
        let mut host_ports = BTreeMap::new();
        for (i, p) in c.ports.iter().enumerate() {
            if p.container_port == 0 {
                self.err(
                    format!("{path}.ports[{i}].containerPort"),
                    "must be 1-65535",
                );
            }
            if p.host_port == Some(0) {
                self.err(format!("{path}.ports[{i}].hostPort"), "must be 1-65535");
            }
            let key = (p.effective_host_port(), p.protocol);
            if let Some(first) = host_ports.insert(key, i) {
                self.err(
                    format!("{path}.ports[{i}].hostPort"),
                    format!(
                        "duplicate host port {}/{} (also in ports[{first}])",
                        key.0,
                        p.protocol.as_str()
                    ),
                );
            }
        }
        let mut probe_names = BTreeSet::new();
        for (i, p) in c.probes.iter().enumerate() {
            let path = format!("{path}.probes[{i}]");
            if let Err(e) = check_name(&p.name) {
                self.err(format!("{path}.name"), e);
            } else if !probe_names.insert(&p.name) {
                self.err(
                    format!("{path}.name"),
                    format!("duplicate probe {:?}", p.name),
                );
            }
            let set = [
                p.http_get.is_some(),
                p.tcp.is_some(),
                p.exec.is_some(),
                p.running.is_some(),
            ];
            if set.iter().filter(|s| **s).count() != 1 {
                self.err(
                    path.clone(),
                    "must set exactly one of httpGet, tcp, exec, running",
                );
            }
            let port = p
                .http_get
                .as_ref()
                .map(|h| h.port)
                .or(p.tcp.as_ref().map(|t| t.port));
            if let Some(port) = port {
                if !c.ports.iter().any(|x| x.container_port == port) {
                    self.err(
                        format!("{path}.{}.port", p.kind()),
                        format!("{port} is not a containerPort in ports; the agent probes the published port"),
                    );
                }
            }
            if let Some(h) = &p.http_get {
                if let Err(e) = crate::checks::check_url_path(&h.path) {
                    self.err(format!("{path}.httpGet.path"), e);
                }
                if h.status_min > h.status_max {
                    self.err(
                        format!("{path}.httpGet.statusMin"),
                        "must not exceed statusMax",
                    );
                }
            }
            if p.exec.as_ref().is_some_and(|e| e.command.is_empty()) {
                self.err(format!("{path}.exec.command"), "must not be empty");
            }
            if p.period_seconds == 0 || p.timeout_seconds == 0 || p.failure_threshold == 0 {
                self.err(
                    path.clone(),
                    "periodSeconds, timeoutSeconds and failureThreshold must be at least 1",
                );
            }
        }
    }

    fn init_container(&mut self, path: &str, c: &InitContainer) {
        self.common(path, &c.name, &c.image, &c.env, &c.volumes);
        if c.timeout_seconds == 0 || c.timeout_seconds > MAX_INIT_TIMEOUT_SECONDS {
            self.err(
                format!("{path}.timeoutSeconds"),
                format!("must be 1-{MAX_INIT_TIMEOUT_SECONDS}"),
            );
        }
    }

    /// What main and init containers share: name, image, env and volumes.
    fn common(
        &mut self,
        path: &str,
        name: &str,
        image: &str,
        env: &[EnvVar],
        volumes: &[VolumeMount],
    ) {
        if let Err(e) = check_name(name) {
            self.err(format!("{path}.name"), e);
        }
        if let Err(e) = crate::checks::check_image(image) {
            self.err(format!("{path}.image"), e);
        }
        let mut env_names = BTreeSet::new();
        for (i, e) in env.iter().enumerate() {
            let ok = e
                .name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && e.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                self.err(
                    format!("{path}.env[{i}].name"),
                    "must be letters, digits and '_', not starting with a digit",
                );
            }
            if !env_names.insert(&e.name) {
                self.err(
                    format!("{path}.env[{i}].name"),
                    format!("duplicate {:?}", e.name),
                );
            }
        }
        let mut mounts = BTreeSet::new();
        for (i, m) in volumes.iter().enumerate() {
            if let Err(e) = check_name(&m.name) {
                self.err(format!("{path}.volumes[{i}].name"), e);
            }
            let mount_path = format!("{path}.volumes[{i}].mountPath");
            match crate::checks::check_abs_path(&m.mount_path) {
                Err(e) => self.err(mount_path, e),
                Ok(()) if m.mount_path == "/" => self.err(
                    mount_path,
                    "must not be / (it would hide the image's whole file system)",
                ),
                Ok(()) if !mounts.insert(&m.mount_path) => {
                    self.err(mount_path, "duplicate mount path")
                }
                Ok(()) => {}
            }
            if let Some(h) = &m.host_path {
                if let Err(e) = crate::checks::check_abs_path(h) {
                    self.err(format!("{path}.volumes[{i}].hostPath"), e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment() -> serde_json::Value {
        json!({
            "apiVersion": "fleet.dev/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {
                "selector": {"matchLabels": {"role": "edge"}},
                "template": {"containers": [{
                    "name": "web",
                    "image": "localhost/http:1",
                    "env": [{"name": "GREETING", "value": "hi"}],
                    "ports": [{"containerPort": 8080, "hostPort": 18080}],
                    "volumes": [{"name": "data", "mountPath": "/data"}]
                }]}
            }
        })
    }

    /// Applies `edit` to a valid Deployment and checks the errors it produces.
    fn check(edit: impl FnOnce(&mut serde_json::Value), expected: &[&str]) {
        let mut doc = deployment();
        edit(&mut doc);
        let got: Vec<String> = match Resource::from_user(doc) {
            Ok(_) => vec![],
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        };
        assert_eq!(got, expected);
    }

    #[test]
    fn valid_deployment_parses_with_defaults() {
        let Resource::Deployment(d) = Resource::from_user(deployment()).unwrap() else {
            panic!("not a deployment")
        };
        assert_eq!(d.spec.template.restart_policy, RestartPolicy::Always);
        assert_eq!(
            d.spec.template.containers[0].ports[0].protocol,
            Protocol::Tcp
        );
    }

    #[test]
    fn validation_names_the_field() {
        check(|_| {}, &[]);
        check(
            |d| d["spec"]["template"]["containers"][0]["image"] = json!(""),
            &["spec.template.containers[0].image: must not be empty"],
        );
        check(
            |d| d["spec"]["template"]["containers"][0]["imagee"] = json!("x"),
            &["spec.template.containers[0].imagee: unknown field"],
        );
        check(
            |d| {
                d["spec"]["template"]["containers"][0]["imagee"] = json!("x");
                d["spec"]["template"]["containers"][0]["image"] = json!("");
            },
            &[
                "spec.template.containers[0].imagee: unknown field",
                "spec.template.containers[0].image: must not be empty",
            ],
        );
        check(|d| d["spex"] = json!({}), &["spex: unknown field"]);
        check(
            |d| {
                d["spec"]["template"]["containers"][0]["ports"] =
                    json!([{"containerPort": 80, "hostPort": 8080}, {"containerPort": 8080}])
            },
            &[
                "spec.template.containers[0].ports[1].hostPort: duplicate host port 8080/tcp (also in ports[0])",
            ],
        );
        check(
            |d| {
                d["spec"]["template"]["containers"][0]["ports"] =
                    json!([{"containerPort": 53, "protocol": "UDP"}, {"containerPort": 53}])
            },
            &[],
        );
        check(
            |d| d["metadata"]["name"] = json!("Web"),
            &["metadata.name: must contain only lower-case letters, digits and '-', found 'W'"],
        );
        check(
            |d| d["spec"]["selector"]["matchLabels"] = json!({}),
            &[
                "spec.selector.matchLabels: must name at least one label (to target every device, give them all a label)",
            ],
        );
        check(
            |d| d["spec"]["template"]["containers"] = json!([]),
            &["spec.template.containers: must hold one container"],
        );
        check(
            |d| d["spec"]["template"]["containers"][0]["env"] = json!([{"name": "A", "value": "1"}, {"name": "A", "value": "2"}, {"name": "1X", "value": ""}]),
            &[
                "spec.template.containers[0].env[1].name: duplicate \"A\"",
                "spec.template.containers[0].env[2].name: must be letters, digits and '_', not starting with a digit",
            ],
        );
        check(
            |d| {
                d["spec"]["template"]["containers"][0]["volumes"] =
                    json!([{"name": "data", "mountPath": "data", "hostPath": "rel"}])
            },
            &[
                "spec.template.containers[0].volumes[0].mountPath: must be an absolute path",
                "spec.template.containers[0].volumes[0].hostPath: must be an absolute path",
            ],
        );
        check(
            |d| {
                d["spec"]["template"]["lifecycle"] =
                    json!({"stopSignal": "TERM", "graceSeconds": 7200})
            },
            &[
                "spec.template.lifecycle.stopSignal: must be one of SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2, SIGWINCH, SIGKILL",
                "spec.template.lifecycle.graceSeconds: must be at most 3600",
            ],
        );
        check(
            |d| {
                d["spec"]["template"]["initContainers"] = json!([
                    {"name": "setup", "image": "img", "command": ["sh", "-c", "true"]},
                    {"name": "web", "image": "", "timeoutSeconds": 0}
                ])
            },
            &[
                "spec.template.initContainers[1].image: must not be empty",
                "spec.template.initContainers[1].timeoutSeconds: must be 1-3600",
                "spec.template.initContainers[1].name: duplicate container name \"web\"",
            ],
        );
        check(
            |d| d["apiVersion"] = json!("v1"),
            &["apiVersion: must be \"fleet.dev/v1\", got \"v1\""],
        );
        check(
            |d| d["kind"] = json!("Pod"),
            &["kind: unknown kind \"Pod\"; one of Deployment, Device"],
        );
        check(
            |d| d["spec"]["template"]["containers"][0]["ports"][0]["containerPort"] = json!(70000),
            &[
                "spec.template.containers[0].ports[0].containerPort: 70000 is out of range (1-65535)",
            ],
        );
    }

    /// One line per kind of hostile or mistaken value: the exact message, field path first.
    #[test]
    fn hostile_values_are_refused_naming_the_field() {
        let c = "spec.template.containers[0]";
        let cases: Vec<(&str, serde_json::Value, String)> = vec![
            (
                "image",
                json!("--privileged"),
                format!("{c}.image: must not start with '-'"),
            ),
            (
                "image",
                json!("-v"),
                format!("{c}.image: must not start with '-'"),
            ),
            (
                "image",
                json!("a\0b"),
                format!("{c}.image: must not contain a NUL byte"),
            ),
            (
                "image",
                json!("img\nx"),
                format!("{c}.image: must not contain '\\n'"),
            ),
            (
                "image",
                json!("Upper/case"),
                format!(
                    "{c}.image: repository path component \"Upper\" must be lower-case letters and digits, joined by '.', '_', '__' or '-'"
                ),
            ),
            ("image", json!(""), format!("{c}.image: must not be empty")),
            (
                "image",
                json!("a".repeat(600)),
                format!("{c}.image: must be at most 512 characters, got 600"),
            ),
            (
                "image",
                json!(7),
                format!("{c}.image: invalid type: integer `7`, expected a string"),
            ),
            (
                "volumes",
                json!([{"name": "d", "mountPath": "/data:O"}]),
                format!("{c}.volumes[0].mountPath: must not contain ':'"),
            ),
            (
                "volumes",
                json!([{"name": "d", "mountPath": "/x", "hostPath": "/etc:/evil"}]),
                format!("{c}.volumes[0].hostPath: must not contain ':'"),
            ),
            (
                "volumes",
                json!([{"name": "d", "mountPath": "/"}]),
                format!(
                    "{c}.volumes[0].mountPath: must not be / (it would hide the image's whole file system)"
                ),
            ),
            (
                "volumes",
                json!([{"name": "d", "mountPath": "/data"}, {"name": "e", "mountPath": "/data/"}]),
                format!(
                    "{c}.volumes[1].mountPath: must be a clean path: no '//', '.' or '..' component and no trailing '/' (did you mean \"/data\"?)"
                ),
            ),
            (
                "volumes",
                json!([{"name": "d", "mountPath": "/a/../etc"}]),
                format!(
                    "{c}.volumes[0].mountPath: must be a clean path: no '//', '.' or '..' component and no trailing '/' (did you mean \"/etc\"?)"
                ),
            ),
            (
                "volumes",
                json!([{"name": "d", "mountPath": "/x", "hostPath": "/srv/../etc"}]),
                format!(
                    "{c}.volumes[0].hostPath: must be a clean path: no '//', '.' or '..' component and no trailing '/' (did you mean \"/etc\"?)"
                ),
            ),
            (
                "volumes",
                json!([{"name": "d", "mountPath": "/x", "readOnly": "yes"}]),
                format!(
                    "{c}.volumes[0].readOnly: invalid type: string \"yes\", expected a boolean"
                ),
            ),
            (
                "ports",
                json!([{"containerPort": 70000}]),
                format!("{c}.ports[0].containerPort: 70000 is out of range (1-65535)"),
            ),
            (
                "ports",
                json!([{"containerPort": -1}]),
                format!("{c}.ports[0].containerPort: -1 is out of range (1-65535)"),
            ),
            (
                "ports",
                json!([{"containerPort": 80, "hostPort": 1.5}]),
                format!("{c}.ports[0].hostPort: must be a whole number, got 1.5"),
            ),
            (
                "ports",
                json!([{"containerPort": 80, "protocol": "SCTP"}]),
                format!("{c}.ports[0].protocol: unknown value \"SCTP\"; expected TCP or UDP"),
            ),
            (
                "ports",
                json!([{"hostPort": 80}]),
                format!("{c}.ports[0].containerPort: is required"),
            ),
            (
                "probes",
                json!([{"name": "h", "httpGet": {"port": 8080, "path": "/a\r\nX-Evil: 1"}}]),
                format!(
                    "{c}.probes[0].httpGet.path: must be visible ASCII without '#' (percent-encode other characters), found '\\r'"
                ),
            ),
            (
                "probes",
                json!([{"name": "h", "httpGet": {"port": 8080, "path": "/a b"}}]),
                format!(
                    "{c}.probes[0].httpGet.path: must be visible ASCII without '#' (percent-encode other characters), found ' '"
                ),
            ),
            (
                "probes",
                json!([{"name": "h", "tcp": {"port": 8080}, "periodSeconds": 4294967296u64}]),
                format!("{c}.probes[0].periodSeconds: 4294967296 is out of range (0-4294967295)"),
            ),
            (
                "command",
                json!(["sh", "-c", "a\0"]),
                format!("{c}.command[2]: must not contain a NUL byte"),
            ),
            (
                "args",
                json!(["x\0"]),
                format!("{c}.args[0]: must not contain a NUL byte"),
            ),
            (
                "env",
                json!([{"name": "A", "value": "x\0y"}]),
                format!("{c}.env[0].value: must not contain a NUL byte"),
            ),
            (
                "env",
                json!([{"name": "A"}]),
                format!("{c}.env[0].value: is required"),
            ),
        ];
        for (field, value, expected) in cases {
            check(
                |d| d["spec"]["template"]["containers"][0][field] = value,
                &[expected.as_str()],
            );
        }
        let r = "spec.rollout";
        check(
            |d| d["spec"]["rollout"] = json!({"waveSize": 1, "maxUnavailable": 0}),
            &[&format!(
                "{r}.maxUnavailable: must be at least 1: with 0 no wave could ever be admitted (leave it out for no limit)"
            )],
        );
        check(
            |d| d["spec"]["template"]["restartPolicy"] = json!("Sometimes"),
            &[
                "spec.template.restartPolicy: unknown value \"Sometimes\"; expected one of Always, OnFailure, Never",
            ],
        );
        check(
            |d| d["spec"]["template"]["lifecycle"] = json!({"graceSeconds": -1}),
            &["spec.template.lifecycle.graceSeconds: -1 is out of range (0-3600)"],
        );
        check(
            |d| d["metadata"] = json!({"labels": {}}),
            &["metadata.name: is required"],
        );
    }

    #[test]
    fn user_status_and_generation_are_dropped() {
        let mut doc = deployment();
        doc["status"] = json!({"anything": true});
        doc["metadata"]["generation"] = json!(99);
        let r = Resource::from_user(doc).unwrap();
        assert_eq!(r.metadata().generation, 0);
    }

    #[test]
    fn stored_documents_tolerate_unknown_fields() {
        let mut doc = deployment();
        doc["spec"]["template"]["containers"][0]["fromTheFuture"] = json!(1);
        let d: Deployment = serde_json::from_value(doc).unwrap();
        assert_eq!(d.metadata.name, "web");
    }

    #[test]
    fn idempotency_warnings() {
        let warn = |script: &str| {
            let t = PodTemplate {
                init_containers: vec![InitContainer {
                    name: "i".into(),
                    image: "img".into(),
                    command: vec!["sh".into(), "-c".into(), script.into()],
                    args: vec![],
                    env: vec![],
                    volumes: vec![],
                    timeout_seconds: 5,
                }],
                ..PodTemplate::single(Container::new("m", "img"))
            };
            t.idempotency_warnings()
                .iter()
                .map(|w| w.split(':').nth(1).unwrap_or("").trim().to_owned())
                .collect::<Vec<_>>()
        };
        assert!(warn("mkdir -p /data && touch /data/x").is_empty());
        assert!(warn("echo a >> /data/log 2>&1").is_empty());
        assert_eq!(
            warn("mkdir /data"),
            [
                "`mkdir` without -p fails when it runs again (init containers rerun before every fresh main container)"
            ]
        );
        assert_eq!(warn("mkdir -v /data").len(), 1);
        assert_eq!(warn("echo 1 > /data/state").len(), 1);
    }

    #[test]
    fn selector() {
        let sel = LabelSelector {
            match_labels: [("role".into(), "edge".into())].into(),
        };
        assert!(sel.matches(&[("role".into(), "edge".into()), ("x".into(), "y".into())].into()));
        assert!(!sel.matches(&[("role".into(), "core".into())].into()));
        assert!(!sel.matches(&Labels::new()));
    }
}
