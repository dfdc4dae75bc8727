//! The pod template: what a Deployment runs on each device, as sent to the device.

use serde::{Deserialize, Serialize};

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

/// An OS release: what an OS upgrade installs on a device, and what `fleet-image` records
/// beside the image it builds (`<image>.release.json`). The device writes `sources` to its
/// apt sources, installs every pinned package at its version (and, with `fullUpgrade`,
/// everything else the sources offer), and afterwards reports `name` as the release it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OsRelease {
    /// Names the release (`2026.12.1`): letters, digits and `.+~_-`, at most 63 bytes.
    pub name: String,
    /// apt one-line sources (`deb [trusted=yes] http://10.0.2.2:8000/ ./`), replacing the
    /// device's own for the upgrade.
    pub sources: Vec<String>,
    /// Package name -> exact version: the release's package set, or the pins that matter.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub packages: std::collections::BTreeMap<String, String>,
    /// Also `apt-get full-upgrade` from `sources`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub full_upgrade: bool,
}

/// One check the upgraded system must pass before it commits, beside the agent's own (it
/// reached the operator, its workloads are Ready): `command` runs on the device as root, with
/// no shell, and must exit 0 within a minute. The check-in runs it again until it passes or
/// the deadline comes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckInCommand {
    /// Names the check in the reason of a rollback: a DNS label.
    pub name: String,
    /// The program (an absolute path) and its arguments.
    pub command: Vec<String>,
}
