//! The QEMU aarch64 harness: boots the image `scripts/image.sh` built (`fleet-image`) the way
//! a Raspberry Pi boots its card, and the tests in `tests/` prove the device scenarios on it:
//! root on the thin LV, the agent enrolling against a real local fleet and running a real
//! container across reboots and without network, the watchdog resetting a hung device, the
//! bootguard rolling back an upgrade on real LVM.
//!
//! What is emulated, and why: the Pi firmware (no QEMU machine model boots a Pi 4 card; the
//! harness reads `config.txt`/`tryboot.txt` from the card's FAT as the firmware does, see
//! [`firmware`]), and the board (`-M virt` with an i6300esb watchdog instead of the BCM2835's).
//! The kernel, initramfs, LVM, systemd, podman and the agent are the image's own.
#![allow(clippy::disallowed_methods)] // A harness starts QEMU, ssh and mtools.

pub mod apt;
pub mod firmware;
pub mod pool;
pub mod scenario;
pub mod vm;

use std::path::PathBuf;

/// The built image: `$FLEET_IMAGE`, else `target/images/fleet-pi.img` in the workspace.
pub fn image() -> PathBuf {
    std::env::var_os("FLEET_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/images/fleet-pi.img")
        })
}
