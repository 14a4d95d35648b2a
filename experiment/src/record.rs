//! What a run produced: the one input of every report (JSON, JUnit, Markdown, HTML) and of the
//! controller's history. Times are milliseconds since the run started unless named `unix_ms`.
use serde::{Deserialize, Serialize};

/// The outcome, and the exit code CI pipelines act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The hypothesis held before, during and after the method. Exit 0.
    Held,
    /// No hypothesis was given (`chaosctl inject` on a cluster): every fault was applied,
    /// affected something and was reverted. Says nothing about the system's health. Exit 0.
    Completed,
    /// A probe left its tolerance. Exit 1.
    Violated,
    /// A stop condition fired, or the user interrupted. Exit 2.
    Aborted,
    /// The run could not decide: an error, a steady state that did not hold before the method,
    /// or a fault that affected nothing. Exit 3.
    Inconclusive,
    /// Chaos Toolkit semantics: the steady state did not hold, or could not be measured,
    /// before the method, so nothing was tested (`chaos run`'s "failed"). Exit 1, as there.
    Failed,
}

impl Verdict {
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Held | Verdict::Completed => 0,
            Verdict::Violated | Verdict::Failed => 1,
            Verdict::Aborted => 2,
            Verdict::Inconclusive => 3,
        }
    }
}

/// When a probe ran relative to the method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Before,
    During,
    After,
    /// Probes after the method until the hypothesis holds again (recovery time).
    Recovery,
    /// A stop condition's probe.
    StopCondition,
    /// A probe step of the method: recorded, decides nothing.
    Method,
}

/// One measurement a probe produced, e.g. `p99_ms` = 212.4 or `status` = 200.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measure {
    pub name: String,
    /// Numeric value when there is one (latencies, rates, codes, PromQL results).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Text value (a command's stdout, a DNS rcode name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// The tolerance it was checked against, as written ("< 300"), when it had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<String>,
    /// Whether it was within its tolerance (true when it had none).
    pub ok: bool,
}

/// One run of one probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSample {
    pub probe: String,
    pub phase: Phase,
    /// When the probe started and ended.
    pub start_ms: u64,
    pub end_ms: u64,
    /// All measures within tolerance, and no error.
    pub ok: bool,
    pub measures: Vec<Measure>,
    /// Why the probe could not measure (connection refused, timeout, bad PromQL...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProbeSample {
    /// The measure named `name`, if the probe produced it.
    pub fn measure(&self, name: &str) -> Option<&Measure> {
        self.measures.iter().find(|m| m.name == name)
    }

    /// What is wrong with the sample, for a person: its error, or each measure out of
    /// tolerance with its value (`error-rate = 0.300 (tolerance <= 0.01)`).
    pub fn out_of_tolerance(&self) -> String {
        if let Some(e) = &self.error {
            return e.clone();
        }
        self.measures
            .iter()
            .filter(|m| !m.ok)
            .map(|m| {
                let v = m
                    .text
                    .clone()
                    .or_else(|| m.value.map(|v| format!("{v:.3}")))
                    .unwrap_or_else(|| "none".into());
                format!(
                    "{} = {v} (tolerance {})",
                    m.name,
                    m.tolerance.as_deref().unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One fault action as it ran on one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultRecord {
    /// The action's name in the experiment.
    pub action: String,
    /// The fault kind ("latency", "loss", ...) and a one-line summary of its parameters.
    pub kind: String,
    pub summary: String,
    pub agent: String,
    /// The pod (namespace/name) for a pod target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The agent's fault id; empty when apply failed.
    pub id: String,
    pub applied_ms: u64,
    /// None while active, or when revert failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverted_ms: Option<u64>,
    pub seen: u64,
    pub matched: u64,
    pub affected: u64,
    /// CPU faults: CPU time the workers consumed.
    #[serde(default)]
    pub cpu_time_us: u64,
    /// pod-kill: from the kill until the selected pods were all Ready again; None when they
    /// were not by the end of the action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl FaultRecord {
    /// Where it ran, for people: the agent, and the pod when it went into one.
    pub fn place(&self) -> String {
        let agent = if self.agent.is_empty() {
            "?"
        } else {
            &self.agent
        };
        match &self.pod {
            Some(p) => format!("{agent} ({p})"),
            None => agent.to_string(),
        }
    }
}

/// A non-fault step of the method or of the rollbacks: a pause, a command, a probe used as an
/// action (Chaos Toolkit allows that).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub name: String,
    /// "pause", "command", "rollback", ...
    pub kind: String,
    pub start_ms: u64,
    pub end_ms: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// Something that happened, in order: phase changes, violations, stop conditions, rollbacks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub t_ms: u64,
    pub text: String,
}

/// The whole record of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// Unique id (assigned by whoever runs it; the controller's history key).
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// The hypothesis's title, and each probe with its tolerances as written.
    pub hypothesis: String,
    pub hypothesis_probes: Vec<String>,
    /// Where it ran: "local" or the controller's address.
    pub runner: String,
    pub started_unix_ms: i64,
    pub duration_ms: u64,
    pub verdict: Verdict,
    /// One line: why this verdict.
    pub reason: String,
    /// From the last revert until the hypothesis held again; None if it never did within the
    /// recovery window or the run did not get that far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery_ms: Option<u64>,
    pub probes: Vec<ProbeSample>,
    pub faults: Vec<FaultRecord>,
    pub steps: Vec<StepRecord>,
    pub events: Vec<Event>,
}
