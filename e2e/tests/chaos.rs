//! Chaos: the operator is SIGKILLed at random moments while a writer applies and deletes
//! Deployments continuously across a set of hollow devices (enrolled, speaking the agent's
//! protocol). After each kill and restart the fleet converges to exactly the declared state:
//! every desired key the resources call for and no other, every device holding and reporting
//! exactly what it should run, and no write the API acknowledged is lost.
//!
//! The schedule comes from a seed (printed; set `FLEET_CHAOS_SEED` to replay it; the timing of
//! real processes still varies).
#![allow(clippy::disallowed_methods)] // A test times what it watches: it reads the clock.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use fleet_contracts::api::Role;
use fleet_e2e::{
    Hollow, Operator, TestFleet, WAIT,
    churn::{self, ROLES, Rng},
    eventually,
};

const DEVICES: usize = 6;
const CYCLES: usize = 6;

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_converges_to_exactly_the_declared_state_after_every_kill_of_the_operator()
-> Result<()> {
    let mut rng = Rng::seeded("FLEET_CHAOS_SEED", "chaos");
    let mut fleet = TestFleet::start().await?;
    let mut devices = Vec::new();
    let mut roles = BTreeMap::new();
    for i in 0..DEVICES {
        let (name, role) = (format!("pi-{i}"), ROLES[i % 2]);
        devices.push(Hollow::start(&fleet, &name, &[("role", role)], true).await?);
        roles.insert(name, role);
    }
    let last = Arc::new(Mutex::new(BTreeMap::new()));
    let mut recoveries = Vec::new();
    let mut acknowledged = 0;
    for cycle in 0..CYCLES {
        let stop = Arc::new(AtomicBool::new(false));
        let writing = tokio::task::spawn_blocking({
            let (url, token) = (fleet.operator.url.clone(), fleet.operator.token.clone());
            let (stop, last, seed) = (stop.clone(), last.clone(), rng.next_u64());
            move || churn::writer(url, token, seed, stop, last)
        });
        // The kill lands at a random moment of a 0.3-2.3 s window of writes.
        let kill_at = Duration::from_millis(300 + rng.below(2000));
        tokio::time::sleep(kill_at).await;
        fleet.operator.proc.kill();
        let killed = Instant::now();
        // The writer goes on against the dead operator for a moment (its calls fail).
        tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
        stop.store(true, Ordering::Relaxed);
        acknowledged += writing.await?;

        fleet.operator = Operator::start(fleet.path(), &fleet.nats, &[]).await?;
        fleet.operator.wait_role(Role::Leader).await?;
        let declared = churn::declared(&fleet).await?;
        // No acknowledged write lost: the last acknowledged operation on each name stands.
        churn::check_acknowledged(&last.lock().unwrap(), &declared)
            .map_err(|e| anyhow::anyhow!("cycle {cycle}: {e}"))?;
        let want = churn::expected(&declared, &roles);
        eventually(
            &format!("cycle {cycle}: desired keys, devices and reports to match"),
            WAIT,
            || churn::matches(&fleet, &devices, &want),
        )
        .await?;
        recoveries.push(killed.elapsed());
        let running: BTreeSet<&String> = declared.keys().collect();
        eprintln!(
            "cycle {cycle}: killed after {kill_at:?}, converged {:?} after the kill; declared {running:?}",
            killed.elapsed()
        );
    }
    assert!(acknowledged > 0, "the writer never got a write through");
    eprintln!(
        "{CYCLES} kills, {acknowledged} acknowledged writes; kill -> converged: {recoveries:?}"
    );
    Ok(())
}
