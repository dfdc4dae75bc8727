//! A typed wrapper over the podman CLI: the executor's only way to touch containers.
//!
//! It builds argument lists and parses podman's JSON output into typed structs; it makes no
//! decisions (that is [`crate::plan`]). Every call goes through the [`CommandRunner`] seam.

use std::collections::BTreeMap;

use fleet_contracts::spec::{
    Container, EnvVar, InitContainer, Lifecycle, RestartPolicy, VolumeMount,
};
use serde::Deserialize;

use crate::{
    config::PodmanConfig,
    runner::{CmdOutput, CommandRunner},
};

/// Labels the agent puts on every container it creates; adoption after a restart reads them.
pub mod labels {
    pub const DEVICE: &str = "fleet.device";
    pub const DEPLOYMENT: &str = "fleet.deployment";
    pub const GENERATION: &str = "fleet.generation";
    pub const SPEC_HASH: &str = "fleet.spec-hash";
}

#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("podman {subcommand} failed: {message}")]
    Failed {
        subcommand: &'static str,
        message: String,
    },
    #[error("cannot parse the output of podman {subcommand}: {source}")]
    Parse {
        subcommand: &'static str,
        source: serde_json::Error,
    },
}

/// One line of `podman ps --format json`, the fields the agent reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PsEntry {
    pub id: String,
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub image: String,
    pub state: String,
    #[serde(default)]
    pub exit_code: i32,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// A container the agent created, as podman reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub id: String,
    pub name: String,
    pub deployment: String,
    pub generation: u64,
    pub spec_hash: String,
    pub state: ContainerState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    Running,
    Exited {
        code: i32,
    },
    /// Created but never started (a crash between create and start).
    Created,
    /// paused, stopping, removing, unknown...
    Other(String),
}

impl Observed {
    /// Reads a ps entry; `None` for a container without Fleet's labels.
    pub fn from_ps(entry: PsEntry) -> Option<Observed> {
        let labels = entry.labels?;
        let state = match entry.state.as_str() {
            "running" => ContainerState::Running,
            "exited" | "stopped" => ContainerState::Exited {
                code: entry.exit_code,
            },
            "created" | "configured" => ContainerState::Created,
            other => ContainerState::Other(other.to_owned()),
        };
        Some(Observed {
            name: entry.names.into_iter().next().unwrap_or_default(),
            deployment: labels.get(labels::DEPLOYMENT)?.clone(),
            generation: labels
                .get(labels::GENERATION)
                .and_then(|g| g.parse().ok())
                .unwrap_or(0),
            spec_hash: labels.get(labels::SPEC_HASH)?.clone(),
            id: entry.id,
            state,
        })
    }
}

/// The container name of a deployment: deterministic, so a restarted agent finds it again.
pub fn container_name(deployment: &str) -> String {
    format!("fleet-{deployment}")
}

/// The podman volume behind a named volume mount of a deployment.
pub fn volume_name(deployment: &str, volume: &str) -> String {
    format!("fleet-{deployment}-{volume}")
}

/// What to create: one deployment's container.
#[derive(Debug, Clone)]
pub struct CreateSpec<'a> {
    pub device: &'a str,
    pub deployment: &'a str,
    pub generation: u64,
    pub spec_hash: &'a str,
    pub container: &'a Container,
    pub restart: RestartPolicy,
    pub lifecycle: &'a Lifecycle,
}

#[derive(Debug)]
pub struct Podman<R> {
    runner: R,
    program: String,
    global: Vec<String>,
}

impl<R: CommandRunner> Podman<R> {
    pub fn new(runner: R, config: &PodmanConfig) -> Self {
        let mut global = Vec::new();
        if let Some(root) = &config.root {
            global.extend(["--root".to_owned(), root.display().to_string()]);
        }
        if let Some(runroot) = &config.runroot {
            global.extend(["--runroot".to_owned(), runroot.display().to_string()]);
        }
        if let Some(runtime) = &config.runtime {
            global.extend(["--runtime".to_owned(), runtime.clone()]);
        }
        Podman {
            runner,
            program: config.program.clone(),
            global,
        }
    }

    /// The runner behind this wrapper (tests inspect a recording one).
    pub fn runner(&self) -> &R {
        &self.runner
    }

    async fn call(
        &self,
        subcommand: &'static str,
        args: Vec<String>,
    ) -> Result<CmdOutput, PodmanError> {
        let mut all = self.global.clone();
        all.push(subcommand.to_owned());
        all.extend(args);
        let out = self
            .runner
            .run(&self.program, &all)
            .await
            .map_err(|source| PodmanError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        if out.success() {
            Ok(out)
        } else {
            Err(PodmanError::Failed {
                subcommand,
                message: out.error_line(),
            })
        }
    }

    /// Every container this device's agent created, running or not.
    pub async fn list(&self, device: &str) -> Result<Vec<Observed>, PodmanError> {
        let out = self
            .call(
                "ps",
                vec![
                    "--all".into(),
                    "--filter".into(),
                    format!("label={}={device}", labels::DEVICE),
                    "--format".into(),
                    "json".into(),
                ],
            )
            .await?;
        parse_ps(&out.stdout)
    }

    /// Creates (pulling the image if missing) and returns the container id; does not start it.
    pub async fn create(&self, spec: &CreateSpec<'_>) -> Result<String, PodmanError> {
        let out = self.call("create", create_args(spec)).await?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub async fn start(&self, id: &str) -> Result<(), PodmanError> {
        self.call("start", vec![id.to_owned()]).await.map(drop)
    }

    /// The last `tail` lines a container wrote, newest last, at most `max_bytes` of them
    /// (older lines dropped first; the flag says so). Read through the bounded line reader, so
    /// a huge line costs the agent 16 KiB, not its size.
    pub async fn logs(
        &self,
        name: &str,
        tail: u32,
        max_bytes: usize,
    ) -> Result<(Vec<String>, bool), PodmanError> {
        let mut all = self.global.clone();
        all.extend([
            "logs".into(),
            "--tail".into(),
            tail.to_string(),
            name.to_owned(),
        ]);
        let mut lines = self
            .runner
            .spawn_lines(&self.program, &all)
            .map_err(|source| PodmanError::Spawn {
                program: self.program.clone(),
                source,
            })?;
        let mut kept = std::collections::VecDeque::new();
        let (mut size, mut dropped) = (0usize, false);
        while let Some(line) = lines.next().await {
            size += line.len() + 1;
            kept.push_back(line);
            while size > max_bytes {
                let Some(old) = kept.pop_front() else { break };
                size -= old.len() + 1;
                dropped = true;
            }
        }
        Ok((kept.into(), dropped))
    }

    /// Follows a container's log: the last `tail` lines, then every new one, until dropped.
    pub fn follow(&self, name: &str, tail: u32) -> std::io::Result<crate::runner::Lines> {
        let mut all = self.global.clone();
        all.extend([
            "logs".into(),
            "--follow".into(),
            "--tail".into(),
            tail.to_string(),
            name.to_owned(),
        ]);
        self.runner.spawn_lines(&self.program, &all)
    }

    /// Runs `command` in a container and returns how it ended, whatever its exit code.
    pub async fn exec_output(
        &self,
        id: &str,
        command: &[String],
    ) -> Result<CmdOutput, PodmanError> {
        let mut all = self.global.clone();
        all.extend(["exec".into(), "--".into(), id.to_owned()]);
        all.extend(command.iter().cloned());
        self.runner
            .run(&self.program, &all)
            .await
            .map_err(|source| PodmanError::Spawn {
                program: self.program.clone(),
                source,
            })
    }

    /// Runs `command` in a running container; fails with its exit code and output.
    pub async fn exec(&self, id: &str, command: &[String]) -> Result<(), String> {
        let mut all = self.global.clone();
        all.extend(["exec".into(), "--".into(), id.to_owned()]);
        all.extend(command.iter().cloned());
        let out = self
            .runner
            .run(&self.program, &all)
            .await
            .map_err(|e| e.to_string())?;
        if out.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Err(format!(
            "{:?} exited with code {}: {}",
            command.join(" "),
            out.code.unwrap_or(-1),
            tail(&text, 3)
        ))
    }

    /// Stops a container the way it was created to stop (its stop signal, then SIGKILL after
    /// its stop timeout) and removes it.
    pub async fn remove(&self, id: &str) -> Result<(), PodmanError> {
        self.call("stop", vec![id.to_owned()]).await?;
        self.remove_now(id).await
    }

    /// Removes a container, killing it if it still runs.
    pub async fn remove_now(&self, id: &str) -> Result<(), PodmanError> {
        self.call(
            "rm",
            vec!["--force".into(), "--time".into(), "0".into(), id.to_owned()],
        )
        .await
        .map(drop)
    }

    /// Sends the container its stop signal and waits up to `lifecycle.grace_seconds` for it
    /// to exit; then SIGKILL if `sigkill_fallback`. Returns whether it stopped.
    pub async fn stop(&self, id: &str, lifecycle: &Lifecycle) -> Result<bool, PodmanError> {
        let grace = lifecycle.grace_seconds;
        if lifecycle.sigkill_fallback {
            self.call(
                "stop",
                vec!["--time".into(), grace.to_string(), id.to_owned()],
            )
            .await?;
            return Ok(true);
        }
        // No SIGKILL: send the signal ourselves and wait for the exit up to the grace. (A
        // `podman stop` cut short would leave the container marked "stopping".)
        let signal = format!("--signal={}", lifecycle.stop_signal);
        self.call("kill", vec![signal, id.to_owned()]).await?;
        let wait = std::time::Duration::from_secs(u64::from(grace));
        match tokio::time::timeout(wait, self.call("wait", vec![id.to_owned()])).await {
            Ok(result) => result.map(|_| true),
            Err(_elapsed) => Ok(false),
        }
    }
}

/// How an init container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitOutcome {
    Exited { code: i32, log_tail: String },
    TimedOut { log_tail: String },
}

/// The container name of a deployment's init container.
pub fn init_container_name(deployment: &str, init: &str) -> String {
    format!("fleet-{deployment}-init-{init}")
}

impl<R: CommandRunner> Podman<R> {
    /// Runs an init container to completion (or its timeout) and removes it; its volumes are
    /// the deployment's, so what it prepares is there for the main container.
    pub async fn run_init(
        &self,
        device: &str,
        deployment: &str,
        init: &InitContainer,
    ) -> Result<InitOutcome, PodmanError> {
        let name = init_container_name(deployment, &init.name);
        // A leftover from a crash mid-run would hold the name.
        self.remove_now(&name).await.ok();
        let args = init_args(&name, device, deployment, init);
        let mut all = self.global.clone();
        all.push("run".into());
        all.extend(args);
        let timeout = std::time::Duration::from_secs(u64::from(init.timeout_seconds));
        let run = tokio::time::timeout(timeout, self.runner.run(&self.program, &all)).await;
        let outcome = match run {
            Err(_elapsed) => InitOutcome::TimedOut {
                log_tail: self.logs_tail(&name).await,
            },
            Ok(Err(source)) => {
                return Err(PodmanError::Spawn {
                    program: self.program.clone(),
                    source,
                });
            }
            Ok(Ok(out)) => {
                // podman itself failing (no such image) exits 125 with its own message and
                // leaves no container behind.
                if out.code == Some(125) && !self.exists(&name).await {
                    return Err(PodmanError::Failed {
                        subcommand: "run",
                        message: out.error_line(),
                    });
                }
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                InitOutcome::Exited {
                    code: out.code.unwrap_or(-1),
                    log_tail: tail(&text, 10),
                }
            }
        };
        self.remove_now(&name).await.ok();
        Ok(outcome)
    }

    pub async fn exists(&self, name: &str) -> bool {
        self.call("container", vec!["exists".into(), name.to_owned()])
            .await
            .is_ok()
    }

    async fn logs_tail(&self, name: &str) -> String {
        match self
            .call("logs", vec!["--tail".into(), "10".into(), name.to_owned()])
            .await
        {
            Ok(out) => {
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                tail(&text, 10)
            }
            Err(_) => String::new(),
        }
    }
}

/// The last `n` non-empty lines of `text`, joined with " | " for a one-line status message.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

fn push_env_and_volumes(
    a: &mut Vec<String>,
    deployment: &str,
    env: &[EnvVar],
    volumes: &[VolumeMount],
) {
    for e in env {
        a.push(format!("--env={}={}", e.name, e.value));
    }
    for v in volumes {
        let source = v
            .host_path
            .clone()
            .unwrap_or_else(|| volume_name(deployment, &v.name));
        let mode = if v.read_only { ":ro" } else { "" };
        a.push(format!("--volume={source}:{}{mode}", v.mount_path));
    }
}

/// The image and the container's arguments, after `--`: whatever they hold, podman reads
/// neither as one of its own options (every option before is in `--name=value` form, so no
/// value can be taken for an option either).
fn push_image_and_args(a: &mut Vec<String>, image: &str, args: &[String]) {
    a.push("--".into());
    a.push(image.to_owned());
    a.extend(args.iter().cloned());
}

pub fn parse_ps(stdout: &[u8]) -> Result<Vec<Observed>, PodmanError> {
    // podman 4 prints `[]` for no containers; older versions printed nothing.
    if stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let entries: Vec<PsEntry> =
        serde_json::from_slice(stdout).map_err(|source| PodmanError::Parse {
            subcommand: "ps",
            source,
        })?;
    Ok(entries.into_iter().filter_map(Observed::from_ps).collect())
}

/// `podman run` arguments for an init container named `name`.
fn init_args(name: &str, device: &str, deployment: &str, init: &InitContainer) -> Vec<String> {
    let mut args: Vec<String> = vec![format!("--name={name}")];
    args.push(format!("--label={}={device}", labels::DEVICE));
    args.push(format!("--label=fleet.init-of={deployment}"));
    push_env_and_volumes(&mut args, deployment, &init.env, &init.volumes);
    if !init.command.is_empty() {
        let entrypoint = serde_json::to_string(&init.command).unwrap_or_default();
        args.push(format!("--entrypoint={entrypoint}"));
    }
    push_image_and_args(&mut args, &init.image, &init.args);
    args
}

fn create_args(s: &CreateSpec<'_>) -> Vec<String> {
    let c = s.container;
    let mut a: Vec<String> = vec![format!("--name={}", container_name(s.deployment))];
    for (k, v) in [
        (labels::DEVICE, s.device.to_owned()),
        (labels::DEPLOYMENT, s.deployment.to_owned()),
        (labels::GENERATION, s.generation.to_string()),
        (labels::SPEC_HASH, s.spec_hash.to_owned()),
    ] {
        a.push(format!("--label={k}={v}"));
    }
    let restart = match s.restart {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "no",
    };
    a.push(format!("--restart={restart}"));
    a.push(format!("--stop-signal={}", s.lifecycle.stop_signal));
    a.push(format!("--stop-timeout={}", s.lifecycle.grace_seconds));
    push_env_and_volumes(&mut a, s.deployment, &c.env, &c.volumes);
    for p in &c.ports {
        a.push(format!(
            "--publish={}:{}/{}",
            p.effective_host_port(),
            p.container_port,
            p.protocol.as_str()
        ));
    }
    if !c.command.is_empty() {
        // The JSON form keeps arguments with spaces intact; like Kubernetes' `command`, it
        // replaces the image's entrypoint and drops the image's default arguments.
        a.push(format!(
            "--entrypoint={}",
            serde_json::to_string(&c.command).unwrap_or_default()
        ));
    }
    push_image_and_args(&mut a, &c.image, &c.args);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::RecordingRunner;
    use fleet_contracts::spec::{EnvVar, Port, Protocol, VolumeMount};

    #[test]
    fn parses_real_podman_4_3_ps_output() {
        let golden = include_bytes!("../tests/golden/podman-4.3-ps.json");
        let got = parse_ps(golden).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "fleet-web");
        assert_eq!(got[0].deployment, "web");
        assert_eq!(got[0].generation, 3);
        assert_eq!(got[0].spec_hash, "abc123");
        assert_eq!(got[0].state, ContainerState::Running);
        assert_eq!(got[1].deployment, "job");
        assert_eq!(got[1].state, ContainerState::Exited { code: 3 });
    }

    #[test]
    fn empty_ps_output() {
        assert_eq!(parse_ps(b"[]\n").unwrap(), vec![]);
        assert_eq!(parse_ps(b"").unwrap(), vec![]);
        assert!(parse_ps(b"{oops").is_err());
    }

    #[test]
    fn unlabelled_containers_are_not_ours() {
        let ps = br#"[{"Id":"x","Names":["db"],"State":"running","Labels":null}]"#;
        assert_eq!(parse_ps(ps).unwrap(), vec![]);
    }

    #[tokio::test]
    async fn create_builds_the_full_command_line() {
        let config = PodmanConfig {
            program: "podman".into(),
            root: Some("/r".into()),
            runroot: None,
            runtime: Some("runc".into()),
        };
        let runner = RecordingRunner::default();
        runner.answer(0, "abc\n", "");
        let podman = Podman::new(runner, &config);
        let container = Container {
            name: "web".into(),
            image: "localhost/http:1".into(),
            command: vec!["/bin/sh".into(), "-c".into()],
            args: vec!["echo hi there".into()],
            env: vec![EnvVar {
                name: "A".into(),
                value: "b c".into(),
            }],
            ports: vec![Port {
                container_port: 80,
                host_port: Some(8080),
                protocol: Protocol::Udp,
            }],
            volumes: vec![
                VolumeMount {
                    name: "data".into(),
                    mount_path: "/data".into(),
                    host_path: None,
                    read_only: false,
                },
                VolumeMount {
                    name: "dev".into(),
                    mount_path: "/d".into(),
                    host_path: Some("/dev/x".into()),
                    read_only: true,
                },
            ],
            probes: vec![],
        };
        let id = podman
            .create(&CreateSpec {
                device: "pi-01",
                deployment: "web",
                generation: 2,
                spec_hash: "h",
                container: &container,
                restart: RestartPolicy::OnFailure,
                lifecycle: &Lifecycle::default(),
            })
            .await
            .unwrap();
        assert_eq!(id, "abc");
        assert_eq!(
            podman.runner().calls(),
            vec![
                "podman --root /r --runtime runc create --name=fleet-web \
                 --label=fleet.device=pi-01 --label=fleet.deployment=web \
                 --label=fleet.generation=2 --label=fleet.spec-hash=h --restart=on-failure \
                 --stop-signal=SIGTERM --stop-timeout=30 --env=A=b c --volume=fleet-web-data:/data --volume=/dev/x:/d:ro \
                 --publish=8080:80/udp --entrypoint=[\"/bin/sh\",\"-c\"] -- localhost/http:1 echo hi there"
            ]
        );
    }

    /// Whatever a user managed to get accepted, podman reads it only as values: every argument
    /// before `--` is one of the options the agent means, in `--option=value` form; after it
    /// come the image (never starting with `-`) and the container's own arguments.
    #[test]
    fn no_accepted_value_becomes_a_podman_option() {
        use fleet_contracts::{resource::Resource, testing::hostile_deployment};
        use proptest::test_runner::{Config, TestRunner};
        const OURS: &[&str] = &[
            "--name",
            "--label",
            "--restart",
            "--stop-signal",
            "--stop-timeout",
            "--env",
            "--volume",
            "--publish",
            "--entrypoint",
        ];
        let check = |args: &[String], image: &str, rest: &[String]| {
            let split = args.iter().position(|a| a == "--").expect("a -- separator");
            for a in &args[..split] {
                let option = a.split_once('=').map(|(o, _)| o).unwrap_or("");
                assert!(OURS.contains(&option), "{a:?} in {args:?}");
            }
            assert_eq!(args[split + 1], image);
            assert!(!image.starts_with('-'), "{args:?}");
            assert_eq!(&args[split + 2..], rest);
        };
        let accepted = std::cell::Cell::new(0u32);
        let mut runner = TestRunner::new(Config {
            cases: 2000,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&hostile_deployment(), |doc| {
                let Ok(Resource::Deployment(d)) = Resource::from_user(doc) else {
                    return Ok(());
                };
                accepted.set(accepted.get() + 1);
                let t = &d.spec.template;
                for c in &t.containers {
                    let args = create_args(&CreateSpec {
                        device: "pi-01",
                        deployment: &d.metadata.name,
                        generation: 1,
                        spec_hash: "h",
                        container: c,
                        restart: t.restart_policy,
                        lifecycle: &t.lifecycle,
                    });
                    check(&args, &c.image, &c.args);
                }
                for i in &t.init_containers {
                    let args = init_args("fleet-x-init-y", "pi-01", &d.metadata.name, i);
                    check(&args, &i.image, &i.args);
                }
                Ok(())
            })
            .unwrap();
        assert!(
            accepted.get() > 0,
            "no hostile document was accepted: the check saw nothing"
        );
    }

    #[tokio::test]
    async fn failures_carry_podmans_message() {
        let runner = RecordingRunner::default();
        runner.answer(125, "", "time=... level=warning msg=retrying\nError: initializing source docker://nope:1: connection refused\n");
        let podman = Podman::new(runner, &PodmanConfig::default());
        let err = podman.start("x").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "podman start failed: Error: initializing source docker://nope:1: connection refused"
        );
    }
}
