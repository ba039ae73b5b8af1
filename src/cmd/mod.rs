//! Binary-side implementations of subcommands.

pub mod bench;
pub mod bridge;
pub mod demo;
pub mod node;
pub mod registry;
pub mod sim;

use anyhow::{Context, Result};

/// A tokio runtime for the subcommands that need one.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

/// Resolves on SIGINT or SIGTERM: daemons then exit cleanly.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
