//! What the bootguard found when it checked the device's storage at boot, and what it did:
//! `rollback/checks` on the boot partition, a few `key=value` lines replaced whole like the
//! upgrade state. The thin pool's repair counter lives here, so a pool that cannot be repaired
//! is not repaired again and again; the agent reads the record and reports it.
//!
//! The pool decision is a pure function ([`pool_decision`]) from what activating root did and
//! the record to what to do; the I/O around it is in [`crate::run`].

use std::fmt;

/// Boots in a row that may try `lvconvert --repair` on a pool that fails its check. One try
/// per boot; two, so a power cut during the first repair still gets a second one.
pub const MAX_POOL_REPAIR_BOOTS: u32 = 2;

/// The contents of `rollback/checks`. Only written when a check found something.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checks {
    /// Boots in a row whose thin pool failed its check and that tried a repair; back to 0 on
    /// the first boot whose pool activates.
    pub pool_repair_boots: u32,
    /// Repairs that brought the pool back, ever.
    pub pool_repairs: u32,
    /// What the last pool check that found something found and did, in words for people.
    pub last_pool: String,
    /// Boots that found the boot partition not cleanly unmounted or damaged and had
    /// `fsck.fat` fix it, ever.
    pub fat_repairs: u32,
    /// What the last of those `fsck.fat` runs said.
    pub last_fat: String,
}

/// Why a checks record could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable(pub String);

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the storage check record is unreadable: {}", self.0)
    }
}

impl std::error::Error for Unreadable {}

impl Checks {
    /// Reads the file's text; unknown keys are ignored (a newer writer).
    pub fn parse(text: &str) -> Result<Checks, Unreadable> {
        let mut checks = Checks::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(Unreadable(format!("line {} is not key=value", n + 1)));
            };
            let number = |v: &str| {
                v.parse::<u32>()
                    .map_err(|_| Unreadable(format!("{key}={v} is not a count")))
            };
            match key {
                "pool_repair_boots" => checks.pool_repair_boots = number(value)?,
                "pool_repairs" => checks.pool_repairs = number(value)?,
                "last_pool" => checks.last_pool = value.to_owned(),
                "fat_repairs" => checks.fat_repairs = number(value)?,
                "last_fat" => checks.last_fat = value.to_owned(),
                _ => {}
            }
        }
        Ok(checks)
    }

    /// The file's text; [`Checks::parse`] reads it back unchanged.
    pub fn render(&self) -> String {
        format!(
            "pool_repair_boots={}\npool_repairs={}\nlast_pool={}\nfat_repairs={}\nlast_fat={}\n",
            self.pool_repair_boots,
            self.pool_repairs,
            one_line(&self.last_pool),
            self.fat_repairs,
            one_line(&self.last_fat),
        )
    }
}

/// Longest text kept per finding: the record lives on a small FAT and travels in heartbeats.
pub const MAX_TEXT: usize = 600;

/// `s` on one line, at most [`MAX_TEXT`] bytes (cut at a character boundary).
pub fn one_line(s: &str) -> String {
    let flat: String = s
        .split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if flat.len() <= MAX_TEXT {
        return flat;
    }
    let mut end = MAX_TEXT;
    while !flat.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &flat[..end])
}

/// What activating root (and with it the thin pool) did this boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolSeen {
    /// Root is active: the pool passed its check (leaked blocks are not fatal).
    Active,
    /// The pool failed `thin_check`: LVM refuses to activate it until it is repaired.
    CheckFailed(String),
    /// Activation failed for another reason (no volume group, no such LV): nothing a repair
    /// of the pool's metadata can fix.
    OtherFailure(String),
}

/// What to do about the pool this boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolDecision {
    /// Nothing; write `Some` record first (the pool works again: the repair streak ends).
    Continue(Option<Checks>),
    /// Write the record (the repair attempt counted before it starts, so a power cut during it
    /// counts too), then `lvconvert --repair` the pool and activate root again.
    Repair(Checks),
    /// Write `Some` record and boot on without trying: the pool failed its check after
    /// [`MAX_POOL_REPAIR_BOOTS`] repairs in a row, or for a reason a repair cannot fix.
    GiveUp(Option<Checks>, String),
}

/// The decision for what activation showed and what the record says.
pub fn pool_decision(seen: &PoolSeen, checks: &Checks, pool: &str) -> PoolDecision {
    match seen {
        PoolSeen::Active if checks.pool_repair_boots == 0 => PoolDecision::Continue(None),
        PoolSeen::Active => PoolDecision::Continue(Some(Checks {
            pool_repair_boots: 0,
            ..checks.clone()
        })),
        PoolSeen::CheckFailed(why) if checks.pool_repair_boots < MAX_POOL_REPAIR_BOOTS => {
            PoolDecision::Repair(Checks {
                pool_repair_boots: checks.pool_repair_boots + 1,
                last_pool: one_line(&format!(
                    "pool {pool} failed its check ({why}); repair attempt {} of {MAX_POOL_REPAIR_BOOTS}",
                    checks.pool_repair_boots + 1
                )),
                ..checks.clone()
            })
        }
        PoolSeen::CheckFailed(why) => {
            let say = format!(
                "pool {pool} still fails its check after {} repair attempts in a row ({why}); \
                 not repairing again: it needs a person (lvconvert --repair {pool} from a rescue system)",
                checks.pool_repair_boots
            );
            let record = one_line(&say);
            let changed = record != checks.last_pool;
            PoolDecision::GiveUp(
                changed.then(|| Checks {
                    last_pool: record,
                    ..checks.clone()
                }),
                say,
            )
        }
        PoolSeen::OtherFailure(why) => {
            let say = format!("root on pool {pool} does not activate: {why}");
            let record = one_line(&say);
            let changed = record != checks.last_pool;
            PoolDecision::GiveUp(
                changed.then(|| Checks {
                    last_pool: record,
                    ..checks.clone()
                }),
                say,
            )
        }
    }
}

/// What `fsck.fat` says that is not about the file system: its version, and the codepage
/// conversion it falls back from in an initramfs without iconv.
fn fsck_noise(line: &str) -> bool {
    line.starts_with("fsck.fat ")
        || line.starts_with("Cannot initialize conversion")
        || line.starts_with("Using internal CP")
}

/// `fsck.fat -a`'s exit status: 0 found nothing, 1 found and fixed something (a volume not
/// cleanly unmounted, a wrong free-cluster count), anything else could not fix it.
pub fn fat_record(checks: &Checks, exit: i32, output: &str) -> Option<Checks> {
    let said = one_line(
        &output
            .lines()
            .map(str::trim)
            .filter(|l| !fsck_noise(l))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    match exit {
        0 => None,
        1 => Some(Checks {
            fat_repairs: checks.fat_repairs + 1,
            last_fat: one_line(&format!("fsck.fat fixed the boot partition: {said}")),
            ..checks.clone()
        }),
        code => Some(Checks {
            last_fat: one_line(&format!(
                "fsck.fat could not fix the boot partition (exit {code}): {said}"
            )),
            ..checks.clone()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_newer_keys_are_ignored() {
        let checks = Checks {
            pool_repair_boots: 1,
            pool_repairs: 3,
            last_pool: "pool vg0/pool failed\nits check".into(),
            fat_repairs: 7,
            last_fat: "Dirty bit is set".into(),
        };
        let back = Checks::parse(&checks.render()).unwrap();
        assert_eq!(
            back,
            Checks {
                last_pool: "pool vg0/pool failed; its check".into(),
                ..checks
            }
        );
        assert_eq!(Checks::parse("").unwrap(), Checks::default());
        assert_eq!(
            Checks::parse("later=1\nfat_repairs=2\n")
                .unwrap()
                .fat_repairs,
            2
        );
        assert_eq!(
            Checks::parse("pool_repairs=-1").unwrap_err().0,
            "pool_repairs=-1 is not a count"
        );
        assert_eq!(
            Checks::parse("garbage").unwrap_err().0,
            "line 1 is not key=value"
        );
    }

    #[test]
    fn long_texts_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_TEXT);
        let cut = one_line(&long);
        assert!(cut.len() <= MAX_TEXT + 3, "{}", cut.len());
        assert!(cut.ends_with("..."));
    }

    /// (what activation showed, repair boots in a row so far) -> what the bootguard does.
    #[test]
    fn pool_decisions() {
        let check = |seen: PoolSeen, streak: u32, want: &str| {
            let checks = Checks {
                pool_repair_boots: streak,
                last_pool: "before".into(),
                ..Checks::default()
            };
            let got = match pool_decision(&seen, &checks, "vg0/pool") {
                PoolDecision::Continue(None) => "continue".to_owned(),
                PoolDecision::Continue(Some(c)) => {
                    format!("continue, streak {}", c.pool_repair_boots)
                }
                PoolDecision::Repair(c) => format!("repair, streak {}", c.pool_repair_boots),
                PoolDecision::GiveUp(Some(c), _) => {
                    format!("give up, streak {}, record", c.pool_repair_boots)
                }
                PoolDecision::GiveUp(None, _) => "give up".to_owned(),
            };
            assert_eq!(got, want, "{seen:?} after {streak}");
        };
        let failed = || PoolSeen::CheckFailed("status:64".into());
        let other = || PoolSeen::OtherFailure("Volume group \"vg0\" not found".into());
        check(PoolSeen::Active, 0, "continue");
        check(PoolSeen::Active, 1, "continue, streak 0");
        check(PoolSeen::Active, 2, "continue, streak 0");
        check(failed(), 0, "repair, streak 1");
        check(failed(), 1, "repair, streak 2");
        check(failed(), 2, "give up, streak 2, record");
        check(failed(), 9, "give up, streak 9, record");
        check(other(), 0, "give up, streak 0, record");
        check(other(), 1, "give up, streak 1, record");
    }

    #[test]
    fn giving_up_is_recorded_once_and_says_what_to_do() {
        let first = pool_decision(
            &PoolSeen::CheckFailed("status:64".into()),
            &Checks {
                pool_repair_boots: MAX_POOL_REPAIR_BOOTS,
                ..Checks::default()
            },
            "vg0/pool",
        );
        let PoolDecision::GiveUp(Some(record), say) = first else {
            panic!("{first:?}")
        };
        assert!(say.contains("not repairing again"), "{say}");
        assert!(say.contains("lvconvert --repair vg0/pool"), "{say}");
        // The next boot finds the same: the record is not written again.
        let again = pool_decision(
            &PoolSeen::CheckFailed("status:64".into()),
            &record,
            "vg0/pool",
        );
        assert!(matches!(again, PoolDecision::GiveUp(None, _)), "{again:?}");
    }

    #[test]
    fn fat_checks_are_recorded_when_fsck_found_something() {
        let none = Checks::default();
        assert_eq!(
            fat_record(&none, 0, "fsck.fat 4.2\n/dev/vda1: 12 files"),
            None
        );
        let fixed = fat_record(
            &none,
            1,
            "Dirty bit is set. Fs was not properly unmounted\n",
        )
        .unwrap();
        assert_eq!(fixed.fat_repairs, 1);
        assert_eq!(
            fixed.last_fat,
            "fsck.fat fixed the boot partition: Dirty bit is set. Fs was not properly unmounted"
        );
        let failed = fat_record(&fixed, 4, "read error").unwrap();
        assert_eq!(failed.fat_repairs, 1);
        assert!(
            failed
                .last_fat
                .contains("could not fix the boot partition (exit 4)")
        );
    }
}
