//! `chaos-agent --backend null`: the Agent API with no kernel behind it. Specs are validated
//! with the same parser and limits as the engine, then kept in memory with zero counters until
//! reverted or past their deadline. It exists to measure the fleet (a thousand agent processes
//! on one machine, unprivileged), never to stand in for the engine in a fault test.
use crate::engine::{new_id, unix_ms};
use crate::server::apply_spec;
use chaos_proto::agent::v1 as pb;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct NullAgent {
    max_duration: Duration,
    faults: Mutex<BTreeMap<String, pb::Fault>>,
}

impl NullAgent {
    pub fn new(max_duration: Duration) -> Self {
        NullAgent {
            max_duration,
            faults: Mutex::new(BTreeMap::new()),
        }
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, pb::Fault>> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops faults whose deadline passed, as the engine's deadline enforcer would.
    fn expire(&self) {
        let now = unix_ms(SystemTime::now()) as i64;
        self.faults().retain(|_, f| f.deadline_unix_ms > now);
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for NullAgent {
    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let (spec, parsed) = apply_spec(req.into_inner())?;
        parsed
            .validate(self.max_duration)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.expire();
        let fault = pb::Fault {
            id: new_id(),
            spec: Some(spec),
            deadline_unix_ms: unix_ms(SystemTime::now() + parsed.duration) as i64,
            counters: Some(pb::Counters::default()),
            backend: "null".into(),
        };
        self.faults().insert(fault.id.clone(), fault.clone());
        Ok(Response::new(pb::ApplyResponse { fault: Some(fault) }))
    }

    async fn revert(
        &self,
        req: Request<pb::RevertRequest>,
    ) -> Result<Response<pb::RevertResponse>, Status> {
        let req = req.into_inner();
        self.expire();
        let mut faults = self.faults();
        let reverted = if req.all {
            std::mem::take(&mut *faults).into_values().collect()
        } else {
            vec![
                faults
                    .remove(&req.id)
                    .ok_or_else(|| Status::not_found(format!("no active fault {}", req.id)))?,
            ]
        };
        Ok(Response::new(pb::RevertResponse { reverted }))
    }

    async fn list(
        &self,
        _req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.expire();
        Ok(Response::new(pb::ListResponse {
            faults: self.faults().values().cloned().collect(),
        }))
    }

    type WatchCountersStream = ReceiverStream<Result<pb::CountersUpdate, Status>>;

    async fn watch_counters(
        &self,
        req: Request<pb::WatchCountersRequest>,
    ) -> Result<Response<Self::WatchCountersStream>, Status> {
        let id = req.into_inner().id;
        if !self.faults().contains_key(&id) {
            return Err(Status::not_found(format!("no active fault {id}")));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx
            .send(Ok(pb::CountersUpdate {
                id,
                counters: Some(pb::Counters::default()),
                ended: false,
            }))
            .await;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn capabilities(
        &self,
        _req: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        Ok(Response::new(pb::CapabilitiesResponse {
            arch: std::env::consts::ARCH.into(),
            kernel: String::new(),
            features: vec![],
            backends: vec![pb::Backend {
                name: "null".into(),
                available: true,
                fault_kinds: vec![],
                reason: "no kernel: faults are accepted and have no effect (fleet benchmarks)"
                    .into(),
            }],
        }))
    }
}
