//! # sixmesh-mesh-node — the daemon every machine of the mesh runs
//!
//! Owns the node's identity (as written by `sixmesh join`), its encrypted
//! tunnels (WireGuard protocol through boringtun's `noise`), the TUN device,
//! user-space forwarding over the routes Babel selected, the sans-IO tunnel
//! manager (re6st's random, reshuffled tunnel graph), the peer database and
//! the control socket that `sixmesh status|peers|routes` talk to.
//!
//! **Dependencies:** `sixmesh-routing` (Babel runs inside every tunnel) and
//! the client types of `sixmesh-registry`. Protocol logic stays sans-IO so
//! that `netsim` can drive the same cores on virtual time.
//!
//! Status: arrives with the mesh-node issue; this crate is the placeholder
//! the workspace builds on.

pub mod daemon;
pub mod fib;
pub mod gossip;
pub mod identity;
pub mod manager;
pub mod node;
pub mod packet;
pub mod peerdb;
pub mod udp;

/// Default name of the node's TUN device.
pub const DEFAULT_TUN_NAME: &str = "sixmesh0";
