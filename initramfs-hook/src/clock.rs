//! The bootguard's one reading of a clock: the monotonic clock for its tool timeouts and the
//! watchdog's budget. It never reads wall-clock time (the device's clock may be anything
//! before the network is up). Nothing else calls `Instant::now` (a clippy rule, `clippy.toml`).
#![allow(clippy::disallowed_methods)] // The one place the clock is read.

use std::time::Instant;

/// The monotonic clock.
pub fn now() -> Instant {
    Instant::now()
}
