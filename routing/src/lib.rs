//! # sixmesh-routing — Babel (RFC 8966), wire-compatible with babeld
//!
//! This crate owns the Babel routing protocol as sixmesh runs it inside every
//! tunnel of the mesh and, optionally, on real LAN interfaces:
//!
//! - `wire`: the TLV codec (RFC 8966 TLVs, address encodings, sub-TLVs);
//! - `core`: the sans-IO router (neighbours, sources, feasibility, route
//!   selection, updates and requests) driven by `now` and packets, returning
//!   transmits, events and timeouts;
//! - `kernel`: installing selected routes with rtnetlink (protocol `babel`);
//! - `driver`: the thin tokio driver on real interfaces.
//!
//! **Dependencies:** nothing of ours. The `wire` and `core` modules do no I/O
//! and read no clock, so that `netsim` can run thousands of routers on
//! virtual time (see `docs/ARCHITECTURE.md`).
//!
//! Without the default `driver` feature, the crate is the codec and the
//! sans-IO core only, with no tokio or netlink.

pub mod core;
#[cfg(feature = "driver")]
pub mod driver;
#[cfg(feature = "driver")]
pub mod kernel;
pub mod wire;

/// The UDP port Babel speaks on (RFC 8966 §4).
pub const BABEL_PORT: u16 = 6696;
