//! `fleet-image`: builds Fleet's flashable Raspberry Pi image from a recipe (`image/pi.toml`).
//!
//! ```text
//! fleet-image build --recipe image/pi.toml --out target/images/fleet-pi.img \
//!     --artifact fleet-agent=target/aarch64-unknown-linux-musl/release/fleet-agent \
//!     --artifact fleet-bootguard=target/aarch64-unknown-linux-musl/release/fleet-bootguard
//! ```
//!
//! `scripts/image.sh` builds the artifacts and runs exactly that. The build needs root (chroot,
//! mounts), `mmdebstrap`, qemu-user with binfmt, `qemu-system-aarch64`, mtools, dosfstools
//! and sfdisk (all installed by `scripts/bootstrap.sh`). See [`build`] for the layers and their
//! cache.
#![allow(clippy::disallowed_methods)] // A build tool: running mmdebstrap, qemu and mkfs is its job.

mod build;
mod recipe;

use std::{collections::BTreeMap, io::Write, os::unix::fs::MetadataExt, path::PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "fleet-image",
    about = "Builds Fleet's flashable Raspberry Pi image"
)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the image (cached layers: a second build with the same inputs takes seconds).
    Build {
        #[arg(long, default_value = "image/pi.toml")]
        recipe: PathBuf,
        #[arg(long, default_value = "target/images/fleet-pi.img")]
        out: PathBuf,
        /// A build artifact the recipe names as "@NAME": NAME=PATH.
        #[arg(long = "artifact", value_name = "NAME=PATH")]
        artifacts: Vec<String>,
        #[arg(
            long,
            env = "FLEET_IMAGE_CACHE",
            default_value = "/var/cache/fleet/image"
        )]
        cache: PathBuf,
    },
    /// Check a recipe without building.
    Check {
        #[arg(long, default_value = "image/pi.toml")]
        recipe: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "fleet-image: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    match args.command {
        Cmd::Check { recipe } => {
            let r = recipe::Recipe::load(&recipe)?;
            let summary = format!(
                "{}: ok ({} packages, {} files, image {})",
                recipe.display(),
                r.base.packages.len(),
                r.files.len() + r.boot_files.len(),
                r.layout.image_size
            );
            let base = build::base_key(&r)?;
            let _ = writeln!(std::io::stdout(), "{summary}\nbase layer: base-{base}.tar");
            Ok(())
        }
        Cmd::Build {
            recipe,
            out,
            artifacts,
            cache,
        } => {
            let mut named = BTreeMap::new();
            for a in artifacts {
                let Some((name, path)) = a.split_once('=') else {
                    bail!("--artifact {a:?}: say NAME=PATH");
                };
                let path = PathBuf::from(path);
                if !path.is_file() {
                    bail!("--artifact {name}: {} is not a file", path.display());
                }
                named.insert(name.to_owned(), path);
            }
            let builder = build::Builder {
                recipe: recipe::Recipe::load(&recipe)?,
                recipe_dir: recipe
                    .parent()
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from(".")),
                artifacts: named,
                cache,
            };
            let built = builder.build(&out)?;
            let meta = std::fs::metadata(&built.image)
                .with_context(|| format!("reading {}", built.image.display()))?;
            let total: std::time::Duration = built.steps.iter().map(|s| s.1).sum();
            let mut report = format!(
                "\n{}: {} MiB ({} MiB allocated) in {}\n",
                built.image.display(),
                meta.len() >> 20,
                (meta.blocks() * 512) >> 20,
                build::human(total)
            );
            for (title, took, cached) in &built.steps {
                report.push_str(&format!(
                    "  {:>8}  {title}\n",
                    if *cached {
                        "cached".to_owned()
                    } else {
                        build::human(*took)
                    }
                ));
            }
            let _ = std::io::stdout().write_all(report.as_bytes());
            Ok(())
        }
    }
}
