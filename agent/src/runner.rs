//! The one seam through which the agent starts processes.
//!
//! Everything that runs a program (podman today) goes through [`CommandRunner`], so unit tests
//! drive the executor with a [`RecordingRunner`] and never touch the host. `Command::new` is
//! banned elsewhere by clippy's `disallowed_methods` (see `clippy.toml`).

use std::{collections::VecDeque, io, sync::Mutex};

/// What a finished process left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CmdOutput {
    /// The exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The last non-empty line of stderr: podman puts its `Error: ...` there.
    pub fn error_line(&self) -> String {
        let stderr = String::from_utf8_lossy(&self.stderr);
        let line = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        if line.is_empty() {
            format!("exited with {:?} and no message", self.code)
        } else {
            line.to_owned()
        }
    }
}

/// Runs a program to completion and captures its output.
pub trait CommandRunner: Send + Sync {
    fn run(
        &self,
        program: &str,
        args: &[String],
    ) -> impl Future<Output = io::Result<CmdOutput>> + Send;
}

/// Runs real processes with tokio.
#[derive(Debug, Default, Clone)]
pub struct TokioRunner;

impl CommandRunner for TokioRunner {
    async fn run(&self, program: &str, args: &[String]) -> io::Result<CmdOutput> {
        #[allow(clippy::disallowed_methods)] // This is the seam.
        let out = tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output()
            .await?;
        Ok(CmdOutput {
            code: out.status.code(),
            stdout: out.stdout,
            stderr: out.stderr,
        })
    }
}

/// A fake runner for tests: records every call and answers from a script of outputs.
#[derive(Debug, Default)]
pub struct RecordingRunner {
    calls: Mutex<Vec<String>>,
    answers: Mutex<VecDeque<CmdOutput>>,
}

impl RecordingRunner {
    /// Queues the output of the next call.
    pub fn answer(&self, code: i32, stdout: &str, stderr: &str) {
        self.answers.lock().unwrap().push_back(CmdOutput {
            code: Some(code),
            stdout: stdout.as_bytes().to_vec(),
            stderr: stderr.as_bytes().to_vec(),
        });
    }

    /// Every call so far, each as `program arg arg ...`.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl CommandRunner for RecordingRunner {
    async fn run(&self, program: &str, args: &[String]) -> io::Result<CmdOutput> {
        self.calls.lock().unwrap().push(
            std::iter::once(program)
                .chain(args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" "),
        );
        // An unscripted call succeeds silently, like most podman subcommands.
        Ok(self
            .answers
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(CmdOutput {
                code: Some(0),
                ..Default::default()
            }))
    }
}
