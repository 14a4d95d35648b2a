//! The ChaosExperiment reconciler: each object is one run. A new object starts a run; its
//! status follows the run; deleting it reverts the run's faults before the finalizer goes.
//!
//! Objects are read as `DynamicObject` and their spec parsed with the experiment loader, not
//! deserialized into the typed CRD: a spec the API server accepted but our rules refuse (a
//! tolerance, a fault parameter) must become a Failed status with the rule, not an object the
//! watcher cannot read and silently skips.
use super::crd::{ChaosExperiment, ChaosExperimentStatus, Condition, FaultStatus, Phase};
use super::driver::KubeDriver;
use crate::fleet::FleetDriver;
use chaos_experiment::Experiment;
use chaos_experiment::history::History;
use chaos_experiment::record::RunRecord;
use chaos_experiment::runner::{self, ProgressEvent, RunOptions};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalize, finalizer};
use kube::{Client, Resource, ResourceExt};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Set on every ChaosExperiment we run: its deletion waits until the faults are reverted.
pub const FINALIZER: &str = "chaos.dev/revert-faults";

/// How long a deletion waits for a run to revert. Past it, the finalizer goes anyway: an agent
/// that cannot be reached reverts on its own when its lease runs out.
pub const REVERT_WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Error(pub String);

struct Run {
    cancel: watch::Sender<bool>,
    task: JoinHandle<()>,
}

pub struct Ctx {
    pub client: Client,
    pub fleet: FleetDriver,
    pub history: Option<Arc<History>>,
    /// The controller's namespace (protected from pod targets).
    pub namespace: String,
    /// Names the runner in records.
    pub runner: String,
    pub recorder: Recorder,
    runs: Mutex<HashMap<String, Run>>,
}

impl Ctx {
    pub fn new(
        client: Client,
        fleet: FleetDriver,
        history: Option<Arc<History>>,
        namespace: String,
        runner: String,
    ) -> Arc<Ctx> {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "chaos-controller".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        );
        Arc::new(Ctx {
            client,
            fleet,
            history,
            namespace,
            runner,
            recorder,
            runs: Mutex::new(HashMap::new()),
        })
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Run>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs in progress (for tests and metrics).
    pub fn active(&self) -> usize {
        self.runs().len()
    }
}

pub fn resource() -> ApiResource {
    ApiResource::erase::<ChaosExperiment>(&())
}

fn api_for(ctx: &Ctx, obj: &DynamicObject) -> Api<DynamicObject> {
    let ns = obj.namespace().unwrap_or_default();
    Api::namespaced_with(ctx.client.clone(), &ns, &resource())
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Writes the fields of `status` that are set (a merge patch: the others keep their values).
async fn patch_status(
    api: &Api<DynamicObject>,
    name: &str,
    status: ChaosExperimentStatus,
) -> Result<(), Error> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .map(|_| ())
    .map_err(|e| Error(format!("status of {name}: {e}")))
}

async fn event(ctx: &Ctx, obj: &DynamicObject, warn: bool, reason: &str, note: String) {
    let ev = Event {
        type_: if warn {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: "Run".into(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&ev, &obj.object_ref(&resource()))
        .await
    {
        tracing::warn!(name = %obj.name_any(), "event: {e}");
    }
}

fn phase_of(obj: &DynamicObject) -> Option<Phase> {
    serde_json::from_value(obj.data.get("status")?.get("phase")?.clone()).ok()
}

/// The status a finished run leaves.
pub fn final_status(record: &RunRecord) -> ChaosExperimentStatus {
    let verdict = serde_json::to_value(record.verdict)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string));
    let faults = record
        .faults
        .iter()
        .map(|f| FaultStatus {
            name: f.action.clone(),
            agent: f.agent.clone(),
            id: f.id.clone(),
            pod: f.pod.clone(),
            packets_seen: f.seen,
            packets_affected: f.affected,
            ready_ms: f.ready_ms,
        })
        .collect();
    ChaosExperimentStatus {
        phase: Some(Phase::Completed),
        conditions: vec![Condition {
            type_: "Completed".into(),
            status: "True".into(),
            reason: format!("{:?}", record.verdict),
            message: record.reason.clone(),
            last_transition_time: now_rfc3339(),
        }],
        verdict,
        message: Some(record.reason.clone()),
        recovery_ms: record.recovery_ms,
        faults,
        finished_at: Some(now_rfc3339()),
        ..Default::default()
    }
}

/// A status that ends the run without a verdict.
fn failed(message: &str) -> ChaosExperimentStatus {
    ChaosExperimentStatus {
        phase: Some(Phase::Failed),
        message: Some(message.into()),
        finished_at: Some(now_rfc3339()),
        ..Default::default()
    }
}

pub async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let api = api_for(&ctx, &obj);
    finalizer(&api, FINALIZER, obj, |ev| async {
        match ev {
            Finalize::Apply(o) => start(o, ctx.clone()).await,
            Finalize::Cleanup(o) => stop(o, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| Error(e.to_string()))
}

pub fn error_policy(obj: Arc<DynamicObject>, e: &Error, _: Arc<Ctx>) -> Action {
    tracing::warn!(name = %obj.name_any(), "reconcile: {e}");
    Action::requeue(Duration::from_secs(5))
}

async fn start(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let uid = obj.uid().unwrap_or_default();
    let name = obj.name_any();
    let api = api_for(&ctx, &obj);
    if ctx.runs().contains_key(&uid) {
        return Ok(Action::await_change());
    }
    match phase_of(&obj) {
        Some(p) if p.is_terminal() => return Ok(Action::await_change()),
        Some(Phase::Running | Phase::Reverting) => {
            // Started by a controller that is gone: its agents reverted the faults when their
            // leases ran out. A run is never resumed half way.
            let message = "the controller that ran this stopped during the run; agents reverted its faults when their leases ran out";
            patch_status(&api, &name, failed(message)).await?;
            event(&ctx, &obj, true, "Interrupted", message.into()).await;
            return Ok(Action::await_change());
        }
        _ => {}
    }
    let source = format!("{}/{name}", obj.namespace().unwrap_or_default());
    let spec = obj.data.get("spec").cloned().unwrap_or_default();
    let text = serde_yaml_ng::to_string(&spec).unwrap_or_default();
    let exp = match Experiment::parse(&text, &source) {
        Ok(e) => e,
        Err(e) => {
            patch_status(&api, &name, failed(&e.to_string())).await?;
            event(&ctx, &obj, true, "Invalid", e.to_string()).await;
            return Ok(Action::await_change());
        }
    };
    let id = crate::experiments::new_run_id();
    patch_status(
        &api,
        &name,
        ChaosExperimentStatus {
            phase: Some(Phase::Running),
            run_id: Some(id.clone()),
            started_at: Some(now_rfc3339()),
            observed_generation: obj.metadata.generation,
            ..Default::default()
        },
    )
    .await?;
    event(
        &ctx,
        &obj,
        false,
        "Started",
        format!("run {id}: {}", exp.title),
    )
    .await;
    let (cancel, cancel_rx) = watch::channel(false);
    let task = tokio::spawn(run(obj.clone(), ctx.clone(), exp, id, cancel_rx));
    ctx.runs().insert(uid, Run { cancel, task });
    Ok(Action::await_change())
}

async fn run(
    obj: Arc<DynamicObject>,
    ctx: Arc<Ctx>,
    exp: Experiment,
    id: String,
    cancel: watch::Receiver<bool>,
) {
    let name = obj.name_any();
    let api = api_for(&ctx, &obj);
    let driver = KubeDriver::new(ctx.fleet.clone(), ctx.client.clone(), ctx.namespace.clone());
    // Each fault goes into the status as it is applied, and its counters follow while it is
    // active, so `kubectl get -o yaml` (and chaosctl following an inject) shows which pods are
    // hit and how. Counters are written at most every LIVE_COUNTERS: a thousand pods must not
    // mean a thousand patches a second.
    let (progress_tx, progress_rx) = tokio::sync::mpsc::unbounded_channel();
    let live = tokio::spawn(live_status(api.clone(), name.clone(), progress_rx));
    let record = runner::run(
        &exp,
        &driver,
        RunOptions {
            id: id.clone(),
            runner: ctx.runner.clone(),
            cancel,
        },
        &move |e| {
            if matches!(
                e,
                ProgressEvent::Applied { .. } | ProgressEvent::Counters { .. }
            ) {
                let _ = progress_tx.send(e);
            }
        },
    )
    .await;
    // The live patches end before the final status, which must not be overwritten.
    let _ = live.await;
    if let Some(h) = &ctx.history
        && let Err(e) = h.put(&record)
    {
        tracing::error!(%id, "history: {e}");
    }
    if let Err(e) = patch_status(&api, &name, final_status(&record)).await {
        tracing::warn!(%id, "{e}");
    }
    let held = record.verdict.exit_code() == 0;
    event(
        &ctx,
        &obj,
        !held,
        "Completed",
        format!("{:?}: {}", record.verdict, record.reason),
    )
    .await;
    tracing::info!(%id, %name, verdict = ?record.verdict, "experiment ended");
    ctx.runs().remove(&obj.uid().unwrap_or_default());
}

/// How often a running experiment's status gets its faults' counters.
const LIVE_COUNTERS: Duration = Duration::from_secs(2);

/// Writes the faults of a running experiment into its status: at once when one is applied,
/// counters at most every LIVE_COUNTERS. Ends when the run drops its sender.
async fn live_status(
    api: Api<DynamicObject>,
    name: String,
    mut events: tokio::sync::mpsc::UnboundedReceiver<ProgressEvent>,
) {
    let mut live = ChaosExperimentStatus::default();
    let mut dirty = false;
    let mut tick = tokio::time::interval(LIVE_COUNTERS);
    loop {
        let write_now = tokio::select! {
            e = events.recv() => match e {
                Some(ProgressEvent::Applied { action, agent, id, pod, .. }) => {
                    live.faults.push(FaultStatus {
                        name: action,
                        agent,
                        id,
                        pod,
                        packets_seen: 0,
                        packets_affected: 0,
                        ready_ms: None,
                    });
                    true
                }
                Some(ProgressEvent::Counters { id, seen, affected, .. }) => {
                    if let Some(f) = live.faults.iter_mut().find(|f| f.id == id) {
                        dirty |= (f.packets_seen, f.packets_affected) != (seen, affected);
                        (f.packets_seen, f.packets_affected) = (seen, affected);
                    }
                    false
                }
                Some(_) => false,
                None => return,
            },
            _ = tick.tick() => dirty,
        };
        if write_now {
            dirty = false;
            if let Err(e) = patch_status(&api, &name, live.clone()).await {
                tracing::warn!("{e}");
            }
        }
    }
}

async fn stop(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let uid = obj.uid().unwrap_or_default();
    let Some(run) = ctx.runs().remove(&uid) else {
        return Ok(Action::await_change());
    };
    let api = api_for(&ctx, &obj);
    let _ = patch_status(
        &api,
        &obj.name_any(),
        ChaosExperimentStatus {
            phase: Some(Phase::Reverting),
            ..Default::default()
        },
    )
    .await;
    let _ = run.cancel.send(true);
    let abort = run.task.abort_handle();
    if tokio::time::timeout(REVERT_WAIT, run.task).await.is_err() {
        abort.abort();
        tracing::warn!(name = %obj.name_any(), "revert did not finish in {REVERT_WAIT:?}; agents' leases cover it");
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::{Caller, Fleet};
    use crate::k8s::fake::FakeApi;
    use serde_json::{Value, json};

    const BASE: &str = "/apis/chaos.dev/v1alpha1/namespaces/shop/chaosexperiments/exp1";

    fn ctx(api: &FakeApi) -> Arc<Ctx> {
        let fleet = FleetDriver {
            fleet: Fleet::new(Duration::from_secs(15), None),
            caller: Caller("test".into()),
        };
        Ctx::new(
            api.client.clone(),
            fleet,
            None,
            "chaos-system".into(),
            "test".into(),
        )
    }

    fn object(spec: Value, finalizers: &[&str], deleting: bool) -> Arc<DynamicObject> {
        let mut meta = json!({
            "name": "exp1", "namespace": "shop", "uid": "u-1", "generation": 1,
            "finalizers": finalizers, "resourceVersion": "7",
        });
        if deleting {
            meta["deletionTimestamp"] = json!("2026-12-01T00:00:00Z");
        }
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "chaos.dev/v1alpha1", "kind": "ChaosExperiment",
                "metadata": meta, "spec": spec,
            }))
            .unwrap(),
        )
    }

    /// Answers like an API server: a patch returns the object, an event is echoed, pods are
    /// listed from `pods`.
    fn api(pods: Value) -> FakeApi {
        FakeApi::start_with_body(move |method, uri, body| {
            if uri.contains("/events") {
                return (201, serde_json::from_str(body).unwrap_or(json!({})));
            }
            if uri.starts_with("/api/v1/namespaces/shop/pods") {
                return (
                    200,
                    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods}),
                );
            }
            assert!(uri.starts_with(BASE), "{method} {uri}");
            (
                200,
                serde_json::to_value(object(json!({}), &[FINALIZER], false).as_ref()).unwrap(),
            )
        })
    }

    fn spec(method: Value) -> Value {
        json!({
            "title": "cart",
            "steady-state-hypothesis": {"title": "ok", "probes": [
                {"name": "true", "command": {"run": ["/bin/true"]}, "tolerance": {"exit-code": "== 0"}}
            ]},
            "method": method,
        })
    }

    fn status_patches(api: &FakeApi) -> Vec<Value> {
        api.requests()
            .into_iter()
            .filter(|(m, u, _)| m == "PATCH" && u.starts_with(&format!("{BASE}/status")))
            .map(|(_, _, b)| serde_json::from_str::<Value>(&b).unwrap()["status"].clone())
            .collect()
    }

    #[tokio::test]
    async fn a_new_experiment_gets_the_finalizer_first() {
        let api = api(json!([]));
        let ctx = ctx(&api);
        reconcile(
            object(spec(json!([{"pause": "1s"}])), &[], false),
            ctx.clone(),
        )
        .await
        .unwrap();
        let reqs = api.requests();
        assert_eq!(reqs.len(), 1, "{reqs:?}");
        let (m, u, b) = &reqs[0];
        assert_eq!((m.as_str(), u.starts_with(BASE)), ("PATCH", true));
        assert!(b.contains(FINALIZER), "{b}");
        assert_eq!(ctx.active(), 0, "nothing runs before the finalizer is on");
    }

    #[tokio::test]
    async fn an_invalid_spec_fails_with_the_rule_in_status_and_an_event() {
        let api = api(json!([]));
        let bad = spec(json!([{"fault": {"name": "l", "loss": {"percent": 200},
            "target": {"pods": {"namespaces": ["shop"]}, "interface": "eth0"}}}]));
        reconcile(object(bad, &[FINALIZER], false), ctx(&api))
            .await
            .unwrap();
        let st = status_patches(&api);
        assert_eq!(st.len(), 1, "{st:?}");
        assert_eq!(st[0]["phase"], "Failed");
        let msg = st[0]["message"].as_str().unwrap();
        assert!(
            msg.contains("fault.loss.percent: must be between 0 and 100"),
            "{msg}"
        );
        assert!(
            api.requests()
                .iter()
                .any(|(m, u, b)| m == "POST" && u.contains("/events") && b.contains("Invalid"))
        );
    }

    /// A run end to end on the fake API: pods resolved, the apply refused because no agent
    /// runs on the pod's node, and the record's verdict written to status.
    #[tokio::test]
    async fn a_run_writes_running_then_its_verdict() {
        let pods = json!([{
            "metadata": {"name": "cart-a", "namespace": "shop", "uid": "6f1c2a3b-0d4e-4f5a-8b6c-7d8e9f0a1b2c"},
            "spec": {"nodeName": "pi-1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running"}
        }]);
        let api = api(pods);
        let ctx = ctx(&api);
        let s = spec(json!([{"fault": {"name": "l", "loss": {"percent": 20},
            "target": {"pods": {"namespaces": ["shop"]}, "interface": "eth0"}, "duration": "1s"}}]));
        reconcile(object(s, &[FINALIZER], false), ctx.clone())
            .await
            .unwrap();
        assert_eq!(ctx.active(), 1);
        for _ in 0..200 {
            if ctx.active() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(ctx.active(), 0, "the run did not end");
        let st = status_patches(&api);
        assert_eq!(st[0]["phase"], "Running");
        assert!(st[0]["runId"].as_str().unwrap().starts_with("run-"));
        let last = st.last().unwrap();
        assert_eq!(last["phase"], "Completed");
        assert_eq!(last["verdict"], "inconclusive");
        assert_eq!(last["conditions"][0]["type"], "Completed");
        assert_eq!(last["conditions"][0]["reason"], "Inconclusive");
        let msg = last["message"].as_str().unwrap();
        assert!(
            msg.contains("pod shop/cart-a") && msg.contains("pi-1"),
            "{msg}"
        );
    }

    /// Deleting a running experiment stops the run within the one reconcile that handles the
    /// deletion, then lets the finalizer go.
    #[tokio::test]
    async fn deleting_a_running_experiment_stops_it_in_one_reconcile() {
        let api = api(json!([]));
        let ctx = ctx(&api);
        let long = spec(json!([{"pause": "10m"}]));
        reconcile(object(long.clone(), &[FINALIZER], false), ctx.clone())
            .await
            .unwrap();
        assert_eq!(ctx.active(), 1);
        let t = std::time::Instant::now();
        reconcile(object(long, &[FINALIZER], true), ctx.clone())
            .await
            .unwrap();
        let took = t.elapsed();
        assert_eq!(ctx.active(), 0);
        assert!(took < Duration::from_secs(5), "took {took:?}");
        let st = status_patches(&api);
        let phases: Vec<&str> = st.iter().filter_map(|s| s["phase"].as_str()).collect();
        assert_eq!(phases, ["Running", "Reverting", "Completed"], "{st:?}");
        assert_eq!(st[2]["verdict"], "aborted");
        let (m, _, b) = api
            .requests()
            .into_iter()
            .rfind(|(_, u, _)| !u.contains("/events"))
            .unwrap();
        assert_eq!(m, "PATCH");
        assert!(
            !b.contains("status") && b.contains("finalizers"),
            "finalizer removal last: {b}"
        );
    }
}
