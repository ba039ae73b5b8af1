//! The command line: one subcommand per role a machine plays.

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;

const AFTER_HELP: &str = "\
How a machine joins a sixmesh network:
  1. the operator runs a registry:   sixmesh registry init && sixmesh registry serve
  2. the operator hands out a token: sixmesh registry token add
  3. each machine enrolls:           sixmesh join --registry https://HOST:8443 --token T --ca-fingerprint sha256:HEX
  4. each machine runs the daemon:   sixmesh node run
  5. and checks on it:               sixmesh status | sixmesh peers | sixmesh routes

To see a whole mesh work on this machine: sixmesh demo (as root, with network namespaces).
Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) to change how much is logged.";

/// sixmesh: a resilient IPv6 overlay mesh with encrypted tunnels and Babel routing.
#[derive(Debug, Parser)]
#[command(name = "sixmesh", version, about, after_help = AFTER_HELP, propagate_version = true)]
pub struct Cli {
    /// How log lines on stderr are written.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SIXMESH_LOG_FORMAT")]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// The roles of `sixmesh`, one line each in `--help`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a registry: the CA that gives each node a certificate and an IPv6 prefix
    Registry(crate::cmd::registry::RegistryArgs),
    /// Enroll this machine with a registry: get a certificate and an IPv6 prefix
    Join(crate::cmd::registry::JoinArgs),
    /// Run the mesh daemon on this machine: tunnels, Babel routing, forwarding
    Node(crate::cmd::node::NodeArgs),
    /// Show this node's identity, prefix, uptime, tunnels and route count
    Status(crate::cmd::node::StatusArgs),
    /// List the peers this node keeps tunnels to, with RTT and traffic
    Peers(crate::cmd::node::StatusArgs),
    /// Print the routes Babel selected (the mesh's routing table)
    Routes(crate::cmd::node::RoutesArgs),
    /// Order, place and run services in computer partitions (SlapOS's SLAP)
    Slap(Pending),
    /// Carry IPv4-only TCP across the mesh over mutual TLS, like stunnel
    Bridge(crate::cmd::bridge::BridgeArgs),
    /// Run a CDN frontend that forwards web traffic to backends on the mesh
    Frontend(Pending),
    /// Simulate a whole mesh from a scenario file, on virtual time
    Sim(crate::cmd::sim::SimArgs),
    /// Start a registry and 8 nodes in namespaces and watch the mesh route around a cut
    Demo(crate::cmd::demo::DemoArgs),
    /// Measure sixmesh against real peers (babeld, wireguard-go, stunnel, ...)
    Bench(crate::cmd::bench::BenchArgs),
}

/// Arguments of a subcommand that a later issue fills; accepted so that the
/// command says "not implemented yet" instead of a parse error.
#[derive(Debug, Args)]
pub struct Pending {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    args: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_subcommand_has_a_one_line_about() {
        let cmd = Cli::command();
        let subs: Vec<_> = cmd.get_subcommands().filter(|s| s.get_name() != "help").collect();
        assert_eq!(subs.len(), 12, "one subcommand per role");
        for sub in subs {
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            assert!(!about.is_empty(), "{} has no description", sub.get_name());
            assert!(!about.contains('\n'), "{}: description must be one line", sub.get_name());
        }
    }

    #[test]
    fn log_format_parses_text_and_json() {
        let cli = Cli::try_parse_from(["sixmesh", "--log-format", "json", "status"]).unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["sixmesh", "--log-format", "xml", "status"]).is_err());
    }
}
