//! `sixmesh`: the one user-facing binary. Each subcommand is a role a machine
//! plays in a sixmesh network; the work itself lives in the library crates.

mod cli;
mod cmd;
mod logging;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// mimalloc instead of glibc's malloc: the simulator's threads free each
/// other's packets and grow tables allocated by another thread, which glibc
/// answers with arena locks and page faults (1,000 nodes, 8 virtual s, two
/// threads: 35.5 s with glibc, 26 s with mimalloc; see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tells the allocator to keep the memory it frees instead of giving it back
/// to the system ten milliseconds later. For the simulator, which frees and
/// allocates packets all the time within a footprint that only grows: given
/// back, that memory comes back in 4 KiB page faults that split the
/// transparent huge pages (1,000 nodes, 240 virtual s on one thread: 94,000
/// page faults and 6 % more time than with 1,400). Not for the daemons, whose
/// footprint is small and should shrink after a peak.
fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc.h (the same in versions 2 and 3):
    /// milliseconds before freed memory is given back, -1 for never.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: mi_option_set only stores an integer option; the purge code
    // reads it each time it runs, so setting it at any time is sound.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// Exit status of a subcommand that a later issue has not filled yet.
pub const EXIT_NOT_IMPLEMENTED: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = logging::init(cli.log_format) {
        eprintln!("sixmesh: cannot set up logging: {err:#}");
        return ExitCode::from(1);
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("sixmesh: error: {err:#}");
            ExitCode::from(1)
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    let (name, issue, title) = match command {
        Command::Registry(args) => return cmd::registry::run_registry(args),
        Command::Join(args) => return cmd::registry::run_join(args),
        Command::Node(args) => return cmd::node::run_node(args),
        Command::Status(args) => return cmd::node::run_status(args),
        Command::Peers(args) => return cmd::node::run_peers(args),
        Command::Routes(args) => return cmd::node::run_routes(args),
        Command::Slap(_) => ("slap", 0, "SLAP orchestration over the mesh, not yet filed"),
        Command::Bridge(args) => return cmd::bridge::run_bridge(args),
        Command::Frontend(_) => ("frontend", 0, "CDN frontend, not yet filed"),
        Command::Sim(args) => return cmd::sim::run_sim(args),
        Command::Demo(args) => return cmd::demo::run_demo(args),
        Command::Bench(args) => return cmd::bench::run_bench(args),
    };
    let issue = if issue == 0 { "a later issue".to_string() } else { format!("issue #{issue}") };
    eprintln!("sixmesh {name}: not implemented yet; it arrives with {issue} ({title}). Nothing was done.");
    Ok(ExitCode::from(EXIT_NOT_IMPLEMENTED))
}
