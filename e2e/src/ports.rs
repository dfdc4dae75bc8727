//! Free loopback ports, claimed so parallel tests never race for one.
#![allow(clippy::disallowed_methods)] // A harness starts processes and reads clocks.

use std::net::TcpListener;

use crate::*;

/// A TCP port on 127.0.0.1 that nothing listens on, reserved for this test process: for a
/// server the test starts next, and starts again on the same port after killing it.
///
/// Taken below the kernel's ephemeral range (`ip_local_port_range`): a port from that range,
/// what binding port 0 gives, can become the local end of another process's outgoing
/// connection between this check and the server's own bind (then the server exits with
/// "address already in use"; under load on two cores it happened). A lock file per port, held
/// until this process ends (nextest runs every test in its own process), keeps parallel tests
/// from taking the same one.
pub fn free_port() -> u16 {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    const LOWEST: u16 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral > LOWEST + 1_000,
        "the ephemeral port range starts at {ephemeral}: no room below it for test servers"
    );
    let locks = std::env::temp_dir().join("fleet-e2e-ports");
    std::fs::create_dir_all(&locks).expect("the port lock folder");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut rng = churn::Rng(u64::from(std::process::id()) << 32 | u64::from(nanos) | 1);
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..1_000 {
        let port = LOWEST + rng.below(u64::from(ephemeral - LOWEST)) as u16;
        let Ok(lock) = std::fs::File::create(locks.join(port.to_string())) else {
            continue;
        };
        // A second lock on the same file fails in this process too (a new open file).
        if lock.try_lock().is_ok() && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            held.push(lock);
            return port;
        }
    }
    panic!("no free port below {ephemeral} after 1,000 tries");
}
