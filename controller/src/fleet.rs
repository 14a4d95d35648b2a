//! The controller's view of its agents: who is connected, with what labels and capabilities,
//! and a request/reply channel over each agent's stream. Commands fan out to every selected
//! agent at once; no lock is held across an await, so one slow agent delays only its own reply.
use crate::audit::Audit;
use chaos_experiment::driver::{AgentSelector, AppliedFault, DriverError, FaultDriver};
use chaos_proto::agent::v1 as pb;
use chaos_proto::fleet::v1 as fleet;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// How long one agent may take to answer a command.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

pub type Outbound = mpsc::Sender<Result<fleet::ControllerMessage, Status>>;
type Pending = Mutex<HashMap<u64, oneshot::Sender<fleet::reply::Result>>>;

/// One connected agent.
pub struct AgentConn {
    pub info: fleet::AgentInfo,
    /// Distinguishes this connection from a later one of the same node.
    pub generation: u64,
    tx: Outbound,
    pending: Pending,
    /// Faults applied through this controller that the agent still holds, by id.
    faults: Mutex<BTreeMap<String, pb::FaultSpec>>,
}

impl AgentConn {
    fn faults(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, pb::FaultSpec>> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn pending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<fleet::reply::Result>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
pub struct Counts {
    pub commands_ok: AtomicU64,
    pub commands_err: AtomicU64,
    pub joins: AtomicU64,
    pub lease_losses: AtomicU64,
}

pub struct Fleet {
    agents: RwLock<HashMap<String, Arc<AgentConn>>>,
    next_id: AtomicU64,
    pub lease: Duration,
    audit: Option<Audit>,
    /// Final counters of faults that ended on the agent without our revert (deadline, lease),
    /// so a later revert is a success with real numbers.
    ended: Mutex<HashMap<(String, String), pb::Counters>>,
    pub counts: Counts,
}

/// Who asked, for the audit log: a certificate's name, or the peer address with plaintext.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

impl Fleet {
    pub fn new(lease: Duration, audit: Option<Audit>) -> Arc<Self> {
        Arc::new(Fleet {
            agents: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            lease,
            audit,
            ended: Mutex::new(HashMap::new()),
            counts: Counts::default(),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<AgentConn>>> {
        self.agents.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<AgentConn>>> {
        self.agents.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a joined agent. One live stream per node name: a second Join for a node
    /// whose stream is up is refused (ALREADY_EXISTS), so nobody holding a certificate that
    /// may announce the node (the shared `fleet` one) can take its faults and reverts over; a
    /// dead stream (its response stream gone, or its inbound ended) is replaced and closed.
    pub fn register(
        &self,
        hello: fleet::Hello,
        peer: String,
        tx: Outbound,
    ) -> Result<Arc<AgentConn>, Status> {
        let generation = self.next_id.fetch_add(1, Ordering::Relaxed);
        let faults = hello
            .faults
            .iter()
            .map(|f| (f.id.clone(), f.spec.clone().unwrap_or_default()))
            .collect();
        let conn = Arc::new(AgentConn {
            info: fleet::AgentInfo {
                node_name: hello.node_name.clone(),
                labels: hello.labels,
                capabilities: hello.capabilities,
                agent_version: hello.agent_version,
                peer,
                connected_unix_ms: chaos_agent::engine::unix_ms(SystemTime::now()) as i64,
                faults: 0,
            },
            generation,
            tx,
            pending: Mutex::new(HashMap::new()),
            faults: Mutex::new(faults),
        });
        let mut agents = self.write();
        if let Some(old) = agents.get(&hello.node_name) {
            if !old.tx.is_closed() {
                tracing::warn!(node = %hello.node_name, peer = %conn.info.peer, live_peer = %old.info.peer, "a second stream for a connected node: refused");
                return Err(Status::already_exists(format!(
                    "node {} is already connected (from {}); a second stream for one node is refused",
                    hello.node_name, old.info.peer
                )));
            }
            tracing::warn!(node = %hello.node_name, old_peer = %old.info.peer, "the node's earlier stream is dead: replaced");
            // Its waiters get no reply on that stream.
            old.pending().clear();
        }
        agents.insert(hello.node_name.clone(), conn.clone());
        drop(agents);
        self.counts.joins.fetch_add(1, Ordering::Relaxed);
        Ok(conn)
    }

    /// Ends every agent's stream with `status` (at shutdown): the agents see the stream end and
    /// close theirs, so a graceful shutdown has no open stream to wait for.
    pub fn close_all(&self, status: &Status) {
        for conn in self.read().values() {
            let _ = conn.tx.try_send(Err(status.clone()));
        }
    }

    /// The agent's stream ended; forget it unless a newer stream replaced it already.
    pub fn unregister(&self, conn: &AgentConn) {
        let mut agents = self.write();
        if agents
            .get(&conn.info.node_name)
            .is_some_and(|c| c.generation == conn.generation)
        {
            agents.remove(&conn.info.node_name);
        }
        // Fail what is still waiting: those replies will never come on this stream.
        conn.pending().clear();
    }

    /// A Reply or FaultEnded from the agent.
    pub fn on_message(&self, conn: &AgentConn, msg: fleet::agent_message::Msg) {
        match msg {
            fleet::agent_message::Msg::Reply(r) => {
                let waiter = conn.pending().remove(&r.request_id);
                if let (Some(w), Some(result)) = (waiter, r.result) {
                    let _ = w.send(result);
                }
            }
            fleet::agent_message::Msg::Ended(e) => {
                tracing::info!(node = %conn.info.node_name, id = %e.id, reason = %e.reason, "fault ended on the agent");
                let who = Caller(format!("agent {}", conn.info.node_name));
                let result = format!("ended: {}", e.reason);
                self.audit(&who, "end", &conn.info.node_name, &e.id, "", &result);
                if e.reason == "lease" {
                    self.counts.lease_losses.fetch_add(1, Ordering::Relaxed);
                }
                conn.faults().remove(&e.id);
                self.ended.lock().unwrap_or_else(|p| p.into_inner()).insert(
                    (conn.info.node_name.clone(), e.id),
                    e.counters.unwrap_or_default(),
                );
            }
            fleet::agent_message::Msg::Hello(_) => {
                tracing::warn!(node = %conn.info.node_name, "a second hello on one stream: ignored");
            }
        }
    }

    pub fn agents(&self) -> Vec<fleet::AgentInfo> {
        let mut list: Vec<_> = self
            .read()
            .values()
            .map(|c| {
                let mut info = c.info.clone();
                info.faults = c.faults().len() as u32;
                info
            })
            .collect();
        list.sort_by(|a, b| a.node_name.cmp(&b.node_name));
        list
    }

    pub fn faults_active(&self) -> usize {
        self.read().values().map(|c| c.faults().len()).sum()
    }

    /// The agents `sel` picks, or one line saying why none or which names are unknown.
    pub fn select(&self, sel: &AgentSelector) -> Result<Vec<Arc<AgentConn>>, String> {
        if sel.pods.is_some() {
            return Err(crate::local_driver::POD_TARGETS.into());
        }
        let agents = self.read();
        let unknown: Vec<&str> = sel
            .agents
            .iter()
            .filter(|n| !agents.contains_key(*n))
            .map(String::as_str)
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "target.agents: no connected agent named {} (connected: {})",
                unknown.join(", "),
                if agents.is_empty() {
                    "none".to_string()
                } else {
                    let mut names: Vec<&str> = agents.keys().map(String::as_str).collect();
                    names.sort();
                    names.join(", ")
                }
            ));
        }
        let picked: Vec<Arc<AgentConn>> = agents
            .values()
            .filter(|c| sel.agents.is_empty() || sel.agents.contains(&c.info.node_name))
            .filter(|c| {
                sel.labels
                    .iter()
                    .all(|(k, v)| c.info.labels.get(k) == Some(v))
            })
            .cloned()
            .collect();
        if let Some(max) = sel.max_agents.filter(|m| picked.len() > *m as usize) {
            return Err(format!(
                "blast-radius.max-agents: the target matches {} agents, more than {max}; nothing was applied",
                picked.len()
            ));
        }
        if picked.is_empty() {
            return Err(if agents.is_empty() {
                "target: no agent is connected to the controller".to_string()
            } else {
                format!(
                    "target.labels: no connected agent has labels {}",
                    sel.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            });
        }
        Ok(picked)
    }

    fn get(&self, node: &str) -> Result<Arc<AgentConn>, String> {
        self.read()
            .get(node)
            .cloned()
            .ok_or_else(|| format!("agent {node} is not connected"))
    }

    /// Sends one command and waits for its reply.
    pub async fn request(
        &self,
        conn: &AgentConn,
        cmd: fleet::command::Cmd,
    ) -> Result<fleet::reply::Result, String> {
        let request_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        conn.pending().insert(request_id, tx);
        let msg = fleet::ControllerMessage {
            msg: Some(fleet::controller_message::Msg::Command(fleet::Command {
                request_id,
                cmd: Some(cmd),
            })),
        };
        let node = &conn.info.node_name;
        if conn.tx.send(Ok(msg)).await.is_err() {
            conn.pending().remove(&request_id);
            return Err(format!("agent {node} disconnected"));
        }
        match tokio::time::timeout(REPLY_TIMEOUT, rx).await {
            Ok(Ok(fleet::reply::Result::Error(e))) => {
                self.counts.commands_err.fetch_add(1, Ordering::Relaxed);
                Err(format!("agent {node}: {e}"))
            }
            Ok(Ok(r)) => {
                self.counts.commands_ok.fetch_add(1, Ordering::Relaxed);
                Ok(r)
            }
            Ok(Err(_)) => Err(format!("agent {node} disconnected before replying")),
            Err(_) => {
                conn.pending().remove(&request_id);
                Err(format!(
                    "agent {node} did not reply within {REPLY_TIMEOUT:?}"
                ))
            }
        }
    }

    /// Applies on every selected agent concurrently, all or nothing.
    pub async fn apply(
        self: &Arc<Self>,
        who: &Caller,
        sel: &AgentSelector,
        spec: pb::FaultSpec,
    ) -> Result<Vec<(String, pb::Fault)>, String> {
        let conns = self.select(sel)?;
        let summary = chaos_experiment::driver::summarize(&spec);
        let mut set = tokio::task::JoinSet::new();
        for conn in conns {
            let (me, spec) = (self.clone(), spec.clone());
            set.spawn(async move {
                let r = me
                    .request(
                        &conn,
                        fleet::command::Cmd::Apply(pb::ApplyRequest {
                            spec: Some(spec.clone()),
                        }),
                    )
                    .await;
                let r = match r {
                    Ok(fleet::reply::Result::Apply(a)) => a
                        .fault
                        .ok_or_else(|| format!("agent {}: empty reply", conn.info.node_name)),
                    Ok(_) => Err(format!("agent {}: unexpected reply", conn.info.node_name)),
                    Err(e) => Err(e),
                };
                if let Ok(f) = &r {
                    conn.faults().insert(f.id.clone(), spec);
                }
                (conn, r)
            });
        }
        let mut applied = Vec::new();
        let mut errors = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((conn, Ok(f))) => applied.push((conn, f)),
                Ok((_, Err(e))) => errors.push(e),
                Err(e) => errors.push(format!("internal: {e}")),
            }
        }
        if !errors.is_empty() {
            // All or nothing: take back what did apply.
            for (conn, f) in &applied {
                let _ = self.revert_on(conn, &f.id).await;
            }
            errors.sort();
            let line = errors.join("; ");
            self.audit(
                who,
                "apply",
                "-",
                "-",
                &summary,
                &format!("refused: {line}"),
            );
            return Err(line);
        }
        applied.sort_by(|a, b| a.0.info.node_name.cmp(&b.0.info.node_name));
        for (conn, f) in &applied {
            self.audit(who, "apply", &conn.info.node_name, &f.id, &summary, "ok");
        }
        Ok(applied
            .into_iter()
            .map(|(c, f)| (c.info.node_name.clone(), f))
            .collect())
    }

    async fn revert_on(&self, conn: &AgentConn, id: &str) -> Result<Vec<pb::Fault>, String> {
        let r = self
            .request(
                conn,
                fleet::command::Cmd::Revert(pb::RevertRequest {
                    id: id.to_string(),
                    all: false,
                }),
            )
            .await;
        conn.faults().remove(id);
        match r {
            Ok(fleet::reply::Result::Revert(r)) => Ok(r.reverted),
            Ok(_) => Err(format!("agent {}: unexpected reply", conn.info.node_name)),
            Err(e) => Err(e),
        }
    }

    /// Reverts one fault (or with `id` None, every fault this controller holds on the agent,
    /// or on every agent when `node` is None too).
    pub async fn revert(
        self: &Arc<Self>,
        who: &Caller,
        node: Option<&str>,
        id: Option<&str>,
    ) -> Result<Vec<(String, pb::Fault)>, String> {
        let targets: Vec<(Arc<AgentConn>, String)> = match (node, id) {
            (Some(n), Some(id)) => vec![(self.get(n)?, id.to_string())],
            // A fault id alone: the agent that holds it.
            (None, Some(id)) => {
                let holder = self
                    .read()
                    .values()
                    .find(|c| c.faults().contains_key(id))
                    .cloned();
                // Not one of ours (applied on the agent's socket, say): ask the agents.
                let holder = match holder {
                    Some(c) => Some(c),
                    None => {
                        let (faults, _) = self.list_faults().await;
                        faults
                            .iter()
                            .find(|(_, f)| f.id == id)
                            .and_then(|(node, _)| self.get(node).ok())
                    }
                };
                match holder {
                    Some(c) => vec![(c, id.to_string())],
                    None => return Err(format!("no fault {id} on any connected agent")),
                }
            }
            (Some(n), None) => {
                let c = self.get(n)?;
                let ids: Vec<String> = c.faults().keys().cloned().collect();
                ids.into_iter().map(|id| (c.clone(), id)).collect()
            }
            (None, _) => self
                .read()
                .values()
                .flat_map(|c| {
                    let ids: Vec<String> = c.faults().keys().cloned().collect();
                    ids.into_iter()
                        .map(|id| (c.clone(), id))
                        .collect::<Vec<_>>()
                })
                .collect(),
        };
        let mut set = tokio::task::JoinSet::new();
        for (conn, id) in targets {
            let me = self.clone();
            set.spawn(async move {
                let r = me.revert_on(&conn, &id).await;
                (conn.info.node_name.clone(), id, r)
            });
        }
        let mut out = Vec::new();
        let mut errors = Vec::new();
        while let Some(Ok((node, id, r))) = set.join_next().await {
            match r {
                Ok(faults) => {
                    self.audit(who, "revert", &node, &id, "", "ok");
                    out.extend(faults.into_iter().map(|f| (node.clone(), f)));
                }
                Err(e) => {
                    self.audit(who, "revert", &node, &id, "", &format!("failed: {e}"));
                    errors.push(e);
                }
            }
        }
        if !errors.is_empty() && out.is_empty() {
            return Err(errors.join("; "));
        }
        Ok(out)
    }

    /// Every connected agent's faults as the agent lists them, asked in parallel; an agent that
    /// does not answer is an error line, not a failed listing.
    pub async fn list_faults(self: &Arc<Self>) -> (Vec<(String, pb::Fault)>, Vec<String>) {
        let conns: Vec<Arc<AgentConn>> = self.read().values().cloned().collect();
        let mut set = tokio::task::JoinSet::new();
        for conn in conns {
            let me = self.clone();
            set.spawn(async move {
                let r = me
                    .request(&conn, fleet::command::Cmd::List(pb::ListRequest {}))
                    .await;
                (conn.info.node_name.clone(), r)
            });
        }
        let (mut faults, mut errors) = (Vec::new(), Vec::new());
        while let Some(Ok((node, r))) = set.join_next().await {
            match r {
                Ok(fleet::reply::Result::List(l)) => {
                    faults.extend(l.faults.into_iter().map(|f| (node.clone(), f)))
                }
                Ok(_) => errors.push(format!("{node}: unexpected reply")),
                Err(e) => errors.push(format!("{node}: {e}")),
            }
        }
        faults.sort_by(|a, b| (&a.0, &a.1.id).cmp(&(&b.0, &b.1.id)));
        errors.sort();
        (faults, errors)
    }

    pub async fn counters(&self, node: &str, id: &str) -> Result<pb::Counters, String> {
        if let Some(c) = self.ended_counters(node, id) {
            return Ok(c);
        }
        let conn = self.get(node)?;
        match self
            .request(&conn, fleet::command::Cmd::Counters(id.to_string()))
            .await?
        {
            fleet::reply::Result::Counters(c) => Ok(c),
            _ => Err(format!("agent {node}: unexpected reply")),
        }
    }

    fn ended_counters(&self, node: &str, id: &str) -> Option<pb::Counters> {
        self.ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(node.to_string(), id.to_string()))
            .copied()
    }

    fn audit(&self, who: &Caller, action: &str, node: &str, id: &str, what: &str, result: &str) {
        if let Some(a) = &self.audit {
            a.record(&who.0, action, node, id, what, result);
        }
    }
}

/// The fleet as the experiment runner sees it. Faults are named by the agent that holds them.
#[derive(Clone)]
pub struct FleetDriver {
    pub fleet: Arc<Fleet>,
    pub caller: Caller,
}

impl FaultDriver for FleetDriver {
    async fn apply(
        &self,
        selector: &AgentSelector,
        spec: pb::FaultSpec,
    ) -> Result<Vec<AppliedFault>, DriverError> {
        let applied = self
            .fleet
            .apply(&self.caller, selector, spec)
            .await
            .map_err(DriverError)?;
        Ok(applied
            .into_iter()
            .map(|(agent, f)| AppliedFault {
                pod: None,
                agent,
                id: f.id,
                backend: f.backend,
            })
            .collect())
    }

    async fn counters(&self, fault: &AppliedFault) -> Result<pb::Counters, DriverError> {
        self.fleet
            .counters(&fault.agent, &fault.id)
            .await
            .map_err(DriverError)
    }

    async fn revert(&self, fault: &AppliedFault) -> Result<pb::Counters, DriverError> {
        if let Some(c) = self.fleet.ended_counters(&fault.agent, &fault.id) {
            return Ok(c);
        }
        let r = self
            .fleet
            .revert(&self.caller, Some(&fault.agent), Some(&fault.id))
            .await
            .map_err(DriverError)?;
        Ok(r.into_iter()
            .find(|(_, f)| f.id == fault.id)
            .and_then(|(_, f)| f.counters)
            .or_else(|| self.fleet.ended_counters(&fault.agent, &fault.id))
            .unwrap_or_default())
    }
}
