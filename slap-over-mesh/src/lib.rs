//! # sixmesh-slap — SLAP orchestration over the mesh
//!
//! The SlapOS-style master (orders, placement of services in computer
//! partitions), the node agent (slapgrid-like: partitions, software,
//! supervision, promises, usage) and the client, all addressing each other
//! by mesh IPv6 addresses.
//!
//! **Dependencies:** nothing of ours. It uses the mesh only through
//! addresses and certificates. SLAP state machines are sans-IO.
//!
//! Status: arrives with the SLAP issue; this crate is the placeholder the
//! workspace builds on.
