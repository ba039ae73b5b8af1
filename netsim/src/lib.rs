//! # sixmesh-netsim — simulate whole meshes
//!
//! An in-process discrete-event simulator on virtual time that drives the
//! real sans-IO cores of `sixmesh-routing` and `sixmesh-mesh-node` over
//! simulated links (latency, jitter, loss, bandwidth, up/down), described by
//! scenario files; a Linux-namespace harness that starts the real `sixmesh`
//! binary arrives later with the same scenario format.
//!
//! - [`babel::BabelSim`]: Babel routers on virtual time over any
//!   [`topology::Graph`], with loop checking and traffic counters; it backs
//!   the routing tests at scale and `sixmesh bench babel`.
//! - [`mesh::MeshSim`]: whole mesh nodes (tunnel manager, Babel in tunnels,
//!   forwarding) over an all-pairs underlay with regions, NAT and failures.
//! - [`scenario::Scenario`] (the TOML format, `docs/netsim.md`),
//!   [`run::run`] (runs one and measures it into a [`run::Report`]) and
//!   [`report::html`] (the HTML report): `sixmesh sim` is built on them.
//!
//! **Dependencies:** `sixmesh-routing` and `sixmesh-mesh-node` (their sans-IO
//! cores). It spawns the `sixmesh` binary rather than linking its drivers.

pub mod babel;
pub mod mesh;
pub mod ns;
pub mod report;
pub mod rng;
pub mod run;
pub mod scenario;
pub mod topology;
