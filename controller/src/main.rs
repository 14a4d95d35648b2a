//! chaosctl: inject faults locally (`--local`, the engine in-process) or through a chaos-agent.
mod agent_client;
mod certs_cmd;
mod cli;
mod cluster_cmd;
mod controller_client;
mod fleet_cmd;
mod local_engine;
mod run_cmd;

/// A new run id (time-ordered).
pub fn run_id() -> String {
    chaos_controller::experiments::new_run_id()
}
mod output;

use anyhow::Result;
use clap::Parser;
use std::process::ExitCode;

/// Exit code for bad input: the command was refused and nothing was applied.
pub const EXIT_INVALID: u8 = 2;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = cli::Cli::parse();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("chaosctl: {}", output::chain(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: cli::Cli) -> Result<ExitCode> {
    cli::dispatch(args).await
}
