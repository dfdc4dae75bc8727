//! The strict reading and the value checks of a document a person sent: unknown fields and
//! type errors at their path, then every value checked for what its consumer (podman, an HTTP
//! request line, a NATS subject) will do with it.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    DeploymentSpec, LabelSelector, MAX_BOOT_ATTEMPTS, MAX_CHECK_IN_SECONDS, MIN_CHECK_IN_SECONDS,
    Metadata, OsUpgradeSpec, Resource,
};
use crate::checks;
use crate::names::check_name;
use crate::spec::{
    Container, EnvVar, InitContainer, MAX_GRACE_SECONDS, MAX_INIT_TIMEOUT_SECONDS, STOP_SIGNALS,
    VolumeMount,
};
use crate::{API_VERSION, FieldError, Labels};

/// Deserializes `doc`; unknown fields come back as errors beside the value, so they are
/// reported together with invalid values. A type or range error fails outright, at its path.
pub(super) fn strict<T: serde::de::DeserializeOwned>(
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
    if let Some(rest) = message.strip_prefix("invalid value: integer `")
        && let Some((n, ty)) = rest.split_once("`, expected ")
    {
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
    if let Some(rest) = message.strip_prefix("invalid type: floating point `")
        && let Some((n, ty)) = rest.split_once("`, expected ")
        && (ty.starts_with('u') || ty.starts_with('i'))
    {
        return FieldError::new(path, format!("must be a whole number, got {n}"));
    }
    if let Some(rest) = message.strip_prefix("unknown variant `")
        && let Some((v, expected)) = rest.split_once("`, expected ")
    {
        let expected = expected.replace('`', "");
        return FieldError::new(path, format!("unknown value {v:?}; expected {expected}"));
    }
    FieldError::new(path, message)
}

/// Every problem with `resource`'s values, in document order.
pub(super) fn resource(resource: &Resource) -> Vec<FieldError> {
    let mut v = Validator::default();
    match resource {
        Resource::Deployment(d) => {
            v.header(&d.api_version, &d.kind, "Deployment", &d.metadata);
            v.deployment_spec(&d.spec);
        }
        Resource::Device(d) => v.header(&d.api_version, &d.kind, "Device", &d.metadata),
        Resource::OsUpgrade(u) => {
            v.header(&u.api_version, &u.kind, "OsUpgrade", &u.metadata);
            v.os_upgrade_spec(&u.spec);
        }
    }
    v.errors
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

    fn selector(&mut self, selector: &LabelSelector) {
        if selector.match_labels.is_empty() {
            self.err(
                "spec.selector.matchLabels",
                "must name at least one label (to target every device, give them all a label)",
            );
        }
        self.labels("spec.selector.matchLabels", &selector.match_labels);
    }

    fn os_upgrade_spec(&mut self, spec: &OsUpgradeSpec) {
        self.selector(&spec.selector);
        let r = &spec.release;
        if let Err(e) = checks::check_release_name(&r.name) {
            self.err("spec.release.name", e);
        }
        match r.sources.len() {
            0 => self.err("spec.release.sources", "must name at least one apt source"),
            n if n > checks::MAX_APT_SOURCES => self.err(
                "spec.release.sources",
                format!("at most {} sources, got {n}", checks::MAX_APT_SOURCES),
            ),
            _ => {}
        }
        for (i, line) in r.sources.iter().enumerate() {
            if let Err(e) = checks::check_apt_source(line) {
                self.err(format!("spec.release.sources[{i}]"), e);
            }
        }
        if r.packages.is_empty() && !r.full_upgrade {
            self.err(
                "spec.release.packages",
                "must pin at least one package, or set fullUpgrade: true",
            );
        }
        if r.packages.len() > checks::MAX_PACKAGES {
            self.err(
                "spec.release.packages",
                format!(
                    "at most {} packages, got {}",
                    checks::MAX_PACKAGES,
                    r.packages.len()
                ),
            );
        }
        for (name, version) in &r.packages {
            if let Err(e) = checks::check_package_name(name) {
                self.err(format!("spec.release.packages.{name}"), e);
            } else if let Err(e) = checks::check_package_version(version) {
                self.err(format!("spec.release.packages.{name}"), e);
            }
        }
        if spec.halt_after_failures == 0 {
            self.err("spec.haltAfterFailures", "must be at least 1");
        }
        if spec.wave_size == Some(0) {
            self.err(
                "spec.waveSize",
                "must be at least 1 (leave it out for all at once)",
            );
        }
        if !(MIN_CHECK_IN_SECONDS..=MAX_CHECK_IN_SECONDS).contains(&spec.check_in_deadline_seconds)
        {
            self.err(
                "spec.checkInDeadlineSeconds",
                format!("must be {MIN_CHECK_IN_SECONDS}-{MAX_CHECK_IN_SECONDS}"),
            );
        }
        if !(1..=MAX_BOOT_ATTEMPTS).contains(&spec.boot_attempts) {
            self.err(
                "spec.bootAttempts",
                format!("must be 1-{MAX_BOOT_ATTEMPTS}"),
            );
        }
        if spec.checks.len() > checks::MAX_CHECK_IN_COMMANDS {
            self.err(
                "spec.checks",
                format!(
                    "at most {} checks, got {}",
                    checks::MAX_CHECK_IN_COMMANDS,
                    spec.checks.len()
                ),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, c) in spec.checks.iter().enumerate() {
            if let Err(e) = check_name(&c.name) {
                self.err(format!("spec.checks[{i}].name"), e);
            } else if !seen.insert(c.name.as_str()) {
                self.err(
                    format!("spec.checks[{i}].name"),
                    format!("{:?} is named twice", c.name),
                );
            }
            match checks::check_check_in_command(&c.command) {
                Ok(()) => {}
                Err((Some(w), e)) => self.err(format!("spec.checks[{i}].command[{w}]"), e),
                Err((None, e)) => self.err(format!("spec.checks[{i}].command"), e),
            }
        }
    }

    fn deployment_spec(&mut self, spec: &DeploymentSpec) {
        self.selector(&spec.selector);
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
            if let Some(port) = port
                && !c.ports.iter().any(|x| x.container_port == port)
            {
                self.err(
                        format!("{path}.{}.port", p.kind()),
                        format!("{port} is not a containerPort in ports; the agent probes the published port"),
                    );
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
            if let Some(h) = &m.host_path
                && let Err(e) = crate::checks::check_abs_path(h)
            {
                self.err(format!("{path}.volumes[{i}].hostPath"), e);
            }
        }
    }
}
