//! Test support for Fleet's end-to-end tests and benchmarks: starts real `nats-server` (one,
//! or a cluster), `fleet-operator` and `fleet-agent` processes on free loopback ports, each
//! agent with its own podman storage, and stops them on drop. [`Hollow`] devices enroll and
//! speak the agent's protocol with the agent's own code, without podman; [`churn`] writes
//! continuously and checks that the fleet holds exactly the declared state.
//!
//! It never fakes a component. It expects the workspace binaries to be built
//! (`cargo build --bins`, which `scripts/test.sh` does) and the tools installed by
//! `scripts/bootstrap.sh`. Waiting is always on a condition ([`eventually`]), never a bare sleep.
#![allow(clippy::disallowed_methods)] // A harness starts processes; the product code may not.

pub mod churn;
pub mod raw;
pub mod store;

use std::{
    future::Future,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use fleet_contracts::resource::{Deployment, RolloutPhase};

/// Set when a wait timed out, so processes print their logs as they stop (tests return
/// errors instead of panicking, so `std::thread::panicking` alone would miss them).
static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How long any single wait may take before the test fails with what it last saw.
pub const WAIT: Duration = Duration::from_secs(60);

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives in the workspace")
        .to_owned()
}

/// A built workspace binary, next to the running test executable.
///
/// `FLEET_AGENT_BIN` replaces the agent with another build: `scripts/test.sh` points it at the
/// static `x86_64-unknown-linux-musl` release binary, so the tests run what ships.
pub fn binary(name: &str) -> PathBuf {
    if name == "fleet-agent"
        && let Some(path) = std::env::var_os("FLEET_AGENT_BIN")
    {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>-<hash> or target/<profile>/<bin>
    let dir = exe
        .parent()
        .map(|p| {
            if p.ends_with("deps") {
                p.parent().unwrap()
            } else {
                p
            }
        })
        .unwrap();
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; scripts/test.sh does)",
        path.display()
    );
    path
}

/// A tool `scripts/bootstrap.sh` unpacked (nats-server).
pub fn tool(name: &str) -> PathBuf {
    tool_path(&format!("tools/bin/{name}"))
}

/// A path under the cache folder of `scripts/bootstrap.sh` (e.g. `venv/bin/python`).
pub fn tool_path(relative: &str) -> PathBuf {
    let cache = std::env::var_os("FLEET_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/fleet"), PathBuf::from);
    let path = cache.join(relative);
    assert!(
        path.exists(),
        "{} is missing: run scripts/bootstrap.sh",
        path.display()
    );
    path
}

/// A process's peak resident memory (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM in /proc/<pid>/status")
}

/// A TCP port on 127.0.0.1 that nothing listens on, reserved for this test process: for a
/// server the test starts next, and starts again on the same port after killing it.
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`): a port from that range,
/// what binding port 0 gives, can become the local end of another process's outgoing
/// connection between this check and the server's own bind (then the server exits with
/// "address already in use"; under load on two cores it happened). A lock file per port, held
/// until this process ends (nextest runs every test in its own process), keeps parallel tests
/// from taking the same one.
pub fn free_port() -> u16 {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    const LOWEST: u16 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral > LOWEST + 1_000,
        "the ephemeral port range starts at {ephemeral}: no room below it for test servers"
    );
    let locks = std::env::temp_dir().join("fleet-e2e-ports");
    std::fs::create_dir_all(&locks).expect("the port lock folder");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut rng = churn::Rng(u64::from(std::process::id()) << 32 | u64::from(nanos) | 1);
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1_000 {
        let port = LOWEST + rng.below(u64::from(ephemeral - LOWEST)) as u16;
        let Ok(lock) = std::fs::File::create(locks.join(port.to_string())) else {
            continue;
        };
        // A second lock on the same file fails in this process too (a new open file).
        if lock.try_lock().is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            held.push(lock);
            return port;
        }
    }
    panic!("no free port below {ephemeral} after 1,000 tries");
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `timeout` with the last
/// state `describe` gives.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_error = String::from("condition not met");
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_error = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
            let message = format!("timed out after {timeout:?} waiting for {what}: {last_error}");
            // Printed now too: the processes' log tails follow on drop, and a long report
            // (CI keeps only its start and end) would bury the cause under them.
            eprintln!("----- {message}");
            bail!(message);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A child process that is killed on drop and whose log is kept for failure reports.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        // Its own process group, so that dropping it also ends what it started (an agent's
        // podman calls), which would otherwise outlive the test and hold its folder.
        let child = std::os::unix::process::CommandExt::process_group(&mut cmd, 0)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: &str) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) and leaves the process be.
    pub fn send_signal(&mut self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
        }
    }

    /// SIGKILL: the process gets no chance to clean up.
    pub fn kill(&mut self) {
        self.signal_and_wait("KILL");
    }

    /// SIGTERM, the clean stop.
    pub fn stop(&mut self) {
        self.signal_and_wait("TERM");
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The last `n` lines of the process's output.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() || FAILED.load(std::sync::atomic::Ordering::Relaxed) {
            eprintln!(
                "----- last lines of {} ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log_tail(40)
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }
}

/// nats-server with JetStream on free loopback ports, its store in a temp folder, in
/// decentralized JWT mode: it trusts the fleet identity that `fleet-operator init-identity`
/// wrote to `<dir>/identity` (a full resolver, so account updates survive restarts). One
/// server, or a cluster of several ([`Nats::start_cluster`]).
#[derive(Debug)]
pub struct Nats {
    nodes: Vec<NatsNode>,
    /// The fleet identity folder: keys, `operator.creds`, `sys.creds`.
    pub identity: PathBuf,
}

#[derive(Debug)]
struct NatsNode {
    port: u16,
    monitor: u16,
    config: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
    clustered: bool,
}

impl NatsNode {
    fn spawn(&mut self) -> Result<()> {
        self.stop();
        let mut cmd = Command::new(tool("nats-server"));
        cmd.arg("-c").arg(&self.config);
        self.proc = Some(Proc::spawn("nats-server", cmd, self.log.clone())?);
        Ok(())
    }

    /// Waits until the server answers (a cluster node: until it has caught up too; the
    /// JetStream-only check answers before that).
    async fn ready(&self) -> Result<()> {
        self.ready_within(WAIT).await
    }

    async fn ready_within(&self, timeout: Duration) -> Result<()> {
        eventually("nats-server to answer", timeout, || async {
            Ok(self.healthy().then_some(()))
        })
        .await
    }

    /// Whether `/healthz` answers 200 (a cluster node: only once it has caught up).
    fn healthy(&self) -> bool {
        let check = if self.clustered {
            ""
        } else {
            "?js-enabled-only=true"
        };
        http_get(&format!("http://127.0.0.1:{}/healthz{check}", self.monitor))
            .is_ok_and(|(status, _)| status == 200)
    }

    /// The monitoring endpoint's `/jsz`, if the node answers.
    fn jsz(&self) -> Option<serde_json::Value> {
        let (_, body) = http_get(&format!("http://127.0.0.1:{}/jsz", self.monitor)).ok()?;
        serde_json::from_str(&body).ok()
    }

    fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
    }
}

impl Nats {
    pub async fn start(dir: &Path) -> Result<Nats> {
        let identity = Nats::identity(dir)?;
        let (port, monitor) = (free_port(), free_port());
        let config = dir.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor}\"\nserver_name: e2e\n\
                 jetstream {{ store_dir: \"{}\" }}\ninclude \"identity/nats-auth.conf\"\n",
                dir.join("nats-store").display()
            ),
        )?;
        let node = NatsNode {
            port,
            monitor,
            config,
            log: dir.join("nats.log"),
            proc: None,
            clustered: false,
        };
        let mut nats = Nats {
            nodes: vec![node],
            identity,
        };
        nats.restart().await?;
        Ok(nats)
    }

    /// A cluster of `size` servers on loopback (`n1`, `n2`, ...), each with its own store and
    /// account resolver folder, joined by plain routes (loopback only: across hosts, routes need
    /// TLS and auth).
    pub async fn start_cluster(dir: &Path, size: usize) -> Result<Nats> {
        let identity = Nats::identity(dir)?;
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let name = format!("n{}", i + 1);
            // Each node lists only the others: with its own route in the list, a fresh
            // nats-server 2.10 cluster under load sometimes elects a meta leader whose group
            // leaves one node out for good ("no suitable peers for placement" for R3; seen in
            // 4 of 30 loaded starts, 0 of 30 without the self route).
            let route_urls = routes
                .iter()
                .filter(|p| *p != route)
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let (port, monitor) = (free_port(), free_port());
            let config = dir.join(format!("nats-{name}.conf"));
            // The resolver block after the include replaces the one in nats-auth.conf: one
            // resolver folder per node.
            std::fs::write(
                &config,
                format!(
                    "listen: \"127.0.0.1:{port}\"\nhttp: \"127.0.0.1:{monitor}\"\nserver_name: {name}\n\
                     jetstream {{ store_dir: \"{store}\" }}\ninclude \"identity/nats-auth.conf\"\n\
                     resolver: {{ type: full, dir: \"{jwt}\", allow_delete: false, interval: \"2m\", timeout: \"3s\" }}\n\
                     cluster {{ name: fleet, listen: \"127.0.0.1:{route}\", routes: [{route_urls}] }}\n",
                    store = dir.join(format!("nats-store-{name}")).display(),
                    jwt = dir.join(format!("nats-jwt-{name}")).display(),
                ),
            )?;
            nodes.push(NatsNode {
                port,
                monitor,
                config,
                log: dir.join(format!("nats-{name}.log")),
                proc: None,
                clustered: true,
            });
        }
        let mut nats = Nats { nodes, identity };
        // A fresh nats-server 2.10.27 cluster does not always form: under load here, about 1 in
        // 30 starts elected a meta leader whose group left a node out for good (the node
        // follows the leader but is no peer; R3 buckets fail with "no suitable peers for
        // placement"), and now and then none elected a leader at all within a minute. The
        // tests are about what Fleet does on a cluster, not about forming one: a cluster that
        // has not formed in 30 s is stopped, wiped (it holds nothing yet) and started again.
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            match nats.form_cluster(Duration::from_secs(30)).await {
                Ok(()) => break,
                Err(e) if attempt < ATTEMPTS => {
                    eprintln!("----- {e:#}\nstarting the cluster afresh");
                    nats.stop();
                    for name in (1..=size).map(|i| format!("n{i}")) {
                        for folder in [format!("nats-store-{name}"), format!("nats-jwt-{name}")] {
                            let _ = std::fs::remove_dir_all(dir.join(folder));
                        }
                    }
                }
                Err(e) => {
                    FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
                    eprintln!("----- {e:#}");
                    return Err(e.context(format!("no cluster formed in {ATTEMPTS} starts")));
                }
            }
        }
        nats.wait_placement(size).await?;
        Ok(nats)
    }

    /// Starts every node and waits until each answers healthy and the meta leader's group
    /// holds them all.
    async fn form_cluster(&mut self, timeout: Duration) -> Result<()> {
        for node in &mut self.nodes {
            node.spawn()?;
        }
        let deadline = Instant::now() + timeout;
        // Not `eventually`: a cluster that does not form is started afresh, not a failure.
        loop {
            let healthy = self.nodes.iter().all(NatsNode::healthy);
            if healthy && self.meta_group_complete() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "a fresh nats-server cluster did not form in {timeout:?} (every node \
                     healthy: {healthy}); the meta group as each node sees it:\n{}",
                    self.meta_views()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether a node answers as meta leader with every other node in its group.
    fn meta_group_complete(&self) -> bool {
        self.nodes.iter().enumerate().any(|(i, node)| {
            let Some(mut jsz) = node.jsz() else {
                return false;
            };
            let meta = jsz["meta_cluster"].take();
            let replicas = meta["replicas"].as_array().map_or(0, Vec::len);
            meta["leader"].as_str() == Some(format!("n{}", i + 1).as_str())
                && replicas == self.nodes.len() - 1
        })
    }

    /// Each node's `/jsz` view of the meta group, a line each (for failure reports).
    fn meta_views(&self) -> String {
        self.nodes
            .iter()
            .map(|node| {
                let meta = node.jsz().map(|mut v| v["meta_cluster"].take());
                format!(
                    "{}: {}",
                    node.config.display(),
                    meta.map(|m| m.to_string()).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until the cluster places a stream with `replicas` replicas: a fresh cluster says
    /// "no suitable peers for placement" until its meta leader has heard from every peer. On
    /// a timeout the error carries each node's view of the meta group (`/jsz`).
    async fn wait_placement(&self, replicas: usize) -> Result<()> {
        let js = async_nats::jetstream::new(self.client().await?);
        let config = async_nats::jetstream::kv::Config {
            bucket: "fleet-e2e-ready".into(),
            num_replicas: replicas,
            ..Default::default()
        };
        let placed = eventually("the cluster to place a replicated bucket", WAIT, || {
            let (js, config) = (js.clone(), config.clone());
            async move {
                js.create_key_value(config).await?;
                Ok(Some(()))
            }
        })
        .await;
        if let Err(e) = placed {
            let views = self.meta_views();
            eprintln!("----- meta group as each node sees it:\n{views}");
            bail!("{e:#}\nmeta group as each node sees it:\n{views}");
        }
        js.delete_key_value("fleet-e2e-ready").await?;
        Ok(())
    }

    fn identity(dir: &Path) -> Result<PathBuf> {
        let identity = dir.join("identity");
        // 10.0.2.2 is how a QEMU guest on user networking reaches this host's loopback
        // (qemu-tests/): its agent checks the server certificate against that address.
        let status = Command::new(binary("fleet-operator"))
            .arg("--identity")
            .arg(&identity)
            .arg("init-identity")
            .args(["--tls-host", "127.0.0.1", "--tls-host", "localhost"])
            .args(["--tls-host", "10.0.2.2"])
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("fleet-operator init-identity failed");
        }
        Ok(identity)
    }

    /// Every server's client URL, comma-separated (what Fleet's `--nats-url` takes).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The fleet CA every client must pin (the server only speaks TLS).
    pub fn ca(&self) -> PathBuf {
        fleet_operator::identity::tls::ca_path(&self.identity)
    }

    /// Starts every server (again), on the same ports and stores, and waits until each
    /// answers.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        for node in &mut self.nodes {
            node.spawn()?;
        }
        for node in &self.nodes {
            node.ready().await?;
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }

    /// SIGKILLs cluster node `i` (0-based).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].proc.take() {
            p.kill();
        }
    }

    /// Starts cluster node `i` again and waits until it has caught up: on every stream, so
    /// this may take a while under load (once over a minute on two busy cores).
    pub async fn start_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].spawn()?;
        self.nodes[i].ready_within(WAIT * 2).await
    }

    /// A client with the operator service's credentials (what tests use to look into KV).
    /// A connection that hears every subject of the fleet account and may publish nothing:
    /// a test's witness of what an attack made anyone publish.
    pub async fn spy(&self) -> Result<async_nats::Client> {
        use fleet_operator::identity::{
            Identity,
            jwt::{Permission, UserPermissions},
        };
        let creds = Identity::init_or_load(&self.identity)?.fleet_user_creds(
            "test-spy",
            UserPermissions {
                publish: Permission {
                    allow: vec![],
                    deny: vec![">".into()],
                },
                subscribe: Permission::allow(&[">"]),
                resp: None,
                subs: Some(-1),
                data: Some(-1),
                payload: Some(-1),
            },
        )?;
        let url = self.url();
        let servers: Vec<&str> = url.split(',').collect();
        Ok(async_nats::ConnectOptions::with_credentials(&creds)?
            .add_root_certificates(self.ca())
            .require_tls(true)
            .connect(servers)
            .await?)
    }

    pub async fn client(&self) -> Result<async_nats::Client> {
        let creds = std::fs::read_to_string(self.identity.join("operator.creds"))?;
        let url = self.url();
        let servers: Vec<&str> = url.split(',').collect();
        Ok(async_nats::ConnectOptions::with_credentials(&creds)?
            .add_root_certificates(self.ca())
            .require_tls(true)
            .custom_inbox_prefix("_INBOX.ctl")
            .connect(servers)
            .await?)
    }
}

/// A plain HTTP GET: (status, body).
pub fn http_get(url: &str) -> Result<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let mut r = agent.get(url).call()?;
    Ok((r.status().as_u16(), r.body_mut().read_to_string()?))
}

/// A running `fleet-operator`.
#[derive(Debug)]
pub struct Operator {
    pub url: String,
    /// The admin token the API requires.
    pub token: String,
    pub proc: Proc,
}

/// The lease time of test operators: a standby takes over this long after the leader's last
/// renewal.
pub const LEASE_MS: u64 = 1500;

impl Operator {
    /// Starts `fleet-operator` (instance `e2e`) with `extra` flags added to the test defaults.
    pub async fn start(dir: &Path, nats: &Nats, extra: &[&str]) -> Result<Operator> {
        Operator::start_named(dir, nats, "e2e", extra).await
    }

    /// Starts one more operator, named `instance` in the leadership lease, and waits until its
    /// view has converged (as leader or standby).
    pub async fn start_named(
        dir: &Path,
        nats: &Nats,
        instance: &str,
        extra: &[&str],
    ) -> Result<Operator> {
        let op = Operator::spawn(dir, nats, instance, extra)?;
        let client = op.client();
        eventually("the operator to converge", WAIT, || {
            let status = client.status();
            async move {
                Ok(status
                    .ok()
                    .filter(|s| s.state == fleet_contracts::api::RecoveryState::Converged)
                    .map(drop))
            }
        })
        .await?;
        Ok(op)
    }

    /// Starts an operator process and returns at once (it may still be recovering).
    pub fn spawn(dir: &Path, nats: &Nats, instance: &str, extra: &[&str]) -> Result<Operator> {
        let port = free_port();
        let mut cmd = Command::new(binary("fleet-operator"));
        cmd.args([
            "--nats-url",
            &nats.url(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--resync-secs",
            "2",
            "--instance",
            instance,
            "--lease-ms",
            &LEASE_MS.to_string(),
        ])
        .arg("--identity")
        .arg(&nats.identity)
        .args(extra)
        .env("FLEET_LOG", "info,fleet_operator=debug");
        let log = match instance {
            "e2e" => dir.join("operator.log"),
            other => dir.join(format!("operator-{other}.log")),
        };
        let proc = Proc::spawn(&format!("fleet-operator {instance}"), cmd, log)?;
        let token = std::fs::read_to_string(nats.identity.join("admin.token"))?
            .trim()
            .to_owned();
        Ok(Operator {
            url: format!("http://127.0.0.1:{port}"),
            token,
            proc,
        })
    }

    pub fn client(&self) -> fleetctl::Client {
        fleetctl::Client::new(&self.url, Some(&self.token))
    }

    /// Waits until this operator reports `role` and converged.
    pub async fn wait_role(&self, role: fleet_contracts::api::Role) -> Result<()> {
        let client = self.client();
        eventually(&format!("the operator to be {role:?}"), WAIT, || {
            let status = client.status();
            async move {
                let s = status?;
                Ok(
                    (s.role == role && s.state == fleet_contracts::api::RecoveryState::Converged)
                        .then_some(()),
                )
            }
        })
        .await
    }

    /// Applies a JSON document through the API.
    pub fn apply(&self, doc: &serde_json::Value) -> Result<fleet_contracts::api::ApplyResult> {
        Ok(self.client().apply(doc)?)
    }

    /// Waits until the Deployment's current generation is `phase` on all its devices.
    pub async fn wait_phase(
        &self,
        name: &str,
        generation: u64,
        phase: RolloutPhase,
    ) -> Result<Deployment> {
        self.wait_phase_within(name, generation, phase, WAIT).await
    }

    /// [`Operator::wait_phase`] with its own time limit.
    pub async fn wait_phase_within(
        &self,
        name: &str,
        generation: u64,
        phase: RolloutPhase,
        timeout: Duration,
    ) -> Result<Deployment> {
        let client = self.client();
        eventually(
            &format!("deployment {name} gen {generation} to be {phase:?}"),
            timeout,
            || {
                let got = client.deployment(name);
                async move {
                    let d = got?;
                    let status = d.status.clone().unwrap_or_default();
                    if d.metadata.generation == generation && status.phase == phase {
                        Ok(Some(d))
                    } else {
                        bail!("last seen: {}", fleetctl::render::progress_line(&d))
                    }
                }
            },
        )
        .await
    }
}

/// A podman storage of its own (root and runroot in a temp folder), with the example images.
#[derive(Debug)]
pub struct PodmanSandbox {
    pub root: PathBuf,
    pub runroot: PathBuf,
}

impl PodmanSandbox {
    pub fn new(dir: &Path) -> Result<PodmanSandbox> {
        let sandbox = PodmanSandbox {
            root: dir.join("podman-root"),
            runroot: dir.join("podman-run"),
        };
        let status = Command::new("bash")
            .arg(workspace().join("scripts/example-image.sh"))
            .args(sandbox.global_args())
            .status()?;
        if !status.success() {
            bail!("scripts/example-image.sh failed for the sandbox");
        }
        Ok(sandbox)
    }

    pub fn global_args(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.root.display().to_string(),
            "--runroot".into(),
            self.runroot.display().to_string(),
            "--runtime".into(),
            "runc".into(),
        ]
    }

    /// Runs podman on this storage; fails with podman's stderr.
    pub fn podman(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("podman")
            .args(self.global_args())
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "podman {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every container in this storage: (name, id, state, started_at).
    pub fn containers(&self) -> Result<Vec<ContainerRow>> {
        let out = self.podman(&["ps", "--all", "--format", "json"])?;
        Ok(serde_json::from_str(if out.trim().is_empty() {
            "[]"
        } else {
            &out
        })?)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerRow {
    pub id: String,
    pub names: Vec<String>,
    pub state: String,
    pub started_at: i64,
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

impl Drop for PodmanSandbox {
    fn drop(&mut self) {
        // Containers hold mounts inside the temp folder: remove them before the folder goes.
        // Stopped first: a test may end while the agent's `podman stop` waits out a long
        // grace, and killing the agent leaves that container "stopping"; podman 4.3's
        // `rm --force` then drops it from its records without killing it (it ran on for an
        // hour after the test), while `stop` kills it.
        for args in [
            &["stop", "--all", "--time", "0"][..],
            &["rm", "--all", "--force", "--time", "0"],
        ] {
            let _ = Command::new("podman")
                .args(self.global_args())
                .args(args)
                .output();
        }
        let _ = Command::new("podman")
            .args(self.global_args())
            .args(["volume", "prune", "--force"])
            .output();
        // podman's overlay driver mounts its folder onto itself; a podman call still running
        // from the agent can keep it, and the temp folder could not be removed. Detach it.
        let overlay = self.root.join("overlay");
        if std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|m| m.contains(&*overlay.to_string_lossy()))
        {
            let _ = Command::new("umount").arg("-l").arg(&overlay).output();
        }
    }
}

/// A running `fleet-agent` on its own podman sandbox.
#[derive(Debug)]
pub struct Agent {
    pub device: String,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    log: PathBuf,
    pub proc: Option<Proc>,
}

impl Agent {
    /// Writes the agent's config (1 s heartbeat and resync, so tests see changes quickly) and
    /// starts it.
    pub fn start(
        dir: &Path,
        device: &str,
        nats: &Nats,
        token: &str,
        podman: &PodmanSandbox,
    ) -> Result<Agent> {
        Agent::start_with(dir, device, nats, token, podman, 1, 1)
    }

    /// Like [`Agent::start`] with the heartbeat and resync intervals in seconds.
    pub fn start_with(
        dir: &Path,
        device: &str,
        nats: &Nats,
        token: &str,
        podman: &PodmanSandbox,
        heartbeat_secs: u64,
        resync_secs: u64,
    ) -> Result<Agent> {
        let (nats_url, ca) = (nats.url(), nats.ca());
        let state_dir = dir.join(format!("agent-{device}"));
        let config = dir.join(format!("agent-{device}.toml"));
        std::fs::write(
            &config,
            format!(
                "device_id = {device:?}\nnats_url = {nats_url:?}\nstate_dir = {:?}\n\
                 heartbeat_interval_secs = {heartbeat_secs}\nresync_interval_secs = {resync_secs}\n\
                 enrollment_token = {token:?}\nnats_ca_file = {:?}\n\
                 [podman]\nroot = {:?}\nrunroot = {:?}\nruntime = \"runc\"\n",
                state_dir.display().to_string(),
                ca.display().to_string(),
                podman.root.display().to_string(),
                podman.runroot.display().to_string(),
            ),
        )?;
        let mut agent = Agent {
            device: device.to_owned(),
            config,
            state_dir,
            log: dir.join(format!("agent-{device}.log")),
            proc: None,
        };
        agent.restart()?;
        Ok(agent)
    }

    pub fn restart(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.stop();
        }
        let mut cmd = Command::new(binary("fleet-agent"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("FLEET_LOG", "info,fleet_agent=debug");
        self.proc = Some(Proc::spawn(
            &format!("fleet-agent {}", self.device),
            cmd,
            self.log.clone(),
        )?);
        Ok(())
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// A Device resource document.
pub fn device_doc(name: &str, labels: &[(&str, &str)]) -> serde_json::Value {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    serde_json::json!({"apiVersion": "fleet.dev/v1", "kind": "Device", "metadata": {"name": name, "labels": labels}})
}

/// A Deployment of the example HTTP server, published on `host_port`, saying `greeting`.
pub fn http_deployment(
    name: &str,
    role: &str,
    host_port: u16,
    greeting: &str,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"role": role}},
            "template": {"containers": [{
                "name": name,
                "image": "localhost/fleet-example-http:1",
                "env": [{"name": "GREETING", "value": greeting}],
                "ports": [{"containerPort": 8080, "hostPort": host_port}]
            }]}
        }
    })
}

/// A fresh folder for one test; kept after the test when `FLEET_E2E_KEEP` is set (logs, stores).
fn test_dir() -> Result<tempfile::TempDir> {
    let mut dir = tempfile::Builder::new().prefix("fleet-e2e-").tempdir()?;
    if std::env::var_os("FLEET_E2E_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("keeping {}", dir.path().display());
    }
    Ok(dir)
}

/// A Deployment of one busybox container on the devices labelled `role`, whose env
/// `VERSION` tells versions apart.
pub fn busybox_deployment(name: &str, role: &str, version: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"role": role}},
            "template": {"containers": [{
                "name": name,
                "image": "localhost/fleet-busybox:1",
                "env": [{"name": "VERSION", "value": version}]
            }]}
        }
    })
}

/// Everything one test needs: a temp folder, NATS, the operator, and helpers.
#[derive(Debug)]
pub struct Fleet {
    pub nats: Nats,
    pub operator: Operator,
    // Last, so processes stop before their folder goes.
    pub dir: tempfile::TempDir,
}

impl Fleet {
    pub async fn start() -> Result<Fleet> {
        Fleet::start_with(&[]).await
    }

    /// Like [`Fleet::start`], with extra `fleet-operator` flags.
    pub async fn start_with(operator_flags: &[&str]) -> Result<Fleet> {
        let dir = test_dir()?;
        let nats = Nats::start(dir.path()).await?;
        let operator = Operator::start(dir.path(), &nats, operator_flags).await?;
        Ok(Fleet {
            nats,
            operator,
            dir,
        })
    }

    /// Like [`Fleet::start`], on a cluster of `size` NATS servers, each KV bucket with `size`
    /// replicas.
    pub async fn start_cluster(size: usize) -> Result<Fleet> {
        let dir = test_dir()?;
        let nats = Nats::start_cluster(dir.path(), size).await?;
        let replicas = size.to_string();
        let operator = Operator::start(dir.path(), &nats, &["--kv-replicas", &replicas]).await?;
        Ok(Fleet {
            nats,
            operator,
            dir,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A one-time enrollment token whose device gets `labels`.
    pub fn enrollment_token(&self, labels: &[(&str, &str)]) -> Result<String> {
        let req = fleet_contracts::api::CreateEnrollmentToken {
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ttl_secs: Some(600),
        };
        Ok(self.operator.client().create_enrollment_token(&req)?.token)
    }

    /// A podman sandbox and an agent for `device`, enrolled with a token carrying `labels`.
    pub async fn device(
        &self,
        device: &str,
        labels: &[(&str, &str)],
    ) -> Result<(PodmanSandbox, Agent)> {
        let sandbox = PodmanSandbox::new(&self.path().join(device))?;
        let token = self.enrollment_token(labels)?;
        let agent = Agent::start(self.path(), device, &self.nats, &token, &sandbox)?;
        Ok((sandbox, agent))
    }
}

/// A device without podman: it enrolls and connects exactly as an agent does, follows its
/// desired keys through the agent's own consumer code, sends heartbeats and reports through the
/// agent's outbox. It reports what the test tells it, or, `auto_ready`, every desired
/// generation `Ready` as soon as it arrives (and removes the reports of removed ones).
#[derive(Debug)]
pub struct Hollow {
    pub name: String,
    outbox: fleet_agent::sync::Outbox,
    desired: std::sync::Arc<
        std::sync::Mutex<
            std::collections::BTreeMap<String, fleet_contracts::state::DesiredDeployment>,
        >,
    >,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Hollow {
    pub async fn start(
        fleet: &Fleet,
        name: &str,
        labels: &[(&str, &str)],
        auto_ready: bool,
    ) -> Result<Hollow> {
        let token = fleet.enrollment_token(labels)?;
        Hollow::enroll(
            &fleet.path().join("hollow").join(name),
            &fleet.nats,
            name,
            &token,
            auto_ready,
        )
        .await
    }

    /// Enrolls with `token` (state kept in `state_dir`) and starts following.
    pub async fn enroll(
        state_dir: &Path,
        nats: &Nats,
        name: &str,
        token: &str,
        auto_ready: bool,
    ) -> Result<Hollow> {
        use fleet_agent::{identity, sync};
        use fleet_contracts::{names, state::Phase};
        std::fs::create_dir_all(state_dir)?;
        let key = identity::load_or_create_key(state_dir)?;
        let jwt = identity::enroll(&nats.url(), &nats.ca(), name, &key, token).await?;
        identity::save_jwt(state_dir, &jwt)?;
        let options = identity::connect_options(state_dir, key);
        let (client, connections) = sync::connect(options, &nats.url(), &nats.ca(), name).await?;
        let (client_tx, client_rx) = tokio::sync::oneshot::channel();
        let _ = client_tx.send(client.clone());
        let outbox = sync::outbox(client_rx, name.to_owned());
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let mut tasks = vec![tokio::spawn(sync::follow_desired(
            client,
            name.to_owned(),
            tx,
            connections,
            Duration::from_secs(60),
        ))];
        let desired = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
        let (map, out, device) = (desired.clone(), outbox.clone(), name.to_owned());
        tasks.push(tokio::spawn(async move {
            // The agent's own rule for answers from another store (`fleet_agent::store`).
            let mut stores = fleet_agent::store::StoreState::default();
            let mut running = None;
            while let Some(event) = rx.recv().await {
                let Some(all) = stores.take(&event, running.as_ref()) else {
                    continue;
                };
                running = Some(all.clone());
                let mut map = map.lock().unwrap();
                let before: Vec<String> = map.keys().cloned().collect();
                *map = all
                    .into_iter()
                    .filter_map(|(k, v)| Some((k, v.ok()?)))
                    .collect();
                if !auto_ready {
                    continue;
                }
                for gone in before.iter().filter(|k| !map.contains_key(*k)) {
                    out.delete(names::deployment_key(&device, gone));
                }
                for (deployment, d) in map.iter() {
                    let bytes = hollow_report(deployment, d.generation, Phase::Ready);
                    out.put(names::deployment_key(&device, deployment), bytes);
                }
            }
        }));
        let (out, device) = (outbox.clone(), name.to_owned());
        let count = desired.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let deployments = count.lock().unwrap().len() as u32;
                out.put(
                    names::info_key(&device),
                    hollow_heartbeat(&device, 1000, deployments),
                );
            }
        }));
        Ok(Hollow {
            name: name.to_owned(),
            outbox,
            desired,
            tasks,
        })
    }

    /// The desired state as this device last received it: deployment -> value.
    pub fn desired(
        &self,
    ) -> std::collections::BTreeMap<String, fleet_contracts::state::DesiredDeployment> {
        self.desired.lock().unwrap().clone()
    }

    /// Reports `deployment` at `generation` in `phase`.
    pub fn report(&self, deployment: &str, generation: u64, phase: fleet_contracts::state::Phase) {
        self.outbox.put(
            fleet_contracts::names::deployment_key(&self.name, deployment),
            hollow_report(deployment, generation, phase),
        );
    }
}

/// The bytes of a device's report on `deployment`, as a hollow device sends it.
pub fn hollow_report(
    deployment: &str,
    generation: u64,
    phase: fleet_contracts::state::Phase,
) -> Vec<u8> {
    let report = fleet_contracts::state::ReportedDeployment {
        schema: fleet_contracts::SCHEMA_VERSION,
        deployment: deployment.to_owned(),
        observed_generation: generation,
        phase,
        message: String::new(),
        container_id: None,
        since_ms: 0,
    };
    serde_json::to_vec(&report).expect("a report serializes")
}

/// The bytes of a hollow device's heartbeat.
pub fn hollow_heartbeat(device: &str, interval_ms: u64, deployments: u32) -> Vec<u8> {
    let hb = fleet_contracts::state::Heartbeat {
        schema: fleet_contracts::SCHEMA_VERSION,
        device: device.to_owned(),
        agent_version: "hollow".into(),
        os: "none".into(),
        uptime_secs: 0,
        sent_at_ms: 0,
        interval_ms,
        health_flags: vec![],
        deployments,
        last_reconcile_ms: None,
        storage: None,
        dropped_requests: 0,
        public_key: String::new(),
    };
    serde_json::to_vec(&hb).expect("a heartbeat serializes")
}

impl Drop for Hollow {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
