//! chaosctl on a Kubernetes cluster: an inject (or an experiment file) becomes a
//! ChaosExperiment, which the elected chaos-controller runs; chaosctl follows its status and
//! exits with its verdict. Nothing here talks to an agent: the cluster's controller does.
use anyhow::Result;
use chaos_controller::k8s::crd::{ChaosExperiment, ChaosExperimentSpec, Phase};
use chaos_experiment::Experiment;
use chaos_experiment::record::Verdict;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::Duration;
use tokio::signal::unix::{SignalKind, signal};

/// How often the status is read: a run's phases last seconds, not milliseconds.
const POLL: Duration = Duration::from_millis(500);
/// A ChaosExperiment nobody picked up in this time means no controller is running.
const PICKUP: Duration = Duration::from_secs(30);
/// How long a deleted experiment may take to go: the controller reverts first (≤ 60 s).
const DELETE_WAIT: Duration = Duration::from_secs(90);
/// How long the API server may fail to answer before chaosctl gives up following (the
/// experiment goes on without it).
const API_PATIENCE: Duration = Duration::from_secs(30);
/// Past the method's own length: the controller's verdict is late, not coming.
const SLACK: Duration = Duration::from_secs(300);

/// What the command submitting is called, and how it exits when refused.
pub struct Submit {
    /// The object's generateName is `chaosctl-PREFIX-`.
    pub prefix: &'static str,
    /// The exit code when the cluster refuses the experiment (or the controller fails it).
    pub refused: u8,
}

/// Creates the experiment in `namespace` and follows it to its verdict. SIGINT or SIGTERM
/// deletes it, which reverts its faults (the finalizer), and waits until it is gone.
pub async fn submit(exp: Experiment, namespace: &str, how: Submit, json: bool) -> Result<ExitCode> {
    let refuse = |line: String| {
        crate::output::error(line, how.refused);
        Ok(ExitCode::from(how.refused))
    };
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            return refuse(format!(
                "--namespace: needs a cluster, and no kubeconfig works ({e}); set KUBECONFIG"
            ));
        }
    };
    let api: Api<ChaosExperiment> = Api::namespaced(client, namespace);
    let longest = chaos_experiment::model::min_duration(&exp.method) + exp.recovery.timeout.0;
    let obj = ChaosExperiment {
        metadata: ObjectMeta {
            generate_name: Some(format!("chaosctl-{}-", how.prefix)),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/created-by".to_string(),
                "chaosctl".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: ChaosExperimentSpec { experiment: exp },
        status: None,
    };
    // Listening before it exists: an interrupt right after "created" must delete it.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let created = match api.create(&PostParams::default(), &obj).await {
        Ok(o) => o,
        Err(kube::Error::Api(s)) if s.code == 404 => {
            return refuse(format!(
                "the cluster has no ChaosExperiment resource in {namespace}: install deploy/ first ({})",
                s.message
            ));
        }
        Err(kube::Error::Api(s)) => return refuse(format!("{namespace}: {}", s.message)),
        Err(e) => return Err(anyhow::anyhow!("create a ChaosExperiment: {e}")),
    };
    let name = created.name_any();
    let what = format!("{namespace}/{name}");
    say(
        json,
        json!({"event": "created", "id": what, "kind": "ChaosExperiment"}),
        || format!("created ChaosExperiment {what}"),
    );

    let started = tokio::time::Instant::now();
    let mut seen_phase = None;
    let mut shown = BTreeSet::new();
    let mut failing_since = None;
    let mut last_totals = (0, 0);
    loop {
        tokio::select! {
            _ = term.recv() => return delete(&api, &name, &what, "sigterm", json).await,
            _ = int.recv() => return delete(&api, &name, &what, "sigint", json).await,
            _ = tokio::time::sleep(POLL) => {}
        }
        let read = match api.get_opt(&name).await {
            Ok(o) => {
                failing_since = None;
                o
            }
            Err(e) => {
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() > API_PATIENCE {
                    return Err(anyhow::anyhow!(
                        "{what}: no answer from the API server for {API_PATIENCE:?} ({e}); the experiment goes on: `kubectl get chaosexp -n {namespace} {name}`"
                    ));
                }
                tracing::warn!("{what}: reading its status: {e}; retrying");
                continue;
            }
        };
        let Some(o) = read else {
            return refuse(format!(
                "{what}: deleted by someone else before it finished"
            ));
        };
        let status = o.status.unwrap_or_default();
        // A fault that could not be applied has no id; the verdict says why.
        let applied = || status.faults.iter().filter(|f| !f.id.is_empty());
        for f in applied() {
            if shown.insert(f.id.clone()) {
                let on = match &f.pod {
                    Some(p) => format!("pod {p} on {}", f.agent),
                    None => f.agent.clone(),
                };
                say(
                    json,
                    json!({"event": "applied", "id": f.id, "action": f.name, "pod": f.pod, "node": f.agent}),
                    || format!("fault {} applied: {} on {on}", f.id, f.name),
                );
            }
        }
        // Live counters, summed over the pods (a line per change, as the controller writes
        // them every few seconds).
        let totals = applied().fold((0, 0), |(s, a), f| {
            (s + f.packets_seen, a + f.packets_affected)
        });
        if status.phase == Some(Phase::Running) && totals != (0, 0) && totals != last_totals {
            last_totals = totals;
            let faults = applied().count();
            say(
                json,
                json!({"event": "counters", "id": what, "faults": faults, "seen": totals.0, "affected": totals.1}),
                || {
                    format!(
                        "{what}: {faults} faults, seen={} affected={}",
                        totals.0, totals.1
                    )
                },
            );
        }
        if status.phase != seen_phase {
            seen_phase = status.phase;
            if let Some(p) = status.phase {
                let phase = format!("{p:?}").to_lowercase();
                let run = status.run_id.clone().unwrap_or_default();
                say(
                    json,
                    json!({"event": phase, "id": what, "run": run}),
                    || format!("{what} {phase} ({run})"),
                );
            }
        }
        match status.phase {
            Some(Phase::Completed) => {
                for f in applied() {
                    let ready = f
                        .ready_ms
                        .map_or(String::new(), |ms| format!(", Ready again after {ms} ms"));
                    say(
                        json,
                        json!({"event": "reverted", "id": f.id, "ready_ms": f.ready_ms,
                            "counters": {"seen": f.packets_seen, "affected": f.packets_affected}}),
                        || {
                            format!(
                                "fault {} reverted: seen={} affected={}{ready}",
                                f.id, f.packets_seen, f.packets_affected
                            )
                        },
                    );
                }
                let verdict = status.verdict.clone().unwrap_or_default();
                let message = status.message.clone().unwrap_or_default();
                say(
                    json,
                    json!({"event": "verdict", "id": what, "verdict": verdict, "message": message}),
                    || format!("verdict: {verdict}: {message}"),
                );
                return Ok(ExitCode::from(exit_code(&verdict)));
            }
            Some(Phase::Failed) => {
                return refuse(format!(
                    "{what} failed: {}",
                    status.message.unwrap_or_default()
                ));
            }
            None if started.elapsed() > PICKUP => {
                let _ = api.delete(&name, &DeleteParams::default()).await;
                return Err(anyhow::anyhow!(
                    "{what}: no chaos-controller picked it up in {PICKUP:?} (is one running with --kubernetes?); deleted it"
                ));
            }
            _ if started.elapsed() > longest + SLACK => {
                return Err(anyhow::anyhow!(
                    "{what}: no verdict {:?} after it was created; `kubectl describe chaosexp -n {namespace} {name}`",
                    longest + SLACK
                ));
            }
            _ => {}
        }
    }
}

/// One line: the JSON object, or the text for people.
fn say(json: bool, v: serde_json::Value, text: impl FnOnce() -> String) {
    if json {
        println!("{v}");
    } else {
        println!("{}", text());
    }
}

/// The exit code of `chaosctl run` for a verdict's name (3 for one this chaosctl does not know).
fn exit_code(verdict: &str) -> u8 {
    serde_json::from_value::<Verdict>(json!(verdict)).map_or(3, Verdict::exit_code)
}

/// Deletes the experiment and waits until it is gone, that is until the controller reverted
/// its faults and let the finalizer go.
async fn delete(
    api: &Api<ChaosExperiment>,
    name: &str,
    what: &str,
    reason: &str,
    json: bool,
) -> Result<ExitCode> {
    if let Err(e) = api.delete(name, &DeleteParams::default()).await {
        return Err(anyhow::anyhow!(
            "{what}: delete it by hand (`kubectl delete chaosexp`), it was not deleted: {e}"
        ));
    }
    let until = tokio::time::Instant::now() + DELETE_WAIT;
    while tokio::time::Instant::now() < until {
        if api.get_opt(name).await?.is_none() {
            say(
                json,
                json!({"event": "reverted", "id": what, "reason": reason}),
                || format!("{what} deleted ({reason}): its faults are reverted"),
            );
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(POLL).await;
    }
    Err(anyhow::anyhow!(
        "{what}: still there {DELETE_WAIT:?} after its delete; its agents' leases revert its faults"
    ))
}
