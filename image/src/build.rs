//! The build: three cached layers, each keyed by the hash of everything that goes into it.
//!
//! 1. **base**: `mmdebstrap` of `[base]` into a tarball (the slow part: package scripts run
//!    under qemu-user; about 17 min cold on a 2-core machine).
//! 2. **rootfs**: the base unpacked, the recipe's files, hostname and services put in, the
//!    initramfs rebuilt in a qemu-user chroot (which also lets Debian's raspi-firmware hook
//!    fill `/boot/firmware`); out come `root.ext4` (`mkfs.ext4 -d`), `boot.vfat` (mtools),
//!    and the kernel and initramfs for the helper VM. A changed agent binary rebuilds only this
//!    layer and the next.
//! 3. **disk**: the partition table (`sfdisk`), the FAT copied in, and the LVM layout made by
//!    a short-lived QEMU VM that runs the image's own kernel and `lvm` (the host kernel has no
//!    device-mapper): VG, thin pool, thin LV `root` holding `root.ext4`, LV `data`.
//!
//! Layers live under the cache folder (default `/var/cache/fleet/image`), outside the clone.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::recipe::{FIRST_PARTITION, MIB, Recipe, key, mode};

/// Bumped when a layer's making changes in a way its inputs do not show.
const BUILDER_VERSION: &str = "fleet-image 1";
const HELPER: &str = include_str!("../helper/image-helper");
const HELPER_PATH: &str = "usr/lib/fleet/image-helper";

#[derive(Debug)]
pub struct Builder {
    pub recipe: Recipe,
    pub recipe_dir: PathBuf,
    pub artifacts: BTreeMap<String, PathBuf>,
    pub cache: PathBuf,
}

/// What a build made, for the report.
#[derive(Debug)]
pub struct Built {
    pub image: PathBuf,
    pub steps: Vec<(String, Duration, bool)>,
}

impl Builder {
    pub fn build(&self, out: &Path) -> Result<Built> {
        fs::create_dir_all(&self.cache)
            .with_context(|| format!("creating the cache {}", self.cache.display()))?;
        let mut steps = Vec::new();
        let mut step = |n: usize, title: &str, f: &mut dyn FnMut() -> Result<(PathBuf, bool)>| {
            progress(&format!("[{n}/4] {title}"));
            let start = Instant::now();
            let (path, cached) = f()?;
            let took = start.elapsed();
            progress(&format!(
                "      {} {}",
                if cached { "cached:" } else { "done in" },
                if cached {
                    path.display().to_string()
                } else {
                    format!("{} ({})", human(took), path.display())
                }
            ));
            steps.push((title.to_owned(), took, cached));
            Ok::<PathBuf, anyhow::Error>(path)
        };
        let base_key = base_key(&self.recipe)?;
        let base = step(
            1,
            &format!(
                "base system: mmdebstrap {} {}, {} packages",
                self.recipe.base.suite,
                self.recipe.base.architecture,
                self.recipe.base.packages.len()
            ),
            &mut || self.base(&base_key),
        )?;
        let rootfs_key = self.rootfs_key(&base_key)?;
        let rootfs = step(
            2,
            "root file system: files, services, initramfs",
            &mut || self.rootfs(&base, &rootfs_key),
        )?;
        let disk_key = key(&[
            rootfs_key.as_bytes(),
            serde_json::to_string(&self.recipe.layout)?.as_bytes(),
            HELPER.as_bytes(),
        ]);
        let disk = step(3, "disk: partitions, LVM in a helper VM", &mut || {
            self.disk(&rootfs, &disk_key)
        })?;
        step(4, &format!("image: {}", out.display()), &mut || {
            if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir)?;
            }
            run(
                Command::new("cp")
                    .args(["--sparse=always", "--reflink=auto"])
                    .arg(&disk)
                    .arg(out),
                "copying the image",
            )?;
            // Its OS release beside it: `<image>.release.json` and `<image>.packages.tsv`.
            for file in ["release.json", "packages.tsv"] {
                fs::copy(rootfs.join(file), out.with_extension(file))
                    .with_context(|| format!("copying the image's {file}"))?;
            }
            Ok((out.to_owned(), false))
        })?;
        Ok(Built {
            image: out.to_owned(),
            steps,
        })
    }

    /// The rootfs key covers the base, the recipe's other fields and every input file's bytes.
    fn rootfs_key(&self, base_key: &str) -> Result<String> {
        let mut parts: Vec<Vec<u8>> = vec![
            base_key.as_bytes().to_vec(),
            serde_json::to_vec(&(
                &self.recipe.hostname,
                &self.recipe.services,
                &self.recipe.files,
                &self.recipe.boot_files,
                &self.recipe.layout.boot_label,
            ))?,
            HELPER.as_bytes().to_vec(),
            // What the layer holds besides the root (bumped when that changes).
            b"layer: root, release.json, packages.tsv".to_vec(),
        ];
        for spec in self.recipe.files.iter().chain(&self.recipe.boot_files) {
            let src = self
                .recipe
                .source(spec, &self.recipe_dir, &self.artifacts)?;
            parts.push(fs::read(&src).with_context(|| format!("reading {}", src.display()))?);
        }
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        Ok(key(&refs))
    }

    fn layer(&self, kind: &str, key: &str) -> PathBuf {
        self.cache
            .join(format!("{kind}-{}-{key}", self.recipe.name))
    }

    /// Removes the other layers of this kind and recipe (older inputs).
    fn prune(&self, kind: &str, keep: &Path) {
        let prefix = format!("{kind}-{}-", self.recipe.name);
        let Ok(entries) = fs::read_dir(&self.cache) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && e.path() != keep {
                let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
            }
        }
    }

    fn base(&self, key: &str) -> Result<(PathBuf, bool)> {
        let tar = self.cache.join(format!("base-{key}.tar"));
        if tar.exists() {
            return Ok((tar, true));
        }
        let b = &self.recipe.base;
        let partial = tar.with_extension("partial.tar");
        let mut cmd = Command::new("mmdebstrap");
        cmd.arg(format!("--architectures={}", b.architecture))
            .arg(format!("--variant={}", b.variant))
            .arg(format!("--components={}", b.components.join(",")))
            .arg(format!("--include={}", b.packages.join(",")))
            .arg(&b.suite)
            .arg(&partial)
            .arg(&b.mirror);
        stream(&mut cmd, "mmdebstrap", |line| line.starts_with("I: "))?;
        fs::rename(&partial, &tar)?;
        // Older bases (other package lists) are 700 MB each.
        if let Ok(entries) = fs::read_dir(&self.cache) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("base-") && name.ends_with(".tar") && e.path() != tar {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok((tar, false))
    }

    /// The image's OS release: its name in `/etc/fleet/release` (what the agent reports),
    /// and beside the layer the exact package set (`packages.tsv`: name, version,
    /// architecture) and `release.json`, the release as an OsUpgrade's `spec.release` names
    /// one (the recipe's apt source, every package pinned at its version).
    fn write_release(&self, work: &Path, layer: &Path, key: &str) -> Result<()> {
        let name = format!("{}-{}", self.recipe.name, &key[..12]);
        fs::create_dir_all(work.join("etc/fleet"))?;
        fs::write(work.join("etc/fleet/release"), format!("{name}\n"))?;
        let listing = capture(
            Command::new("dpkg-query")
                .arg(format!(
                    "--admindir={}",
                    work.join("var/lib/dpkg").display()
                ))
                .args([
                    "-W",
                    "-f",
                    "${db:Status-Abbrev}\t${Package}\t${Version}\t${Architecture}\n",
                ]),
            "listing the image's packages",
        )?;
        let mut tsv = String::new();
        let mut packages = std::collections::BTreeMap::new();
        for line in listing.lines() {
            let fields: Vec<&str> = line.split('\t').collect();
            if let [status, package, version, arch] = fields[..]
                && status.starts_with("ii")
            {
                tsv.push_str(&format!("{package}\t{version}\t{arch}\n"));
                packages.insert(package.to_owned(), version.to_owned());
            }
        }
        ensure!(
            !packages.is_empty(),
            "dpkg-query listed no installed package"
        );
        let b = &self.recipe.base;
        let release = serde_json::json!({
            "name": name,
            "sources": [format!("deb {} {} {}", b.mirror, b.suite, b.components.join(" "))],
            "packages": packages,
        });
        fs::write(layer.join("packages.tsv"), tsv)?;
        fs::write(
            layer.join("release.json"),
            serde_json::to_vec_pretty(&release)?,
        )?;
        detail(&format!("OS release {name}: {} packages", packages.len()));
        Ok(())
    }

    fn rootfs(&self, base: &Path, key: &str) -> Result<(PathBuf, bool)> {
        let layer = self.layer("rootfs", key);
        if layer.join("done").exists() {
            return Ok((layer, true));
        }
        let _ = fs::remove_dir_all(&layer);
        fs::create_dir_all(&layer)?;
        let work = self.cache.join(format!("work-{}", self.recipe.name));
        Mounts::unmount_all(&work);
        remove_work(&work)?;
        fs::create_dir_all(&work)?;
        detail("unpacking the base system");
        run(
            Command::new("tar")
                .args(["--xattrs", "--xattrs-include=*", "-xpf"])
                .arg(base)
                .arg("-C")
                .arg(&work),
            "unpacking the base",
        )?;
        detail(&format!(
            "{} files, hostname, {} services",
            self.recipe.files.len() + self.recipe.boot_files.len(),
            self.recipe.services.len()
        ));
        for spec in &self.recipe.files {
            let src = self
                .recipe
                .source(spec, &self.recipe_dir, &self.artifacts)?;
            install(
                &src,
                &work.join(spec.path.trim_start_matches('/')),
                mode(&spec.mode)?,
            )?;
        }
        let firmware = work.join("boot/firmware");
        for spec in &self.recipe.boot_files {
            let src = self
                .recipe
                .source(spec, &self.recipe_dir, &self.artifacts)?;
            install(&src, &firmware.join(&spec.path), mode(&spec.mode)?)?;
        }
        fs::create_dir_all(work.join(HELPER_PATH).parent().unwrap())?;
        fs::write(work.join(HELPER_PATH), HELPER)?;
        set_mode(&work.join(HELPER_PATH), 0o755)?;
        let host = &self.recipe.hostname;
        fs::write(work.join("etc/hostname"), format!("{host}\n"))?;
        fs::write(
            work.join("etc/hosts"),
            format!("127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n::1\tlocalhost ip6-localhost\n"),
        )?;
        for dir in ["var/lib/fleet", "var/lib/containers", "boot/firmware"] {
            fs::create_dir_all(work.join(dir))?;
        }
        self.write_release(&work, &layer, key)?;
        if !self.recipe.services.is_empty() {
            run(
                Command::new("systemctl")
                    .arg(format!("--root={}", work.display()))
                    .arg("enable")
                    .args(&self.recipe.services),
                "enabling services",
            )?;
        }
        {
            detail("rebuilding the initramfs (qemu-user chroot; a few minutes)");
            let _mounts = Mounts::chroot(&work)?;
            stream(
                Command::new("chroot")
                    .arg(&work)
                    .args(["update-initramfs", "-u", "-k", "all"]),
                "update-initramfs",
                |_| true,
            )?;
            let listing = capture(
                Command::new("chroot").arg(&work).args([
                    "sh",
                    "-c",
                    "lsinitramfs /boot/initrd.img-*",
                ]),
                "listing the initramfs",
            )?;
            for want in [
                "usr/sbin/fleet-bootguard",
                "scripts/local-top/fleet-bootguard",
                "dm-thin-pool.ko",
                "sbin/lvm",
                "i6300esb.ko",
                // The pool's self-repair and the boot partition's check (the hook also
                // refuses an lvmlocal.conf without thin_check's --ignore-non-fatal-errors).
                "usr/sbin/thin_repair",
                "usr/sbin/fsck.fat",
                "etc/lvm/lvmlocal.conf",
                // Root's own check before it is mounted (conf.d/fleet-root-fsck).
                "sbin/e2fsck",
            ] {
                ensure!(
                    listing.contains(want),
                    "the new initramfs lacks {want}: check the hook in initramfs-hook/initramfs/"
                );
            }
        }
        let boot_files = fs::read_dir(&firmware)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect::<Vec<_>>();
        for want in ["config.txt", "cmdline.txt"] {
            ensure!(
                boot_files.iter().any(|f| f == want),
                "raspi-firmware left no {want} in /boot/firmware (found {boot_files:?})"
            );
        }
        let cmdline = fs::read_to_string(firmware.join("cmdline.txt"))?;
        let root = format!("root=/dev/mapper/{}-root", self.recipe.layout.vg);
        ensure!(
            cmdline.contains(&root),
            "cmdline.txt does not say {root} (files/raspi-firmware sets ROOTPART): {cmdline:?}"
        );
        // The helper VM boots the same kernel and initramfs.
        for (prefix, name) in [("vmlinuz-", "vmlinuz"), ("initrd.img-", "initrd.img")] {
            let found = boot_files
                .iter()
                .find(|f| f.starts_with(prefix))
                .with_context(|| format!("no {prefix}* in /boot/firmware"))?;
            fs::copy(firmware.join(found), layer.join(name))?;
        }
        detail("boot partition (FAT) and root file system (ext4)");
        let l = &self.recipe.layout;
        let vfat = layer.join("boot.vfat");
        run(
            Command::new("mkfs.vfat")
                .args(["-C", "-F", "32", "-n", &l.boot_label])
                .arg(&vfat)
                .arg((l.boot_size.0 / 1024).to_string()),
            "making the FAT",
        )?;
        let mut mcopy = Command::new("mcopy");
        mcopy.args(["-s", "-p", "-m", "-i"]).arg(&vfat);
        for f in &boot_files {
            mcopy.arg(firmware.join(f));
        }
        run(mcopy.arg("::/"), "filling the FAT")?;
        fs::remove_dir_all(&firmware)?;
        fs::create_dir_all(&firmware)?;
        run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "root", "-b", "4096", "-d"])
                .arg(&work)
                .arg(layer.join("root.ext4"))
                .arg(format!("{}M", l.root_size.mib())),
            "making the root file system",
        )?;
        remove_work(&work)?;
        fs::write(layer.join("done"), key)?;
        self.prune("rootfs", &layer);
        Ok((layer, false))
    }

    fn disk(&self, rootfs: &Path, key: &str) -> Result<(PathBuf, bool)> {
        let layer = self.layer("disk", key);
        let image = layer.join(format!("{}.img", self.recipe.name));
        if layer.join("done").exists() {
            return Ok((image, true));
        }
        let _ = fs::remove_dir_all(&layer);
        fs::create_dir_all(&layer)?;
        let l = &self.recipe.layout;
        fs::File::create(&image)?.set_len(l.image_size.0)?;
        let sector = 512;
        let boot_start = FIRST_PARTITION / sector;
        let boot_sectors = l.boot_size.0 / sector;
        let table = format!(
            "label: dos\nstart={boot_start}, size={boot_sectors}, type=c, bootable\n\
             start={}, type=8e\n",
            boot_start + boot_sectors
        );
        run_stdin(
            Command::new("sfdisk").arg("--quiet").arg(&image),
            table.as_bytes(),
            "writing the partition table",
        )?;
        run(
            Command::new("dd")
                .arg(format!("if={}", rootfs.join("boot.vfat").display()))
                .arg(format!("of={}", image.display()))
                .args(["bs=1M", "conv=notrunc,sparse", "status=none"])
                .arg(format!("seek={}", FIRST_PARTITION / MIB)),
            "copying the FAT into partition 1",
        )?;
        let console = layer.join("helper-console.log");
        let append = format!(
            "root=/dev/vdb ro rootwait init=/{HELPER_PATH} console=ttyAMA0 panic=-1 \
             fleet.bootguard=off fleet.vg={} fleet.pool={} fleet.root={} fleet.data={}",
            l.vg,
            l.pool_size.mib(),
            l.root_size.mib(),
            l.data_size.mib()
        );
        detail("helper VM: LVM layout and root copy (qemu-system-aarch64, TCG)");
        let mut qemu = Command::new("qemu-system-aarch64");
        qemu.args(["-M", "virt", "-cpu", "max", "-smp", "2", "-m", "1024"])
            .args(["-display", "none", "-monitor", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(rootfs.join("vmlinuz"))
            .arg("-initrd")
            .arg(rootfs.join("initrd.img"))
            .args(["-append", &append])
            .arg("-drive")
            .arg(format!(
                "if=none,id=disk,format=raw,file={}",
                image.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=disk"])
            .arg("-drive")
            .arg(format!(
                "if=none,id=root,format=raw,readonly=on,file={}",
                rootfs.join("root.ext4").display()
            ))
            .args(["-device", "virtio-blk-pci,drive=root"]);
        let start = Instant::now();
        let mut child = qemu
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting qemu-system-aarch64 (scripts/bootstrap.sh installs it)")?;
        let mut shown = 0;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            let log = fs::read_to_string(&console).unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("fleet-image-helper:"))
                .collect();
            for line in &lines[shown.min(lines.len())..] {
                detail(line.trim());
            }
            shown = lines.len();
            if start.elapsed() > Duration::from_secs(20 * 60) {
                let _ = child.kill();
                bail!(
                    "the helper VM did not finish in 20 min; its console: {}",
                    console.display()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let log = fs::read_to_string(&console).unwrap_or_default();
        if !log.contains("fleet-image-helper: done") {
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            bail!(
                "the helper VM failed ({status}); last lines of {}:\n{}",
                console.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        fs::write(layer.join("done"), key)?;
        self.prune("disk", &layer);
        Ok((image, false))
    }
}

/// The base layer's cache key (`base-<key>.tar` in the cache): the builder's version and the
/// recipe's `[base]`, nothing else.
pub fn base_key(recipe: &Recipe) -> Result<String> {
    Ok(key(&[
        BUILDER_VERSION.as_bytes(),
        serde_json::to_string(&recipe.base)?.as_bytes(),
    ]))
}

/// Removes the chroot folder, refusing while anything is still mounted in it: a bind mount
/// of `/dev` left behind would make `remove_dir_all` delete the host's device nodes.
fn remove_work(work: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let Ok(root) = fs::metadata(work) else {
        return Ok(());
    };
    for sub in ["dev", "proc", "sys"] {
        if let Ok(m) = fs::metadata(work.join(sub)) {
            ensure!(
                m.dev() == root.dev(),
                "{} is still mounted: unmount it (umount -l) before the next build",
                work.join(sub).display()
            );
        }
    }
    fs::remove_dir_all(work).with_context(|| format!("removing {}", work.display()))
}

/// The mounts a qemu-user chroot needs, undone on drop.
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn chroot(root: &Path) -> Result<Mounts> {
        let mut m = Mounts(Vec::new());
        for (what, kind, target) in [
            ("proc", Some("proc"), "proc"),
            ("sysfs", Some("sysfs"), "sys"),
            ("/dev", None, "dev"),
        ] {
            let target = root.join(target);
            fs::create_dir_all(&target)?;
            let mut cmd = Command::new("mount");
            match kind {
                Some(kind) => cmd.args(["-t", kind, what]),
                None => cmd.args(["--bind", what]),
            };
            run(cmd.arg(&target), "mounting for the chroot")?;
            m.0.push(target);
        }
        Ok(m)
    }

    /// Unmounts whatever a crashed build left mounted under `root`.
    fn unmount_all(root: &Path) {
        for target in ["dev", "sys", "proc"] {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(root.join(target))
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for target in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(target).status();
        }
    }
}

fn install(src: &Path, dest: &Path, mode: u32) -> Result<()> {
    if let Some(dir) = dest.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(src, dest).with_context(|| format!("copying {} to the image", src.display()))?;
    set_mode(dest, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn progress(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn detail(line: &str) {
    progress(&format!("      {line}"));
}

pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Runs a command; its error names `what` and carries the command's stderr.
fn run(cmd: &mut Command, what: &str) -> Result<()> {
    capture(cmd, what).map(drop)
}

fn capture(cmd: &mut Command, what: &str) -> Result<String> {
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

fn run_stdin(cmd: &mut Command, input: &[u8], what: &str) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: starting {:?}", cmd.get_program()))?;
    child.stdin.take().unwrap().write_all(input)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs a long command, showing the lines `show` picks (with the time so far) and keeping the
/// last lines of its output for the error.
fn stream(cmd: &mut Command, what: &str, show: impl Fn(&str) -> bool) -> Result<()> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{what}: starting {:?}", cmd.get_program()))?;
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    for pipe in [
        Box::new(stdout) as Box<dyn std::io::Read + Send>,
        Box::new(stderr),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let mut tail = std::collections::VecDeque::new();
    for line in rx {
        if show(&line) {
            detail(&format!("[{}] {line}", human(start.elapsed())));
        }
        tail.push_back(line);
        if tail.len() > 40 {
            tail.pop_front();
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "{what} failed ({status}); its last lines:\n{}",
            Vec::from(tail).join("\n")
        );
    }
    Ok(())
}
