//! One emulated Raspberry Pi: a copy-on-write overlay of the built image, booted again and
//! again by `qemu-system-aarch64 -M virt` (TCG) the way the Pi firmware boots a card.
//!
//! Every boot starts with the emulated firmware ([`crate::firmware`]) reading the boot
//! partition *of the overlay* (so what the guest or the bootguard wrote there counts), and
//! QEMU runs with `-action reboot=shutdown`: a reboot, a panic's reboot and a watchdog reset
//! all end the QEMU process, and its QMP events say which (`WATCHDOG` before `SHUTDOWN` for
//! a watchdog reset, `SHUTDOWN` with `guest-reset` for a reboot, `guest-shutdown` for a power
//! off). Killing QEMU is a power cut. The i6300esb watchdog is the board's hardware watchdog,
//! the serial console goes to `console-<boot>.log`, SSH is forwarded from 127.0.0.1, and the
//! guest reaches the host's loopback as 10.0.2.2 (QEMU user networking) unless the network is
//! cut for that boot.

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::firmware;

/// How a boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// The guest rebooted (`reboot`, or the kernel's reboot after a panic).
    Reboot,
    /// The hardware watchdog expired and reset the board.
    WatchdogReset,
    PowerOff,
    /// The test pulled the plug.
    PowerCut,
    /// QEMU ended without saying why.
    Other(String),
}

/// The guest's network for one boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// SSH in, and the host's loopback reachable as 10.0.2.2.
    Connected,
    /// SSH in only: the guest reaches nothing (`restrict=on`).
    Cut,
}

/// The first partition of an MBR disk: (byte offset, byte length).
fn boot_partition(image: &Path) -> Result<(u64, u64)> {
    let mut mbr = [0u8; 512];
    use std::io::Read;
    fs::File::open(image)?.read_exact(&mut mbr)?;
    ensure!(
        mbr[510..512] == [0x55, 0xaa],
        "{} has no MBR",
        image.display()
    );
    let entry = &mbr[446..462];
    let start = u32::from_le_bytes(entry[8..12].try_into()?) as u64;
    let sectors = u32::from_le_bytes(entry[12..16].try_into()?) as u64;
    ensure!(sectors > 0, "{} has no first partition", image.display());
    Ok((start * 512, sectors * 512))
}

#[derive(Debug)]
pub struct Vm {
    pub dir: PathBuf,
    overlay: PathBuf,
    boot_part: (u64, u64),
    key: PathBuf,
    pub ssh_port: u16,
    /// The host's port forwarded to the guest's 8080 (where the scenarios' workload listens).
    pub http_port: u16,
    qemu: Option<Child>,
    events: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Boots so far, and how each ended (the running one is not in it yet).
    pub exits: Vec<Exit>,
    tryboot: bool,
}

impl Vm {
    /// A new device in `dir` from the built `image`, with an SSH key for root written to the
    /// boot partition (`fleet/authorized_keys`).
    pub fn new(image: &Path, dir: &Path) -> Result<Vm> {
        ensure!(
            image.exists(),
            "no image at {}: build it with scripts/image.sh",
            image.display()
        );
        fs::create_dir_all(dir)?;
        let overlay = dir.join("disk.qcow2");
        run(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(fs::canonicalize(image)?)
                .arg(&overlay),
            "creating the overlay",
        )?;
        let key = dir.join("id_ed25519");
        run(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&key),
            "making an SSH key",
        )?;
        let vm = Vm {
            dir: dir.to_owned(),
            overlay,
            boot_part: boot_partition(image)?,
            key: key.clone(),
            ssh_port: fleet_e2e::free_port(),
            http_port: fleet_e2e::free_port(),
            qemu: None,
            events: Arc::default(),
            exits: Vec::new(),
            tryboot: false,
        };
        let public = fs::read(key.with_extension("pub"))?;
        vm.write_boot_files(&[("fleet/authorized_keys", &public)])?;
        Ok(vm)
    }

    fn fat(&self) -> PathBuf {
        self.dir.join("boot.vfat")
    }

    /// Copies the overlay's boot partition out to `boot.vfat`.
    fn extract_boot(&self) -> Result<()> {
        let (offset, len) = self.boot_part;
        ensure!(
            offset % (1 << 20) == 0 && len % (1 << 20) == 0,
            "boot partition not MiB-aligned"
        );
        let _ = fs::remove_file(self.fat());
        // qemu-img dd counts `count` from the start of the input, skipped blocks included.
        run(
            Command::new("qemu-img")
                .args(["dd", "-f", "qcow2", "-O", "raw", "bs=1M"])
                .arg(format!("skip={}", offset >> 20))
                .arg(format!("count={}", (offset + len) >> 20))
                .arg(format!("if={}", self.overlay.display()))
                .arg(format!("of={}", self.fat().display())),
            "reading the boot partition",
        )?;
        let got = fs::metadata(self.fat())?.len();
        ensure!(
            got == len,
            "read {got} bytes of the boot partition, not {len}"
        );
        Ok(())
    }

    /// Every file on the boot partition (after [`Vm::extract_boot`]).
    fn boot_listing(&self) -> Result<BTreeSet<String>> {
        let out = run(
            Command::new("mdir")
                .args(["-b", "-/", "-i"])
                .arg(self.fat())
                .arg("::/"),
            "listing the boot partition",
        )?;
        Ok(out
            .lines()
            .filter_map(|l| l.trim().strip_prefix("::/"))
            .filter(|l| !l.ends_with('/'))
            .map(str::to_owned)
            .collect())
    }

    /// A file from the boot partition as it is now.
    pub fn read_boot_file(&self, path: &str) -> Result<Vec<u8>> {
        self.extract_boot()?;
        self.fat_read(path)
    }

    fn fat_read(&self, path: &str) -> Result<Vec<u8>> {
        let out = Command::new("mtype")
            .args(["-i"])
            .arg(self.fat())
            .arg(format!("::/{path}"))
            .output()?;
        ensure!(out.status.success(), "no {path} on the boot partition");
        Ok(out.stdout)
    }

    /// Writes files onto the overlay's boot partition, as a user editing a flashed card.
    pub fn write_boot_files(&self, files: &[(&str, &[u8])]) -> Result<()> {
        ensure!(self.qemu.is_none(), "the device is running");
        self.extract_boot()?;
        for (path, bytes) in files {
            let local = self.dir.join("upload");
            fs::write(&local, bytes)?;
            let mut parent = String::new();
            for part in path.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                parent.push('/');
                parent.push_str(part);
                let _ = Command::new("mmd")
                    .arg("-i")
                    .arg(self.fat())
                    .arg(format!("::{parent}"))
                    .stderr(Stdio::null())
                    .status();
            }
            run(
                Command::new("mcopy")
                    .args(["-o", "-i"])
                    .arg(self.fat())
                    .arg(&local)
                    .arg(format!("::/{path}")),
                "writing to the boot partition",
            )?;
        }
        let (offset, len) = self.boot_part;
        run(
            Command::new("qemu-io")
                .args(["-f", "qcow2", "-c"])
                .arg(format!(
                    "write -q -s {} {offset} {len}",
                    self.fat().display()
                ))
                .arg(&self.overlay),
            "writing the boot partition back",
        )?;
        Ok(())
    }

    /// `len` bytes of the stopped device's disk from byte `offset` (4 KiB aligned).
    pub fn read_disk(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        ensure!(self.qemu.is_none(), "the device is running");
        const BS: u64 = 4096;
        ensure!(
            offset.is_multiple_of(BS) && len.is_multiple_of(BS),
            "disk reads are in 4 KiB blocks"
        );
        let out = self.dir.join("disk-read.bin");
        let _ = fs::remove_file(&out);
        // qemu-img dd counts `count` from the start of the input, skipped blocks included.
        run(
            Command::new("qemu-img")
                .args(["dd", "-f", "qcow2", "-O", "raw", &format!("bs={BS}")])
                .arg(format!("skip={}", offset / BS))
                .arg(format!("count={}", (offset + len) / BS))
                .arg(format!("if={}", self.overlay.display()))
                .arg(format!("of={}", out.display())),
            "reading the disk",
        )?;
        let bytes = fs::read(&out)?;
        let _ = fs::remove_file(&out);
        ensure!(
            bytes.len() as u64 == len,
            "read {} bytes of the disk, not {len}",
            bytes.len()
        );
        Ok(bytes)
    }

    /// Writes `bytes` onto the stopped device's disk at byte `offset`.
    pub fn write_disk(&self, offset: u64, bytes: &[u8]) -> Result<()> {
        ensure!(self.qemu.is_none(), "the device is running");
        let local = self.dir.join("disk-write.bin");
        fs::write(&local, bytes)?;
        run(
            Command::new("qemu-io")
                .args(["-f", "qcow2", "-c"])
                .arg(format!(
                    "write -q -s {} {offset} {}",
                    local.display(),
                    bytes.len()
                ))
                .arg(&self.overlay),
            "writing the disk",
        )?;
        let _ = fs::remove_file(&local);
        Ok(())
    }

    /// Powers the board on: the firmware picks kernel, initramfs and command line from the
    /// boot partition, then QEMU runs until the guest reboots, powers off or is cut.
    pub fn boot(&mut self, network: Network) -> Result<()> {
        ensure!(self.qemu.is_none(), "the device is already running");
        self.extract_boot()?;
        let files = self.boot_listing()?;
        let tryboot = std::mem::take(&mut self.tryboot);
        let config_name = if tryboot && files.contains("tryboot.txt") {
            "tryboot.txt"
        } else {
            "config.txt"
        };
        let config = String::from_utf8(self.fat_read(config_name)?)?;
        let pick = firmware::select(&config, tryboot, |f| files.contains(f))?;
        let n = self.exits.len() + 1;
        let kernel = self.dir.join("kernel");
        let initrd = self.dir.join("initrd");
        fs::write(&kernel, self.fat_read(&pick.kernel)?)?;
        if let Some(i) = &pick.initramfs {
            fs::write(&initrd, self.fat_read(i)?)?;
        }
        let cmdline = String::from_utf8(self.fat_read(&pick.cmdline_file)?)?;
        // The Pi firmware adds its own arguments too; ours name the serial console of the
        // virt board (last console= wins) and whether this is a tryboot boot.
        let append = format!(
            "{} console=ttyAMA0 rpiemu.tryboot={}",
            cmdline.trim(),
            u8::from(tryboot)
        );
        let qmp = self.dir.join("qmp.sock");
        let _ = fs::remove_file(&qmp);
        let mut net = format!(
            "user,id=net,hostfwd=tcp:127.0.0.1:{}-:22,hostfwd=tcp:127.0.0.1:{}-:8080",
            self.ssh_port, self.http_port
        );
        if network == Network::Cut {
            net.push_str(",restrict=on");
        }
        let mut cmd = Command::new("qemu-system-aarch64");
        // A CPU like the Pi 4's Cortex-A72 in what matters for speed: no pointer
        // authentication and no SVE, both slow to emulate (about 15 % of a boot).
        cmd.args([
            "-M",
            "virt",
            "-cpu",
            "max,pauth=off,sve=off",
            "-smp",
            "2",
            "-m",
            "2048",
        ])
        .args(["-display", "none", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", self.console_path(n).display()))
        .arg("-kernel")
        .arg(&kernel)
        .args(["-append", &append])
        .arg("-drive")
        .arg(format!(
            "if=none,id=disk,format=qcow2,file={}",
            self.overlay.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=disk"])
        .args(["-device", "i6300esb"])
        .args(["-action", "reboot=shutdown", "-action", "watchdog=reset"])
        .args(["-netdev", &net, "-device", "virtio-net-pci,netdev=net"])
        .args(["-device", "virtio-rng-pci"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if pick.initramfs.is_some() {
            cmd.arg("-initrd").arg(&initrd);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.join(format!("qemu-{n}.err")))?)
            .spawn()
            .context("starting qemu-system-aarch64 (scripts/bootstrap.sh installs it)")?;
        self.qemu = Some(child);
        self.events = Arc::default();
        self.listen_qmp(&qmp)?;
        Ok(())
    }

    fn listen_qmp(&mut self, socket: &Path) -> Result<()> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(_) if start.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).context("connecting to QEMU's QMP socket"),
            }
        };
        let mut writer = stream.try_clone()?;
        writer.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
        let events = self.events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && v.get("event").is_some()
                {
                    events.lock().unwrap().push(v);
                }
            }
        });
        Ok(())
    }

    pub fn console_path(&self, boot: usize) -> PathBuf {
        self.dir.join(format!("console-{boot}.log"))
    }

    /// The console of the current (or last) boot.
    pub fn console(&self) -> String {
        let n = self.exits.len() + usize::from(self.qemu.is_some());
        fs::read(self.console_path(n.max(1)))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `n` lines of the current boot's console, for failure messages.
    pub fn console_tail(&self, n: usize) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn fail<T>(&self, what: String) -> Result<T> {
        bail!(
            "{what}\n----- last lines of {} -----\n{}",
            self.console_path((self.exits.len() + usize::from(self.qemu.is_some())).max(1))
                .display(),
            self.console_tail(40)
        )
    }

    /// Waits until this boot ends, and says how.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<Exit> {
        let start = Instant::now();
        loop {
            let Some(child) = self.qemu.as_mut() else {
                bail!("the device is not running");
            };
            if let Some(status) = child.try_wait()? {
                self.qemu = None;
                let exit = self.classify(status.to_string());
                if self
                    .console()
                    .contains("Restarting system with command '0 tryboot'")
                {
                    self.tryboot = true;
                }
                self.exits.push(exit.clone());
                return Ok(exit);
            }
            if start.elapsed() > timeout {
                return self.fail(format!(
                    "boot {} did not end within {timeout:?}",
                    self.exits.len() + 1
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn classify(&self, status: String) -> Exit {
        let events = self.events.lock().unwrap();
        if events.iter().any(|e| e["event"] == "WATCHDOG") {
            return Exit::WatchdogReset;
        }
        match events
            .iter()
            .rev()
            .find(|e| e["event"] == "SHUTDOWN")
            .and_then(|e| e["data"]["reason"].as_str())
        {
            Some("guest-reset") => Exit::Reboot,
            Some("guest-shutdown") | Some("guest-panic") => Exit::PowerOff,
            Some(other) => Exit::Other(other.to_owned()),
            None => Exit::Other(status),
        }
    }

    /// Pulls the plug.
    pub fn power_cut(&mut self) {
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
            self.exits.push(Exit::PowerCut);
        }
    }

    pub fn running(&mut self) -> bool {
        matches!(self.qemu.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn ssh_command(&self, command: &str) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-i")
            .arg(&self.key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args([
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=5",
                "-o",
                "BatchMode=yes",
            ])
            .args(["-p", &self.ssh_port.to_string(), "root@127.0.0.1", command]);
        cmd
    }

    /// Runs `command` as root in the guest: (exit code, stdout and stderr).
    pub fn ssh_status(&self, command: &str) -> Result<(i32, String)> {
        let out = self.ssh_command(command).stdin(Stdio::null()).output()?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Ok((out.status.code().unwrap_or(-1), text))
    }

    /// Runs `command` as root in the guest and returns its output; a failure is an error with
    /// the output.
    pub fn ssh(&self, command: &str) -> Result<String> {
        let (code, text) = self.ssh_status(command)?;
        if code != 0 {
            bail!(
                "in the guest, `{command}` exited with {code}: {}",
                text.trim()
            );
        }
        Ok(text)
    }

    /// Waits until SSH answers in this boot (fails at once if the boot ends first).
    pub fn wait_ssh(&mut self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if !self.running() {
                let exit = self.wait_exit(Duration::from_secs(5))?;
                return self.fail(format!(
                    "the device ended its boot ({exit:?}) before SSH answered"
                ));
            }
            if let Ok((0, _)) = self.ssh_status("true") {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                return self.fail(format!("SSH did not answer within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Waits until the console of this boot shows `text`.
    pub fn wait_console(&mut self, text: &str, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if self.console().contains(text) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                return self.fail(format!(
                    "the console did not show {text:?} within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{what}: starting {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
