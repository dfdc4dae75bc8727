//! The boot (FAT) partition as the bootguard and the upgrade commands see it: the state file,
//! the known-good copy of the boot files with its manifest, and an event log.
//!
//! ```text
//! <boot>/rollback/state              the upgrade state (fleet_contracts::boot), replaced whole
//! <boot>/rollback/checks             what the storage checks found (checks.rs), replaced whole
//! <boot>/rollback/events             one line per decision, for people (bounded)
//! <boot>/rollback/boot-prev/MANIFEST "<sha256> <size> <path>" per file, written last
//! <boot>/rollback/boot-prev/<path>   the copies
//! ```
//!
//! Every write goes to a temporary file, is fsynced, renamed over the old one, and the folder
//! is fsynced: a power cut leaves the old or the new file. `rollback/` and `fleet/` (the
//! device's first-boot settings) are never part of the known-good set and never removed by a
//! restore.

use std::{
    collections::BTreeSet,
    fs::{self, File, OpenOptions},
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

use crate::{
    KnownGood,
    checks::{Checks, Unreadable},
    error::{At, Error},
};
use fleet_contracts::boot::{BootState, Corrupt};

/// Folders of the boot partition that belong to the device, not to the OS's boot set.
const KEEP: [&str; 2] = ["rollback", "fleet"];
const MANIFEST: &str = "MANIFEST";
/// The event log is cut to its newer half past this size.
const EVENTS_MAX: u64 = 64 * 1024;

/// A mounted boot partition.
#[derive(Debug, Clone)]
pub struct BootPartition {
    root: PathBuf,
}

/// One file of the known-good set.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    digest: String,
    size: u64,
    path: String,
}

impl BootPartition {
    pub fn new(root: impl Into<PathBuf>) -> BootPartition {
        BootPartition { root: root.into() }
    }

    fn rollback(&self) -> PathBuf {
        self.root.join("rollback")
    }

    fn prev(&self) -> PathBuf {
        self.rollback().join("boot-prev")
    }

    /// The state file: `Ok(None)` when there is none.
    pub fn read_state(&self) -> Result<Result<Option<BootState>, Corrupt>, Error> {
        let path = self.rollback().join("state");
        match fs::read(&path) {
            Ok(bytes) => Ok(match String::from_utf8(bytes) {
                Ok(text) => BootState::parse(&text).map(Some),
                Err(_) => Err(Corrupt("the state file is not text".into())),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Ok(None)),
            Err(e) => Err(e).at("read", &path),
        }
    }

    /// The state file, for a command that needs a readable one: a corrupt file is an error
    /// naming it.
    pub fn state(&self) -> Result<Option<BootState>, Error> {
        self.read_state()?.map_err(|corrupt| Error::Corrupt {
            path: self.rollback().join("state"),
            corrupt,
        })
    }

    pub fn write_state(&self, state: &BootState) -> Result<(), Error> {
        self.make_rollback()?;
        write_atomic(&self.rollback().join("state"), state.render().as_bytes())
    }

    /// The storage check record: `Ok(None)` when there is none (nothing was ever found).
    pub fn read_checks(&self) -> Result<Result<Option<Checks>, Unreadable>, Error> {
        let path = self.rollback().join("checks");
        match fs::read(&path) {
            Ok(bytes) => Ok(match String::from_utf8(bytes) {
                Ok(text) => Checks::parse(&text).map(Some),
                Err(_) => Err(Unreadable("the file is not text".into())),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Ok(None)),
            Err(e) => Err(e).at("read", &path),
        }
    }

    pub fn write_checks(&self, checks: &Checks) -> Result<(), Error> {
        self.make_rollback()?;
        write_atomic(&self.rollback().join("checks"), checks.render().as_bytes())
    }

    fn make_rollback(&self) -> Result<(), Error> {
        let dir = self.rollback();
        fs::create_dir_all(&dir).at("create the folder", &dir)
    }

    /// Appends a line to `rollback/events`, keeping the file under 64 KiB.
    pub fn log_event(&self, line: &str) -> Result<(), Error> {
        self.make_rollback()?;
        let path = self.rollback().join("events");
        let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if size > EVENTS_MAX {
            let old = fs::read(&path).at("read", &path)?;
            let half = &old[old.len() / 2..];
            let start = half
                .iter()
                .position(|b| *b == b'\n')
                .map_or(half.len(), |i| i + 1);
            write_atomic(&path, &half[start..])?;
        }
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .at("open", &path)?;
        writeln!(f, "{}", line.replace('\n', " ")).at("append to", &path)?;
        f.sync_all().at("fsync", &path)
    }

    /// Whether the known-good copy is there and whole.
    pub fn known_good(&self) -> Result<KnownGood, Error> {
        let path = self.prev().join(MANIFEST);
        let manifest = match fs::read_to_string(&path) {
            Ok(m) => m,
            // A copy without its manifest was never finished: there is nothing to restore.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(KnownGood::Missing),
            Err(e) => return Err(e).at("read", &path),
        };
        let Some(entries) = parse_manifest(&manifest) else {
            return Ok(KnownGood::Incomplete);
        };
        for entry in &entries {
            let copy = self.prev().join(&entry.path);
            match digest_file(&copy) {
                Ok((digest, size)) if digest == entry.digest && size == entry.size => {}
                Ok(_) => return Ok(KnownGood::Incomplete),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Ok(KnownGood::Incomplete);
                }
                Err(e) => return Err(e).at("read", &copy),
            }
        }
        Ok(KnownGood::Complete)
    }

    /// Copies the boot set (every file outside `rollback/` and `fleet/`) into
    /// `rollback/boot-prev/`, the manifest last. Returns the number of files.
    pub fn save_known_good(&self) -> Result<usize, Error> {
        let prev = self.prev();
        if prev.exists() {
            fs::remove_dir_all(&prev).at("remove the old copy", &prev)?;
        }
        let mut manifest = String::new();
        let files = self.boot_set()?;
        for rel in &files {
            let dest = prev.join(rel);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).at("create the folder", parent)?;
            }
            let src = self.root.join(rel);
            fs::copy(&src, &dest).map_err(|source| Error::File {
                op: "copy",
                path: src.clone(),
                source: io::Error::new(source.kind(), format!("to {}: {source}", dest.display())),
            })?;
            File::open(&dest)
                .and_then(|f| f.sync_all())
                .at("fsync", &dest)?;
            let (digest, size) = digest_file(&dest).at("read", &dest)?;
            manifest.push_str(&format!("{digest} {size} {rel}\n"));
        }
        write_atomic(&prev.join(MANIFEST), manifest.as_bytes())?;
        Ok(files.len())
    }

    /// Puts the known-good files back: each file through a temporary copy and a rename,
    /// `config.txt` last, files the copy does not have removed, then the copy itself removed.
    /// Repeating it after a power cut gives the same result.
    pub fn restore_known_good(&self) -> Result<usize, Error> {
        let path = self.prev().join(MANIFEST);
        let manifest = fs::read_to_string(&path).at("read", &path)?;
        let entries = parse_manifest(&manifest).ok_or(Error::Manifest { path })?;
        let wanted: BTreeSet<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        for stale in self.boot_set()? {
            if !wanted.contains(stale.as_str()) {
                let stale = self.root.join(&stale);
                fs::remove_file(&stale).at("remove", &stale)?;
            }
        }
        let (last, first): (Vec<&Entry>, Vec<&Entry>) =
            entries.iter().partition(|e| e.path == "config.txt");
        for entry in first.iter().chain(last.iter()) {
            let dest = self.root.join(&entry.path);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).at("create the folder", parent)?;
            }
            let copy = self.prev().join(&entry.path);
            let bytes = fs::read(&copy).at("read", &copy)?;
            write_atomic(&dest, &bytes)?;
        }
        sync_dir(&self.root)?;
        fs::remove_dir_all(self.prev()).at("remove", &self.prev())?;
        sync_dir(&self.rollback())?;
        Ok(entries.len())
    }

    /// Removes the known-good copy (after a commit).
    pub fn drop_known_good(&self) -> Result<(), Error> {
        match fs::remove_dir_all(self.prev()) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e).at("remove", &self.prev()),
            _ => sync_dir(&self.rollback()),
        }
    }

    /// Every file of the boot set, relative to the root, sorted.
    fn boot_set(&self) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        walk(&self.root, "", &mut out)?;
        out.sort();
        Ok(out)
    }
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) -> Result<(), Error> {
    for entry in fs::read_dir(dir).at("list", dir)? {
        let entry = entry.at("list", dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if prefix.is_empty() && KEEP.iter().any(|k| k.eq_ignore_ascii_case(&name)) {
            continue;
        }
        let rel = format!("{prefix}{name}");
        if entry.file_type().at("stat", &entry.path())?.is_dir() {
            walk(&entry.path(), &format!("{rel}/"), out)?;
        } else {
            out.push(rel);
        }
    }
    Ok(())
}

fn parse_manifest(text: &str) -> Option<Vec<Entry>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let mut parts = line.splitn(3, ' ');
            let digest = parts.next()?.to_owned();
            let size = parts.next()?.parse().ok()?;
            let path = parts.next()?.to_owned();
            let sane = digest.len() == 64
                && !path.starts_with('/')
                && !path.split('/').any(|c| c == ".." || c.is_empty());
            sane.then_some(Entry { digest, size, path })
        })
        .collect()
}

fn digest_file(path: &Path) -> io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((hex, size))
}

/// Write `<path>.tmp`, fsync, rename over `path`, fsync the renamed file and the folder.
///
/// The fsync after the rename matters on vfat: its rename only marks the moved inode dirty,
/// and the directory entry naming the new clusters is written with that inode, not with the
/// folder. Without it, a reboot soon after left `config.txt` pointing at the clusters of the
/// file it replaced, already freed (seen under QEMU in the bootguard test).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .at("write", &tmp)?;
    fs::rename(&tmp, path).at("rename the new copy over", path)?;
    File::open(path)
        .and_then(|f| f.sync_all())
        .at("fsync", path)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .at("fsync the folder", dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_contracts::boot::Phase;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    fn temp(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("bootguard-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn boot_files(root: &Path, kernel: &str) {
        fs::create_dir_all(root.join("overlays")).unwrap();
        fs::write(root.join("config.txt"), format!("kernel={kernel}\n")).unwrap();
        fs::write(root.join("cmdline.txt"), "root=/dev/mapper/vg0-root\n").unwrap();
        fs::write(root.join(kernel), kernel.repeat(1000)).unwrap();
        fs::write(root.join("overlays/a.dtbo"), "overlay").unwrap();
        fs::create_dir_all(root.join("fleet")).unwrap();
        fs::write(root.join("fleet/device.toml"), "nats_url = \"x\"\n").unwrap();
    }

    #[test]
    fn failed_file_operations_name_the_operation_and_the_path() {
        let dir = temp("errors");
        let part = BootPartition::new(&dir.0);
        let missing = dir.0.join("rollback/boot-prev/MANIFEST");
        let err = part.restore_known_good().unwrap_err();
        assert!(err.is_not_found(), "{err:?}");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read {}: ", missing.display())),
            "{err}"
        );
        fs::create_dir_all(dir.0.join("rollback/boot-prev")).unwrap();
        fs::write(&missing, "not a manifest\n").unwrap();
        assert_eq!(
            part.restore_known_good().unwrap_err().to_string(),
            format!(
                "{}: not a manifest of sha256, size and path lines",
                missing.display()
            )
        );
        fs::write(dir.0.join("rollback/state"), "phase=maybe\n").unwrap();
        assert_eq!(
            part.state().unwrap_err().to_string(),
            format!(
                "{}: the upgrade state file is unreadable: unknown phase \"maybe\"",
                dir.0.join("rollback/state").display()
            )
        );
    }

    #[test]
    fn state_round_trips_and_a_missing_file_is_none() {
        let dir = temp("state");
        let boot = BootPartition::new(&dir.0);
        assert_eq!(boot.read_state().unwrap(), Ok(None));
        let state = BootState {
            phase: Phase::Pending,
            boot_count: 2,
            upgrade_id: "u7".into(),
            ..BootState::default()
        };
        boot.write_state(&state).unwrap();
        assert_eq!(boot.read_state().unwrap(), Ok(Some(state)));
        assert!(!dir.0.join("rollback/state.tmp").exists());
        fs::write(dir.0.join("rollback/state"), [0xff, 0xfe]).unwrap();
        assert!(boot.read_state().unwrap().is_err());
    }

    #[test]
    fn a_saved_boot_set_restores_exactly_and_keeps_the_devices_own_files() {
        let dir = temp("restore");
        let boot = BootPartition::new(&dir.0);
        boot_files(&dir.0, "vmlinuz-1");
        assert_eq!(boot.known_good().unwrap(), KnownGood::Missing);
        assert_eq!(boot.save_known_good().unwrap(), 4);
        assert_eq!(boot.known_good().unwrap(), KnownGood::Complete);
        let before = boot.boot_set().unwrap();
        let config_before = fs::read(dir.0.join("config.txt")).unwrap();

        // The upgrade: a new kernel, a rewritten config.txt, an overlay gone.
        fs::remove_file(dir.0.join("vmlinuz-1")).unwrap();
        fs::remove_file(dir.0.join("overlays/a.dtbo")).unwrap();
        boot_files(&dir.0, "vmlinuz-2");
        fs::remove_file(dir.0.join("overlays/a.dtbo")).unwrap();
        fs::write(dir.0.join("fleet/device.toml"), "changed by the user\n").unwrap();

        assert_eq!(boot.restore_known_good().unwrap(), 4);
        assert_eq!(boot.boot_set().unwrap(), before);
        assert_eq!(fs::read(dir.0.join("config.txt")).unwrap(), config_before);
        assert_eq!(
            fs::read_to_string(dir.0.join("fleet/device.toml")).unwrap(),
            "changed by the user\n"
        );
        assert_eq!(boot.known_good().unwrap(), KnownGood::Missing);
    }

    #[test]
    fn a_damaged_copy_is_incomplete() {
        let dir = temp("damaged");
        let boot = BootPartition::new(&dir.0);
        boot_files(&dir.0, "vmlinuz-1");
        boot.save_known_good().unwrap();
        fs::write(dir.0.join("rollback/boot-prev/vmlinuz-1"), "truncated").unwrap();
        assert_eq!(boot.known_good().unwrap(), KnownGood::Incomplete);
        fs::remove_file(dir.0.join("rollback/boot-prev/vmlinuz-1")).unwrap();
        assert_eq!(boot.known_good().unwrap(), KnownGood::Incomplete);
        fs::write(dir.0.join("rollback/boot-prev/MANIFEST"), "nonsense\n").unwrap();
        assert_eq!(boot.known_good().unwrap(), KnownGood::Incomplete);
        fs::remove_file(dir.0.join("rollback/boot-prev/MANIFEST")).unwrap();
        assert_eq!(boot.known_good().unwrap(), KnownGood::Missing);
    }

    #[test]
    fn the_event_log_stays_bounded_and_keeps_the_newest_lines() {
        let dir = temp("events");
        let boot = BootPartition::new(&dir.0);
        for i in 0..3000 {
            boot.log_event(&format!("event {i} with some words to fill the line"))
                .unwrap();
        }
        let log = fs::read_to_string(dir.0.join("rollback/events")).unwrap();
        assert!(log.len() as u64 <= EVENTS_MAX + 100, "{} bytes", log.len());
        assert!(log.ends_with("event 2999 with some words to fill the line\n"));
        assert!(log.lines().all(|l| l.starts_with("event ")));
    }
}
