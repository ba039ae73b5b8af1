//! # sixmesh-frontend — CDN frontends and the stunnel-like TLS bridge
//!
//! The CDN reverse proxy (HTTP/1.1, HTTP/2, HTTP/3, with cache) that takes
//! IPv4/IPv6 web traffic and forwards it to backends on mesh addresses, and
//! the TLS bridge (`sixmesh bridge`) that lets IPv4-only software talk across
//! the mesh with mutual TLS and CRL checks.
//!
//! **Dependencies:** nothing of ours. It uses the mesh only through
//! addresses and certificates.
//!
//! Today: [`bridge`], the TLS bridge. The CDN frontend arrives with its issue.

pub mod bridge;
