//! # sixmesh-tests — end-to-end tests across sixmesh's crates
//!
//! The tests themselves live in `tests/tests/`; this library is their
//! support code:
//!
//! - [`netns`], [`tunlink`], [`mesh`]: the namespace harness of
//!   `sixmesh_netsim::ns` (namespaces and veth pairs that clean up after
//!   themselves, TUN links with user-space delay, a whole network with a
//!   registry), plus [`netns::require_root_netns`], the gate that skips a
//!   namespace test on a developer laptop but fails it under `CI=true`;
//! - [`sixmesh_bin`]: where the `sixmesh` binary under test is.
//!
//! **Dependencies:** it may use every crate of the workspace; nothing
//! depends on it.

pub use sixmesh_netsim::ns::{mesh, tunlink};

/// Network namespaces (from `sixmesh_netsim::ns::netns`) and the gate that
/// skips a namespace test on a laptop but fails it under `CI=true`.
pub mod netns {
    pub use sixmesh_netsim::ns::netns::*;
    use std::process::Command;

    /// Whether this process may create network namespaces. When it may not, the
    /// test is skipped with a printed reason — except under `CI=true`, where the
    /// test fails instead: namespace tests must run in CI.
    ///
    /// ```no_run
    /// if !sixmesh_tests::netns::require_root_netns() {
    ///     return;
    /// }
    /// ```
    pub fn require_root_netns() -> bool {
        let reason = if !nix::unistd::geteuid().is_root() {
            Some("not running as root".to_string())
        } else if let Err(e) = Command::new("ip").arg("-V").output() {
            Some(format!("`ip` (iproute2) cannot run: {e}"))
        } else {
            None
        };
        let Some(reason) = reason else { return true };
        let test = std::thread::current().name().unwrap_or("<test>").to_string();
        if crate::in_ci() {
            panic!(
                "{test}: needs network namespaces, and CI=true forbids skipping it: {reason}. \
                 Run the tests as root with iproute2 installed (./scripts/test does both)."
            );
        }
        eprintln!("SKIPPED {test}: needs network namespaces: {reason} (run as root to include it)");
        false
    }
}

use std::path::PathBuf;

/// Whether this is a CI run (`CI=true` or `CI=1`): tests that need root or
/// namespaces must run there, never skip.
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

/// Path of the `sixmesh` binary under test: `$SIXMESH_BIN` if set, otherwise
/// the one cargo built next to this test executable (`cargo test
/// --workspace` builds it). Panics with what to do when it is missing.
pub fn sixmesh_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SIXMESH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("path of the test executable");
    // target/<profile>/deps/<test> -> target/<profile>/sixmesh
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("sixmesh"))
        .expect("test executable lives in target/<profile>/deps");
    assert!(
        bin.exists(),
        "{} does not exist: run `cargo build` (or `cargo test --workspace`, which builds it) first, \
         or point SIXMESH_BIN at a sixmesh binary",
        bin.display()
    );
    bin
}
