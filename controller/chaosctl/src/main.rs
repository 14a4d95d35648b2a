//! chaosctl: inject faults locally (`--local`, the engine in-process) or through a chaos-agent.
use chaosctl::{cli, controller_client, output};
use clap::Parser;
use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a log file or a CI job.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = cli::Cli::parse();
    output::set_json(cli::json(&args));
    let controller = cli::controller_flags(&args);
    match cli::dispatch(args).await {
        Ok(code) => code,
        Err(e) => {
            // One line: the error and its causes, and the controller's reason when it refused
            // our certificate after a handshake the failed call could not see.
            let refused = match &controller {
                Some(ctl) => controller_client::refusal(ctl, &e).await,
                None => None,
            };
            match refused {
                Some(why) => output::error(format!("{e}: {why}"), 1),
                None => output::error(output::chain(&e), 1),
            }
            ExitCode::FAILURE
        }
    }
}
