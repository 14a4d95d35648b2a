//! The agent's side of the fleet: it dials out to the controller (so agents behind NAT work),
//! keeps one stream open, and serves the controller's commands with the same Agent API
//! implementation the unix socket serves (the engine, or the null backend).
//!
//! The lease is the safety net: faults applied for the controller are reverted when no lease
//! renewal has arrived for the lease's ttl. The watchdog runs as its own task, so a stuck stream
//! or a slow command can never keep a fault alive past its lease.
use crate::tls::TlsFiles;
use chaos_proto::agent::v1 as pb;
use chaos_proto::agent::v1::agent_server::Agent;
use chaos_proto::fleet::v1 as fleet;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

/// Until the controller says otherwise (its first Lease).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `https://host:port` (mTLS) or `http://127.0.0.1:port` (plaintext, loopback only).
    pub url: String,
    pub node_name: String,
    pub labels: BTreeMap<String, String>,
    pub tls: Option<TlsFiles>,
}

/// What the fleet client knows, shared with the watchdog and /metrics.
#[derive(Default)]
pub struct FleetState {
    /// Faults this agent applied for the controller and still holds.
    owned: Mutex<BTreeSet<String>>,
    /// When the lease runs out; None before the first lease or after it was acted on.
    lease_until: Mutex<Option<Instant>>,
    /// Faults that ended without a revert command while no stream was up, to report on the
    /// next one.
    outbox: Mutex<Vec<fleet::FaultEnded>>,
    /// The live stream's sender, while joined: an end is reported as it happens.
    live: Mutex<Option<tokio::sync::mpsc::Sender<fleet::AgentMessage>>>,
    connected: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FleetState {
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn owned(&self) -> usize {
        lock(&self.owned).len()
    }

    /// Tells the controller a fault ended without its revert: on the live stream now, or on
    /// the next one.
    fn report_ended(&self, ended: fleet::FaultEnded) {
        let msg = fleet::AgentMessage {
            msg: Some(fleet::agent_message::Msg::Ended(ended.clone())),
        };
        let sent = lock(&self.live)
            .as_ref()
            .is_some_and(|tx| tx.try_send(msg).is_ok());
        if !sent {
            lock(&self.outbox).push(ended);
        }
    }
}

/// Starts the connection loop and the lease watchdog; both run until the process ends.
pub fn spawn<A: Agent>(agent: Arc<A>, cfg: FleetConfig) -> Arc<FleetState> {
    let state = Arc::new(FleetState::default());
    tokio::spawn(watchdog(agent.clone(), state.clone()));
    tokio::spawn(connection_loop(agent, cfg, state.clone()));
    state
}

async fn connection_loop<A: Agent>(agent: Arc<A>, cfg: FleetConfig, state: Arc<FleetState>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        match session(&agent, &cfg, &state).await {
            Ok(()) => tracing::warn!(controller = %cfg.url, "controller closed the stream"),
            Err(e) if e.starts_with("join refused") => {
                tracing::warn!(controller = %cfg.url, "{e}; retrying with backoff")
            }
            Err(e) => tracing::warn!(controller = %cfg.url, "controller unreachable: {e}"),
        }
        state.connected.store(false, Ordering::Relaxed);
        *lock(&state.live) = None;
        // A session that lasted resets the backoff; flapping ones back off up to 5 s.
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        // Jitter so a restarted controller is not hit by every agent in the same millisecond.
        let jitter = Duration::from_millis((std::process::id() as u64 * 7919) % 200);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn connect(cfg: &FleetConfig) -> Result<Channel, String> {
    #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
    let mut ep = Endpoint::from_shared(cfg.url.clone())
        .map_err(|e| format!("--controller `{}`: {e}", cfg.url))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    #[cfg(feature = "tls")]
    if let Some(tls) = &cfg.tls {
        let host = crate::tls::ServiceUrl::parse(&cfg.url)
            .map(|u| u.host)
            .unwrap_or_default();
        ep = ep
            .tls_config(tls.client(&host).map_err(|e| e.to_string())?)
            .map_err(|e| format!("TLS: {e}"))?;
    }
    #[cfg(not(feature = "tls"))]
    if cfg.tls.is_some() {
        return Err("this chaos-agent was built without TLS (feature `tls`)".into());
    }
    ep.connect().await.map_err(|e| transport_error(&e))
}

/// The controller's reason for refusing our certificate, which a failed call cannot see with
/// TLS 1.3 (see [`crate::tls::refusal`]).
async fn hidden_refusal(cfg: &FleetConfig) -> Option<String> {
    #[cfg(feature = "tls")]
    if let Some(files) = &cfg.tls {
        let url = crate::tls::ServiceUrl::parse(&cfg.url).ok()?;
        return crate::tls::refusal(files, &url).await;
    }
    let _ = cfg;
    None
}

/// A connection's failure in one line: the TLS reason when there is one, else the causes.
fn transport_error(e: &(dyn std::error::Error + 'static)) -> String {
    #[cfg(feature = "tls")]
    if let Some(why) = crate::tls::explain(e) {
        return why;
    }
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line = format!("{line}: {c}");
        cause = c.source();
    }
    line
}

async fn session<A: Agent>(
    agent: &Arc<A>,
    cfg: &FleetConfig,
    state: &Arc<FleetState>,
) -> Result<(), String> {
    let channel = connect(cfg).await?;
    let mut client = fleet::fleet_client::FleetClient::new(channel);
    let (tx, rx) = mpsc::channel::<fleet::AgentMessage>(256);

    let capabilities = agent
        .capabilities(Request::new(pb::CapabilitiesRequest {}))
        .await
        .map(|r| r.into_inner())
        .ok();
    let owned = lock(&state.owned).clone();
    let faults = agent
        .list(Request::new(pb::ListRequest {}))
        .await
        .map(|r| r.into_inner().faults)
        .unwrap_or_default()
        .into_iter()
        .filter(|f| owned.contains(&f.id))
        .collect();
    let hello = fleet::Hello {
        node_name: cfg.node_name.clone(),
        labels: cfg.labels.clone().into_iter().collect(),
        capabilities,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        faults,
    };
    let send = |msg| fleet::AgentMessage { msg: Some(msg) };
    tx.send(send(fleet::agent_message::Msg::Hello(hello)))
        .await
        .map_err(|_| "stream closed".to_string())?;
    let outbox = std::mem::take(&mut *lock(&state.outbox));
    for ended in outbox {
        let _ = tx.send(send(fleet::agent_message::Msg::Ended(ended))).await;
    }

    let mut inbound = match client.join(ReceiverStream::new(rx)).await {
        Ok(joined) => joined.into_inner(),
        Err(s) => {
            return Err(match s.code() {
                tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled => {
                    hidden_refusal(cfg)
                        .await
                        .unwrap_or_else(|| transport_error(&s))
                }
                _ => format!("join refused: {}", s.message()),
            });
        }
    };
    state.connected.store(true, Ordering::Relaxed);
    *lock(&state.live) = Some(tx.clone());
    tracing::info!(controller = %cfg.url, node = %cfg.node_name, "joined the controller");
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(s) => return Err(transport_error(&s)),
        };
        match msg.msg {
            Some(fleet::controller_message::Msg::Lease(l)) => {
                let ttl = Duration::from_millis(l.ttl_ms.max(100));
                *lock(&state.lease_until) = Some(Instant::now() + ttl);
            }
            Some(fleet::controller_message::Msg::Command(c)) => {
                // Concurrently: a slow apply must not hold up leases or other commands.
                let (agent, state, tx) = (agent.clone(), state.clone(), tx.clone());
                tokio::spawn(async move {
                    let reply = execute(&*agent, &state, c).await;
                    let _ = tx.send(send(fleet::agent_message::Msg::Reply(reply))).await;
                });
            }
            None => {}
        }
    }
}

async fn execute<A: Agent>(agent: &A, state: &FleetState, c: fleet::Command) -> fleet::Reply {
    use fleet::command::Cmd;
    use fleet::reply::Result as R;
    let result = match c.cmd {
        Some(Cmd::Apply(req)) => match agent.apply(Request::new(req)).await {
            Ok(r) => {
                let r = r.into_inner();
                if let Some(f) = &r.fault {
                    lock(&state.owned).insert(f.id.clone());
                }
                R::Apply(r)
            }
            Err(s) => R::Error(s.message().to_string()),
        },
        Some(Cmd::Revert(req)) => {
            // "All" from the controller means all it owns, not faults applied locally.
            let ids: Vec<String> = if req.all {
                lock(&state.owned).iter().cloned().collect()
            } else {
                vec![req.id]
            };
            let mut reverted = Vec::new();
            let mut error = None;
            for id in ids {
                match agent
                    .revert(Request::new(pb::RevertRequest {
                        id: id.clone(),
                        all: false,
                    }))
                    .await
                {
                    Ok(r) => {
                        lock(&state.owned).remove(&id);
                        reverted.extend(r.into_inner().reverted);
                    }
                    Err(s) => {
                        if s.code() == tonic::Code::NotFound {
                            lock(&state.owned).remove(&id);
                        }
                        error = Some(s.message().to_string());
                    }
                }
            }
            match error {
                Some(e) if reverted.is_empty() => R::Error(e),
                _ => R::Revert(pb::RevertResponse { reverted }),
            }
        }
        Some(Cmd::List(req)) => match agent.list(Request::new(req)).await {
            Ok(r) => R::List(r.into_inner()),
            Err(s) => R::Error(s.message().to_string()),
        },
        Some(Cmd::Counters(id)) => match agent.list(Request::new(pb::ListRequest {})).await {
            Ok(r) => match r.into_inner().faults.into_iter().find(|f| f.id == id) {
                Some(f) => R::Counters(f.counters.unwrap_or_default()),
                None => R::Error(format!("no active fault {id}")),
            },
            Err(s) => R::Error(s.message().to_string()),
        },
        None => R::Error("empty command".into()),
    };
    fleet::Reply {
        request_id: c.request_id,
        result: Some(result),
    }
}

/// Reverts everything the controller owns once its lease has run out, and notices faults that
/// ended by their own deadline.
async fn watchdog<A: Agent>(agent: Arc<A>, state: Arc<FleetState>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut last_prune = Instant::now();
    loop {
        tick.tick().await;
        let expired = {
            let mut until = lock(&state.lease_until);
            match *until {
                Some(t) if Instant::now() >= t => {
                    *until = None;
                    true
                }
                _ => false,
            }
        };
        if expired {
            let ids: Vec<String> = lock(&state.owned).iter().cloned().collect();
            if !ids.is_empty() {
                tracing::warn!(
                    faults = ids.len(),
                    "lease expired: the controller is gone, reverting its faults"
                );
            }
            for id in ids {
                let counters = agent
                    .revert(Request::new(pb::RevertRequest {
                        id: id.clone(),
                        all: false,
                    }))
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().reverted.pop())
                    .and_then(|f| f.counters);
                lock(&state.owned).remove(&id);
                tracing::info!(%id, "reverted: lease expired");
                // The lease ran out because the controller is unreachable: the next stream
                // carries it.
                lock(&state.outbox).push(fleet::FaultEnded {
                    id,
                    reason: "lease".into(),
                    counters,
                });
            }
        }
        if last_prune.elapsed() >= Duration::from_millis(250) {
            last_prune = Instant::now();
            let owned: Vec<String> = lock(&state.owned).iter().cloned().collect();
            if owned.is_empty() {
                continue;
            }
            let Ok(list) = agent.list(Request::new(pb::ListRequest {})).await else {
                continue;
            };
            let active: BTreeSet<String> =
                list.into_inner().faults.into_iter().map(|f| f.id).collect();
            for id in owned.into_iter().filter(|id| !active.contains(id)) {
                lock(&state.owned).remove(&id);
                state.report_ended(fleet::FaultEnded {
                    id,
                    reason: "deadline".into(),
                    counters: None,
                });
            }
        }
    }
}
