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

/// Set by Ctrl-C (SIGINT) and SIGTERM once [`catch_interrupts`] ran.
pub static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes Ctrl-C and SIGTERM set [`INTERRUPTED`] instead of killing the
/// process, for commands that must clean up (namespaces, processes) first.
pub fn catch_interrupts() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    extern "C" fn on_signal(_: nix::libc::c_int) {
        INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let act = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
    for s in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(s, &act) }.context("cannot install the Ctrl-C handler")?;
    }
    Ok(())
}
