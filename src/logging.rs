//! Logging, set up once for the whole process: `tracing` to stderr, filtered
//! by `RUST_LOG` (default `info`), as human text or one JSON object per line.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// How log lines are written to stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. Fails if `RUST_LOG` cannot be parsed.
pub fn init(format: LogFormat) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(&spec).map_err(|e| {
            anyhow::anyhow!(
                "RUST_LOG={spec:?} is not a valid filter ({e}); try RUST_LOG=info or RUST_LOG=sixmesh=debug"
            )
        })?,
        _ => EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("{e}"))
}
