//! # sixmesh-registry — the root of trust of a sixmesh network
//!
//! The registry is a certificate authority that gives each node a
//! certificate and an IPv6 prefix: token enrollment, renewal, revocation,
//! the CRL, the signed network configuration and the bootstrap peer list,
//! all kept in SQLite. It also holds the *client* side ([`client`]) that
//! `sixmesh join` and the node daemon use to enroll and renew.
//!
//! **Dependencies:** nothing of ours. `mesh-node` may depend on this crate's
//! client types; nothing in here may depend on the mesh.
//!
//! Modules: [`prefix`] (addresses), [`db`] (schema, prefix tree), [`ca`]
//! (certificates), [`netconfig`] (the signed network config), [`registry`]
//! (operations on a registry state directory).

pub mod bench;
pub mod ca;
pub mod client;
pub mod db;
pub mod error;
pub mod netconfig;
pub mod prefix;
pub mod registry;
pub mod server;

pub use error::{Error, Result};

/// Default directory of the registry's state (database with the CA inside).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sixmesh/registry";
