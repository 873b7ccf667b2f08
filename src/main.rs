//! The `fhirbox` binary: parses the command line and runs the library. Everything else lives in
//! the library so that tests and benchmarks can drive it in-process.

use clap::Parser;
use fhirbox::config::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(fhirbox::server::run(args))?,
    }
    Ok(())
}
