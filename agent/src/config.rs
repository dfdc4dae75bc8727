//! The agent's configuration file (TOML), validated before the agent touches anything.
//!
//! Unknown keys are errors: a typo in a device's config must not silently fall back to a
//! default.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use fleet_contracts::names::check_name;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This device's id: its keys in NATS KV and the `fleet.device` label of its containers.
    pub device_id: String,
    /// NATS server URL(s), comma-separated: `nats://host:4222` (TLS is always used).
    pub nats_url: String,
    /// The fleet's CA certificate (`<identity>/tls/ca.pem` on the operator's host). The agent
    /// talks to NATS over TLS only, and trusts only servers this CA signed.
    pub nats_ca_file: PathBuf,
    /// Where the agent keeps its state (the desired-state cache). On a device this is on the
    /// data LV, outside the root snapshot.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_secs: u64,
    /// How often the agent compares podman with the desired state even without a change.
    #[serde(default = "default_resync")]
    pub resync_interval_secs: u64,
    /// How often the agent asks the operator for its whole desired state even without being
    /// told it changed: the safety net for a missed doorbell.
    #[serde(default = "default_desired_sync")]
    pub desired_sync_secs: u64,
    /// A one-time enrollment token (`fleetctl enroll-token create`), used on the first start to
    /// obtain the device's NATS credentials. Ignored once the device is enrolled.
    pub enrollment_token: Option<String>,
    /// A file holding the enrollment token instead (e.g. on the boot partition).
    pub enrollment_token_file: Option<PathBuf>,
    #[serde(default)]
    pub podman: PodmanConfig,
    /// The mounted boot partition, where the bootguard leaves its record of the storage checks
    /// at boot (`rollback/checks`); the agent reports what it finds there. Nothing is reported
    /// when it does not exist (a development host).
    #[serde(default = "default_boot_dir")]
    pub boot_dir: PathBuf,
    /// The volume group of root's thin LV, which an OS upgrade snapshots.
    #[serde(default = "default_volume_group")]
    pub volume_group: String,
    /// Where the running system names its OS release (written by the image and by each OS
    /// upgrade; `unknown` is reported without it).
    #[serde(default = "default_release_file")]
    pub release_file: PathBuf,
    /// Whether this agent may upgrade the OS it runs on when an OsUpgrade selects it. Off for
    /// an agent on a development machine (the local fleet, the tests): it then refuses every
    /// OS upgrade before touching anything.
    #[serde(default = "default_true")]
    pub os_upgrades: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodmanConfig {
    #[serde(default = "default_podman")]
    pub program: String,
    /// podman `--root`: container storage (so several agents can share a host in tests).
    pub root: Option<PathBuf>,
    /// podman `--runroot`.
    pub runroot: Option<PathBuf>,
    /// podman `--runtime`, e.g. `runc`.
    pub runtime: Option<String>,
}

impl Default for PodmanConfig {
    fn default() -> Self {
        Self {
            program: default_podman(),
            root: None,
            runroot: None,
            runtime: None,
        }
    }
}

fn default_state_dir() -> PathBuf {
    "/var/lib/fleet".into()
}
fn default_boot_dir() -> PathBuf {
    "/boot/firmware".into()
}
fn default_true() -> bool {
    true
}
fn default_volume_group() -> String {
    "vg0".into()
}
fn default_release_file() -> PathBuf {
    crate::osupgrade::RELEASE_FILE.into()
}
fn default_heartbeat() -> u64 {
    10
}
fn default_resync() -> u64 {
    5
}
fn default_desired_sync() -> u64 {
    60
}
fn default_podman() -> String {
    "podman".into()
}

/// Where and what, without quoting the line: the config holds a secret (the enrollment
/// token), and error messages end up in logs.
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {}", e.message())
        }
        None => e.message().to_owned(),
    }
}

/// One server URL: `nats://` or `tls://`, a host name or IP address (`[...]` for IPv6), and an
/// optional port 1-65535; nothing else (no path, no user, no space).
fn check_nats_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("nats://")
        .or_else(|| url.strip_prefix("tls://"))
        .ok_or_else(|| format!("{url:?} must start with nats:// or tls://"))?;
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (addr, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: an IPv6 address needs its closing ']'"))?;
            if addr.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("{url:?}: {addr:?} is not an IPv6 address"));
            }
            match after {
                "" => (addr, None),
                p => (
                    addr,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| format!("{url:?}: only :port may follow the address"))?,
                    ),
                ),
            }
        }
        None => match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        },
    };
    if host.is_empty() {
        return Err(format!("{url:?} names no host"));
    }
    let host_ok = rest.starts_with('[')
        || host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !host_ok {
        return Err(format!(
            "{url:?}: host {host:?} must be a host name or IP address (letters, digits, '-', '.')"
        ));
    }
    if let Some(p) = port {
        match p.parse::<u16>() {
            Ok(1..) => {}
            _ => return Err(format!("{url:?}: port {p:?} must be 1-65535")),
        }
    }
    Ok(())
}

/// The fleet CA file must be readable and hold at least one PEM certificate: TLS with no
/// trusted certificate fails only later, and forever, as "UnknownIssuer".
fn check_ca_file(path: &Path) -> Result<(), String> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let bytes = std::fs::read(path).map_err(|e| {
        format!(
            "{} is not a readable file (the fleet CA, ca.pem): {e}",
            path.display()
        )
    })?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----); it must be the fleet CA, ca.pem",
            path.display()
        ));
    }
    Ok(())
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: parse_message(text, &e),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        check_name(&self.device_id).map_err(|m| invalid("device_id", m))?;
        for url in self.nats_url.split(',') {
            check_nats_url(url.trim()).map_err(|m| invalid("nats_url", m))?;
        }
        check_ca_file(&self.nats_ca_file).map_err(|m| invalid("nats_ca_file", m))?;
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path".into()));
        }
        if self.heartbeat_interval_secs == 0 {
            return Err(invalid(
                "heartbeat_interval_secs",
                "must be at least 1".into(),
            ));
        }
        if self.enrollment_token.is_some() && self.enrollment_token_file.is_some() {
            return Err(invalid(
                "enrollment_token",
                "give enrollment_token or enrollment_token_file, not both".into(),
            ));
        }
        if self.resync_interval_secs == 0 {
            return Err(invalid("resync_interval_secs", "must be at least 1".into()));
        }
        if self.desired_sync_secs < 5 {
            return Err(invalid(
                "desired_sync_secs",
                format!("must be at least 5, got {}", self.desired_sync_secs),
            ));
        }
        Ok(())
    }

    /// The enrollment token, from the config or its file; `None` when neither is given.
    pub fn enrollment_token(&self) -> Result<Option<String>, ConfigError> {
        match (&self.enrollment_token, &self.enrollment_token_file) {
            (Some(t), _) => Ok(Some(t.trim().to_owned())),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                }),
            (None, None) => Ok(None),
        }
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_interval_secs)
    }

    pub fn desired_sync_interval(&self) -> Duration {
        Duration::from_secs(self.desired_sync_secs)
    }

    pub fn resync_interval(&self) -> Duration {
        Duration::from_secs(self.resync_interval_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<(), &str>) {
        let got = Config::parse(text, Path::new("agent.toml"))
            .map(drop)
            .map_err(|e| e.to_string());
        match (got, expected) {
            (Ok(()), Ok(())) => {}
            (Err(got), Err(want)) => assert!(got.contains(want), "{got}"),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    /// A CA file with one certificate: a fixed self-signed one (its key was thrown away), as
    /// the check is only that a certificate is there.
    fn ca_file() -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), include_str!("../tests/golden/ca.pem")).unwrap();
        file
    }

    #[test]
    fn validation() {
        let ca_file = ca_file();
        let ca = &format!("nats_ca_file = \"{}\"\n", ca_file.path().display());
        let ok = &format!("device_id = \"pi-01\"\nnats_url = \"nats://127.0.0.1:4222\"\n{ca}");
        check(ok, Ok(()));
        check(
            &format!("{ok}[podman]\nroot = \"/x\"\nruntime = \"runc\"\n"),
            Ok(()),
        );
        check("device_id = \"pi-01\"\n", Err("missing field `nats_url`"));
        check(
            "device_id = \"pi-01\"\nnats_url = \"nats://x\"\nnats_ca_file = \"/nonexistent/ca.pem\"\n",
            Err("nats_ca_file: /nonexistent/ca.pem is not a readable file"),
        );
        check(
            "device_id = \"pi-01\"\nnats_url = \"nats://x\"\nnats_ca_file = \"/proc/version\"\n",
            Err("nats_ca_file: /proc/version holds no PEM certificate"),
        );
        for (url, why) in [
            ("nats://", "\"nats://\" names no host"),
            ("nats://h:99999", "port \"99999\" must be 1-65535"),
            ("nats://h:0", "port \"0\" must be 1-65535"),
            ("nats://h:", "port \"\" must be 1-65535"),
            ("nats://a host:4222", "host \"a host\" must be a host name"),
            ("nats://h:4222/path", "port \"4222/path\" must be 1-65535"),
            ("nats://u:p@h:4222", "host \"u:p@h\" must be a host name"),
            ("nats://[::1", "closing ']'"),
            ("nats://[zz]:1", "is not an IPv6 address"),
            ("nats://a,nats://", "\"nats://\" names no host"),
        ] {
            let err = Config::parse(
                &format!("device_id = \"a\"\nnats_url = \"{url}\"\n{ca}"),
                Path::new("agent.toml"),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.starts_with("config file agent.toml: nats_url: ") && err.contains(why),
                "{url}: {err}"
            );
        }
        for url in [
            "tls://h",
            "nats://10.0.2.2:4222",
            "nats://[::1]:4222",
            "nats://a:1, nats://b-c.d:2",
        ] {
            check(
                &format!("device_id = \"a\"\nnats_url = \"{url}\"\n{ca}"),
                Ok(()),
            );
        }
        check(
            &format!("{ok}heartbeat = 3\n"),
            Err("unknown field `heartbeat`"),
        );
        check(
            &format!("device_id = \"*\"\nnats_url = \"nats://x\"\n{ca}"),
            Err("agent.toml: device_id: must contain only lower-case letters"),
        );
        check(
            &format!("device_id = \"a\"\nnats_url = \"http://x\"\n{ca}"),
            Err("nats_url: \"http://x\" must start with nats://"),
        );
        check(
            &format!("{ok}state_dir = \"rel\"\n"),
            Err("state_dir: must be an absolute path"),
        );
        check(
            &format!("{ok}heartbeat_interval_secs = 0\n"),
            Err("heartbeat_interval_secs: must be at least 1"),
        );
        check(
            &format!("{ok}desired_sync_secs = 1\n"),
            Err("desired_sync_secs: must be at least 5, got 1"),
        );
        check("device_id = [", Err("agent.toml is not valid"));
        // A malformed line holding the token is located, never quoted.
        let err = Config::parse(
            "device_id = \"a\"\nenrollment_token = SECRET:xyz\n",
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("config file a.toml is not valid: line 2:") && !err.contains("SECRET"),
            "{err}"
        );
    }
}
