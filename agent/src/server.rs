//! The agent's gRPC service (chaos.agent.v1.Agent): a thin edge over the engine. Protobuf types
//! are converted by `chaos_proto::convert`, once, with the same parsers and error lines as the
//! CLI.
use crate::caps;
use crate::engine::{Engine, EngineError, FaultStatus, unix_ms};
use crate::spec::{FaultKind, FaultSpec};
use chaos_proto::agent::v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct AgentService {
    engine: Arc<Engine>,
}

impl AgentService {
    pub fn new(engine: Arc<Engine>) -> Self {
        AgentService { engine }
    }
}

pub fn fault_pb(f: &FaultStatus) -> pb::Fault {
    pb::Fault {
        id: f.id.clone(),
        spec: Some((&f.spec).into()),
        deadline_unix_ms: unix_ms(f.deadline) as i64,
        counters: Some(f.counters.into()),
        backend: f.backend.to_string(),
    }
}

fn status(e: EngineError) -> Status {
    match &e {
        EngineError::NotFound(_) => Status::not_found(e.to_string()),
        EngineError::Privileges(_) => Status::permission_denied(e.to_string()),
        _ if e.is_user_error() => Status::invalid_argument(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// Engine calls block (netns threads, bpf syscalls): keep them off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("engine task: {e}")))
}

/// The spec of an Apply request, as sent and as parsed with the CLI's parsers: every backend of
/// the Agent API (the engine, the null backend) refuses the same input with the same line.
pub fn apply_spec(req: pb::ApplyRequest) -> Result<(pb::FaultSpec, FaultSpec), Status> {
    let sent = req
        .spec
        .ok_or_else(|| Status::invalid_argument("invalid spec: is required"))?;
    let parsed =
        FaultSpec::try_from(sent.clone()).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok((sent, parsed))
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let (_, spec) = apply_spec(req.into_inner())?;
        let engine = self.engine.clone();
        let fault = blocking(move || engine.apply(spec))
            .await?
            .map_err(status)?;
        match &fault.spec.kind {
            FaultKind::Cpu { cgroup, .. } => {
                tracing::info!(id = %fault.id, kind = "cpu", target = %cgroup, "applied")
            }
            kind => {
                tracing::info!(id = %fault.id, kind = kind.name(), iface = %fault.spec.target.interface, "applied")
            }
        }
        Ok(Response::new(pb::ApplyResponse {
            fault: Some(fault_pb(&fault)),
        }))
    }

    async fn revert(
        &self,
        req: Request<pb::RevertRequest>,
    ) -> Result<Response<pb::RevertResponse>, Status> {
        let req = req.into_inner();
        let engine = self.engine.clone();
        let reverted = if req.all {
            blocking(move || engine.revert_all())
                .await?
                .into_iter()
                .filter_map(Result::ok)
                .collect()
        } else {
            vec![
                blocking(move || engine.revert(&req.id))
                    .await?
                    .map_err(status)?,
            ]
        };
        Ok(Response::new(pb::RevertResponse {
            reverted: reverted.iter().map(fault_pb).collect(),
        }))
    }

    async fn list(
        &self,
        _req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let engine = self.engine.clone();
        let faults = blocking(move || engine.list()).await?;
        Ok(Response::new(pb::ListResponse {
            faults: faults.iter().map(fault_pb).collect(),
        }))
    }

    type WatchCountersStream = ReceiverStream<Result<pb::CountersUpdate, Status>>;

    async fn watch_counters(
        &self,
        req: Request<pb::WatchCountersRequest>,
    ) -> Result<Response<Self::WatchCountersStream>, Status> {
        let req = req.into_inner();
        let interval = Duration::from_millis(req.interval_ms.clamp(50, 60_000) as u64);
        let engine = self.engine.clone();
        if engine.status(&req.id).is_none() {
            return Err(Status::not_found(format!("no active fault {}", req.id)));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let (id, engine2) = (req.id.clone(), engine.clone());
                let Ok(Some(f)) = tokio::task::spawn_blocking(move || engine2.status(&id)).await
                else {
                    break;
                };
                let ended = f.ended.is_some();
                let update = pb::CountersUpdate {
                    id: f.id,
                    counters: Some(f.counters.into()),
                    ended,
                };
                if tx.send(Ok(update)).await.is_err() || ended {
                    break;
                }
                tokio::time::sleep(interval).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn capabilities(
        &self,
        _req: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        let caps = blocking(caps::detect).await?;
        Ok(Response::new(capabilities_pb(&caps)))
    }
}

pub fn capabilities_pb(c: &caps::Capabilities) -> pb::CapabilitiesResponse {
    pb::CapabilitiesResponse {
        arch: c.arch.to_string(),
        kernel: c.kernel.clone(),
        features: c
            .features
            .iter()
            .map(|f| pb::Feature {
                name: f.name.to_string(),
                present: f.present,
                detail: f.detail.clone(),
            })
            .collect(),
        backends: c
            .backends
            .iter()
            .map(|b| pb::Backend {
                name: b.name.to_string(),
                available: b.available,
                fault_kinds: b.fault_kinds.iter().map(|k| k.to_string()).collect(),
                reason: b.reason.clone(),
            })
            .collect(),
    }
}
