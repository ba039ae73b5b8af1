//! # sixmesh-netsim — simulate whole meshes
//!
//! Two layers, one scenario format (the latter two arrive with the netsim
//! issue): an in-process discrete-event simulator on virtual time that
//! drives the real sans-IO cores of `sixmesh-routing` and
//! `sixmesh-mesh-node` over simulated links (latency, loss, up/down), and a
//! Linux-namespace harness that starts the real `sixmesh` binary.
//!
//! Today: [`babel::BabelSim`], Babel routers on virtual time over any
//! [`topology::Graph`], with loop checking and traffic counters; it backs
//! the routing tests at scale and `sixmesh bench babel`.
//!
//! **Dependencies:** `sixmesh-routing` and `sixmesh-mesh-node` (their sans-IO
//! cores). It spawns the `sixmesh` binary rather than linking its drivers.

pub mod babel;
pub mod mesh;
pub mod rng;
pub mod topology;
