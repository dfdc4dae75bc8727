//! Processes: the workspace binaries and tools, a child process that prints its log when a
//! test failed and stops on drop, waiting on a condition, peak memory.
#![allow(clippy::disallowed_methods)] // A harness starts processes and reads clocks.

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// Set when a wait timed out, so processes print their logs as they stop (tests return
/// errors instead of panicking, so `std::thread::panicking` alone would miss them).
pub(crate) static FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

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
