//! # sixmesh-registry — the root of trust of a sixmesh network
//!
//! The registry is a certificate authority that gives each node a
//! certificate and an IPv6 prefix: token enrollment, renewal, revocation,
//! the CRL, the signed network configuration and the bootstrap peer list,
//! all kept in SQLite. It also holds the *client* side that `sixmesh join`
//! and the node daemon use to enroll and renew.
//!
//! **Dependencies:** nothing of ours. `mesh-node` may depend on this crate's
//! client types; nothing in here may depend on the mesh.
//!
//! Status: arrives with the registry issue; this crate is the placeholder
//! the workspace builds on.

/// Default directory of the registry's state (CA key, database).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sixmesh/registry";
