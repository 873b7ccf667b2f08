//! The `fhirbox` binary: parses the command line and runs the library. Everything else lives in
//! the library so that tests and benchmarks can drive it in-process.

use std::io::IsTerminal;

use clap::{CommandFactory, FromArgMatches};
use fhirbox::config::{limits_in_force, Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let Command::Serve(args) = cli.command;
    init_logging(args.log_format);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(fhirbox::server::run(args, limits_in_force(&matches)))?;
    Ok(())
}

/// The log goes to stderr: text (colored only on a terminal, so log files hold no escape
/// codes) or one JSON object per line, for log shippers. `RUST_LOG` picks the levels.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
}
