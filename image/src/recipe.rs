//! The image recipe (`image/pi.toml`): the base system, the files, users and services layered
//! on it, and the disk layout. Loading checks everything a build would otherwise trip over
//! late (sizes that do not fit, relative target paths, a FAT label FAT cannot hold) and names
//! the field.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    pub hostname: String,
    #[serde(default)]
    pub services: Vec<String>,
    pub base: Base,
    #[serde(default)]
    pub files: Vec<FileSpec>,
    #[serde(default)]
    pub boot_files: Vec<FileSpec>,
    pub layout: Layout,
}

/// Layer 1: what mmdebstrap makes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    pub suite: String,
    pub architecture: String,
    pub mirror: String,
    pub components: Vec<String>,
    pub variant: String,
    pub packages: Vec<String>,
}

/// A file put into the image: `source` is relative to the recipe, or `@name` for a build
/// artifact given on the command line.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    pub source: String,
    pub path: String,
    #[serde(default = "default_mode")]
    pub mode: String,
}

fn default_mode() -> String {
    "0644".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub image_size: Size,
    pub boot_size: Size,
    pub boot_label: String,
    pub vg: String,
    pub pool_size: Size,
    /// The thin LV's virtual size (its ext4 file system's size).
    pub root_size: Size,
    pub data_size: Size,
}

/// A size in bytes, written `256MiB`, `4GiB` (or a plain number of bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Size(pub u64);

pub const MIB: u64 = 1 << 20;

impl Size {
    pub fn mib(self) -> u64 {
        self.0 / MIB
    }
}

impl TryFrom<String> for Size {
    type Error = String;
    fn try_from(s: String) -> Result<Size, String> {
        let t = s.trim();
        let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size (say 256MiB or 4GiB)"))?;
        let mult = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => MIB,
            "GiB" => 1 << 30,
            other => {
                return Err(format!(
                    "unknown size unit {other:?} in {s:?} (KiB, MiB, GiB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Size)
            .ok_or_else(|| format!("{s:?} is too large"))
    }
}

impl From<Size> for String {
    fn from(s: Size) -> String {
        s.to_string()
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            b if b >= 1 << 30 && b % (1 << 30) == 0 => write!(f, "{}GiB", b >> 30),
            b if b % MIB == 0 => write!(f, "{}MiB", b >> 20),
            b => write!(f, "{b}"),
        }
    }
}

/// The space before the first partition and the LVM overheads the layout check counts.
pub const FIRST_PARTITION: u64 = 4 * MIB;
const POOL_METADATA: u64 = 64 * MIB;

impl Recipe {
    pub fn load(path: &Path) -> Result<Recipe> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let recipe: Recipe =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        recipe
            .check()
            .with_context(|| format!("checking {}", path.display()))?;
        Ok(recipe)
    }

    fn check(&self) -> Result<()> {
        ensure!(
            !self.name.is_empty() && self.name.chars().all(simple),
            "name {:?}: use letters, digits, - and _",
            self.name
        );
        ensure!(
            !self.base.packages.is_empty(),
            "base.packages: the list is empty"
        );
        for f in &self.files {
            ensure!(
                f.path.starts_with('/') && !f.path.split('/').any(|c| c == ".."),
                "files: target {:?} must be an absolute path without ..",
                f.path
            );
            mode(&f.mode).with_context(|| format!("files: {}", f.path))?;
        }
        for f in &self.boot_files {
            ensure!(
                !f.path.starts_with('/') && !f.path.split('/').any(|c| c == ".." || c.is_empty()),
                "boot_files: target {:?} must be relative to the boot partition",
                f.path
            );
        }
        for s in &self.services {
            ensure!(
                [".service", ".socket", ".timer", ".target"]
                    .iter()
                    .any(|suffix| s.ends_with(suffix)),
                "services: {s:?} is not a unit name"
            );
        }
        let l = &self.layout;
        ensure!(
            !l.boot_label.is_empty()
                && l.boot_label.len() <= 11
                && l.boot_label
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit()),
            "layout.boot_label {:?}: FAT labels are at most 11 capital letters or digits",
            l.boot_label
        );
        ensure!(
            !l.vg.is_empty() && l.vg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "layout.vg {:?}: use letters, digits and _ (device-mapper doubles a -)",
            l.vg
        );
        ensure!(
            l.boot_size.0 >= 64 * MIB,
            "layout.boot_size {}: the boot partition needs at least 64MiB",
            l.boot_size
        );
        for (field, size) in [
            ("image_size", l.image_size),
            ("boot_size", l.boot_size),
            ("pool_size", l.pool_size),
            ("root_size", l.root_size),
            ("data_size", l.data_size),
        ] {
            ensure!(
                size.0 % MIB == 0 && size.0 > 0,
                "layout.{field} {size}: use whole MiB"
            );
        }
        // The pool's metadata and LVM's spare copy of it, one MiB of PV header.
        let needed = FIRST_PARTITION
            + l.boot_size.0
            + MIB
            + l.pool_size.0
            + 2 * POOL_METADATA
            + l.data_size.0;
        if needed > l.image_size.0 {
            bail!(
                "layout: boot {} + thin pool {} + data {} (+ {} MiB of LVM metadata and \
                 alignment) do not fit in image_size {}",
                l.boot_size,
                l.pool_size,
                l.data_size,
                (FIRST_PARTITION + MIB + 2 * POOL_METADATA) / MIB,
                l.image_size
            );
        }
        Ok(())
    }

    /// Where `source` is: an artifact from the command line, or a path next to the recipe.
    pub fn source(
        &self,
        spec: &FileSpec,
        recipe_dir: &Path,
        artifacts: &BTreeMap<String, PathBuf>,
    ) -> Result<PathBuf> {
        match spec.source.strip_prefix('@') {
            Some(name) => artifacts.get(name).cloned().with_context(|| {
                format!(
                    "{} needs the artifact {name:?}: pass --artifact {name}=PATH",
                    spec.path
                )
            }),
            None => Ok(recipe_dir.join(&spec.source)),
        }
    }
}

fn simple(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

/// An octal file mode such as `0755`.
pub fn mode(text: &str) -> Result<u32> {
    u32::from_str_radix(text, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .with_context(|| format!("mode {text:?} is not an octal file mode such as 0644"))
}

/// A cache key: the hex SHA-256 of the parts, each length-prefixed.
pub fn key(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> Recipe {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pi.toml");
        Recipe::load(&path).unwrap()
    }

    fn check(edit: impl FnOnce(&mut Recipe)) -> String {
        let mut r = recipe();
        edit(&mut r);
        match r.check() {
            Ok(()) => "ok".into(),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn the_shipped_recipe_loads() {
        let r = recipe();
        assert_eq!(r.base.suite, "trixie");
        assert_eq!(r.layout.root_size, Size(2 << 30));
        assert!(r.files.iter().any(|f| f.source == "@fleet-agent"));
    }

    #[test]
    fn sizes_parse_and_print() {
        for (text, bytes) in [("256MiB", 256 * MIB), ("4GiB", 4 << 30), ("512", 512)] {
            let s = Size::try_from(text.to_owned()).unwrap();
            assert_eq!(s.0, bytes);
            assert_eq!(s.to_string(), text);
        }
        let err = Size::try_from("4GB".to_owned()).unwrap_err();
        assert!(err.contains("unknown size unit \"GB\""), "{err}");
        assert!(Size::try_from("lots".to_owned()).is_err());
    }

    #[test]
    fn bad_recipes_name_the_field() {
        assert_eq!(check(|_| {}), "ok");
        type Edit = Box<dyn FnOnce(&mut Recipe)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|r| r.layout.data_size = Size(8 << 30)),
                "do not fit in image_size 4GiB",
            ),
            (
                Box::new(|r| r.layout.boot_label = "fleet boot".into()),
                "layout.boot_label",
            ),
            (
                Box::new(|r| r.layout.boot_size = Size(32 * MIB)),
                "at least 64MiB",
            ),
            (
                Box::new(|r| r.files[0].path = "usr/bin/x".into()),
                "must be an absolute path",
            ),
            (Box::new(|r| r.files[0].mode = "rwx".into()), "octal"),
            (
                Box::new(|r| r.boot_files[0].path = "../escape".into()),
                "relative to the boot partition",
            ),
            (Box::new(|r| r.layout.vg = "vg-0".into()), "layout.vg"),
            (
                Box::new(|r| r.services.push("ssh".into())),
                "is not a unit name",
            ),
            (
                Box::new(|r| r.base.packages.clear()),
                "base.packages: the list is empty",
            ),
        ];
        for (edit, want) in cases {
            let got = check(edit);
            assert!(got.contains(want), "want {want:?}, got {got:?}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("pi.toml"))
            .unwrap()
            .replace("[layout]", "[layout]\nswap_size = \"1GiB\"");
        let err = toml::from_str::<Recipe>(&text).unwrap_err().to_string();
        assert!(err.contains("unknown field `swap_size`"), "{err}");
    }

    #[test]
    fn artifacts_must_be_given() {
        let r = recipe();
        let spec = r.files.iter().find(|f| f.source == "@fleet-agent").unwrap();
        let err = r
            .source(spec, Path::new("."), &BTreeMap::new())
            .unwrap_err();
        assert!(
            err.to_string().contains("--artifact fleet-agent=PATH"),
            "{err}"
        );
    }

    #[test]
    fn keys_change_with_any_part() {
        assert_eq!(key(&[b"a", b"bc"]), key(&[b"a", b"bc"]));
        assert_ne!(key(&[b"a", b"bc"]), key(&[b"ab", b"c"]));
        assert_eq!(key(&[b"x"]).len(), 16);
    }
}
