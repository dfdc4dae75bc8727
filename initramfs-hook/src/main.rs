//! `fleet-bootguard`: the initramfs step (`boot`) and the userspace commands around an OS
//! upgrade (`arm`, `commit`, `request-rollback`, `status`). See the library's docs.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    process::ExitCode,
};

use fleet_bootguard::{
    Error,
    boot::BootPartition,
    error::At,
    run::{self, FatCheck, Lvm, Outcome, WATCHDOG_BUDGET, Watchdog},
};

const USAGE: &str = "usage: fleet-bootguard <command> [options]

commands:
  boot              (initramfs) count the boot of a pending upgrade; past the limit, roll back
                    and exit 10: the caller unmounts the boot partition and reboots
  status            print the upgrade state
  arm               save the known-good boot files, mark an upgrade pending, snapshot root
  commit            accept the running upgrade: remove the snapshot and the saved files
  request-rollback  make the next boot roll back

options:
  --boot-dir DIR     the mounted boot partition (default /boot/firmware)
  --vg NAME          the volume group (default vg0)
  --origin NAME      the root LV to snapshot (arm; default root)
  --upgrade-id ID    names the upgrade (arm)
  --max-boots N      boots the upgraded system gets to check in (arm; default 3)
  --reason TEXT      why (request-rollback)
  --watchdog PATH    the watchdog to arm (boot; default /dev/watchdog0)
  --root-lv NAME     root's LV, whose thin pool is checked and repaired (boot; default root)
  --fat-check-exit N, --fat-check-log FILE
                     what `fsck.fat -a` of the boot partition said, to record (boot)";

#[derive(Debug)]
struct Args {
    command: String,
    boot_dir: PathBuf,
    vg: String,
    origin: String,
    upgrade_id: Option<String>,
    max_boots: u32,
    reason: Option<String>,
    watchdog: PathBuf,
    root_lv: String,
    fat_check_exit: Option<i32>,
    fat_check_log: Option<PathBuf>,
}

fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
    let command = argv.next().ok_or("no command")?;
    let mut args = Args {
        command,
        boot_dir: PathBuf::from("/boot/firmware"),
        vg: "vg0".into(),
        origin: "root".into(),
        upgrade_id: None,
        max_boots: fleet_contracts::boot::DEFAULT_MAX_BOOTS,
        reason: None,
        watchdog: PathBuf::from("/dev/watchdog0"),
        root_lv: "root".into(),
        fat_check_exit: None,
        fat_check_log: None,
    };
    while let Some(flag) = argv.next() {
        let value = argv.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--boot-dir" => args.boot_dir = value.into(),
            "--vg" => args.vg = value,
            "--origin" => args.origin = value,
            "--upgrade-id" => args.upgrade_id = Some(value),
            "--max-boots" => {
                args.max_boots = value
                    .parse()
                    .map_err(|_| format!("--max-boots {value:?} is not a count"))?
            }
            "--reason" => args.reason = Some(value),
            "--watchdog" => args.watchdog = value.into(),
            "--root-lv" => args.root_lv = value,
            "--fat-check-exit" => {
                args.fat_check_exit = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--fat-check-exit {value:?} is not an exit status"))?,
                )
            }
            "--fat-check-log" => args.fat_check_log = Some(value.into()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(args)
}

fn say(line: &str) {
    // The console in the initramfs; a terminal or the journal otherwise.
    let _ = writeln!(io::stderr(), "fleet-bootguard: {line}");
}

fn main() -> ExitCode {
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            say(&format!("{e}\n{USAGE}"));
            return ExitCode::from(2);
        }
    };
    match execute(&args) {
        Ok(code) => code,
        Err(e) => {
            say(&format!("{}: {e}", args.command));
            ExitCode::FAILURE
        }
    }
}

/// `boot`'s exit status when the device must reboot (after a rollback).
const REBOOT: u8 = 10;

fn execute(args: &Args) -> Result<ExitCode, Error> {
    let part = BootPartition::new(&args.boot_dir);
    let lvm = Lvm::new(&args.vg);
    match args.command.as_str() {
        "boot" => {
            // Armed first, so a hang anywhere from here on resets the device.
            let watchdog = Watchdog::arm(&args.watchdog, WATCHDOG_BUDGET)?;
            match &watchdog {
                Some(_) => say(&format!("watchdog {} armed", args.watchdog.display())),
                None => say(&format!("no watchdog at {}", args.watchdog.display())),
            }
            let fat = args.fat_check_exit.map(|exit| FatCheck {
                exit,
                output: args
                    .fat_check_log
                    .as_ref()
                    .and_then(|p| std::fs::read(p).ok())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default(),
            });
            let outcome = run::boot(&part, &lvm, &args.root_lv, fat.as_ref(), &mut say)?;
            drop(watchdog); // Still armed: systemd takes it over.
            // The caller unmounts the boot partition (flushing it whole) and then reboots.
            Ok(match outcome {
                Outcome::Continue => ExitCode::SUCCESS,
                Outcome::Reboot => ExitCode::from(REBOOT),
            })
        }
        "status" => {
            let text = match part.read_state()? {
                Ok(Some(state)) => state.render(),
                Ok(None) => "phase=idle (no state file)\n".to_owned(),
                Err(corrupt) => format!("corrupt: {corrupt}\n"),
            };
            io::stdout()
                .write_all(text.as_bytes())
                .at("write", Path::new("(standard output)"))?;
            Ok(ExitCode::SUCCESS)
        }
        "arm" => {
            let id = args
                .upgrade_id
                .as_deref()
                .ok_or_else(|| Error::Usage("arm needs --upgrade-id".into()))?;
            let state = run::arm(&part, &lvm, &args.origin, id, args.max_boots)?;
            say(&format!(
                "upgrade {id} pending: snapshot {}/{} taken, {} boots to check in",
                args.vg, state.snapshot, state.max_boots
            ));
            Ok(ExitCode::SUCCESS)
        }
        "commit" => {
            let state = run::commit(&part, &lvm)?;
            say(&state.last_result);
            Ok(ExitCode::SUCCESS)
        }
        "request-rollback" => {
            let reason = args.reason.as_deref().unwrap_or("requested by hand");
            run::request_rollback(&part, reason)?;
            say("the next boot rolls back");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(Error::Usage(format!("unknown command {other}\n{USAGE}"))),
    }
}
