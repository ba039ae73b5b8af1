//! # sixmesh-tests — end-to-end tests across sixmesh's crates
//!
//! The tests themselves live in `tests/tests/`; this library is their
//! support code:
//!
//! - [`netns`]: network namespaces and veth pairs that clean up after
//!   themselves, and [`netns::require_root_netns`], the gate that skips a
//!   namespace test on a developer laptop but fails it under `CI=true`;
//! - [`sixmesh_bin`]: where the `sixmesh` binary under test is.
//!
//! **Dependencies:** it may use every crate of the workspace; nothing
//! depends on it.

pub mod mesh;
pub mod netns;
pub mod tunlink;

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
