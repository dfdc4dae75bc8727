//! Test support for Fleet's end-to-end tests and benchmarks: starts real `nats-server` (one,
//! or a cluster), `fleet-operator` and `fleet-agent` processes on free loopback ports, each
//! agent with its own podman storage, and stops them on drop. [`Hollow`] devices enroll and
//! speak the agent's protocol with the agent's own code, without podman; [`churn`] writes
//! continuously and checks that the fleet holds exactly the declared state.
//!
//! It never fakes a component. It expects the workspace binaries to be built
//! (`cargo build --bins`, which `scripts/test.sh` does) and the tools installed by
//! `scripts/bootstrap.sh`. Waiting is always on a condition ([`eventually`]), never a bare sleep.
//!
//! One module per thing it starts: `process` (binaries, [`Proc`], waiting), `ports`, `nats`
//! (one node or a cluster), `operator`, `podman` (a sandbox per agent), `agent`, `hollow`
//! (protocol-level devices), `fixtures` (documents), and `fleet` ([`TestFleet`]: NATS and an
//! operator together); all re-exported here.
#![allow(clippy::disallowed_methods)] // A harness starts processes; the product code may not.

pub mod churn;
pub mod raw;
pub mod store;

mod agent;
mod fixtures;
mod fleet;
mod hollow;
mod nats;
mod operator;
mod podman;
mod ports;
mod process;

pub use agent::*;
pub use fixtures::*;
pub use fleet::*;
pub use hollow::*;
pub use nats::*;
pub use operator::*;
pub use podman::*;
pub use ports::*;
pub use process::*;
