//! A podman sandbox per agent: its own storage, removed on drop.
#![allow(clippy::disallowed_methods)] // A harness starts processes and reads clocks.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Result, bail};

use crate::*;

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
