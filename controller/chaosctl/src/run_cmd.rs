//! `chaosctl run FILE`: runs an experiment here (--local) or on a controller, shows progress,
//! writes reports, and exits with the code CI acts on: 0 held, 1 violated, 2 aborted,
//! 3 error or inconclusive (an invalid file is an error: 3).
use crate::controller_client::{self, ControllerFlags};
use crate::local_engine;
use anyhow::{Context, Result};
use chaos_controller::local_driver::LocalDriver;
use chaos_experiment::record::{RunRecord, Verdict};
use chaos_experiment::runner::{self, ProgressEvent, RunOptions};
use chaos_experiment::{Experiment, report};
use chaos_proto::experiments::v1 as pb;
use chaos_proto::experiments::v1::experiments_client::ExperimentsClient;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio::signal::unix::{SignalKind, signal};

pub const EXIT_ERROR: u8 = 3;

pub struct RunArgs<'a> {
    pub file: &'a Path,
    pub local: bool,
    pub report_dir: Option<&'a Path>,
    pub journal_dir: PathBuf,
    pub json: bool,
}

pub fn fail(line: impl std::fmt::Display) -> Result<ExitCode> {
    crate::output::error(line, EXIT_ERROR);
    Ok(ExitCode::from(EXIT_ERROR))
}

/// `run --check`: validation only, nothing contacted or applied.
pub fn check(file: &Path) -> Result<ExitCode> {
    match Experiment::load(file) {
        Ok(e) => {
            println!(
                "{}: ok: {} hypothesis probes, {} fault actions, {} stop conditions, method at least {:?}",
                file.display(),
                e.hypothesis_probes().len(),
                chaos_experiment::model::faults(&e.method).len(),
                e.stop_conditions.len(),
                chaos_experiment::model::min_duration(&e.method)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => fail(e),
    }
}

/// `run --dry-run`: validation, then what each fault would hit; nothing applied.
pub async fn dry_run(file: &Path) -> Result<ExitCode> {
    let exp = match Experiment::load(file) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let needs_cluster = chaos_experiment::model::faults(&exp.method)
        .iter()
        .any(|f| f.selector.pods.is_some());
    let client = match needs_cluster {
        true => match kube::Client::try_default().await {
            Ok(c) => Some(c),
            Err(e) => return fail(format!("--dry-run: pod targets need a cluster: {e}")),
        },
        false => None,
    };
    let own = std::env::var("CHAOS_NAMESPACE").unwrap_or_else(|_| "chaos-system".into());
    let lines = match chaos_controller::k8s::targets::plan(client.as_ref(), &exp, &own).await {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    for l in lines {
        println!("{l}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run(a: RunArgs<'_>, controller: Option<&ControllerFlags>) -> Result<ExitCode> {
    let text = match std::fs::read_to_string(a.file) {
        Ok(t) => t,
        Err(e) => return fail(format!("{}: {e}", a.file.display())),
    };
    let source = a.file.display().to_string();
    // Validated here in every case: a bad file fails before anything runs or is sent.
    let exp = match Experiment::parse(&text, &source) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let record = match (a.local, controller) {
        (true, _) => run_local(&exp, &a).await?,
        (false, Some(ctl)) => {
            // The controller gets the validated model: a Chaos Toolkit file is imported here,
            // where its `env` configuration is meant to be read. As JSON: the loader counts
            // its nesting one level per bracket, where YAML's block style would count more
            // levels than the file had (and could pass the limit the file kept).
            let model = serde_json::to_string(&exp).context("serialize the experiment")?;
            match run_remote(&model, &source, ctl, a.json).await? {
                Ok(r) => r,
                Err(code) => return Ok(code),
            }
        }
        (false, None) => return fail("run: give --local, or --controller URL"),
    };
    finish(&record, &a)
}

fn finish(record: &RunRecord, a: &RunArgs) -> Result<ExitCode> {
    if let Some(dir) = a.report_dir {
        let files = report::write_all(record, dir)
            .with_context(|| format!("write reports into {}", dir.display()))?;
        if !a.json {
            for f in files {
                println!("report: {}", f.display());
            }
        }
    }
    Ok(ExitCode::from(record.verdict.exit_code()))
}

async fn run_local(exp: &Experiment, a: &RunArgs<'_>) -> Result<RunRecord> {
    let engine = local_engine::start(a.journal_dir.clone()).await?;
    let driver = LocalDriver::new(engine.clone());
    let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        let _ = cancel_tx.send(true);
        // Stay alive so the receiver does not see the sender drop.
        std::future::pending::<()>().await;
    });
    let json = a.json;
    let record = runner::run(
        exp,
        &driver,
        RunOptions {
            id: crate::run_id(),
            runner: "local".into(),
            cancel: cancel_rx,
        },
        &move |e| show(&e, json),
    )
    .await;
    // Whatever the runner did, nothing of ours stays in the kernel.
    let _ = tokio::task::spawn_blocking(move || engine.revert_all()).await;
    Ok(record)
}

/// Streams the run from the controller. Err(code) when it never started (invalid file) or the
/// user interrupted it.
async fn run_remote(
    text: &str,
    source: &str,
    ctl: &ControllerFlags,
    json: bool,
) -> Result<std::result::Result<RunRecord, ExitCode>> {
    let mut c = ExperimentsClient::new(controller_client::connect(ctl).await?);
    let stream = c
        .run(pb::RunRequest {
            source_name: source.to_string(),
            text: text.to_string(),
        })
        .await;
    let mut stream = match stream {
        Ok(s) => s.into_inner(),
        Err(s) => {
            crate::output::error(controller_client::failed_line(ctl, s).await, EXIT_ERROR);
            return Ok(Err(ExitCode::from(EXIT_ERROR)));
        }
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut id = String::new();
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = term.recv() => None.ok_or(tonic::Status::cancelled("")).map(|_: ()| None),
            _ = int.recv() => None.ok_or(tonic::Status::cancelled("")).map(|_: ()| None),
        };
        let ev = match msg {
            Ok(Some(ev)) => ev,
            Ok(None) | Err(_) if !id.is_empty() => {
                crate::output::error(
                    format!(
                        "interrupted: the controller reverts the faults of run {id}; `chaosctl experiments show {id}` has its record"
                    ),
                    Verdict::Aborted.exit_code(),
                );
                return Ok(Err(ExitCode::from(Verdict::Aborted.exit_code())));
            }
            Ok(None) => anyhow::bail!("the controller closed the stream without a record"),
            Err(s) => return Err(controller_client::CallFailed(s).into()),
        };
        match ev.event {
            Some(pb::run_event::Event::ProgressJson(line)) => {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if v["event"] == "started" {
                    id = v["id"].as_str().unwrap_or_default().to_string();
                    if json {
                        println!("{line}");
                    } else {
                        println!("run {id} on {}", ctl.url);
                    }
                    continue;
                }
                match serde_json::from_str::<ProgressEvent>(&line) {
                    Ok(e) => show(&e, json),
                    Err(_) if json => println!("{line}"),
                    Err(_) => {}
                }
            }
            Some(pb::run_event::Event::RecordJson(r)) => {
                return Ok(Ok(
                    serde_json::from_str(&r).context("the controller's record")?
                ));
            }
            None => {}
        }
    }
}

/// One line per event: JSON as is, or for people.
fn show(e: &ProgressEvent, json: bool) {
    if json {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
        return;
    }
    let t = |ms: &u64| format!("[{:>6.1}s]", *ms as f64 / 1000.0);
    match e {
        ProgressEvent::Phase { t_ms, phase } => println!("{} phase {phase}", t(t_ms)),
        ProgressEvent::Applied {
            t_ms,
            action,
            agent,
            id,
            pod,
        } => match pod {
            Some(pod) => println!("{} applied {action} on pod {pod} ({agent}, {id})", t(t_ms)),
            None => println!("{} applied {action} on {agent} ({id})", t(t_ms)),
        },
        ProgressEvent::Counters {
            t_ms,
            action,
            agent,
            seen,
            matched,
            affected,
            ..
        } => println!(
            "{} {action}@{agent}: seen {seen} matched {matched} affected {affected}",
            t(t_ms)
        ),
        ProgressEvent::Reverted {
            t_ms,
            action,
            agent,
            affected,
        } => {
            println!(
                "{} reverted {action} on {agent} (affected {affected})",
                t(t_ms)
            )
        }
        ProgressEvent::Sample { sample } => {
            let m: Vec<String> = sample
                .measures
                .iter()
                .map(|m| {
                    let v = m
                        .text
                        .clone()
                        .or(m.value.map(|v| format!("{v:.2}")))
                        .unwrap_or_else(|| "-".into());
                    format!("{}={v}{}", m.name, if m.ok { "" } else { "!" })
                })
                .collect();
            println!(
                "{} probe {} ({:?}): {}{} {}",
                t(&sample.end_ms),
                sample.probe,
                sample.phase,
                if sample.ok { "ok" } else { "OUT OF TOLERANCE" },
                sample
                    .error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" ({e})")),
                m.join(" ")
            );
        }
        ProgressEvent::Note { t_ms, text } => println!("{} {text}", t(t_ms)),
        ProgressEvent::Verdict {
            verdict,
            reason,
            exit_code,
        } => {
            println!("verdict: {verdict:?} (exit {exit_code}): {reason}")
        }
    }
}

pub async fn list(ctl: &ControllerFlags, json: bool) -> Result<ExitCode> {
    let mut c = ExperimentsClient::new(controller_client::connect(ctl).await?);
    let runs = match c.list(pb::ListRequest { limit: 0 }).await {
        Ok(r) => r.into_inner().runs,
        Err(s) => return fail(controller_client::failed_line(ctl, s).await),
    };
    for r in &runs {
        if json {
            println!(
                "{}",
                serde_json::json!({"id": r.id, "title": r.title, "verdict": r.verdict, "started_unix_ms": r.started_unix_ms, "duration_ms": r.duration_ms})
            );
        } else {
            println!(
                "{:<28} {:<13} {:>7.1}s  {}",
                r.id,
                r.verdict,
                r.duration_ms as f64 / 1000.0,
                r.title
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn show_run(
    ctl: &ControllerFlags,
    id: &str,
    report_dir: Option<&Path>,
    json: bool,
) -> Result<ExitCode> {
    let mut c = ExperimentsClient::new(controller_client::connect(ctl).await?);
    let r = match c.get(pb::GetRequest { id: id.to_string() }).await {
        Ok(r) => r.into_inner().record_json,
        // An id that names no run is the caller's mistake (2), like any bad input; anything
        // else went wrong on the way (1). Not 3: showing a record is not a run.
        Err(s) => {
            let code = match s.code() {
                tonic::Code::NotFound | tonic::Code::InvalidArgument => crate::EXIT_INVALID,
                _ => 1,
            };
            crate::output::error(controller_client::failed_line(ctl, s).await, code);
            return Ok(ExitCode::from(code));
        }
    };
    let record: RunRecord = serde_json::from_str(&r).context("the controller's record")?;
    if json {
        println!("{r}");
    } else {
        print!("{}", report::markdown(&record));
    }
    if let Some(dir) = report_dir {
        report::write_all(&record, dir)?;
    }
    Ok(ExitCode::SUCCESS)
}
