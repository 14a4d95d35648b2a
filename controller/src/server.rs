//! The controller's gRPC services: Fleet (agents join) and Controller (chaosctl drives).
//! With mTLS the caller's certificate decides what it may do: agent certificates may only
//! join, as the node they were issued to; user certificates may only drive.
use crate::certs::{self, ROLE_AGENT, ROLE_USER};
use crate::fleet::{Caller, Fleet};
use chaos_experiment::driver::AgentSelector;
use chaos_proto::agent::v1 as pb;
use chaos_proto::fleet::v1 as fleet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// The caller's (role, name) from its client certificate; None without TLS.
pub fn identity<T>(req: &Request<T>) -> Option<(String, String)> {
    let certs = req.peer_certs()?;
    certs.first().and_then(|c| certs::peer_identity(c.as_ref()))
}

/// Refuses a caller whose certificate has another role; plaintext callers (loopback only,
/// enforced at start) are named by their address.
pub fn caller<T>(req: &Request<T>, role: &str) -> Result<Caller, Status> {
    match identity(req) {
        Some((r, name)) if r == role => Ok(Caller(name)),
        Some((r, name)) => Err(refused(format!(
            "certificate {name} has role {r:?}; this API needs {role:?}"
        ))),
        None if req.peer_certs().is_some() => Err(refused("client certificate has no role".into())),
        None => Ok(Caller(format!(
            "plaintext:{}",
            req.remote_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|| "unix".into())
        ))),
    }
}

/// PERMISSION_DENIED for a certificate the CA signed but this API does not serve, logged once
/// per identity and reason: the operator sees who is locked out without a line per retry.
fn refused(why: String) -> Status {
    crate::tls_front::once(format!("role {why}"), || {
        tracing::warn!("refused a caller: {why}")
    });
    Status::permission_denied(why)
}

pub struct FleetService {
    pub fleet: Arc<Fleet>,
}

type JoinStream = Pin<Box<dyn Stream<Item = Result<fleet::ControllerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl fleet::fleet_server::Fleet for FleetService {
    type JoinStream = JoinStream;

    async fn join(
        &self,
        req: Request<Streaming<fleet::AgentMessage>>,
    ) -> Result<Response<Self::JoinStream>, Status> {
        let who = caller(&req, ROLE_AGENT)?;
        let peer = req
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unix".into());
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))?;
        let hello = match first {
            Some(Ok(fleet::AgentMessage {
                msg: Some(fleet::agent_message::Msg::Hello(h)),
            })) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ));
            }
        };
        certs::check_name("node_name", &hello.node_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // An agent certificate is good for its own node only (a shared fleet certificate,
        // e.g. for a DaemonSet, is named "fleet" and may announce any node).
        if !who.0.starts_with("plaintext:") && who.0 != "fleet" && who.0 != hello.node_name {
            return Err(refused(format!(
                "certificate {} may not join as node {}",
                who.0, hello.node_name
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let conn = self.fleet.register(hello, peer.clone(), tx.clone())?;
        tracing::info!(node = %conn.info.node_name, %peer, labels = ?conn.info.labels, "agent joined");

        // Leases: renewed at a third of their ttl, so two may be lost before the agent acts.
        let ttl = self.fleet.lease;
        let lease_tx = tx.clone();
        let leases = tokio::spawn(async move {
            let mut tick = tokio::time::interval(ttl / 3);
            loop {
                tick.tick().await;
                let msg = fleet::ControllerMessage {
                    msg: Some(fleet::controller_message::Msg::Lease(fleet::Lease {
                        ttl_ms: ttl.as_millis() as u64,
                    })),
                };
                if lease_tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        let fleet = self.fleet.clone();
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                match msg {
                    Ok(fleet::AgentMessage { msg: Some(m) }) => fleet.on_message(&conn, m),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(node = %conn.info.node_name, "agent stream error: {}", e.message());
                        break;
                    }
                }
            }
            leases.abort();
            fleet.unregister(&conn);
            tracing::info!(node = %conn.info.node_name, "agent left");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

pub struct ControllerService {
    pub fleet: Arc<Fleet>,
}

fn selector(s: Option<fleet::Selector>) -> AgentSelector {
    let s = s.unwrap_or_default();
    AgentSelector {
        agents: s.agents,
        labels: s.labels.into_iter().collect(),
        max_agents: None,
        pods: None,
    }
}

fn agent_faults(list: Vec<(String, pb::Fault)>) -> Vec<fleet::AgentFault> {
    list.into_iter()
        .map(|(node_name, f)| fleet::AgentFault {
            node_name,
            fault: Some(f),
        })
        .collect()
}

#[tonic::async_trait]
impl fleet::controller_server::Controller for ControllerService {
    async fn list_agents(
        &self,
        req: Request<fleet::ListAgentsRequest>,
    ) -> Result<Response<fleet::ListAgentsResponse>, Status> {
        caller(&req, ROLE_USER)?;
        Ok(Response::new(fleet::ListAgentsResponse {
            agents: self.fleet.agents(),
        }))
    }

    async fn apply(
        &self,
        req: Request<fleet::FleetApplyRequest>,
    ) -> Result<Response<fleet::FleetApplyResponse>, Status> {
        let who = caller(&req, ROLE_USER)?;
        let req = req.into_inner();
        let spec = req
            .spec
            .ok_or_else(|| Status::invalid_argument("spec: is required"))?;
        let faults = self
            .fleet
            .apply(&who, &selector(req.selector), spec)
            .await
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(fleet::FleetApplyResponse {
            faults: agent_faults(faults),
        }))
    }

    async fn revert(
        &self,
        req: Request<fleet::FleetRevertRequest>,
    ) -> Result<Response<fleet::FleetRevertResponse>, Status> {
        let who = caller(&req, ROLE_USER)?;
        let req = req.into_inner();
        let node = (!req.node_name.is_empty()).then_some(req.node_name.as_str());
        let id = (!req.all && !req.id.is_empty()).then_some(req.id.as_str());
        if node.is_none() && id.is_none() && !req.all {
            return Err(Status::invalid_argument(
                "node_name: is required unless an id or all is set",
            ));
        }
        let reverted = self
            .fleet
            .revert(&who, node, id)
            .await
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(fleet::FleetRevertResponse {
            reverted: agent_faults(reverted),
        }))
    }

    async fn list_faults(
        &self,
        req: Request<fleet::ListFaultsRequest>,
    ) -> Result<Response<fleet::ListFaultsResponse>, Status> {
        caller(&req, ROLE_USER)?;
        let (faults, errors) = self.fleet.list_faults().await;
        Ok(Response::new(fleet::ListFaultsResponse {
            faults: agent_faults(faults),
            errors,
        }))
    }

    async fn counters(
        &self,
        req: Request<fleet::FleetCountersRequest>,
    ) -> Result<Response<pb::Counters>, Status> {
        caller(&req, ROLE_USER)?;
        let req = req.into_inner();
        self.fleet
            .counters(&req.node_name, &req.id)
            .await
            .map(Response::new)
            .map_err(Status::failed_precondition)
    }
}
