//! `fleetctl`: the command line for the Fleet operator's HTTP API.
//!
//! Exit codes: 0 on success, 1 when an operation failed (an invalid resource, a failed or
//! timed-out rollout, an unreachable operator), 2 for a usage error.
#![allow(clippy::print_stdout)] // A CLI prints its results.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use fleetctl::{Client, CtlError, render};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Declare workloads for a Fleet of devices and watch them converge"
)]
struct Args {
    /// The operator's URL.
    #[arg(
        long,
        global = true,
        env = "FLEET_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// The operator's admin token (`<identity>/admin.token`).
    #[arg(long, global = true, env = "FLEET_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the admin token, read when --token is not given.
    #[arg(long, global = true, env = "FLEET_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or update resources from a file or a folder of YAML/JSON files.
    ///
    /// Every document is checked first (fields, size, a resource given twice); if any is
    /// invalid, nothing is applied. A document the operator then refuses for a reason only it
    /// can see (a concurrent change, NATS unreachable) is reported, and the ones before it stay
    /// applied: apply again once the cause is fixed.
    Apply {
        /// A file (several documents separated by `---` are fine) or a folder.
        #[arg(short, long)]
        file: PathBuf,
        /// Wait until each applied Deployment runs on every matching device, showing progress.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// List resources, or show one.
    Get {
        kind: Kind,
        name: Option<String>,
        /// Print the full JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// Show one resource in detail, with its status on every device.
    Describe { kind: Kind, name: String },
    /// Delete a resource. Deleting a Deployment removes its containers from every device;
    /// deleting a Device removes every container the fleet runs on it.
    Delete { kind: Kind, name: String },
    /// Show whether the operator has finished reading the fleet's state.
    Status,
    /// Print the last lines a Deployment's container wrote on a device.
    Logs {
        deployment: String,
        #[arg(long)]
        device: String,
        #[arg(long, default_value_t = 100)]
        tail: u32,
        /// Keep printing new lines until interrupted.
        #[arg(short, long)]
        follow: bool,
    },
    /// Run a command once in a Deployment's container on a device (audited); exits with the
    /// command's exit code.
    Exec {
        deployment: String,
        #[arg(long)]
        device: String,
        #[arg(long, default_value_t = 30)]
        timeout: u32,
        /// Who runs it (recorded in the audit log); defaults to $USER.
        #[arg(long = "as", env = "USER", default_value = "unknown")]
        by: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// One-time tokens that let a new device enroll (get its NATS credentials).
    #[command(subcommand)]
    EnrollToken(TokenCommand),
    /// Quarantine a device, or lift the quarantine.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Staged rollouts: where one stands, and continuing a halted one.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Write every value of the fleet's store (but the operators' lease) to FILE as JSON.
    Backup {
        /// Where to write it; `-` for standard output.
        file: PathBuf,
    },
    /// Restore a backup: the fleet's resources become the backup's, under a new epoch of its
    /// fleet. Devices take the restored desired state and keep running (held) what it does
    /// not mention; nothing the backup holds is restarted. See docs/store-loss.md.
    Restore {
        /// A file written by `fleetctl backup`.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCommand {
    /// How far the current generation got, and why it halted if it did.
    Status { deployment: String },
    /// Continue a halted rollout past the devices holding it back now (a new spec, a fix,
    /// restarts the rollout by itself).
    Resume {
        deployment: String,
        #[arg(long = "as", env = "USER", default_value = "unknown")]
        by: String,
    },
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Cut the device off NATS at once and refuse its reconnects and new credentials. Its
    /// containers keep running.
    Blacklist {
        name: String,
        /// Why (recorded on the device).
        #[arg(long, default_value = "")]
        reason: String,
        /// Who asks (recorded on the device); defaults to $USER.
        #[arg(long = "as", env = "USER", default_value = "unknown")]
        by: String,
    },
    /// Let a blacklisted device back in; it reconnects by itself.
    Unblacklist {
        name: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long = "as", env = "USER", default_value = "unknown")]
        by: String,
    },
    /// Take in a device that reports but is `Unregistered` (the store lost its record) or is
    /// holding on another store: it gets a Device record with these labels and its identity
    /// record back, and keeps running what it runs (as held deployments) under this store.
    Adopt {
        name: String,
        /// A label of its Device record, `key=value`; repeat for more.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long = "as", env = "USER", default_value = "unknown")]
        by: String,
    },
    /// Let a device remove the deployments it holds from an earlier store (those no
    /// Deployment of this store names).
    Release {
        name: String,
        #[arg(long = "as", env = "USER", default_value = "unknown")]
        by: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token; prints the secret token alone on stdout (it is shown only once).
    Create {
        /// A label the enrolled Device gets, `key=value`; repeat for more.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// How long the token can be used, in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl: u64,
    },
    /// List tokens (never the secrets): who used each, which expired or were revoked.
    List,
    /// Revoke an unused token.
    Revoke { id: String },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    #[value(alias = "deployment", alias = "deploy")]
    Deployments,
    #[value(alias = "device", alias = "dev")]
    Devices,
    #[value(alias = "osupgrade", alias = "os")]
    Osupgrades,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("error: cannot read the token file {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
        },
        (None, None) => None,
    };
    let client = Client::new(&args.server, token.as_deref());
    match run(&client, args.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            if let CtlError::Api { fields, .. } = &e {
                for f in fields {
                    eprintln!("  {f}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

fn run(client: &Client, command: Command) -> Result<ExitCode, CtlError> {
    match command {
        Command::Apply {
            file,
            wait,
            timeout,
        } => apply(client, &file, wait, Duration::from_secs(timeout)),
        Command::Get {
            kind: Kind::Deployments,
            name,
            json,
        } => {
            let list = match name {
                Some(n) => vec![client.deployment(&n)?],
                None => client.deployments()?,
            };
            if json {
                print_json(&list);
            } else {
                println!("{}", render::deployments_table(&list));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            kind: Kind::Devices,
            name,
            json,
        } => {
            let list = match name {
                Some(n) => vec![client.device(&n)?],
                None => client.devices()?,
            };
            if json {
                print_json(&list);
            } else {
                println!("{}", render::devices_table(&list));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Get {
            kind: Kind::Osupgrades,
            name,
            json,
        } => {
            let list = match name {
                Some(n) => vec![client.os_upgrade(&n)?],
                None => client.os_upgrades()?,
            };
            if json {
                print_json(&list);
            } else {
                println!("{}", render::os_upgrades_table(&list));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe {
            kind: Kind::Osupgrades,
            name,
        } => {
            println!(
                "{}",
                render::describe_os_upgrade(&client.os_upgrade(&name)?)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe {
            kind: Kind::Deployments,
            name,
        } => {
            println!(
                "{}",
                render::describe_deployment(&client.deployment(&name)?)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe {
            kind: Kind::Devices,
            name,
        } => {
            println!(
                "{}",
                render::describe_device(&client.device(&name)?, fleetctl::clock::unix_ms())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete { kind, name } => {
            let (path, label) = match kind {
                Kind::Deployments => ("deployments", "deployment"),
                Kind::Devices => ("devices", "device"),
                Kind::Osupgrades => ("osupgrades", "osupgrade"),
            };
            client.delete(path, &name)?;
            println!("{label}/{name} deleted");
            Ok(ExitCode::SUCCESS)
        }
        Command::EnrollToken(TokenCommand::Create { labels, ttl }) => {
            let req = fleet_contracts::api::CreateEnrollmentToken {
                labels: labels.into_iter().collect(),
                ttl_secs: Some(ttl),
            };
            let created = client.create_enrollment_token(&req)?;
            eprintln!(
                "enrollment token {} created, usable once within {}; put it in the device's agent config (enrollment_token)",
                created.info.id,
                render::age(ttl * 1000)
            );
            println!("{}", created.token);
            Ok(ExitCode::SUCCESS)
        }
        Command::EnrollToken(TokenCommand::List) => {
            let tokens = client.enrollment_tokens()?;
            println!(
                "{}",
                render::tokens_table(&tokens, fleetctl::clock::unix_ms())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::EnrollToken(TokenCommand::Revoke { id }) => {
            client.revoke_enrollment_token(&id)?;
            println!("enrollment token {id} revoked");
            Ok(ExitCode::SUCCESS)
        }
        Command::Device(DeviceCommand::Blacklist { name, reason, by }) => {
            println!("{}", client.blacklist(&name, true, &by, &reason)?.message);
            Ok(ExitCode::SUCCESS)
        }
        Command::Device(DeviceCommand::Unblacklist { name, reason, by }) => {
            println!("{}", client.blacklist(&name, false, &by, &reason)?.message);
            Ok(ExitCode::SUCCESS)
        }
        Command::Device(DeviceCommand::Adopt { name, labels, by }) => {
            let request = fleet_contracts::api::AdoptRequest {
                by,
                labels: labels.into_iter().collect(),
            };
            println!(
                "device/{name} adopted: {}",
                client.adopt(&name, &request)?.message
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Device(DeviceCommand::Release { name, by }) => {
            println!("device/{name}: {}", client.release(&name, &by)?.message);
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup { file } => {
            let backup = client.backup()?;
            let mut bytes = serde_json::to_vec_pretty(&backup).expect("serializes");
            bytes.push(b'\n');
            let values: usize = backup.buckets.values().map(|b| b.len()).sum();
            if file.as_os_str() == "-" {
                std::io::Write::write_all(&mut std::io::stdout(), &bytes)
                    .map_err(|e| CtlError::Io(format!("cannot write the backup: {e}")))?;
            } else {
                write_whole(&file, &bytes)?;
            }
            eprintln!(
                "backed up {values} values of {} ({} bytes)",
                backup.store,
                bytes.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore { file } => {
            let text = std::fs::read(&file)
                .map_err(|e| CtlError::Io(format!("cannot read {}: {e}", file.display())))?;
            let mut de = serde_json::Deserializer::from_slice(&text);
            let backup: fleet_contracts::api::Backup = serde_path_to_error::deserialize(&mut de)
                .map_err(|e| {
                    CtlError::Io(format!(
                        "{} is not a backup written by `fleetctl backup`: {}: {}",
                        file.display(),
                        e.path(),
                        e.inner()
                    ))
                })?;
            eprintln!("restoring {} from {} ...", backup.store, file.display());
            let result = client.restore(&backup)?;
            for (bucket, what) in &result.buckets {
                println!("{bucket}: {what}");
            }
            println!(
                "restored as {}: devices of this fleet take it and keep running (held) what it does not mention",
                result.store
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs {
            deployment,
            device,
            tail,
            follow: true,
        } => {
            client.follow_logs(&deployment, &device, tail, |line| {
                println!("{line}");
                true
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs {
            deployment,
            device,
            tail,
            ..
        } => match client.logs(&deployment, &device, tail)? {
            fleet_contracts::rpc::LogsReply::Lines { lines, truncated } => {
                if truncated {
                    eprintln!("(older lines dropped: the answer is capped at 512 KiB)");
                }
                for line in lines {
                    println!("{line}");
                }
                Ok(ExitCode::SUCCESS)
            }
            fleet_contracts::rpc::LogsReply::Error { message } => {
                eprintln!("error: {message}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Exec {
            deployment,
            device,
            timeout,
            by,
            command,
        } => {
            let cmd = fleet_contracts::api::ExecCommand {
                device,
                command,
                timeout_secs: timeout,
                by,
            };
            match client.exec(&deployment, &cmd)? {
                fleet_contracts::rpc::ExecReply::Done {
                    exit_code,
                    stdout,
                    stderr,
                    truncated,
                } => {
                    print!("{stdout}");
                    eprint!("{stderr}");
                    if truncated {
                        eprintln!("(output truncated at 256 KiB per stream)");
                    }
                    Ok(ExitCode::from(u8::try_from(exit_code).unwrap_or(1)))
                }
                fleet_contracts::rpc::ExecReply::TimedOut { after_secs } => {
                    eprintln!("error: the command did not finish within {after_secs}s");
                    Ok(ExitCode::FAILURE)
                }
                fleet_contracts::rpc::ExecReply::Error { message } => {
                    eprintln!("error: {message}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Rollout(RolloutCommand::Status { deployment }) => {
            let d = client.deployment(&deployment)?;
            println!("{}", render::progress_line(&d));
            let halted = d.status.and_then(|s| s.rollout).and_then(|r| r.halted);
            Ok(if halted.is_some() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Rollout(RolloutCommand::Resume { deployment, by }) => {
            let r = client.resume_rollout(&deployment, &by)?;
            println!(
                "rollout of {deployment} generation {} resumed: the next wave goes out when its devices are Ready",
                r.generation
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let s = client.status()?;
            println!(
                "operator {} ({}): {:?}, {:?}",
                s.instance, s.version, s.role, s.state
            );
            if s.role == fleet_contracts::api::Role::Standby {
                match &s.leader {
                    Some(l) => println!("  the leader is {l}"),
                    None => println!("  no leader known"),
                }
            }
            for p in &s.pending {
                println!("  {p}");
            }
            for u in &s.unreadable {
                println!("  skipped, unreadable: {u}");
            }
            println!("{} deployments, {} devices", s.deployments, s.devices);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn apply(
    client: &Client,
    path: &std::path::Path,
    wait: bool,
    timeout: Duration,
) -> Result<ExitCode, CtlError> {
    let docs = match fleetctl::load_documents(path) {
        Ok(docs) => docs,
        Err(e) => {
            eprintln!("error: {e}\nnothing was applied");
            return Ok(ExitCode::FAILURE);
        }
    };
    let problems = fleetctl::check_documents(&docs);
    if !problems.is_empty() {
        for (source, why) in &problems {
            eprintln!("error: {source}:");
            for w in why {
                eprintln!("  {w}");
            }
        }
        eprintln!(
            "nothing was applied: {} of {} document(s) are invalid",
            problems.len(),
            docs.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    let mut failed = false;
    let mut deployments = Vec::new();
    for doc in &docs {
        match client.apply(&doc.value) {
            Ok(r) => {
                println!(
                    "{}/{} {} (generation {})",
                    r.kind.to_lowercase(),
                    r.name,
                    r.outcome,
                    r.generation
                );
                for w in &r.warnings {
                    println!("  warning: {w}");
                }
                if r.kind == "Deployment" {
                    deployments.push(r.name);
                }
            }
            Err(CtlError::Api {
                message, fields, ..
            }) => {
                failed = true;
                eprintln!("error: {}: {message}", doc.source);
                for f in fields {
                    eprintln!("  {f}");
                }
            }
            Err(e) => return Err(e),
        }
    }
    if wait && !failed {
        for name in deployments {
            match client.wait_running(&name, timeout, |line| println!("  {line}")) {
                Ok(_) => println!("deployment/{name} is running on every matching device"),
                Err(e) => {
                    eprintln!("error: deployment/{name} {e}");
                    failed = true;
                }
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Writes `bytes` to `path` through a temporary file renamed over it, synced first: a crash
/// leaves the old file or the new one, never half a backup. Readable by its owner only: a
/// backup holds the devices' identities and the revocation list.
fn write_whole(path: &std::path::Path, bytes: &[u8]) -> Result<(), CtlError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| CtlError::Io(format!("cannot write {}: {e}", path.display())))
}
