//! Runs an experiment: the hypothesis before, the method with the hypothesis and stop
//! conditions probed continuously, rollbacks, the time to recover, the hypothesis after.
//!
//! Safety first: every fault that was applied is reverted, whatever happens (a violation, a
//! stop condition, an error, the user's interrupt), and a violation or stop condition reverts
//! everything as soon as the probe that saw it ends, not when the method would have.
use crate::driver::{AppliedFault, FaultDriver};
use crate::model::{self, Experiment, Probe, Semantics, Step};
use crate::probe;
use crate::record::{Event, FaultRecord, Phase, ProbeSample, RunRecord, StepRecord, Verdict};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

/// What the live display and the controller's stream show as the run goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProgressEvent {
    Phase {
        t_ms: u64,
        phase: String,
    },
    Applied {
        t_ms: u64,
        action: String,
        agent: String,
        id: String,
        /// namespace/name, for a pod target.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pod: Option<String>,
    },
    Counters {
        t_ms: u64,
        action: String,
        agent: String,
        /// The agent's fault id.
        #[serde(default)]
        id: String,
        seen: u64,
        matched: u64,
        affected: u64,
    },
    Reverted {
        t_ms: u64,
        action: String,
        agent: String,
        affected: u64,
    },
    Sample {
        sample: ProbeSample,
    },
    Note {
        t_ms: u64,
        text: String,
    },
    Verdict {
        verdict: Verdict,
        reason: String,
        exit_code: u8,
    },
}

pub struct RunOptions {
    /// The record's id.
    pub id: String,
    /// Where it runs ("local", or the controller's address).
    pub runner: String,
    /// Becomes true when the user (or a closed client stream) interrupts the run.
    pub cancel: watch::Receiver<bool>,
}

type Progress<'a> = &'a (dyn Fn(ProgressEvent) + Send + Sync);

struct Active {
    record: usize,
    action: String,
    fault: AppliedFault,
}

/// Shared by the method, the continuous probes and the reverter.
struct State {
    t0: Instant,
    record: Mutex<RunRecord>,
    active: Mutex<Vec<Active>>,
    /// Set to stop the method early: (verdict, reason).
    halt: watch::Sender<Option<(Verdict, String)>>,
    last_revert_ms: Mutex<Option<u64>>,
    apply_error: Mutex<Option<String>>,
    /// blast-radius.max-agents, enforced by the driver when it resolves a selector.
    max_agents: Option<u32>,
}

impl State {
    fn ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64
    }
    fn rec(&self) -> std::sync::MutexGuard<'_, RunRecord> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn active(&self) -> std::sync::MutexGuard<'_, Vec<Active>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn event(&self, text: String, progress: Progress) {
        let t_ms = self.ms();
        self.rec().events.push(Event {
            t_ms,
            text: text.clone(),
        });
        progress(ProgressEvent::Note { t_ms, text });
    }
    fn halted(&self) -> bool {
        self.halt.borrow().is_some()
    }
    fn stop(&self, verdict: Verdict, reason: String) {
        self.halt.send_if_modified(|h| {
            if h.is_none() {
                *h = Some((verdict, reason));
                true
            } else {
                false
            }
        });
    }
}

pub async fn run<D: FaultDriver>(
    exp: &Experiment,
    driver: &D,
    opts: RunOptions,
    progress: Progress<'_>,
) -> RunRecord {
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let record = RunRecord {
        id: opts.id.clone(),
        title: exp.title.clone(),
        description: exp.description.clone(),
        tags: exp.tags.clone(),
        hypothesis: exp
            .steady_state_hypothesis
            .as_ref()
            .map(|h| h.title.clone())
            .unwrap_or_default(),
        hypothesis_probes: exp.hypothesis_probes().iter().map(describe).collect(),
        runner: opts.runner.clone(),
        started_unix_ms,
        duration_ms: 0,
        verdict: Verdict::Inconclusive,
        reason: String::new(),
        recovery_ms: None,
        probes: vec![],
        faults: vec![],
        steps: vec![],
        events: vec![],
    };
    let (halt, _) = watch::channel(None);
    let st = State {
        t0: Instant::now(),
        record: Mutex::new(record),
        active: Mutex::new(vec![]),
        halt,
        last_revert_ms: Mutex::new(None),
        apply_error: Mutex::new(None),
        max_agents: exp.blast_radius.max_agents,
    };
    let (verdict, reason) = drive(exp, driver, &st, opts.cancel, progress).await;
    let mut rec = st.rec().clone();
    rec.verdict = verdict;
    rec.reason = reason.clone();
    rec.duration_ms = st.ms();
    progress(ProgressEvent::Verdict {
        verdict,
        reason,
        exit_code: verdict.exit_code(),
    });
    rec
}

/// A probe with its tolerances, as written: `cart: http p99-ms < 300, error-rate <= 0.01`.
fn describe(p: &Probe) -> String {
    let t: Vec<String> = p
        .tolerance
        .iter()
        .map(|(k, v)| format!("{k} {}", v.as_str()))
        .collect();
    format!("{}: {} {}", p.name, p.kind.name(), t.join(", "))
}

fn failed_measures(s: &ProbeSample) -> String {
    format!("{}: {}", s.probe, s.out_of_tolerance())
}

async fn probe_all(
    st: &State,
    probes: &[Probe],
    phase: Phase,
    progress: Progress<'_>,
) -> Vec<ProbeSample> {
    let samples = join_all(probes.iter().map(|p| probe::run(p, phase, st.t0))).await;
    for s in &samples {
        st.rec().probes.push(s.clone());
        progress(ProgressEvent::Sample { sample: s.clone() });
    }
    samples
}

fn phase(st: &State, name: &str, progress: Progress) {
    progress(ProgressEvent::Phase {
        t_ms: st.ms(),
        phase: name.into(),
    });
    st.rec().events.push(Event {
        t_ms: st.ms(),
        text: format!("phase: {name}"),
    });
}

async fn drive<D: FaultDriver>(
    exp: &Experiment,
    driver: &D,
    st: &State,
    mut cancel: watch::Receiver<bool>,
    progress: Progress<'_>,
) -> (Verdict, String) {
    let hyp = exp.hypothesis_probes();
    let ctk = exp.semantics == Semantics::ChaosToolkit;
    phase(st, "before", progress);
    let before = probe_all(st, hyp, Phase::Before, progress).await;
    if let Some(bad) = before.iter().find(|s| !s.ok) {
        let why = format!(
            "the steady state did not hold before the method: {}",
            failed_measures(bad)
        );
        if !ctk {
            return (Verdict::Inconclusive, why);
        }
        // `chaos run` rolls back after a steady state out of tolerance, not after a probe
        // that could not measure.
        if before.iter().all(|s| s.error.is_none()) {
            rollbacks(exp, st, progress).await;
        }
        return (Verdict::Failed, why);
    }
    if *cancel.borrow() {
        return (Verdict::Aborted, "interrupted before the method".into());
    }

    phase(st, "method", progress);
    let method_done = watch::channel(false);
    let during = if ctk { &[] } else { hyp };
    let violated: Mutex<Option<String>> = Mutex::new(None);
    let watcher = async {
        let mut done = method_done.1.clone();
        let mut next = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = done.changed() => return,
            }
            if *done.borrow() || st.halted() {
                return;
            }
            next = tokio::time::Instant::now() + exp.during.interval.0;
            let (samples, stops) = tokio::join!(
                probe_all(st, during, Phase::During, progress),
                probe_all(st, &exp.stop_conditions, Phase::StopCondition, progress),
            );
            if let Some(bad) = stops.iter().find(|s| !s.ok) {
                let why = format!("stop condition {}", failed_measures(bad));
                st.event(format!("{why}: reverting every fault"), progress);
                st.stop(Verdict::Aborted, why);
                revert_all(driver, st, progress).await;
                return;
            }
            if let Some(bad) = samples.iter().find(|s| !s.ok) {
                let why = format!(
                    "hypothesis violated during the method: {}",
                    failed_measures(bad)
                );
                let first = {
                    let mut v = violated.lock().unwrap_or_else(|p| p.into_inner());
                    let first = v.is_none();
                    if first {
                        *v = Some(why.clone());
                    }
                    first
                };
                if exp.during.stop_on_violation {
                    st.event(
                        format!("{why}: reverting every fault (stop-on-violation)"),
                        progress,
                    );
                    st.stop(Verdict::Violated, why);
                    revert_all(driver, st, progress).await;
                    return;
                } else if first {
                    st.event(why, progress);
                }
            }
            counters(driver, st, progress).await;
        }
    };
    let method = async {
        tokio::select! {
            _ = exec(&exp.method, driver, st, progress) => {}
            _ = async {
                while !*cancel.borrow() {
                    if cancel.changed().await.is_err() {
                        // The sender is gone: nobody can interrupt any more.
                        std::future::pending::<()>().await;
                    }
                }
            } => {
                st.event("interrupted: reverting every fault".into(), progress);
                st.stop(Verdict::Aborted, "interrupted by the user".into());
            }
        }
        // Faults without a duration last until the end of the method.
        revert_all(driver, st, progress).await;
        let _ = method_done.0.send(true);
    };
    tokio::join!(method, watcher);

    let applied_any = st.rec().faults.iter().any(|f| !f.id.is_empty());
    if !ctk {
        rollbacks(exp, st, progress).await;
    }

    let halt = st.halt.borrow().clone();
    let interrupted = matches!(&halt, Some((Verdict::Aborted, r)) if r.starts_with("interrupted"));
    // Recovery is the hypothesis holding again: without one there is nothing to measure.
    if applied_any && !interrupted && !hyp.is_empty() && !ctk {
        phase(st, "recovery", progress);
        let from = st
            .last_revert_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or_else(|| st.ms());
        let deadline = tokio::time::Instant::now() + exp.recovery.timeout.0;
        loop {
            let t = tokio::time::Instant::now();
            let samples = probe_all(st, hyp, Phase::Recovery, progress).await;
            if samples.iter().all(|s| s.ok) {
                let end = samples
                    .iter()
                    .map(|s| s.end_ms)
                    .max()
                    .unwrap_or_else(|| st.ms());
                let rec_ms = end.saturating_sub(from);
                st.rec().recovery_ms = Some(rec_ms);
                st.event(
                    format!(
                        "recovered: the hypothesis holds again {rec_ms} ms after the last revert"
                    ),
                    progress,
                );
                break;
            }
            if tokio::time::Instant::now() >= deadline || *cancel.borrow() {
                st.event(
                    format!("not recovered within {:?}", exp.recovery.timeout.0),
                    progress,
                );
                break;
            }
            tokio::time::sleep_until(t + exp.recovery.interval.0).await;
        }
    }

    phase(st, "after", progress);
    let after = probe_all(st, hyp, Phase::After, progress).await;
    if ctk {
        rollbacks(exp, st, progress).await;
    }

    // The verdict, most decisive first.
    if let Some((v, reason)) = halt.filter(|(v, _)| *v == Verdict::Aborted) {
        return (v, reason);
    }
    if let Some(e) = st
        .apply_error
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        return (Verdict::Inconclusive, e);
    }
    if let Some(why) = violated.lock().unwrap_or_else(|p| p.into_inner()).clone() {
        return (Verdict::Violated, why);
    }
    if let Some(bad) = after.iter().find(|s| !s.ok) {
        return (
            Verdict::Violated,
            format!(
                "the steady state did not hold after the method: {}",
                failed_measures(bad)
            ),
        );
    }
    let rec = st.rec();
    if let Some(f) = rec
        .faults
        .iter()
        .find(|f| f.affected == 0 && f.cpu_time_us == 0)
    {
        return (
            Verdict::Inconclusive,
            format!(
                "fault {} on {} affected nothing (seen {}, matched {}): it proves nothing; check its target",
                f.action, f.agent, f.seen, f.matched
            ),
        );
    }
    // A method of commands only (a Chaos Toolkit import injecting through its own tools) is
    // judged on the hypothesis alone; a method with fault actions must have applied one.
    if rec.faults.is_empty() && !model::faults(&exp.method).is_empty() {
        return (Verdict::Inconclusive, "the method applied no fault".into());
    }
    if exp.steady_state_hypothesis.is_none() {
        return (
            Verdict::Completed,
            "no hypothesis: every fault was applied, affected traffic or processes, and was reverted; nothing was measured of the system's health".into(),
        );
    }
    let when = if ctk {
        "before and after"
    } else {
        "before, during and after"
    };
    (
        Verdict::Held,
        format!("the hypothesis held {when} the method"),
    )
}

/// Rollbacks run once the method has started (or, in Chaos Toolkit semantics, once the
/// steady state was measured): its commands may have changed the system even where no fault
/// of ours was applied.
async fn rollbacks(exp: &Experiment, st: &State, progress: Progress<'_>) {
    if !exp.rollbacks.is_empty() {
        phase(st, "rollbacks", progress);
        for c in &exp.rollbacks {
            run_command_step(c, "rollback", st, progress).await;
        }
    }
}

/// Runs steps in order; stops early when the run is halted.
fn exec<'a, D: FaultDriver>(
    steps: &'a [Step],
    driver: &'a D,
    st: &'a State,
    progress: Progress<'a>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        for (i, s) in steps.iter().enumerate() {
            if st.halted() {
                return;
            }
            match s {
                Step::Fault(f) => fault(f, driver, st, progress).await,
                Step::Pause(d) => {
                    let start = st.ms();
                    halted_sleep(st, d.0).await;
                    st.rec().steps.push(StepRecord {
                        name: format!("pause {:?}", d.0),
                        kind: "pause".into(),
                        start_ms: start,
                        end_ms: st.ms(),
                        ok: true,
                        detail: None,
                    });
                }
                Step::Parallel(branch) => {
                    join_all(
                        branch
                            .iter()
                            .map(|s| exec(std::slice::from_ref(s), driver, st, progress)),
                    )
                    .await;
                }
                Step::Command(c) => run_command_step(c, "command", st, progress).await,
                Step::Probe(p) => {
                    let start = st.ms();
                    let samples =
                        probe_all(st, std::slice::from_ref(&**p), Phase::Method, progress).await;
                    let bad = samples.iter().find(|s| !s.ok);
                    st.rec().steps.push(StepRecord {
                        name: p.name.clone(),
                        kind: "probe".into(),
                        start_ms: start,
                        end_ms: st.ms(),
                        ok: bad.is_none(),
                        detail: bad.map(failed_measures),
                    });
                }
                Step::Background(b) => {
                    let rest = &steps[i + 1..];
                    tokio::join!(
                        exec(std::slice::from_ref(&**b), driver, st, progress),
                        exec(rest, driver, st, progress)
                    );
                    return;
                }
            }
        }
    })
}

async fn halted_sleep(st: &State, d: Duration) {
    let mut halt = st.halt.subscribe();
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = halt.wait_for(|h| h.is_some()) => {}
    }
}

async fn fault<D: FaultDriver>(f: &model::Fault, driver: &D, st: &State, progress: Progress<'_>) {
    let start = st.ms();
    let mut selector = f.selector.clone();
    selector.max_agents = st.max_agents;
    match driver.apply(&selector, f.spec.clone()).await {
        Ok(applied) => {
            let now = st.ms();
            {
                let mut rec = st.rec();
                let mut active = st.active();
                for a in applied {
                    progress(ProgressEvent::Applied {
                        t_ms: now,
                        action: f.name.clone(),
                        agent: a.agent.clone(),
                        id: a.id.clone(),
                        pod: a.pod.clone(),
                    });
                    rec.faults.push(FaultRecord {
                        action: f.name.clone(),
                        kind: f.kind.clone(),
                        summary: summary(f),
                        agent: a.agent.clone(),
                        pod: a.pod.clone(),
                        id: a.id.clone(),
                        applied_ms: now,
                        reverted_ms: None,
                        seen: 0,
                        matched: 0,
                        affected: 0,
                        cpu_time_us: 0,
                        ready_ms: None,
                        error: None,
                    });
                    active.push(Active {
                        record: rec.faults.len() - 1,
                        action: f.name.clone(),
                        fault: a,
                    });
                }
            }
            if let Some(d) = f.duration {
                halted_sleep(st, d).await;
                revert_action(driver, st, &f.name, progress).await;
            }
        }
        Err(e) => {
            let why = format!("fault {} could not be applied: {e}", f.name);
            st.rec().faults.push(FaultRecord {
                action: f.name.clone(),
                kind: f.kind.clone(),
                summary: summary(f),
                agent: String::new(),
                pod: None,
                id: String::new(),
                applied_ms: start,
                reverted_ms: None,
                seen: 0,
                matched: 0,
                affected: 0,
                cpu_time_us: 0,
                ready_ms: None,
                error: Some(e.to_string()),
            });
            st.event(format!("{why}: stopping the method"), progress);
            *st.apply_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.clone());
            st.stop(Verdict::Inconclusive, why);
        }
    }
}

/// The audit log's description of the fault, and how long the action holds it.
fn summary(f: &model::Fault) -> String {
    let s = crate::driver::summarize(&f.spec);
    match f.duration {
        Some(d) => format!("{s} for {d:?}"),
        None => s,
    }
}

async fn revert_action<D: FaultDriver>(
    driver: &D,
    st: &State,
    action: &str,
    progress: Progress<'_>,
) {
    let mine: Vec<Active> = {
        let mut active = st.active();
        let (mine, rest) = std::mem::take(&mut *active)
            .into_iter()
            .partition(|a| a.action == action);
        *active = rest;
        mine
    };
    revert_these(driver, st, mine, progress).await;
}

async fn revert_all<D: FaultDriver>(driver: &D, st: &State, progress: Progress<'_>) {
    let all = std::mem::take(&mut *st.active());
    revert_these(driver, st, all, progress).await;
}

async fn revert_these<D: FaultDriver>(
    driver: &D,
    st: &State,
    faults: Vec<Active>,
    progress: Progress<'_>,
) {
    let results = join_all(faults.iter().map(|a| driver.revert(&a.fault))).await;
    for (a, r) in faults.iter().zip(results) {
        let now = st.ms();
        let mut rec = st.rec();
        let f = &mut rec.faults[a.record];
        match r {
            Ok(c) => {
                f.reverted_ms = Some(now);
                f.seen = c.seen;
                f.matched = c.matched;
                f.affected = c.affected;
                f.cpu_time_us = c.cpu_time_us;
                f.ready_ms = (c.ready_ms > 0).then_some(c.ready_ms);
                progress(ProgressEvent::Reverted {
                    t_ms: now,
                    action: a.action.clone(),
                    agent: a.fault.agent.clone(),
                    affected: c.affected,
                });
            }
            Err(e) => {
                f.error = Some(format!("revert: {e}"));
                drop(rec);
                st.event(
                    format!(
                        "revert of {} on {} failed: {e} (the agent's deadline still ends it)",
                        a.action, a.fault.agent
                    ),
                    progress,
                );
            }
        }
        *st.last_revert_ms.lock().unwrap_or_else(|p| p.into_inner()) = Some(now);
    }
}

/// Live counters of every active fault.
async fn counters<D: FaultDriver>(driver: &D, st: &State, progress: Progress<'_>) {
    let list: Vec<(usize, String, AppliedFault)> = st
        .active()
        .iter()
        .map(|a| (a.record, a.action.clone(), a.fault.clone()))
        .collect();
    let results = join_all(list.iter().map(|(_, _, f)| driver.counters(f))).await;
    for ((idx, action, f), r) in list.into_iter().zip(results) {
        if let Ok(c) = r {
            let mut rec = st.rec();
            if let Some(fr) = rec.faults.get_mut(idx) {
                fr.seen = c.seen;
                fr.matched = c.matched;
                fr.affected = c.affected;
                fr.cpu_time_us = c.cpu_time_us;
            }
            progress(ProgressEvent::Counters {
                t_ms: st.ms(),
                action,
                id: f.id,
                agent: f.agent,
                seen: c.seen,
                matched: c.matched,
                affected: c.affected,
            });
        }
    }
}

async fn run_command_step(c: &model::Command, kind: &str, st: &State, progress: Progress<'_>) {
    let start = st.ms();
    let r = probe::run_command(&c.run, c.timeout.0).await;
    let (ok, detail) = match r {
        Ok(o) if o.status.success() => (true, None),
        Ok(o) => (
            false,
            Some(format!(
                "exit {}: {}",
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
        ),
        Err(e) => (false, Some(e)),
    };
    if let Some(d) = &detail {
        st.event(format!("{kind} {} failed: {d}", c.name), progress);
    }
    st.rec().steps.push(StepRecord {
        name: c.name.clone(),
        kind: kind.into(),
        start_ms: start,
        end_ms: st.ms(),
        ok,
        detail,
    });
}

#[cfg(test)]
mod tests {
    //! The runner's own logic against real probes: a real HTTP server on loopback whose
    //! behaviour an in-memory driver switches when a "fault" is applied (the driver is a test
    //! double for the fleet; the fleet and the engine are tested with real agents elsewhere).
    use super::*;
    use crate::driver::{AgentSelector, DriverError};
    use chaos_proto::agent::v1 as pb;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Default)]
    struct Switch {
        /// While a fault is active the server answers 500.
        broken: AtomicBool,
        affected: AtomicU64,
        applied: AtomicUsize,
        reverted: AtomicUsize,
    }

    struct TestDriver(Arc<Switch>);

    impl FaultDriver for TestDriver {
        async fn apply(
            &self,
            _: &AgentSelector,
            _: pb::FaultSpec,
        ) -> Result<Vec<AppliedFault>, DriverError> {
            self.0.applied.fetch_add(1, Ordering::SeqCst);
            self.0.broken.store(true, Ordering::SeqCst);
            Ok(vec![AppliedFault {
                pod: None,
                agent: "a1".into(),
                id: "f1".into(),
                backend: "test".into(),
            }])
        }
        async fn counters(&self, _: &AppliedFault) -> Result<pb::Counters, DriverError> {
            Ok(pb::Counters {
                seen: 10,
                matched: 5,
                affected: self.0.affected.load(Ordering::SeqCst),
                ..pb::Counters::default()
            })
        }
        async fn revert(&self, f: &AppliedFault) -> Result<pb::Counters, DriverError> {
            self.0.reverted.fetch_add(1, Ordering::SeqCst);
            self.0.broken.store(false, Ordering::SeqCst);
            self.counters(f).await
        }
    }

    async fn server(sw: Arc<Switch>) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let sw = sw.clone();
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    let _ = s.read(&mut b).await;
                    let code = if sw.broken.load(Ordering::SeqCst) {
                        500
                    } else {
                        200
                    };
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        addr
    }

    fn experiment(addr: std::net::SocketAddr, extra: &str, tolerance: &str) -> Experiment {
        let text = format!(
            r#"title: t
steady-state-hypothesis:
  title: web answers
  probes:
    - name: web
      http: {{url: "http://{addr}/", rate: 20, window: 200ms, timeout: 300ms}}
      tolerance: {{error-rate: "{tolerance}"}}
during: {{interval: 100ms}}
recovery: {{timeout: 2s, interval: 100ms}}
method:
  - fault:
      name: break-it
      loss: {{percent: 50}}
      target: {{interface: eth0}}
      duration: 1s
{extra}"#
        );
        Experiment::parse(&text, "t.yaml").unwrap()
    }

    async fn go(exp: &Experiment, sw: &Arc<Switch>, cancel: watch::Receiver<bool>) -> RunRecord {
        let events = Mutex::new(Vec::new());
        let rec = run(
            exp,
            &TestDriver(sw.clone()),
            RunOptions {
                id: "r1".into(),
                runner: "test".into(),
                cancel,
            },
            &|e| events.lock().unwrap().push(e),
        )
        .await;
        assert!(matches!(
            events.lock().unwrap().last(),
            Some(ProgressEvent::Verdict { .. })
        ));
        rec
    }

    fn never() -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        std::mem::forget(tx);
        rx
    }

    #[tokio::test]
    async fn a_tolerant_hypothesis_holds() {
        let sw = Arc::new(Switch::default());
        sw.affected.store(7, Ordering::SeqCst);
        let addr = server(sw.clone()).await;
        let rec = go(&experiment(addr, "", "<= 1"), &sw, never()).await;
        assert_eq!(rec.verdict, Verdict::Held, "{}", rec.reason);
        assert_eq!(rec.faults[0].affected, 7);
        assert!(rec.recovery_ms.is_some());
        assert!(rec.probes.iter().any(|p| p.phase == Phase::During));
        assert_eq!(sw.reverted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_violation_reverts_at_once_and_the_system_recovers() {
        let sw = Arc::new(Switch::default());
        sw.affected.store(3, Ordering::SeqCst);
        let addr = server(sw.clone()).await;
        let rec = go(&experiment(addr, "", "<= 0.01"), &sw, never()).await;
        assert_eq!(rec.verdict, Verdict::Violated, "{}", rec.reason);
        let f = &rec.faults[0];
        let held = f.reverted_ms.unwrap() - f.applied_ms;
        // The 1 s fault is cut short by the first violating sample (a 200 ms window).
        assert!(held < 700, "reverted after {held} ms");
        assert_eq!(sw.reverted.load(Ordering::SeqCst), 1);
        assert!(rec.recovery_ms.is_some(), "{:?}", rec.events);
    }

    #[tokio::test]
    async fn a_stop_condition_aborts() {
        let sw = Arc::new(Switch::default());
        sw.affected.store(3, Ordering::SeqCst);
        let addr = server(sw.clone()).await;
        let stop = format!(
            "stop-conditions:\n  - name: budget\n    http: {{url: \"http://{addr}/\", rate: 20, window: 200ms}}\n    tolerance: {{error-rate: \"< 0.5\"}}\n"
        );
        let rec = go(&experiment(addr, &stop, "<= 1"), &sw, never()).await;
        assert_eq!(rec.verdict, Verdict::Aborted, "{}", rec.reason);
        assert!(
            rec.reason.starts_with("stop condition budget"),
            "{}",
            rec.reason
        );
        assert_eq!(sw.reverted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn without_a_hypothesis_the_run_can_only_complete() {
        let sw = Arc::new(Switch::default());
        sw.affected.store(4, Ordering::SeqCst);
        let addr = server(sw.clone()).await;
        let mut exp = experiment(addr, "", "<= 0.01");
        exp.steady_state_hypothesis = None;
        let rec = go(&exp, &sw, never()).await;
        // The server answered 500 throughout the fault: with no hypothesis nobody asked.
        assert_eq!(rec.verdict, Verdict::Completed, "{}", rec.reason);
        assert!(rec.probes.is_empty());
        assert_eq!(rec.recovery_ms, None);
        assert_eq!(sw.reverted.load(Ordering::SeqCst), 1);

        sw.affected.store(0, Ordering::SeqCst);
        let rec = go(&exp, &sw, never()).await;
        assert_eq!(rec.verdict, Verdict::Inconclusive, "{}", rec.reason);
    }

    #[tokio::test]
    async fn a_fault_that_affected_nothing_is_inconclusive() {
        let sw = Arc::new(Switch::default());
        let addr = server(sw.clone()).await;
        let rec = go(&experiment(addr, "", "<= 1"), &sw, never()).await;
        assert_eq!(rec.verdict, Verdict::Inconclusive);
        assert!(rec.reason.contains("affected nothing"), "{}", rec.reason);
    }

    #[tokio::test]
    async fn no_steady_state_before_means_no_fault() {
        let sw = Arc::new(Switch::default());
        sw.broken.store(true, Ordering::SeqCst);
        let addr = server(sw.clone()).await;
        let rec = go(&experiment(addr, "", "<= 0.01"), &sw, never()).await;
        assert_eq!(rec.verdict, Verdict::Inconclusive);
        assert!(
            rec.reason
                .starts_with("the steady state did not hold before"),
            "{}",
            rec.reason
        );
        assert_eq!(sw.applied.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_interrupt_aborts_and_still_reverts() {
        let sw = Arc::new(Switch::default());
        sw.affected.store(3, Ordering::SeqCst);
        let addr = server(sw.clone()).await;
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = tx.send(true);
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let rec = go(&experiment(addr, "", "<= 1"), &sw, rx).await;
        assert_eq!(rec.verdict, Verdict::Aborted, "{}", rec.reason);
        assert_eq!(sw.reverted.load(Ordering::SeqCst), 1);
        assert!(rec.faults[0].reverted_ms.unwrap() < 900);
    }
}
