//! A local apt repository for the device scenarios: real `.deb` packages built with
//! `dpkg-deb` (good versions and versions made bad on purpose), a flat repository index
//! (`Packages`, `Release`) and a small HTTP server on the host's loopback, which the guest
//! reaches as `10.0.2.2` through QEMU's user network. The guest's apt reads it exactly as it
//! reads a Debian mirror (`deb [trusted=yes] http://10.0.2.2:PORT/ ./`; the index is not
//! signed, the `trusted=yes` option says so).

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use anyhow::{Context, Result, ensure};
use sha2::{Digest, Sha256};

/// One package to build: its files (path in the root, contents) and an optional `postinst`.
#[derive(Debug, Clone)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub files: Vec<(String, String)>,
    pub postinst: Option<String>,
}

impl Package {
    pub fn new(name: &str, version: &str) -> Package {
        Package {
            name: name.into(),
            version: version.into(),
            files: Vec::new(),
            postinst: None,
        }
    }

    pub fn file(mut self, path: &str, contents: &str) -> Package {
        self.files.push((path.into(), contents.into()));
        self
    }
}

/// The repository, served while it lives.
#[derive(Debug)]
pub struct AptRepo {
    pub dir: PathBuf,
    pub port: u16,
    stop: Arc<AtomicBool>,
    /// Files served so far (what apt fetched).
    pub served: Arc<AtomicUsize>,
}

impl AptRepo {
    /// Builds `packages` into `dir` and serves them on 127.0.0.1.
    pub fn start(dir: &Path, packages: &[Package]) -> Result<AptRepo> {
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir)?;
        let mut index = String::new();
        for p in packages {
            let deb = build(dir, p)?;
            let bytes = fs::read(&deb)?;
            let control = Command::new("dpkg-deb")
                .arg("-f")
                .arg(&deb)
                .output()
                .context("dpkg-deb -f")?;
            ensure!(control.status.success(), "dpkg-deb -f {}", deb.display());
            index.push_str(String::from_utf8(control.stdout)?.trim_end());
            let file = deb.file_name().unwrap().to_string_lossy();
            writeln!(
                index,
                "\nFilename: ./{file}\nSize: {}\nSHA256: {}\n",
                bytes.len(),
                hex(&Sha256::digest(&bytes))
            )?;
        }
        fs::write(dir.join("Packages"), &index)?;
        let date = Command::new("date").args(["-u", "-R"]).output()?;
        let release = format!(
            "Origin: fleet-tests\nLabel: fleet-tests\nSuite: fleet-tests\nCodename: fleet-tests\n\
             Date: {}\nArchitectures: arm64 all\nSHA256:\n {} {} Packages\n",
            String::from_utf8_lossy(&date.stdout).trim(),
            hex(&Sha256::digest(index.as_bytes())),
            index.len()
        );
        fs::write(dir.join("Release"), release)?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let (root, stop2, served2) = (dir.to_owned(), stop.clone(), served.clone());
        // Blocking accepts; dropping the repository sets `stop` and wakes the last one.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(stream) = stream
                    && serve(&root, stream).unwrap_or(false)
                {
                    served2.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(AptRepo {
            dir: dir.to_owned(),
            port,
            stop,
            served,
        })
    }

    /// The apt source line the guest uses.
    pub fn source(&self) -> String {
        format!("deb [trusted=yes] http://10.0.2.2:{}/ ./", self.port)
    }
}

impl Drop for AptRepo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Answers one request (`GET /file`), then closes: apt opens a new connection when it must.
/// Returns whether a file was sent.
fn serve(root: &Path, mut stream: TcpStream) -> Result<bool> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let mut words = request.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
    let name = path.trim_start_matches('/').trim_start_matches("./");
    let file = (!name.contains("..") && !name.contains('/') && !name.is_empty())
        .then(|| root.join(name))
        .filter(|p| p.is_file());
    match file {
        Some(p) => {
            let body = fs::read(p)?;
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            if method != "HEAD" {
                stream.write_all(&body)?;
            }
            Ok(true)
        }
        None => {
            stream.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )?;
            Ok(false)
        }
    }
}

/// `dpkg-deb --build` of one package (architecture `all`).
fn build(dir: &Path, p: &Package) -> Result<PathBuf> {
    let tree = dir.join(format!("build-{}-{}", p.name, p.version));
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(tree.join("DEBIAN"))?;
    fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: {}\nVersion: {}\nArchitecture: all\nMaintainer: Fleet tests <tests@fleet.invalid>\n\
             Section: misc\nPriority: optional\nDescription: made by Fleet's QEMU tests\n",
            p.name, p.version
        ),
    )?;
    if let Some(script) = &p.postinst {
        let path = tree.join("DEBIAN/postinst");
        fs::write(&path, script)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    for (path, contents) in &p.files {
        let at = tree.join(path.trim_start_matches('/'));
        fs::create_dir_all(at.parent().unwrap())?;
        fs::write(at, contents)?;
    }
    let deb = dir.join(format!("{}_{}_all.deb", p.name, p.version));
    let out = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "--build"])
        .arg(&tree)
        .arg(&deb)
        .output()
        .context("dpkg-deb --build")?;
    ensure!(
        out.status.success(),
        "dpkg-deb --build {}: {}",
        p.name,
        String::from_utf8_lossy(&out.stderr)
    );
    fs::remove_dir_all(&tree)?;
    Ok(deb)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn get(port: u16, path: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn the_repository_indexes_real_packages_and_serves_only_its_files() {
        let dir = std::env::temp_dir().join(format!("fleet-apt-{}", std::process::id()));
        let repo = AptRepo::start(
            &dir,
            &[Package::new("fleet-test-marker", "2").file("/usr/share/fleet-test/marker", "2\n")],
        )
        .unwrap();
        let packages = get(repo.port, "/./Packages");
        assert!(packages.starts_with("HTTP/1.1 200"), "{packages}");
        assert!(
            packages.contains("Package: fleet-test-marker\nVersion: 2\n"),
            "{packages}"
        );
        assert!(
            packages.contains("Filename: ./fleet-test-marker_2_all.deb"),
            "{packages}"
        );
        let release = get(repo.port, "/Release");
        let index = fs::read(dir.join("Packages")).unwrap();
        assert!(release.contains(&hex(&Sha256::digest(&index))), "{release}");
        assert!(get(repo.port, "/../etc/passwd").starts_with("HTTP/1.1 404"));
        assert!(get(repo.port, "/nope").starts_with("HTTP/1.1 404"));
        assert_eq!(
            repo.source(),
            format!("deb [trusted=yes] http://10.0.2.2:{}/ ./", repo.port)
        );
        drop(repo);
        fs::remove_dir_all(dir).unwrap();
    }
}
