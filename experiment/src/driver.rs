//! Where faults run, seen from the runner. One trait so the same runner serves
//! `chaosctl run --local` (the engine in this process) and the controller (agents over gRPC).
use chaos_proto::agent::v1 as pb;
use std::collections::BTreeMap;

/// Which agents a fault action goes to. Empty names and labels mean "the only agent" for a
/// local driver and "every connected agent" for the fleet, which blast-radius limits bound.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
