//! # sixmesh-netsim — simulate whole meshes
//!
//! Two layers, one scenario format: an in-process discrete-event simulator
//! on virtual time that drives the real sans-IO cores of `sixmesh-routing`
//! and `sixmesh-mesh-node` over simulated links (latency, jitter, loss,
//! bandwidth, up/down), and a Linux-namespace harness that starts the real
//! `sixmesh` binary. Both produce JSON and HTML reports.
//!
//! **Dependencies:** `sixmesh-routing` and `sixmesh-mesh-node` (their sans-IO
//! cores). It spawns the `sixmesh` binary rather than linking its drivers.
//!
//! Status: arrives with the netsim issue; this crate is the placeholder the
//! workspace builds on.
