//! The part of the Raspberry Pi firmware the tests need, emulated on the host: which kernel,
//! initramfs and command line a boot uses, read from the boot partition the way the Pi 4's
//! firmware reads it (`config.txt`, or `tryboot.txt` once when the one-shot tryboot flag is
//! set).
//!
//! Honoured: the conditional sections `[all]`, `[none]`, `[tryboot]` and the board filters
//! (this emulates a Pi 4: `[pi4]` applies, other boards' do not), `kernel=`, `initramfs <file>
//! [followkernel]`, `auto_initramfs=1`, `cmdline=`, and `os_prefix=` with the firmware's rule
//! that the prefix is ignored unless the kernel exists under it. Everything else (overlays,
//! `dtparam`, clocks) is firmware business a QEMU `virt` machine has no use for.

use anyhow::{Result, bail};

/// What one boot loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub kernel: String,
    pub initramfs: Option<String>,
    pub cmdline_file: String,
}

const BOARDS: [&str; 12] = [
    "pi0", "pi0w", "pi02", "pi1", "pi2", "pi3", "pi3+", "pi4", "pi400", "pi5", "cm4", "cm5",
];

/// Chooses the boot files from `config` (the text of `config.txt`, or of `tryboot.txt` on a
/// tryboot boot) and the files the partition holds.
pub fn select(config: &str, tryboot: bool, exists: impl Fn(&str) -> bool) -> Result<Selection> {
    let mut applies = true;
    let mut kernel = None;
    let mut initramfs = None;
    let mut auto_initramfs = false;
    let mut cmdline = None;
    let mut prefix = String::new();
    for raw in config.lines() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            applies = match section {
                "all" => true,
                "none" => false,
                "tryboot" => tryboot,
                "pi4" => true,
                board if BOARDS.contains(&board) => false,
                // Filters we do not model (EDID, serial numbers, GPIO): the firmware would
                // apply them only on matching hardware; we are none of it.
                _ => false,
            };
            continue;
        }
        if !applies {
            continue;
        }
        if let Some(rest) = line.strip_prefix("initramfs ") {
            let file = rest.split_whitespace().next().unwrap_or("");
            initramfs = Some(file.to_owned());
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().to_owned();
        match key.trim() {
            "kernel" => kernel = Some(value),
            "cmdline" => cmdline = Some(value),
            "os_prefix" => prefix = value,
            "auto_initramfs" => auto_initramfs = value == "1",
            _ => {}
        }
    }
    // Without kernel=, the Pi 4 boots its 64-bit default.
    let kernel = kernel.unwrap_or_else(|| "kernel8.img".into());
    finish(prefix, kernel, initramfs, auto_initramfs, cmdline, exists)
}

fn finish(
    prefix: String,
    kernel: String,
    initramfs: Option<String>,
    auto_initramfs: bool,
    cmdline: Option<String>,
    exists: impl Fn(&str) -> bool,
) -> Result<Selection> {
    // An absolute name bypasses the prefix; a prefix whose kernel is missing is ignored.
    let apply = |name: &str, prefix: &str| match name.strip_prefix('/') {
        Some(abs) => abs.to_owned(),
        None => format!("{prefix}{name}"),
    };
    let prefix = if !prefix.is_empty() && exists(&apply(&kernel, &prefix)) {
        prefix
    } else {
        String::new()
    };
    let kernel_path = apply(&kernel, &prefix);
    if !exists(&kernel_path) {
        bail!("the firmware finds no kernel {kernel_path:?} on the boot partition");
    }
    let initramfs = match initramfs {
        Some(name) => Some(apply(&name, &prefix)),
        None if auto_initramfs => {
            let name = kernel
                .replace("kernel", "initramfs")
                .trim_end_matches(".img")
                .to_owned();
            Some(apply(&name, &prefix)).filter(|p| exists(p))
        }
        None => None,
    };
    if let Some(i) = &initramfs
        && !exists(i)
    {
        bail!("the firmware finds no initramfs {i:?} on the boot partition");
    }
    Ok(Selection {
        kernel: kernel_path,
        initramfs,
        cmdline_file: apply(cmdline.as_deref().unwrap_or("cmdline.txt"), &prefix),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Debian's raspi-firmware writes (trixie, 1.20240424+ds).
    const DEBIAN: &str = "# Do not modify this file!\n\
        [pi4]\nmax_framebuffers=2\n[all]\narm_64bit=1\nenable_uart=1\nupstream_kernel=1\n\
        kernel=vmlinuz-6.12.48+deb13-arm64\n\
        # For details on the initramfs directive, see https://...\n\
        initramfs initrd.img-6.12.48+deb13-arm64\n";

    fn on_disk(files: &'static [&'static str]) -> impl Fn(&str) -> bool {
        move |f| files.contains(&f)
    }

    #[test]
    fn debians_config_picks_its_kernel_and_initramfs() {
        let files = on_disk(&[
            "vmlinuz-6.12.48+deb13-arm64",
            "initrd.img-6.12.48+deb13-arm64",
        ]);
        let s = select(DEBIAN, false, files).unwrap();
        assert_eq!(s.kernel, "vmlinuz-6.12.48+deb13-arm64");
        assert_eq!(
            s.initramfs.as_deref(),
            Some("initrd.img-6.12.48+deb13-arm64")
        );
        assert_eq!(s.cmdline_file, "cmdline.txt");
    }

    #[test]
    fn tryboot_sections_apply_only_on_a_tryboot_boot_and_other_boards_never() {
        let cfg = "kernel=a.img\n[tryboot]\nkernel=b.img\ncmdline=try.txt\n[pi5]\nkernel=c.img\n\
                   [none]\nkernel=d.img\n[all]\ninitramfs i.img followkernel\n";
        let files = on_disk(&["a.img", "b.img", "c.img", "d.img", "i.img"]);
        let normal = select(cfg, false, &files).unwrap();
        assert_eq!(
            (normal.kernel.as_str(), normal.cmdline_file.as_str()),
            ("a.img", "cmdline.txt")
        );
        let tried = select(cfg, true, &files).unwrap();
        assert_eq!(
            (tried.kernel.as_str(), tried.cmdline_file.as_str()),
            ("b.img", "try.txt")
        );
        assert_eq!(tried.initramfs.as_deref(), Some("i.img"));
    }

    #[test]
    fn os_prefix_applies_only_when_its_kernel_exists() {
        let cfg = "os_prefix=b/\nkernel=k.img\ninitramfs i.img\n";
        let with = select(cfg, false, on_disk(&["b/k.img", "b/i.img"])).unwrap();
        assert_eq!(with.kernel, "b/k.img");
        assert_eq!(with.initramfs.as_deref(), Some("b/i.img"));
        assert_eq!(with.cmdline_file, "b/cmdline.txt");
        let without = select(cfg, false, on_disk(&["k.img", "i.img"])).unwrap();
        assert_eq!(without.kernel, "k.img");
        let absolute = select("os_prefix=b/\nkernel=/k.img\n", false, on_disk(&["k.img"])).unwrap();
        assert_eq!(absolute.kernel, "k.img");
    }

    #[test]
    fn auto_initramfs_follows_the_kernel_name() {
        let s = select(
            "auto_initramfs=1\n",
            false,
            on_disk(&["kernel8.img", "initramfs8"]),
        )
        .unwrap();
        assert_eq!(s.kernel, "kernel8.img");
        assert_eq!(s.initramfs.as_deref(), Some("initramfs8"));
    }

    #[test]
    fn a_missing_kernel_or_initramfs_is_named() {
        let err = select(DEBIAN, false, on_disk(&[])).unwrap_err().to_string();
        assert!(
            err.contains("no kernel \"vmlinuz-6.12.48+deb13-arm64\""),
            "{err}"
        );
        let err = select(DEBIAN, false, on_disk(&["vmlinuz-6.12.48+deb13-arm64"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no initramfs"), "{err}");
    }
}
