//! The Experiments service: runs experiments on the fleet and keeps their history.
use crate::certs::ROLE_USER;
use crate::fleet::{Fleet, FleetDriver};
use crate::server::caller;
use chaos_experiment::history::History;
use chaos_experiment::runner::{self, RunOptions};
use chaos_experiment::{Experiment, report};
use chaos_proto::experiments::v1 as pb;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub struct ExperimentsService {
    pub fleet: Arc<Fleet>,
    pub history: Arc<History>,
    /// How the runner names itself in records.
    pub runner: String,
}

/// A run id that sorts by time and is unique enough for one controller.
pub fn new_run_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "run-{}-{:04x}",
        now.as_millis(),
        (now.subsec_nanos() >> 8) & 0xffff
    )
}

#[tonic::async_trait]
impl pb::experiments_server::Experiments for ExperimentsService {
    type RunStream = ReceiverStream<Result<pb::RunEvent, Status>>;

    async fn run(&self, req: Request<pb::RunRequest>) -> Result<Response<Self::RunStream>, Status> {
        let who = caller(&req, ROLE_USER)?;
        let req = req.into_inner();
        let source = if req.source_name.is_empty() {
            "experiment".to_string()
        } else {
            req.source_name
        };
        // Parsing is bounded (size, nesting) but still CPU work: it runs on a blocking thread so
        // a hostile file never delays the fleet's streams and leases on the async workers.
        let name = source.clone();
        let exp = tokio::task::spawn_blocking(move || Experiment::parse(&req.text, &name))
            .await
            .map_err(|e| Status::internal(format!("parsing {source}: {e}")))?
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let id = new_run_id();
        let (tx, rx) = mpsc::channel::<Result<pb::RunEvent, Status>>(1024);
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let (fleet, history, runner_name) = (
            self.fleet.clone(),
            self.history.clone(),
            self.runner.clone(),
        );
        tracing::info!(%id, title = %exp.title, who = %who.0, "experiment started");
        let started = serde_json::json!({"event": "started", "id": id}).to_string();
        let _ = tx
            .send(Ok(pb::RunEvent {
                event: Some(pb::run_event::Event::ProgressJson(started)),
            }))
            .await;
        // The client going away (Ctrl-C, a cancelled CI job) aborts the run.
        let watch_tx = tx.clone();
        tokio::spawn(async move {
            watch_tx.closed().await;
            let _ = cancel_tx.send(true);
        });
        tokio::spawn(async move {
            let driver = FleetDriver { fleet, caller: who };
            let events = tx.clone();
            let record = runner::run(
                &exp,
                &driver,
                RunOptions {
                    id: id.clone(),
                    runner: runner_name,
                    cancel: cancel_rx,
                },
                &move |e| {
                    let line = serde_json::to_string(&e).unwrap_or_default();
                    // Progress is best effort: a slow client must not stall the run.
                    let _ = events.try_send(Ok(pb::RunEvent {
                        event: Some(pb::run_event::Event::ProgressJson(line)),
                    }));
                },
            )
            .await;
            if let Err(e) = history.put(&record) {
                tracing::error!(%id, "history: {e}");
            }
            tracing::info!(%id, verdict = ?record.verdict, reason = %record.reason, "experiment ended");
            let _ = tx
                .send(Ok(pb::RunEvent {
                    event: Some(pb::run_event::Event::RecordJson(report::json(&record))),
                }))
                .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        caller(&req, ROLE_USER)?;
        let limit = req.into_inner().limit as usize;
        let mut runs = self
            .history
            .list()
            .map_err(|e| Status::internal(e.to_string()))?;
        if limit > 0 {
            runs.truncate(limit);
        }
        Ok(Response::new(pb::ListResponse {
            runs: runs
                .into_iter()
                .map(|s| pb::RunSummary {
                    id: s.id,
                    title: s
                        .error
                        .map(|e| format!("(unreadable: {e})"))
                        .unwrap_or(s.title),
                    verdict: s
                        .verdict
                        .map(|v| {
                            serde_json::to_value(v)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default()
                        })
                        .unwrap_or_default(),
                    started_unix_ms: s.started_unix_ms,
                    duration_ms: s.duration_ms,
                })
                .collect(),
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        caller(&req, ROLE_USER)?;
        let id = req.into_inner().id;
        match self.history.get(&id) {
            Ok(Some(r)) => Ok(Response::new(pb::GetResponse {
                record_json: report::json(&r),
            })),
            Ok(None) => Err(Status::not_found(format!("no run {id}"))),
            Err(e) => Err(Status::internal(e.to_string())),
        }
    }
}
