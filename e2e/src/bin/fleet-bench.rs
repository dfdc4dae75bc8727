//! `fleet-bench`: the figures of the local fleet, against real nats-server, operator, agent and
//! podman, with a baseline measured in the same run.
//!
//! - apply-to-Ready latency (p50, p99) over N Deployments, from the API call until the
//!   device reports the generation Ready; baseline: `podman run -d` of the same image on the
//!   same storage, the floor any agent pays;
//! - the agent's peak and current RSS and its idle CPU while it manages 10 containers;
//! - cutover downtime of an upgrade: last answer from v1 to first answer from v2 of an HTTP
//!   service polled every 5 ms, median and max over 10 upgrades;
//! - stop time of the old container on an upgrade, for an app that exits on SIGTERM and for one
//!   that ignores it and is SIGKILLed after its grace, median and max over 5 upgrades each;
//! - logs-follow latency: a line written in the container to its arrival at a `fleetctl logs
//!   -f` client, median and p99 over 200 lines (the container prints the kernel's uptime,
//!   which it shares with the host, so both ends read one clock, at 10 ms resolution);
//! - blacklist command to disconnect, and un-blacklist to the device reconnected and converged
//!   (a change made while it was out), median over 10 runs;
//! - the size of the stripped static aarch64 agent, when built;
//! - operator recovery (hollow devices, KV state written directly): a full fan-out of one
//!   Deployment to 1,000 and 10,000 devices until every device has acknowledged it, against
//!   the floor of raw pipelined KV puts of as many keys in the same run; operator start to
//!   "converged" on that state; and SIGKILL to converged under a continuous writer.
//!
//! Run it through `scripts/bench.sh` (`scripts/bench.sh recovery`: the recovery figures only),
//! which builds everything in release mode first.
#![allow(clippy::print_stdout, clippy::disallowed_methods)] // A benchmark prints and times podman.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fleet_contracts::{
    names,
    state::{Phase, ReportedDeployment},
};
use fleet_e2e::{Agent, PodmanSandbox, TestFleet, WAIT, free_port, http_deployment};
use futures::StreamExt;

const DEVICE: &str = "bench-01";

#[tokio::main]
async fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("recovery") {
        return recovery_figures().await;
    }
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(25);
    println!("fleet-bench: {n} deployments, real nats-server + podman (runc), one agent");
    let fleet = TestFleet::start().await?;
    let sandbox = PodmanSandbox::new(&fleet.path().join(DEVICE))?;

    let baseline = podman_floor(&sandbox, n)?;

    // Default device intervals (10 s heartbeat, 5 s resync), as on a Pi.
    let token = fleet.enrollment_token(&[("role", "bench")])?;
    let agent = Agent::start_with(fleet.path(), DEVICE, &fleet.nats, &token, &sandbox, 10, 5)?;
    let js = async_nats::jetstream::new(fleet.nats.client().await?);
    let reported = js.get_key_value(names::REPORTED_BUCKET).await?;

    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("bench-{i}");
        let key = names::deployment_key(DEVICE, &name);
        let mut watch = reported.watch(&key).await?;
        let started = Instant::now();
        fleet
            .operator
            .apply(&http_deployment(&name, "bench", free_port(), "bench"))?;
        tokio::time::timeout(WAIT, async {
            while let Some(entry) = watch.next().await {
                let entry = entry?;
                if let Ok(r) = serde_json::from_slice::<ReportedDeployment>(&entry.value) {
                    match r.phase {
                        Phase::Ready if r.observed_generation == 1 => return Ok(()),
                        Phase::Failed => bail!("{name} failed: {}", r.message),
                        _ => {}
                    }
                }
            }
            bail!("watch ended")
        })
        .await
        .with_context(|| format!("{name} did not run"))??;
        latencies.push(started.elapsed());
    }
    for i in 10..n {
        fleet
            .operator
            .client()
            .delete("deployments", &format!("bench-{i}"))?;
    }
    fleet_e2e::eventually("10 containers left", WAIT, || async {
        Ok((sandbox.containers()?.len() == 10).then_some(()))
    })
    .await?;

    let pid = agent
        .proc
        .as_ref()
        .and_then(|p| p.pid())
        .context("agent pid")?;
    // Let the deletions settle, then measure a quiet window.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let window = Duration::from_secs(20);
    let (cpu0, child0) = cpu_ticks(pid)?;
    tokio::time::sleep(window).await;
    let (cpu1, child1) = cpu_ticks(pid)?;
    let (hwm, rss) = memory_kib(pid)?;
    let ticks = 100.0; // USER_HZ on Linux
    let own = (cpu1 - cpu0) as f64 / ticks / window.as_secs_f64() * 100.0;
    let with_podman =
        ((cpu1 + child1) - (cpu0 + child0)) as f64 / ticks / window.as_secs_f64() * 100.0;

    let p50 = percentile(&latencies, 50.0);
    let p99 = percentile(&latencies, 99.0);
    let floor = percentile(&baseline, 50.0);
    println!();
    println!("apply-to-Ready (API call -> device reports the deployment Ready), n={n}");
    println!("  p50 {:>8.1} ms   p99 {:>8.1} ms", ms(p50), ms(p99));
    println!("baseline: podman run -d of the same image, same storage, n={n}");
    println!(
        "  p50 {:>8.1} ms   p99 {:>8.1} ms",
        ms(floor),
        ms(percentile(&baseline, 99.0))
    );
    println!(
        "  ratio p50 apply-to-Ready / podman run: {:.2}x",
        p50.as_secs_f64() / floor.as_secs_f64()
    );
    println!(
        "agent with 10 containers (5 s resync, 10 s heartbeat), over {}s idle:",
        window.as_secs()
    );
    println!(
        "  RSS now {:.1} MiB, peak {:.1} MiB (target: under 8 MiB; balena supervisor idles at 45 MB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "  CPU {own:.2}% of one core (agent alone), {with_podman:.2}% including the podman processes it runs"
    );
    cutover_figures(&fleet).await?;
    stop_figures(&fleet, &reported).await?;
    follow_figures(&fleet).await?;
    blacklist_figures(&fleet, &agent, &reported).await?;
    let aarch64 =
        fleet_e2e::workspace().join("target/aarch64-unknown-linux-musl/release/fleet-agent");
    match std::fs::metadata(&aarch64) {
        Ok(m) => println!(
            "aarch64 static agent, stripped: {:.2} MiB ({} bytes)",
            m.len() as f64 / 1048576.0,
            m.len()
        ),
        Err(_) => println!("aarch64 agent not built (scripts/bench.sh builds it)"),
    }
    drop(agent);
    drop(fleet);
    recovery_figures().await?;
    Ok(())
}

/// `podman run -d` + `rm` of the example image, n times: what creating a container costs.
fn podman_floor(sandbox: &PodmanSandbox, n: usize) -> Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let port = free_port().to_string();
        let name = format!("floor-{i}");
        let started = Instant::now();
        sandbox.podman(&[
            "run",
            "-d",
            "--name",
            &name,
            "--publish",
            &format!("{port}:8080"),
            "localhost/fleet-example-http:1",
        ])?;
        out.push(started.elapsed());
        sandbox.podman(&["rm", "--force", "--time", "0", &name])?;
    }
    Ok(out)
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut v = samples.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (own utime+stime, waited-for children's cutime+cstime) in clock ticks.
fn cpu_ticks(pid: u32) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime is field 14 overall.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    Ok((f[0] + f[1], f[2] + f[3]))
}

/// (VmHWM, VmRSS) in KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmHWM:"), field("VmRSS:")))
}

/// Blacklist -> disconnect, and un-blacklist -> reconnected and converged, 10 times.
async fn blacklist_figures(
    fleet: &TestFleet,
    agent: &Agent,
    reported: &async_nats::jetstream::kv::Store,
) -> Result<()> {
    let seed = std::fs::read_to_string(agent.state_dir.join("identity/device.nk"))?;
    let jwt = std::fs::read_to_string(agent.state_dir.join("identity/device.jwt"))?;
    let key = std::sync::Arc::new(nkeys::KeyPair::from_seed(seed.trim())?);
    let api = fleet.operator.client();
    let (mut cut, mut back) = (Vec::new(), Vec::new());
    for round in 0..10u64 {
        // An observer holding the device's own credentials sees the cut.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let signer = key.clone();
        let _observer = async_nats::ConnectOptions::with_jwt(jwt.trim().to_owned(), move |nonce| {
            let signer = signer.clone();
            async move { signer.sign(&nonce).map_err(async_nats::AuthError::new) }
        })
        .add_root_certificates(fleet.nats.ca())
        .require_tls(true)
        .custom_inbox_prefix(format!("_INBOX.dev.{DEVICE}"))
        .max_reconnects(Some(0))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                if matches!(event, async_nats::Event::Disconnected) {
                    let _ = tx.send(Instant::now());
                }
            }
        })
        .connect(fleet.nats.url())
        .await?;
        let sent = Instant::now();
        api.blacklist(DEVICE, true, "bench", "measuring")?;
        let at = tokio::time::timeout(WAIT, rx.recv())
            .await?
            .context("observer closed")?;
        cut.push(at.duration_since(sent));

        // A change while it is out, then let it back in and wait until it runs the change.
        let generation = round + 2;
        let key_name = names::deployment_key(DEVICE, "bench-0");
        let mut watch = reported.watch(&key_name).await?;
        let mut doc = http_deployment("bench-0", "bench", free_port(), &format!("round {round}"));
        doc["metadata"]["name"] = "bench-0".into();
        let applied = fleet.operator.apply(&doc)?;
        assert_eq!(applied.generation, generation);
        let sent = Instant::now();
        api.blacklist(DEVICE, false, "bench", "measured")?;
        tokio::time::timeout(WAIT, async {
            while let Some(entry) = watch.next().await {
                let entry = entry?;
                if let Ok(r) = serde_json::from_slice::<ReportedDeployment>(&entry.value)
                    && r.phase == Phase::Ready
                    && r.observed_generation == generation
                {
                    return Ok(());
                }
            }
            bail!("watch ended")
        })
        .await
        .context("the device did not converge after un-blacklisting")??;
        back.push(sent.elapsed());
    }
    println!("blacklist command -> device disconnected, n=10");
    println!(
        "  median {:>8.1} ms   max {:>8.1} ms",
        ms(percentile(&cut, 50.0)),
        ms(percentile(&cut, 100.0))
    );
    println!("un-blacklist -> device reconnected and running a change made meanwhile, n=10");
    println!(
        "  median {:>8.1} ms   max {:>8.1} ms",
        ms(percentile(&back, 50.0)),
        ms(percentile(&back, 100.0))
    );
    println!(
        "  (anchors: a token-expiry cut-off waits up to an hour; Mender device tokens last a week)"
    );
    Ok(())
}

/// Upgrades an HTTP service 10 times while polling it, and prints the gap between the last
/// answer of the old version and the first of the new one.
async fn cutover_figures(fleet: &TestFleet) -> Result<()> {
    let port = free_port();
    fleet
        .operator
        .apply(&http_deployment("cutover", "bench", port, "c0"))?;
    fleet
        .operator
        .wait_phase(
            "cutover",
            1,
            fleet_contracts::resource::RolloutPhase::Running,
        )
        .await?;
    let url = format!("http://127.0.0.1:{port}/");
    let mut gaps = Vec::new();
    for round in 1..=10u64 {
        let (old, new) = (format!("c{}", round - 1), format!("c{round}"));
        let poll_url = url.clone();
        let poller = tokio::task::spawn_blocking(move || -> Result<Duration> {
            let deadline = Instant::now() + WAIT;
            let mut last_old = Instant::now();
            while Instant::now() < deadline {
                if let Ok((200, body)) = fleet_e2e::http_get(&poll_url) {
                    let body = body.trim();
                    if body == old {
                        last_old = Instant::now();
                    } else if body == new {
                        return Ok(Instant::now().duration_since(last_old));
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            bail!("{new} never answered")
        });
        fleet.operator.apply(&http_deployment(
            "cutover",
            "bench",
            port,
            &format!("c{round}"),
        ))?;
        gaps.push(poller.await??);
    }
    println!(
        "cutover downtime of an upgrade (last v1 answer -> first v2 answer, default lifecycle), n=10 (p99 is the max)"
    );
    println!(
        "  median {:>8.1} ms   p99 {:>8.1} ms",
        ms(percentile(&gaps, 50.0)),
        ms(percentile(&gaps, 99.0))
    );
    fleet.operator.client().delete("deployments", "cutover")?;
    Ok(())
}

/// How long the old container takes to stop on an upgrade, for an app that exits on SIGTERM
/// and for one that ignores it (SIGKILLed after its 3 s grace): from the device's `Upgrading`
/// report to its `Creating` report (the old container stopped and removed), both stamped by the
/// agent's clock. Five upgrades each.
async fn stop_figures(
    fleet: &TestFleet,
    reported: &async_nats::jetstream::kv::Store,
) -> Result<()> {
    const GRACE: u32 = 3;
    let app = |script: &str, round: u64| {
        serde_json::json!({
            "apiVersion": "fleet.dev/v1",
            "kind": "Deployment",
            "metadata": {"name": "stopper"},
            "spec": {
                "selector": {"matchLabels": {"role": "bench"}},
                "template": {
                    "lifecycle": {"graceSeconds": GRACE},
                    "containers": [{
                        "name": "stopper",
                        "image": "localhost/fleet-busybox:1",
                        "command": ["/bin/sh", "-c", script],
                        "env": [{"name": "ROUND", "value": round.to_string()}]
                    }]
                }
            }
        })
    };
    let graceful = "trap 'exit 0' TERM; sleep 3600 & wait";
    let stubborn = "trap '' TERM; sleep 3600 & wait; sleep 3600";
    let key = names::deployment_key(DEVICE, "stopper");
    let client = fleet.operator.client();
    println!(
        "stop time of the old container on an upgrade (Upgrading -> Creating, agent clock), n=5"
    );
    for (label, script) in [
        ("exits on SIGTERM", graceful),
        ("ignores SIGTERM, grace 3 s", stubborn),
    ] {
        let first = fleet.operator.apply(&app(script, 0))?.generation;
        fleet
            .operator
            .wait_phase(
                "stopper",
                first,
                fleet_contracts::resource::RolloutPhase::Running,
            )
            .await?;
        let mut stops = Vec::new();
        for round in 1..=5 {
            let mut watch = reported.watch(&key).await?;
            let generation = fleet.operator.apply(&app(script, round))?.generation;
            let (mut upgrading, mut creating) = (None, None);
            tokio::time::timeout(WAIT, async {
                while let Some(entry) = watch.next().await {
                    let entry = entry?;
                    let Ok(r) = serde_json::from_slice::<ReportedDeployment>(&entry.value) else {
                        continue;
                    };
                    if r.observed_generation != generation {
                        continue;
                    }
                    match r.phase {
                        Phase::Upgrading => upgrading = Some(r.since_ms),
                        Phase::Creating => creating = Some(r.since_ms),
                        Phase::Ready => return Ok(()),
                        Phase::Failed => bail!("stopper failed: {}", r.message),
                        _ => {}
                    }
                }
                bail!("watch ended")
            })
            .await
            .context("the upgrade did not finish")??;
            let (Some(a), Some(b)) = (upgrading, creating) else {
                bail!("missed a phase: Upgrading {upgrading:?}, Creating {creating:?}");
            };
            stops.push(Duration::from_millis(b.saturating_sub(a)));
        }
        println!(
            "  {label:<28} median {:>8.1} ms   max {:>8.1} ms",
            ms(percentile(&stops, 50.0)),
            ms(percentile(&stops, 100.0))
        );
    }
    client.delete("deployments", "stopper")?;
    Ok(())
}

/// Follows a container that prints the shared kernel uptime every 50 ms and measures how late
/// each line arrives.
async fn follow_figures(fleet: &TestFleet) -> Result<()> {
    let mut doc = http_deployment("clock", "bench", free_port(), "x");
    doc["spec"]["template"]["containers"][0]["image"] = "localhost/fleet-busybox:1".into();
    doc["spec"]["template"]["containers"][0]["command"] = serde_json::json!([
        "/bin/sh",
        "-c",
        "trap 'exit 0' TERM; while :; do cut -d' ' -f1 /proc/uptime; sleep 0.05; done"
    ]);
    fleet.operator.apply(&doc)?;
    fleet
        .operator
        .wait_phase("clock", 1, fleet_contracts::resource::RolloutPhase::Running)
        .await?;
    let client = fleet.operator.client();
    let lags = tokio::task::spawn_blocking(move || -> Result<Vec<Duration>> {
        let mut lags = Vec::new();
        client.follow_logs("clock", DEVICE, 0, |line| {
            let now = std::fs::read_to_string("/proc/uptime")
                .ok()
                .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok());
            if let (Ok(written), Some(now)) = (line.trim().parse::<f64>(), now) {
                lags.push(Duration::from_secs_f64((now - written).max(0.0)));
            }
            lags.len() < 200
        })?;
        Ok(lags)
    })
    .await??;
    println!(
        "logs-follow latency (written in the container -> read by the client), n={}",
        lags.len()
    );
    println!(
        "  median {:>8.1} ms   p99 {:>8.1} ms   (10 ms clock resolution)",
        ms(percentile(&lags, 50.0)),
        ms(percentile(&lags, 99.0))
    );
    fleet.operator.client().delete("deployments", "clock")?;
    Ok(())
}

/// A fleet user that may read and write every key: the benchmark's hollow devices.
fn hollow_fleet_creds(fleet: &TestFleet) -> Result<String> {
    use fleet_operator::identity::jwt::{Permission, UserPermissions};
    let identity = fleet_operator::identity::Identity::init_or_load(&fleet.nats.identity)?;
    Ok(identity.fleet_user_creds(
        "fleet-bench-hollow",
        UserPermissions {
            publish: Permission::allow(&["$JS.API.>", "$KV.>", "$JS.ACK.>", "$JS.FC.>"]),
            subscribe: Permission::allow(&["_INBOX.>"]),
            resp: None,
            subs: Some(-1),
            data: Some(-1),
            payload: Some(-1),
        },
    )?)
}

async fn hollow_client(fleet: &TestFleet) -> Result<async_nats::jetstream::Context> {
    let creds = hollow_fleet_creds(fleet)?;
    let client = async_nats::ConnectOptions::with_credentials(&creds)?
        .add_root_certificates(fleet.nats.ca())
        .require_tls(true)
        .connect(fleet.nats.url())
        .await?;
    Ok(async_nats::jetstream::new(client))
}

/// Puts every `(subject, bytes)` pipelined (a window of publishes out before its acks are
/// awaited). The window must stay under async-nats' limit of acks in flight (5,000 by
/// default): past it a publish waits for an ack nobody is awaiting yet.
async fn put_all(
    js: &async_nats::jetstream::Context,
    puts: Vec<(String, Vec<u8>)>,
    window: usize,
) -> Result<()> {
    for chunk in puts.chunks(window) {
        let mut acks = Vec::with_capacity(chunk.len());
        for (subject, bytes) in chunk {
            acks.push(js.publish(subject.clone(), bytes.clone().into()).await?);
        }
        for ack in acks {
            ack.await?;
        }
    }
    Ok(())
}

/// Hollow devices acknowledging every desired value: for each desired put it reports the
/// deployment Ready at that generation, as an agent would once it runs.
fn spawn_acker(js: async_nats::jetstream::Context) -> tokio::task::JoinHandle<Result<()>> {
    use async_nats::jetstream::consumer::{DeliverPolicy, push::OrderedConfig};
    tokio::spawn(async move {
        let stream = js
            .get_stream(names::kv_stream(names::DESIRED_BUCKET))
            .await?;
        let consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: format!("$KV.{}.>", names::DESIRED_BUCKET),
                deliver_subject: js.client().new_inbox(),
                deliver_policy: DeliverPolicy::New,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let prefix = format!("$KV.{}.", names::DESIRED_BUCKET);
        let mut pending = Vec::new();
        loop {
            // Batch whatever has arrived, then publish the reports pipelined.
            let first = messages.next().await;
            let Some(first) = first else { return Ok(()) };
            let mut batch = vec![first?];
            while let Ok(Some(Ok(m))) =
                tokio::time::timeout(Duration::from_millis(1), messages.next()).await
            {
                batch.push(m);
                if batch.len() >= 1000 {
                    break;
                }
            }
            for m in batch {
                let Some(key) = m.subject.as_str().strip_prefix(&prefix) else {
                    continue;
                };
                let Ok(d) =
                    serde_json::from_slice::<fleet_contracts::state::DesiredDeployment>(&m.payload)
                else {
                    continue;
                };
                let subject = format!("$KV.{}.{key}", names::REPORTED_BUCKET);
                let report = fleet_e2e::hollow_report(&d.deployment, d.generation, Phase::Ready);
                pending.push(js.publish(subject, report.into()).await?);
            }
            for ack in pending.drain(..) {
                ack.await?;
            }
        }
    })
}

/// Counts the reported keys of `deployment` that are Ready at `generation`, until `n`.
async fn wait_acks(
    js: &async_nats::jetstream::Context,
    deployment: &str,
    generation: u64,
    n: usize,
) -> Result<()> {
    let kv = js.get_key_value(names::REPORTED_BUCKET).await?;
    let mut watch = kv.watch(format!("*.{deployment}")).await?;
    let mut acked = std::collections::BTreeSet::new();
    tokio::time::timeout(Duration::from_secs(300), async {
        while let Some(entry) = watch.next().await {
            let entry = entry?;
            if let Ok(r) = serde_json::from_slice::<ReportedDeployment>(&entry.value)
                && r.phase == Phase::Ready
                && r.observed_generation == generation
            {
                acked.insert(entry.key);
                if acked.len() == n {
                    return Ok(());
                }
            }
        }
        bail!("watch ended")
    })
    .await
    .context("not every device acknowledged within 300 s")?
}

/// Polls the operator's status every 10 ms until it says converged.
async fn wait_converged(op: &fleet_e2e::Operator) -> Result<()> {
    let client = op.client();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(s) = client.status()
            && s.state == fleet_contracts::api::RecoveryState::Converged
            && s.role == fleet_contracts::api::Role::Leader
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the operator did not converge within 300 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn fan_doc(version: u64) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "fleet.dev/v1",
        "kind": "Deployment",
        "metadata": {"name": "fan"},
        "spec": {
            "selector": {"matchLabels": {"fleet": "bench"}},
            "template": {"containers": [{
                "name": "fan",
                "image": "localhost/fleet-busybox:1",
                "env": [{"name": "VERSION", "value": version.to_string()}]
            }]}
        }
    })
}

/// Fan-out to N hollow devices until all acknowledged, against raw KV puts of N keys; operator
/// start to converged on that state; SIGKILL to converged under a writer.
async fn recovery_figures() -> Result<()> {
    println!("operator recovery (hollow devices; KV state written directly, pipelined)");
    for n in [1_000usize, 10_000] {
        let mut fleet = TestFleet::start().await?;
        let js = hollow_client(&fleet).await?;
        eprintln!("  ({n} devices: writing their state)");
        // Devices (labelled for the fan-out and, alternately, for the writer below) and one
        // heartbeat each, written straight into KV.
        let mut puts = Vec::with_capacity(2 * n);
        for i in 0..n {
            let name = format!("h{i:05}");
            let doc = serde_json::json!({
                "apiVersion": "fleet.dev/v1", "kind": "Device",
                "metadata": {"name": name, "generation": 1,
                             "labels": {"fleet": "bench", "role": fleet_e2e::churn::ROLES[i % 2]}}
            });
            let key = names::resource_key("Device", &name);
            puts.push((
                format!("$KV.{}.{key}", names::RESOURCES_BUCKET),
                serde_json::to_vec(&doc)?,
            ));
            puts.push((
                format!("$KV.{}.{}", names::REPORTED_BUCKET, names::info_key(&name)),
                fleet_e2e::hollow_heartbeat(&name, 3_600_000, 1),
            ));
        }
        put_all(&js, puts, 1_000).await?;
        eprintln!("  ({n} devices: waiting for the operator to read them)");
        let client = fleet.operator.client();
        fleet_e2e::eventually("the operator to know every device", WAIT * 5, || async {
            Ok((client.status()?.devices == n).then_some(()))
        })
        .await?;

        // The floor: raw pipelined puts of n keys of the same size, in a scratch bucket.
        let scratch = js
            .create_key_value(async_nats::jetstream::kv::Config {
                bucket: "fleet-bench-floor".into(),
                ..Default::default()
            })
            .await?;
        let value = desired_value_bytes(1)?;
        let floor_puts = (0..n)
            .map(|i| (format!("$KV.{}.h{i:05}.fan", scratch.name), value.clone()))
            .collect();
        let started = Instant::now();
        put_all(&js, floor_puts, 1_000).await?;
        let floor = started.elapsed();

        let acker = spawn_acker(js.clone());
        let started = Instant::now();
        fleet.operator.apply(&fan_doc(1))?;
        wait_acks(&js, "fan", 1, n).await?;
        let fan_out = started.elapsed();
        println!(
            "  {n:>6} devices: fan-out of one Deployment until every device acknowledged it {:>8.1} ms; raw pipelined KV puts of {n} keys {:>7.1} ms; ratio {:.1}x",
            ms(fan_out),
            ms(floor),
            fan_out.as_secs_f64() / floor.as_secs_f64()
        );

        // Start to converged on n devices, n desired keys, 2n reported keys.
        fleet.operator.proc.kill();
        let started = Instant::now();
        fleet.operator = fleet_e2e::Operator::spawn(fleet.path(), &fleet.nats, "e2e", &[])?;
        wait_converged(&fleet.operator).await?;
        println!(
            "  {n:>6} devices: operator start -> converged {:>8.1} ms ({} KV entries)",
            ms(started.elapsed()),
            4 * n
        );
        if n == 1_000 {
            kill_under_load(&mut fleet).await?;
        }
        acker.abort();
    }
    Ok(())
}

fn desired_value_bytes(version: u64) -> Result<Vec<u8>> {
    let doc: fleet_contracts::resource::Deployment = serde_json::from_value(fan_doc(version))?;
    let d = fleet_contracts::state::DesiredDeployment::new("fan", 1, doc.spec.template);
    Ok(serde_json::to_vec(&d)?)
}

/// SIGKILL -> converged while a writer applies and deletes Deployments (each on half of the
/// devices), 5 times.
async fn kill_under_load(fleet: &mut TestFleet) -> Result<()> {
    use std::sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    };
    let mut times = Vec::new();
    for round in 0..5u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(Mutex::new(std::collections::BTreeMap::new()));
        let writing = tokio::task::spawn_blocking({
            let (url, token) = (fleet.operator.url.clone(), fleet.operator.token.clone());
            let (stop, last) = (stop.clone(), last.clone());
            move || fleet_e2e::churn::writer(url, token, round + 1, stop, last)
        });
        tokio::time::sleep(Duration::from_millis(1000)).await;
        fleet.operator.proc.kill();
        let killed = Instant::now();
        fleet.operator = fleet_e2e::Operator::spawn(fleet.path(), &fleet.nats, "e2e", &[])?;
        // The writer keeps writing against the new operator while it recovers.
        wait_converged(&fleet.operator).await?;
        times.push(killed.elapsed());
        stop.store(true, Ordering::Relaxed);
        writing.await?;
    }
    println!(
        "    1000 devices, under a continuous writer: SIGKILL -> restarted operator converged, n=5: median {:>8.1} ms   p99 {:>8.1} ms (p99 is the max)",
        ms(percentile(&times, 50.0)),
        ms(percentile(&times, 99.0))
    );
    Ok(())
}
