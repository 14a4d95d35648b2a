//! chaos-controller: agents join it, chaosctl drives it, experiments run on it.
use anyhow::{Context, Result, bail};
use chaos_agent::admin::{self, Admin, Text};
use chaos_agent::tls::{self, TlsFiles};
use chaos_controller::audit::Audit;
use chaos_controller::experiments::ExperimentsService;
use chaos_controller::fleet::Fleet;
use chaos_controller::server::{ControllerService, FleetService};
use chaos_controller::tls_front;
use chaos_experiment::history::History;
use chaos_proto::experiments::v1::experiments_server::ExperimentsServer;
use chaos_proto::fleet::v1::controller_server::ControllerServer;
use chaos_proto::fleet::v1::fleet_server::FleetServer;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::StreamExt;

#[derive(Parser)]
#[command(
    name = "chaos-controller",
    version,
    about = "Drives chaos agents and experiments"
)]
struct Args {
    /// https://ADDR:PORT (mutual TLS), or http://127.0.0.1:PORT with --insecure-plaintext.
    #[arg(long, default_value = "https://0.0.0.0:7070")]
    listen: String,
    /// Directory with ca.pem, controller.pem and controller-key.pem (`chaosctl certs init`).
    #[arg(long, env = "CHAOS_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    /// Serve without TLS; allowed only on loopback.
    #[arg(long)]
    insecure_plaintext: bool,
    /// How long an agent keeps the controller's faults without hearing from it.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease: std::time::Duration,
    /// Append one JSON line per apply and revert here.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Serve the admin endpoint on this address (ip:port): /metrics (Prometheus), /live and
    /// /ready (ready once this process leads and listens; a standby is live, not ready).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Where the history of experiment runs is kept.
    #[arg(long, default_value = "/var/lib/chaos")]
    state_dir: PathBuf,
    /// Kubernetes mode: reconcile ChaosExperiments (in-cluster config, or the kubeconfig), one
    /// replica at a time through a Lease in $POD_NAMESPACE; others wait before serving.
    #[arg(long)]
    kubernetes: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (YAML), as committed in deploy/base/crds/.
    Crds,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    chaos_agent::spec::parse_duration(s).map_err(|e| e.rule)
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a log file or a CI job.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if let Some(Command::Crds) = args.command {
        return match chaos_controller::k8s::crd::crds_yaml() {
            Ok(y) => {
                print!("{y}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chaos-controller: crds: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos-controller: start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chaos-controller: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let (addr, tls) = listen_config(&args)?;

    let nofile = chaos_controller::limits::raise_nofile();
    let audit = match &args.audit_log {
        Some(p) => Some(Audit::open(p).with_context(|| format!("--audit-log {}", p.display()))?),
        None => None,
    };
    let fleet = Fleet::new(args.lease, audit);
    let runs = args.state_dir.join("runs");
    let history =
        Arc::new(History::open(&runs).with_context(|| format!("--state-dir: {}", runs.display()))?);
    let listening = Arc::new(AtomicBool::new(false));
    if let Some(m) = args.metrics {
        let admin = Admin {
            metrics: render(fleet.clone()),
            live: admin::always("live"),
            ready: ready(listening.clone()),
        };
        let local = admin::serve(m, admin)
            .await
            .with_context(|| format!("--metrics {m}"))?;
        tracing::info!(%local, "admin endpoint: /metrics, /live, /ready");
    }
    // Only the leader listens: a Service (and the agents behind it) reach no one else. Metrics
    // (and /live) are served before, so a standby stays alive while it waits.
    let kube = match args.kubernetes {
        true => Some(kubernetes::lead().await?),
        false => None,
    };
    let lost = match kube {
        Some((client, lock)) => {
            kubernetes::reconcile(client, fleet.clone(), history.clone(), &args.listen);
            Some(lock)
        }
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("--listen {}", args.listen))?;
    tracing::info!(listen = %args.listen, local = %listener.local_addr()?, lease = ?args.lease, nofile, "chaos-controller ready");
    listening.store(true, Ordering::SeqCst);
    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
        // A node's stream that stopped answering pings is dead within 15 s: its agent (which
        // retries a refused Join with backoff) gets the node back.
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)));
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let closing = fleet.clone();
    let shutdown = async move {
        let hold = async {
            match &lost {
                Some(lock) => lock.hold().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
            why = hold => tracing::error!("leadership lost: {why}; stopping"),
        }
        // Agents' Join streams never end by themselves: end them, so the server stops. Their
        // faults stay until their lease runs out. A stream that does not close in 10 s (an
        // agent that stopped reading) does not keep the process alive.
        closing.close_all(&tonic::Status::unavailable(
            "chaos-controller is shutting down",
        ));
        tokio::spawn(async {
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            tracing::error!("streams still open 10 s after shutdown began: exiting");
            std::process::exit(0);
        });
    };
    let router = builder
        .add_service(FleetServer::new(FleetService {
            fleet: fleet.clone(),
        }))
        .add_service(ControllerServer::new(ControllerService {
            fleet: fleet.clone(),
        }))
        .add_service(ExperimentsServer::new(ExperimentsService {
            fleet: fleet.clone(),
            history,
            runner: format!("controller {}", args.listen),
        }));
    match tls {
        Some(config) => {
            let incoming = tls_front::incoming(listener, config, tls_front::Limits::default());
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        None => {
            // Small replies must not wait for delayed ACKs (Nagle): 40 ms per command otherwise.
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
                if let Ok(s) = &s {
                    let _ = s.set_nodelay(true);
                }
                s
            });
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    }
    .context("serve")
}

fn listen_config(args: &Args) -> Result<(SocketAddr, Option<Arc<rustls::ServerConfig>>)> {
    let url = &args.listen;
    let parsed = tls::service_url("--listen", url, args.insecure_plaintext)?;
    let tls = if parsed.tls {
        let Some(dir) = &args.tls_dir else {
            bail!("--tls-dir: is required to listen on https:// (see `chaosctl certs init`)");
        };
        Some(tls_front::server_config(&TlsFiles::in_dir(
            dir,
            "controller",
        ))?)
    } else {
        None
    };
    let addr = parsed
        .socket_addrs(None)
        .into_iter()
        .next()
        .with_context(|| format!("--listen: `{url}` needs a host:port"))?;
    Ok((addr, tls))
}

/// /ready: this process leads (on Kubernetes) and listens, so a Service sends agents and users
/// to it and to no standby.
fn ready(listening: Arc<AtomicBool>) -> admin::Check {
    Arc::new(move || {
        let up = listening.load(Ordering::SeqCst);
        Box::pin(async move {
            match up {
                true => Ok("ready: listening".to_string()),
                false => Err("not listening: waiting to lead, or starting".to_string()),
            }
        })
    })
}

fn render(fleet: Arc<Fleet>) -> admin::Render {
    Arc::new(move || {
        let fleet = fleet.clone();
        Box::pin(async move {
            let mut t = Text::default();
            t.family(
                "chaos_controller_agents_connected",
                "gauge",
                "Agents with an open stream.",
            )
            .sample(
                "chaos_controller_agents_connected",
                &[],
                fleet.agents().len() as f64,
            );
            t.family(
                "chaos_controller_faults_active",
                "gauge",
                "Faults the controller holds on agents.",
            )
            .sample(
                "chaos_controller_faults_active",
                &[],
                fleet.faults_active() as f64,
            );
            let c = &fleet.counts;
            t.family(
                "chaos_controller_commands_total",
                "counter",
                "Commands answered by agents.",
            )
            .sample(
                "chaos_controller_commands_total",
                &[("result", "ok")],
                c.commands_ok.load(Ordering::Relaxed) as f64,
            )
            .sample(
                "chaos_controller_commands_total",
                &[("result", "error")],
                c.commands_err.load(Ordering::Relaxed) as f64,
            );
            t.family(
                "chaos_controller_agent_joins_total",
                "counter",
                "Agent streams opened.",
            )
            .sample(
                "chaos_controller_agent_joins_total",
                &[],
                c.joins.load(Ordering::Relaxed) as f64,
            );
            t.family(
                "chaos_controller_lease_reverts_total",
                "counter",
                "Faults agents reverted because the lease ran out.",
            )
            .sample(
                "chaos_controller_lease_reverts_total",
                &[],
                c.lease_losses.load(Ordering::Relaxed) as f64,
            );
            t.finish()
        })
    })
}

/// Kubernetes mode: leadership first, then the ChaosExperiment reconciler beside the fleet.
mod kubernetes {
    use super::*;
    use chaos_controller::fleet::{Caller, FleetDriver};
    use chaos_controller::k8s::{lease::LeaseLock, reconcile, schedule};
    use kube::runtime::{Controller, watcher};

    fn namespace() -> String {
        std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "chaos-system".into())
    }

    /// Connects to the API server and waits until this replica holds the Lease.
    pub async fn lead() -> Result<(kube::Client, LeaseLock)> {
        let client = kube::Client::try_default()
            .await
            .context("--kubernetes: no in-cluster config and no kubeconfig")?;
        let me = std::env::var("POD_NAME")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| format!("chaos-controller-{}", std::process::id()));
        let lock = LeaseLock::new(
            client.clone(),
            &namespace(),
            "chaos-controller",
            &me,
            std::time::Duration::from_secs(15),
        );
        tracing::info!(identity = %me, "waiting for leadership");
        lock.acquire().await;
        tracing::info!(identity = %me, "leading");
        Ok((client, lock))
    }

    /// Starts the reconciler in the background.
    pub fn reconcile(client: kube::Client, fleet: Arc<Fleet>, history: Arc<History>, listen: &str) {
        let ctx = reconcile::Ctx::new(
            client.clone(),
            FleetDriver {
                fleet,
                caller: Caller("kubernetes".into()),
            },
            Some(history),
            namespace(),
            format!("controller {listen} (kubernetes)"),
        );
        spawn_controller(
            &client,
            schedule::resource(),
            schedule::reconcile,
            ctx.clone(),
        );
        spawn_controller(&client, reconcile::resource(), reconcile::reconcile, ctx);
    }

    /// One kube-runtime controller over every object of `ar`, in the background.
    fn spawn_controller<F, Fut>(
        client: &kube::Client,
        ar: kube::api::ApiResource,
        reconcile_fn: F,
        ctx: Arc<reconcile::Ctx>,
    ) where
        F: FnMut(Arc<kube::api::DynamicObject>, Arc<reconcile::Ctx>) -> Fut + Send + 'static,
        Fut: std::future::Future<
                Output = Result<kube::runtime::controller::Action, reconcile::Error>,
            > + Send
            + 'static,
    {
        let kind = ar.kind.clone();
        let api = kube::Api::<kube::api::DynamicObject>::all_with(client.clone(), &ar);
        tokio::spawn(async move {
            let results = Controller::new_with(api, watcher::Config::default(), ar).run(
                reconcile_fn,
                reconcile::error_policy,
                ctx,
            );
            let mut results = std::pin::pin!(results);
            while let Some(r) = results.next().await {
                if let Err(e) = r {
                    tracing::warn!(%kind, "reconcile: {e}");
                }
            }
        });
    }
}
