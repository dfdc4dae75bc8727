//! What can go wrong, each failure naming the operation and what it was done on: the file and
//! its path, the tool with its arguments and what it said, the upgrade state that forbids a
//! command. In the initramfs this text is all a person sees on the console, so "No such file
//! or directory" alone is never enough.

use std::{
    fmt, io,
    path::{Path, PathBuf},
    time::Duration,
};

use fleet_contracts::boot::Corrupt;

/// The bootguard's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failure of the bootguard or of one of its commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed (`op` is a verb: "read", "create", "rename ... over").
    #[error("cannot {op} {}: {source}", path.display())]
    File {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A tool (lvm, thin_check) did not start, did not end in time, or failed.
    #[error("{command}: {failure}")]
    Tool {
        /// The command line as run (`lvm lvconvert --merge vg0/root_preupgrade`).
        command: String,
        failure: ToolFailure,
    },
    /// The state file is there but cannot be read.
    #[error("{}: {corrupt}", path.display())]
    Corrupt { path: PathBuf, corrupt: Corrupt },
    /// The known-good copy's manifest is there but not in its format.
    #[error("{}: not a manifest of sha256, size and path lines", path.display())]
    Manifest { path: PathBuf },
    /// The upgrade is not in a state that allows the command (`no upgrade to commit`).
    #[error("{0}")]
    Refused(String),
    /// A logical volume is not as the command needs it (`snapshot root_preupgrade exists
    /// already`, `root still does not activate after the repair: ...`).
    #[error("{lv}: {problem}")]
    Volume { lv: String, problem: String },
    /// The command line is not one the bootguard knows.
    #[error("{0}")]
    Usage(String),
}

/// How a tool failed.
#[derive(Debug)]
pub enum ToolFailure {
    /// It could not be started (not installed, not executable).
    CannotStart(io::Error),
    /// It was killed after this long without a result.
    TimedOut { after: Duration },
    /// It ended with a failure; what it said on stderr and stdout.
    Failed { status: Option<i32>, said: String },
    /// Its output could not be collected while it ran.
    Io(io::Error),
}

impl fmt::Display for ToolFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToolFailure::CannotStart(e) => write!(f, "cannot start it: {e}"),
            ToolFailure::TimedOut { after } => write!(f, "no result after {after:?}; killed"),
            ToolFailure::Failed { status, said } => {
                match status {
                    Some(code) => write!(f, "exit {code}")?,
                    None => f.write_str("killed by a signal")?,
                }
                if said.is_empty() {
                    Ok(())
                } else {
                    write!(f, ": {said}")
                }
            }
            ToolFailure::Io(e) => write!(f, "cannot read its output: {e}"),
        }
    }
}

impl Error {
    /// A refusal of a command, in words for people.
    pub fn refused(why: impl Into<String>) -> Error {
        Error::Refused(why.into())
    }

    /// Whether this is a file that is not there (a known-good copy never finished).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::File { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

/// Names the operation and the path of a failed file operation.
pub trait At<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T, Error>;
}

impl<T> At<T> for io::Result<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T, Error> {
        self.map_err(|source| Error::File {
            op,
            path: path.to_owned(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_operation_and_what_it_was_done_on() {
        let missing: io::Result<()> = Err(io::Error::from(io::ErrorKind::NotFound));
        let e = missing
            .at("read", Path::new("/boot/firmware/rollback/state"))
            .unwrap_err();
        assert!(e.is_not_found());
        assert!(
            e.to_string()
                .starts_with("cannot read /boot/firmware/rollback/state: "),
            "{e}"
        );
        let tool = Error::Tool {
            command: "lvm lvconvert --merge vg0/root_preupgrade".into(),
            failure: ToolFailure::Failed {
                status: Some(5),
                said: "Volume group \"vg0\" not found".into(),
            },
        };
        assert_eq!(
            tool.to_string(),
            "lvm lvconvert --merge vg0/root_preupgrade: exit 5: Volume group \"vg0\" not found"
        );
        let timed_out = Error::Tool {
            command: "thin_check /dev/mapper/vg0-pool_tmeta".into(),
            failure: ToolFailure::TimedOut {
                after: Duration::from_secs(300),
            },
        };
        assert_eq!(
            timed_out.to_string(),
            "thin_check /dev/mapper/vg0-pool_tmeta: no result after 300s; killed"
        );
    }
}
