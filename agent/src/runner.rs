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

    /// Starts a long-running program and hands back its output line by line (standard output
    /// and standard error merged); dropping the [`Lines`] kills it.
    fn spawn_lines(&self, program: &str, args: &[String]) -> io::Result<Lines>;
}

/// The output of a running program, line by line; the program dies with it.
#[derive(Debug)]
pub struct Lines {
    rx: tokio::sync::mpsc::Receiver<String>,
    _child: Option<tokio::process::Child>,
}

impl Lines {
    /// The next line; `None` once the program's output ended.
    pub async fn next(&mut self) -> Option<String> {
        self.rx.recv().await
    }

    /// Lines from a script, for tests.
    pub fn scripted(lines: Vec<String>) -> Lines {
        let (tx, rx) = tokio::sync::mpsc::channel(lines.len().max(1));
        for l in lines {
            let _ = tx.try_send(l);
        }
        Lines { rx, _child: None }
    }
}

/// Runs real processes with tokio.
#[derive(Debug, Default, Clone)]
pub struct TokioRunner;

impl CommandRunner for TokioRunner {
    fn spawn_lines(&self, program: &str, args: &[String]) -> io::Result<Lines> {
        use tokio::io::BufReader;
        #[allow(clippy::disallowed_methods)] // This is the seam.
        let mut child = tokio::process::Command::new(program)
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        // A small buffer: when the reader stops reading, the program blocks on its pipe, so a
        // slow follower never makes this process buffer without bound.
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(BufReader::new(out), tx.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(BufReader::new(err), tx));
        }
        Ok(Lines {
            rx,
            _child: Some(child),
        })
    }

    async fn run(&self, program: &str, args: &[String]) -> io::Result<CmdOutput> {
        #[allow(clippy::disallowed_methods)] // This is the seam.
        // systemd's notify socket is the agent's alone: podman (conmon) would otherwise speak
        // for the service on it.
        let out = tokio::process::Command::new(program)
            .args(args)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
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

async fn forward_lines<R: tokio::io::AsyncBufRead + Unpin>(
    mut reader: R,
    tx: tokio::sync::mpsc::Sender<String>,
) {
    while let Ok(Some(line)) =
        read_bounded_line(&mut reader, fleet_contracts::rpc::MAX_LINE_BYTES).await
    {
        if tx.send(line).await.is_err() {
            break;
        }
    }
}

/// Reads one line, keeping at most `max` bytes of it: a gigabyte without a newline costs
/// `max` bytes of memory, not a gigabyte. A cut line ends with " [line cut at N bytes]".
pub async fn read_bounded_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> io::Result<Option<String>> {
    use tokio::io::AsyncBufReadExt;
    let mut line = Vec::new();
    let mut cut = false;
    let mut read_any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            break;
        }
        read_any = true;
        let (part, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        let room = max.saturating_sub(line.len());
        line.extend_from_slice(&part[..part.len().min(room)]);
        cut |= part.len() > room;
        let used = done.unwrap_or(available.len());
        reader.consume(used);
        if done.is_some() {
            break;
        }
    }
    if !read_any {
        return Ok(None);
    }
    let mut text = String::from_utf8_lossy(&line).into_owned();
    if cut {
        text.push_str(&format!(" [line cut at {max} bytes]"));
    }
    Ok(Some(text))
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
    fn spawn_lines(&self, program: &str, args: &[String]) -> io::Result<Lines> {
        self.calls.lock().unwrap().push(
            std::iter::once(program)
                .chain(args.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" "),
        );
        Ok(Lines::scripted(vec![]))
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_lines_cut_long_lines_and_keep_going() {
        let mut input: &[u8] = b"short\nabcdefghij\n\nlast";
        let mut got = Vec::new();
        while let Some(l) = read_bounded_line(&mut input, 4).await.unwrap() {
            got.push(l);
        }
        assert_eq!(
            got,
            [
                "shor [line cut at 4 bytes]",
                "abcd [line cut at 4 bytes]",
                "",
                "last"
            ]
        );
    }
}
