//! The agent's one reading of the clocks: wall-clock time for what it reports and stores
//! (timestamps, token expiry), the monotonic clock for every deadline and interval. Nothing
//! else in the agent calls `SystemTime::now` or `Instant::now` (a clippy rule,
//! `clippy.toml`), so tests can see every place time enters a decision, and tokio's paused
//! time drives the monotonic reads in tests.
#![allow(clippy::disallowed_methods)] // The one place the clocks are read.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The monotonic clock (tokio's, so `tokio::time::pause` controls it in tests).
pub fn now() -> tokio::time::Instant {
    tokio::time::Instant::now()
}

/// Wall-clock time since the Unix epoch (zero for a clock before 1970).
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    since_epoch().as_millis() as u64
}

/// Wall-clock seconds since the Unix epoch.
pub fn unix_secs() -> u64 {
    since_epoch().as_secs()
}
