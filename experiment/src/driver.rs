//! Where faults run, seen from the runner. One trait so the same runner serves
//! `chaosctl run --local` (the engine in this process) and the controller (agents over gRPC).
use chaos_proto::agent::v1 as pb;
use std::collections::BTreeMap;

/// Which agents a fault action goes to. Empty names and labels mean "the only agent" for a
/// local driver and "every connected agent" for the fleet, which blast-radius limits bound.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AgentSelector {
    /// Agents by node name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// Agents whose labels include all of these.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The blast radius: refuse, before applying anything, when more agents than this match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_agents: Option<u32>,
    /// Kubernetes pods: the fault goes into each chosen pod (its netns or cgroup) through the
    /// agent on the pod's node. Only the controller in Kubernetes mode resolves these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodSelector>,
}

/// Which pods a fault hits: the pods of `namespaces` matching `labels`, on nodes matching
/// `node-labels`, narrowed by `mode`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PodSelector {
    pub namespaces: Vec<String>,
    /// Pod labels, all of which must match (a label selector's matchLabels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Node labels, all of which must match, e.g. kubernetes.io/arch: arm64.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub mode: PodMode,
    /// The N of `fixed`, the percent of `fixed-percent` and `random-max-percent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// kube-system, kube-public, kube-node-lease and the controller's own namespace are
    /// refused unless this is set.
    #[serde(default)]
    pub allow_protected: bool,
    /// A hostNetwork pod shares its node's network namespace: a network fault on it hits
    /// the whole node. Refused unless this is set.
    #[serde(default)]
    pub allow_host_network: bool,
}

/// How many of the matching pods a fault hits.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum PodMode {
    /// One, chosen at random.
    One,
    /// Every matching pod.
    #[default]
    All,
    /// `value` pods chosen at random (refused when fewer match).
    Fixed,
    /// `value` percent of them (rounded down, at least one), chosen at random.
    FixedPercent,
    /// A random number of them, from one up to `value` percent.
    RandomMaxPercent,
}

impl PodSelector {
    /// The rules the types cannot say; one line naming the field.
    pub fn check(&self) -> Result<(), String> {
        if self.namespaces.is_empty() || self.namespaces.iter().any(|n| n.is_empty()) {
            return Err("pods.namespaces: needs at least one namespace".into());
        }
        let v = self.value;
        match self.mode {
            PodMode::One | PodMode::All if v.is_some() => Err(
                "pods.value: only fixed, fixed-percent and random-max-percent take a value".into(),
            ),
            PodMode::Fixed if !v.is_some_and(|v| v >= 1.0 && v.fract() == 0.0) => {
                Err("pods.value: mode fixed needs a whole number of pods >= 1".into())
            }
            PodMode::FixedPercent | PodMode::RandomMaxPercent
                if !v.is_some_and(|v| v > 0.0 && v <= 100.0) =>
            {
                Err("pods.value: a percent mode needs a value in (0, 100]".into())
            }
            _ => Ok(()),
        }
    }
}

/// One fault as applied on one agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AppliedFault {
    /// The node name of the agent holding it ("local" for the in-process engine).
    pub agent: String,
    /// The agent's fault id.
    pub id: String,
    /// How it is attached, e.g. "ebpf/tcx".
    pub backend: String,
    /// The pod it went into (namespace/name), for a pod target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// A failure the runner reports in the record; the message is one line for a person.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DriverError(pub String);

/// Applies, observes and reverts faults. Implementations must make `revert` idempotent (a fault
/// that already ended, e.g. by its deadline or a lost lease, reverts as a success with its last
/// counters) because rollbacks and stop conditions may revert twice.
pub trait FaultDriver: Send + Sync {
    /// Applies `spec` on every agent `selector` picks; all or nothing: if one agent refuses,
    /// the ones that applied are reverted before the error is returned.
    fn apply(
        &self,
        selector: &AgentSelector,
        spec: pb::FaultSpec,
    ) -> impl std::future::Future<Output = Result<Vec<AppliedFault>, DriverError>> + Send;

    /// The fault's counters now.
    fn counters(
        &self,
        fault: &AppliedFault,
    ) -> impl std::future::Future<Output = Result<pb::Counters, DriverError>> + Send;

    /// Reverts the fault and returns its final counters.
    fn revert(
        &self,
        fault: &AppliedFault,
    ) -> impl std::future::Future<Output = Result<pb::Counters, DriverError>> + Send;
}

/// One line describing a spec for the audit log and records: kind, parameters, target.
pub fn summarize(spec: &pb::FaultSpec) -> String {
    use pb::fault_spec::Kind;
    let kind = match &spec.kind {
        Some(Kind::Loss(l)) => format!("loss {}%", l.percent),
        Some(Kind::Corrupt(c)) => format!("corrupt {}%", c.percent),
        Some(Kind::Partition(_)) => "partition".into(),
        Some(Kind::Latency(l)) => format!("latency {} ms", l.ms),
        Some(Kind::Bandwidth(b)) => format!("bandwidth {}", b.rate),
        Some(Kind::Reorder(r)) => format!("reorder {}%", r.percent),
        Some(Kind::Duplicate(d)) => format!("duplicate {}%", d.percent),
        Some(Kind::Dns(d)) => format!("dns {}", d.mode),
        Some(Kind::Cpu(c)) => format!("cpu {}x{}%", c.workers, c.load_percent),
        Some(Kind::ContainerKill(k)) => format!(
            "container-kill {} SIG{}",
            if k.container_name.is_empty() {
                "(all containers)"
            } else {
                &k.container_name
            },
            if k.signal.is_empty() {
                "KILL"
            } else {
                &k.signal
            }
        ),
        Some(Kind::ProcessPause(_)) => "process-pause".into(),
        Some(Kind::ClockSkew(c)) => format!("clock-skew {} ns", c.offset_ns),
        Some(Kind::DiskFill(d)) => format!("disk-fill {}", d.path),
        Some(Kind::Memory(m)) => format!("memory x{}", m.workers),
        Some(Kind::ProcessKill(k)) => match k.interval_ms {
            0 => format!("process-kill SIG{}", k.signal),
            ms => format!("process-kill SIG{} every {ms} ms", k.signal),
        },
        Some(Kind::PodKill(k)) => match k.grace_period_seconds {
            Some(0) => "pod-kill (force)".into(),
            Some(s) => format!("pod-kill (grace {s}s)"),
            None => "pod-kill".into(),
        },
        None => "?".into(),
    };
    match &spec.target {
        Some(t) => {
            let mut s = format!(
                "{kind} on {}",
                if t.interface.is_empty() {
                    "?"
                } else {
                    &t.interface
                }
            );
            if !t.dest.is_empty() {
                s.push_str(&format!(" to {}", t.dest.join(",")));
            }
            s
        }
        None => kind,
    }
}
