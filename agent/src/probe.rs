//! Readiness probes: HTTP GET, TCP connect, a command in the container, or "running", each with
//! a timeout, a period and a failure threshold; a deployment is `Ready` when all pass.
//!
//! HTTP and TCP probes go to the published host port on 127.0.0.1 (the agent runs on the
//! device); the HTTP client is a few lines over a TCP stream, enough for a status line.

use std::{collections::HashMap, time::Duration};

use fleet_contracts::spec::{Container, Probe};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use crate::{podman::Podman, runner::CommandRunner};

/// What the agent remembers of one probe of one container.
#[derive(Debug, Clone)]
struct State {
    container_id: String,
    next_run: Instant,
    passing: bool,
    consecutive_failures: u32,
    last_error: String,
}

/// Probe results across passes, keyed by (deployment, probe name).
#[derive(Debug, Default)]
pub struct Probes {
    states: HashMap<(String, String), State>,
    /// The container of each deployment that has passed all its probes at least once.
    ready_once: HashMap<String, String>,
}

/// What the probes of a running container say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Every probe passes.
    Ready,
    /// This container has not passed all its probes yet since it started: why not.
    Starting(String),
    /// It was ready, and a probe fails now (past its failure threshold): which and why.
    Failing(String),
}

impl Probes {
    /// Runs the probes of `container` (running as `container_id`) that are due, and says
    /// whether all pass, or why the first one does not.
    pub async fn check<R: CommandRunner>(
        &mut self,
        podman: &Podman<R>,
        deployment: &str,
        container_id: &str,
        container: &Container,
    ) -> Readiness {
        let now = crate::clock::now();
        let mut verdict = None;
        for probe in &container.probes {
            let key = (deployment.to_owned(), probe.name.clone());
            let state = self.states.entry(key).or_insert_with(|| State {
                container_id: container_id.to_owned(),
                next_run: now,
                passing: false,
                consecutive_failures: 0,
                last_error: "not run yet".into(),
            });
            if state.container_id != container_id {
                // A new container starts from scratch: it has to pass again.
                *state = State {
                    container_id: container_id.to_owned(),
                    next_run: now,
                    passing: false,
                    consecutive_failures: 0,
                    last_error: "not run yet".into(),
                };
            }
            if now >= state.next_run {
                state.next_run = now + Duration::from_secs(u64::from(probe.period_seconds));
                match run(podman, container_id, container, probe).await {
                    Ok(()) => {
                        state.passing = true;
                        state.consecutive_failures = 0;
                    }
                    Err(e) => {
                        state.consecutive_failures += 1;
                        state.last_error = e;
                        if !state.passing || state.consecutive_failures >= probe.failure_threshold {
                            state.passing = false;
                        }
                    }
                }
            }
            if !state.passing && verdict.is_none() {
                verdict = Some(format!(
                    "probe {:?} ({}) failing: {}",
                    probe.name,
                    probe.kind(),
                    state.last_error
                ));
            }
        }
        self.readiness(deployment, container_id, verdict)
    }

    fn readiness(
        &mut self,
        deployment: &str,
        container_id: &str,
        verdict: Option<String>,
    ) -> Readiness {
        let was_ready = self
            .ready_once
            .get(deployment)
            .is_some_and(|id| id == container_id);
        match verdict {
            None => {
                self.ready_once
                    .insert(deployment.to_owned(), container_id.to_owned());
                Readiness::Ready
            }
            Some(why) if was_ready => Readiness::Failing(why),
            Some(why) => Readiness::Starting(why),
        }
    }

    /// Forgets the probes of deployments that are gone.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.states.retain(|(deployment, _), _| keep(deployment));
        self.ready_once.retain(|deployment, _| keep(deployment));
    }
}

async fn run<R: CommandRunner>(
    podman: &Podman<R>,
    container_id: &str,
    container: &Container,
    probe: &Probe,
) -> Result<(), String> {
    let timeout = Duration::from_secs(u64::from(probe.timeout_seconds));
    let host_port = |port: u16| {
        container
            .ports
            .iter()
            .find(|p| p.container_port == port)
            .map(|p| p.effective_host_port())
            .ok_or_else(|| format!("port {port} is not published"))
    };
    let check = async {
        if let Some(h) = &probe.http_get {
            let status = http_status(host_port(h.port)?, &h.path).await?;
            if (h.status_min..=h.status_max).contains(&status) {
                Ok(())
            } else {
                Err(format!("GET {} answered {status}", h.path))
            }
        } else if let Some(t) = &probe.tcp {
            let port = host_port(t.port)?;
            TcpStream::connect(("127.0.0.1", port))
                .await
                .map(drop)
                .map_err(|e| format!("connect to port {port}: {e}"))
        } else if let Some(e) = &probe.exec {
            podman.exec(container_id, &e.command).await
        } else {
            // `running`: the agent only probes running containers.
            Ok(())
        }
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {}s", probe.timeout_seconds)),
    }
}

/// The status code of `GET path` on 127.0.0.1:`port`.
async fn http_status(port: u16, path: &str) -> Result<u16, String> {
    // The operator refuses such a path; a device checks again before it writes a request line.
    fleet_contracts::checks::check_url_path(path)
        .map_err(|why| format!("probe path {path:?} {why}"))?;
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect to port {port}: {e}"))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < head.len() {
        match stream.read(&mut head[len..]).await {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) => return Err(format!("read: {e}")),
        }
        if head[..len].contains(&b'\n') {
            break;
        }
    }
    parse_status(&head[..len]).ok_or_else(|| "no HTTP status line in the answer".into())
}

/// `HTTP/1.x NNN ...` -> NNN.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head).ok()?.lines().next()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path that would add a header never reaches the socket; a plain one is sent as is.
    #[tokio::test]
    async fn a_probe_path_cannot_inject_a_header() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let err = http_status(port, "/a\r\nX-Evil: 1").await.unwrap_err();
        assert!(
            err.starts_with("probe path \"/a\\r\\nX-Evil: 1\" must be visible ASCII"),
            "{err}"
        );
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.0 204 No Content\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        assert_eq!(http_status(port, "/ok?x=%0D").await, Ok(204));
        // The first connection the listener saw is the good probe's: the bad one never connected.
        let request = server.await.unwrap();
        assert!(
            request.starts_with("GET /ok?x=%0D HTTP/1.0\r\nHost:"),
            "{request}"
        );
    }

    #[test]
    fn a_container_starts_until_first_ready_and_fails_only_after() {
        let mut p = Probes::default();
        let why = || Some("probe \"http\" failing".to_owned());
        assert_eq!(
            p.readiness("web", "c1", why()),
            Readiness::Starting("probe \"http\" failing".into())
        );
        assert_eq!(p.readiness("web", "c1", None), Readiness::Ready);
        assert_eq!(
            p.readiness("web", "c1", why()),
            Readiness::Failing("probe \"http\" failing".into())
        );
        // A new container (an upgrade, a re-create) has to become ready again.
        assert!(matches!(
            p.readiness("web", "c2", why()),
            Readiness::Starting(_)
        ));
        p.retain(|_| false);
        assert!(p.ready_once.is_empty());
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.0 200 OK\r\n"), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.1 503 Service Unavailable\r\nx"),
            Some(503)
        );
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }
}
