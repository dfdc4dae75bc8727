//! `fleetctl`'s one reading of the clocks: the monotonic clock for `--wait` deadlines, and
//! wall-clock time for the ages it prints. Nothing else in `fleetctl` calls `SystemTime::now`
//! or `Instant::now` (a clippy rule, `clippy.toml`); what it prints takes the time as an
//! argument ([`crate::render`]).
#![allow(clippy::disallowed_methods)] // The one place the clocks are read.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The monotonic clock.
pub fn now() -> Instant {
    Instant::now()
}

/// Wall-clock milliseconds since the Unix epoch (zero for a clock before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
