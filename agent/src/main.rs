//! chaos-agent: serves the fault engine over gRPC on a unix socket and, with --controller, joins
//! a controller's fleet.
use anyhow::{Context, Result, bail};
use chaos_agent::admin::{self, Admin, Text};
use chaos_agent::datapath::AttachMode;
use chaos_agent::fleet_client::{self, FleetConfig, FleetState};
use chaos_agent::null_backend::NullAgent;
use chaos_agent::server::AgentService;
use chaos_agent::tls::{self, TlsFiles};
use chaos_agent::{Engine, EngineConfig, spec};
use chaos_proto::agent::v1 as pb;
use chaos_proto::agent::v1::agent_server::{Agent, AgentServer};
use clap::Parser;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;

#[derive(Parser)]
#[command(
    name = "chaos-agent",
    version,
    about = "Applies network faults on this node"
)]
struct Args {
    /// Unix socket to serve the Agent API on ("" = none; the null backend serves none by default).
    #[arg(long)]
    socket: Option<PathBuf>,
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
    /// engine: faults in the kernel. null: no kernel, faults are only accepted and listed (for
    /// fleet benchmarks; needs no privileges).
    #[arg(long, default_value = "engine", value_parser = ["engine", "null"])]
    backend: String,
    /// Join this controller: https://HOST:PORT (mutual TLS), or http://127.0.0.1:PORT with
    /// --insecure-plaintext.
    #[arg(long, env = "CHAOS_CONTROLLER")]
    controller: Option<String>,
    /// This node's name in the fleet (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// A label k=v faults can select this agent by. Repeatable.
    #[arg(long = "label", value_parser = spec::parse_label)]
    labels: Vec<(String, String)>,
    /// Directory with ca.pem and agent-<node>.pem / agent-<node>-key.pem (`chaosctl certs init`).
    #[arg(long, env = "CHAOS_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// The certificate name in --tls-dir, if not the node name (e.g. one shared DaemonSet cert).
    #[arg(long)]
    tls_name: Option<String>,
    /// Talk to the controller without TLS; allowed only on loopback.
    #[arg(long)]
    insecure_plaintext: bool,
    /// Serve the admin endpoint on this address (ip:port): /metrics (Prometheus), /live and
    /// /ready (the probes' reasons in the body).
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    spec::parse_duration(s).map_err(|e| e.rule)
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("chaos-agent: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a log file or a CI job.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    // The null backend exists to run a thousand agents on one box: one thread each.
    let runtime = if args.backend == "null" {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(run(args))
}

fn fleet_config(args: &Args) -> Result<Option<FleetConfig>> {
    let Some(url) = args.controller.clone() else {
        return Ok(None);
    };
    let node_name = match &args.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("--node-name: not given and the host name is unreadable")?
            .trim()
            .to_string(),
    };
    let tls = if tls::service_url("--controller", &url, args.insecure_plaintext)?.tls {
        let Some(dir) = &args.tls_dir else {
            bail!("--tls-dir: is required for an https:// controller (see `chaosctl certs init`)");
        };
        let name = args.tls_name.as_deref().unwrap_or(&node_name);
        Some(TlsFiles::in_dir(dir, &format!("agent-{name}")))
    } else {
        None
    };
    Ok(Some(FleetConfig {
        url,
        node_name,
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        tls,
    }))
}

/// The controller's addresses, so no fault ever matches the agent's own control traffic: the
/// host and port the dialer uses, from the same parse.
fn controller_endpoints(url: &str) -> Vec<SocketAddr> {
    match tls::ServiceUrl::parse(url) {
        Ok(u) => u.socket_addrs(Some(if u.tls { 443 } else { 80 })),
        Err(_) => vec![],
    }
}

async fn run(args: Args) -> Result<()> {
    let fleet = fleet_config(&args)?;
    let mut excluded = args.exclude.clone();
    if let Some(f) = &fleet {
        let eps = controller_endpoints(&f.url);
        tracing::info!(
            ?eps,
            "the controller's endpoints are excluded from every fault"
        );
        excluded.extend(eps);
    }
    if args.backend == "null" {
        let agent = Arc::new(NullAgent::new(args.max_duration));
        return serve(args, agent, fleet, None).await;
    }
    let config = EngineConfig {
        journal_dir: args.journal_dir.clone(),
        max_duration: args.max_duration,
        attach: match args.attach.as_str() {
            "tcx" => AttachMode::Tcx,
            "clsact" => AttachMode::Clsact,
            _ => AttachMode::detect(),
        },
        excluded,
        ..EngineConfig::default()
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
    for r in &reclaimed.refused {
        tracing::warn!("reclaim: a journal named what is not ours: {r}");
    }
    engine.spawn_deadline_enforcer();
    // What a crashed `chaosctl --local` (or any dead engine) left goes without a restart.
    engine.spawn_sweeper(chaos_agent::engine::SWEEP_EVERY);
    let agent = Arc::new(AgentService::new(engine.clone()));
    let result = serve(args, agent, fleet, Some(engine.config().attach.name())).await;
    let results = tokio::task::spawn_blocking(move || engine.revert_all()).await?;
    for r in results {
        match r {
            Ok(f) => tracing::info!(id = %f.id, "reverted at shutdown"),
            Err(e) => tracing::error!("revert at shutdown: {e}"),
        }
    }
    result
}

/// Serves `agent` on the unix socket and/or to the controller until SIGTERM/SIGINT.
async fn serve<A: Agent>(
    args: Args,
    agent: Arc<A>,
    fleet: Option<FleetConfig>,
    attach: Option<&'static str>,
) -> Result<()> {
    let state = fleet.map(|cfg| {
        tracing::info!(controller = %cfg.url, node = %cfg.node_name, "joining the controller");
        fleet_client::spawn(agent.clone(), cfg)
    });
    let serving = Arc::new(AtomicBool::new(false));
    if let Some(addr) = args.metrics {
        let admin = Admin {
            metrics: render(agent.clone(), state.clone()),
            live: live(agent.clone()),
            ready: ready(serving.clone(), state.clone()),
        };
        let local = admin::serve(addr, admin)
            .await
            .with_context(|| format!("--metrics {addr}"))?;
        tracing::info!(%local, "admin endpoint: /metrics, /live, /ready");
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    };
    let socket = match (&args.socket, args.backend.as_str()) {
        (Some(p), _) if p.as_os_str().is_empty() => None,
        (Some(p), _) => Some(p.clone()),
        (None, "null") => None,
        (None, _) => Some(PathBuf::from("/run/chaos/agent.sock")),
    };
    let Some(socket) = socket else {
        tracing::info!(backend = %args.backend, "chaos-agent ready (no unix socket)");
        serving.store(true, Ordering::SeqCst);
        shutdown.await;
        return Ok(());
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    match std::fs::remove_file(&socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove stale {}", socket.display()));
        }
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("bind {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), attach = attach.unwrap_or("none"), backend = %args.backend, "chaos-agent ready");
    serving.store(true, Ordering::SeqCst);
    let served = tonic::transport::Server::builder()
        .add_service(AgentServer::from_arc(agent))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .context("serve");
    let _ = std::fs::remove_file(&socket);
    served
}

/// /live: the engine answers (its state lock is not wedged). A kubelet that restarts a wedged
/// agent ends its faults: the kernel voids them when the heartbeat stops.
fn live<A: Agent>(agent: Arc<A>) -> admin::Check {
    Arc::new(move || {
        let agent = agent.clone();
        Box::pin(async move {
            match agent.list(tonic::Request::new(pb::ListRequest {})).await {
                Ok(r) => Ok(format!(
                    "live: {} faults active",
                    r.into_inner().faults.len()
                )),
                Err(e) => Err(format!("the engine does not answer: {}", e.message())),
            }
        })
    })
}

/// /ready: the engine has started (leftovers reclaimed) and the agent serves its API. The
/// controller link is reported, not required: an agent that cannot reach its controller still
/// serves the node's socket, and a controller outage must not stall a DaemonSet rollout.
fn ready(serving: Arc<AtomicBool>, state: Option<Arc<FleetState>>) -> admin::Check {
    Arc::new(move || {
        let up = serving.load(Ordering::SeqCst);
        let link = match state.as_deref() {
            Some(s) if s.connected() => "; controller connected",
            Some(_) => "; controller not connected",
            None => "",
        };
        let text = format!("{}{link}", if up { "ready" } else { "starting" });
        Box::pin(async move { if up { Ok(text) } else { Err(text) } })
    })
}

/// /metrics: faults and their counters as the Agent API lists them, and the controller link.
fn render<A: Agent>(agent: Arc<A>, state: Option<Arc<FleetState>>) -> admin::Render {
    Arc::new(move || {
        let (agent, state) = (agent.clone(), state.clone());
        Box::pin(async move {
            let faults = agent
                .list(tonic::Request::new(pb::ListRequest {}))
                .await
                .map(|r| r.into_inner().faults)
                .unwrap_or_default();
            render_text(&faults, state.as_deref())
        })
    })
}

fn render_text(faults: &[pb::Fault], state: Option<&FleetState>) -> String {
    let mut t = Text::default();
    t.family(
        "chaos_agent_faults_active",
        "gauge",
        "Faults active on this agent.",
    )
    .sample("chaos_agent_faults_active", &[], faults.len() as f64);
    t.family(
        "chaos_agent_fault_packets_total",
        "counter",
        "Packets each active fault has seen, matched and affected.",
    );
    for f in faults {
        let kind = f
            .spec
            .as_ref()
            .and_then(|s| s.kind.as_ref())
            .map(|k| chaos_proto::convert::kind_info(k).name)
            .unwrap_or("unknown");
        let c = f.counters.unwrap_or_default();
        for (name, v) in [
            ("seen", c.seen),
            ("matched", c.matched),
            ("affected", c.affected),
        ] {
            t.sample(
                "chaos_agent_fault_packets_total",
                &[("fault", &f.id), ("kind", kind), ("counter", name)],
                v as f64,
            );
        }
    }
    if let Some(s) = state {
        t.family(
            "chaos_agent_controller_connected",
            "gauge",
            "1 while the stream to the controller is up.",
        )
        .sample(
            "chaos_agent_controller_connected",
            &[],
            if s.connected() { 1.0 } else { 0.0 },
        );
    }
    t.finish()
}
