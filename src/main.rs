//! `sixmesh`: the one user-facing binary. Each subcommand is a role a machine
//! plays in a sixmesh network; the work itself lives in the library crates.

mod cli;
mod logging;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// Exit status of a subcommand that a later issue has not filled yet.
const EXIT_NOT_IMPLEMENTED: u8 = 2;

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
        Command::Registry(_) => ("registry", 3, "Registry: certificates, prefixes and revocation"),
        Command::Join(_) => ("join", 3, "Registry: certificates, prefixes and revocation"),
        Command::Node(_) => ("node", 5, "The mesh node: encrypted tunnels and the tunnel manager"),
        Command::Status(_) => ("status", 5, "The mesh node: control socket and status"),
        Command::Peers(_) => ("peers", 5, "The mesh node: control socket and status"),
        Command::Routes(_) => ("routes", 4, "Babel routing (RFC 8966)"),
        Command::Slap(_) => ("slap", 0, "SLAP orchestration over the mesh, not yet filed"),
        Command::Bridge(_) => ("bridge", 7, "stunnel-like TLS bridge"),
        Command::Frontend(_) => ("frontend", 0, "CDN frontend, not yet filed"),
        Command::Sim(_) => ("sim", 6, "netsim: simulate whole meshes"),
        Command::Demo(_) => ("demo", 6, "netsim and the demo"),
        Command::Bench(_) => ("bench", 0, "the benchmarks of each issue"),
    };
    let issue = if issue == 0 { "a later issue".to_string() } else { format!("issue #{issue}") };
    eprintln!("sixmesh {name}: not implemented yet; it arrives with {issue} ({title}). Nothing was done.");
    Ok(ExitCode::from(EXIT_NOT_IMPLEMENTED))
}
