//! The namespace harness: real `sixmesh` processes in Linux network
//! namespaces (needs root). [`netns`] makes namespaces and veth pairs that
//! clean up after themselves; [`tunlink`] joins two namespaces through TUN
//! devices relayed in user space (delay and cuts without netem); [`mesh`]
//! builds a whole network: an "internet" bridge, a registry, and nodes that
//! joined it. `tests/` and `sixmesh demo` use it.

pub mod mesh;
pub mod netns;
pub mod tunlink;
