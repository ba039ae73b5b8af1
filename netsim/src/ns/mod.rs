//! The namespace harness: real `sixmesh` processes in Linux network
//! namespaces (needs root). [`netns`] makes namespaces and veth pairs that
//! clean up after themselves; [`tunlink`] joins two namespaces through TUN
//! devices relayed in user space (delay and cuts without netem); [`relay`]
//! delays what hosts send to the "internet" (latency per path); [`mesh`]
//! builds a whole network: an "internet" bridge, a registry, and nodes that
//! joined it; [`scenario`] runs scenario files on such a network (`sixmesh
//! sim --namespaces`). `tests/` and `sixmesh demo` use it.

pub mod mesh;
pub mod netns;
pub mod relay;
pub mod scenario;
pub mod tunlink;
