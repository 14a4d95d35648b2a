//! chaos-agent: serves the fault engine over gRPC on a unix socket.
use anyhow::{Context, Result};
use chaos_agent::datapath::AttachMode;
use chaos_agent::server::AgentService;
use chaos_agent::{Engine, EngineConfig, spec};
use chaos_proto::agent::v1::agent_server::AgentServer;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

#[derive(Parser)]
#[command(
    name = "chaos-agent",
    version,
    about = "Applies network faults on this node"
)]
struct Args {
    /// Unix socket to serve the Agent API on.
    #[arg(long, default_value = "/run/chaos/agent.sock")]
    socket: PathBuf,
    /// Where the journal of applied faults lives (crash recovery reads it).
    #[arg(long, default_value = "/run/chaos/journal")]
    journal_dir: PathBuf,
    /// Longest fault duration accepted.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    max_duration: std::time::Duration,
    /// How classifiers attach: tcx (kernel >= 6.6), clsact, or auto.
    #[arg(long, default_value = "auto", value_parser = ["auto", "tcx", "clsact"])]
    attach: String,
    /// A control-plane endpoint (ip:port) that no fault may ever match. Repeatable.
    #[arg(long = "exclude")]
    exclude: Vec<SocketAddr>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    spec::parse_duration(s).map_err(|e| e.rule)
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = EngineConfig {
        journal_dir: args.journal_dir,
        max_duration: args.max_duration,
        attach: match args.attach.as_str() {
            "tcx" => AttachMode::Tcx,
            "clsact" => AttachMode::Clsact,
            _ => AttachMode::detect(),
        },
        excluded: args.exclude,
    };
    let (engine, reclaimed) = tokio::task::spawn_blocking(move || Engine::start(config)).await??;
    tracing::info!(
        journals = reclaimed.journals,
        faults = reclaimed.faults,
        clsact_filters = reclaimed.clsact_filters,
        root_qdiscs = reclaimed.qdiscs,
        "reclaimed leftovers of earlier runs"
    );
    for e in &reclaimed.errors {
        tracing::error!("reclaim: {e}");
    }
    engine.spawn_deadline_enforcer();

    if let Some(dir) = args.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    match std::fs::remove_file(&args.socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove stale {}", args.socket.display()));
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&args.socket)
        .with_context(|| format!("bind {}", args.socket.display()))?;
    tracing::info!(socket = %args.socket.display(), attach = engine.config().attach.name(), "chaos-agent ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    };
    tonic::transport::Server::builder()
        .add_service(AgentServer::new(AgentService::new(engine.clone())))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("serve")?;

    let results = tokio::task::spawn_blocking(move || engine.revert_all()).await?;
    for r in results {
        match r {
            Ok(f) => tracing::info!(id = %f.id, "reverted at shutdown"),
            Err(e) => tracing::error!("revert at shutdown: {e}"),
        }
    }
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}
