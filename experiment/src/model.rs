//! The experiment file: what an SRE writes (YAML), strictly validated.
//!
//! Rules live in the types (a percent, a duration, a tolerance, a fault are each validated
//! while they are deserialized), so every error comes with the line and column of the value
//! that broke it and the path to it: `exp.yaml:14:9: method[0].fault: ...`. Unknown fields are
//! errors everywhere: a typo must never silently drop a stop condition.
use crate::driver::{AgentSelector, PodSelector};
use crate::tolerance::Tolerance;
use chaos_proto::agent::v1 as pb;
use chaos_spec::FaultSpec;
use chaos_spec::params::{self, Kind, Params};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// A duration written like "500ms", "30s", "2m".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Dur(pub Duration);

impl TryFrom<String> for Dur {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let d = chaos_spec::parse_duration(&s).map_err(|e| e.rule)?;
        if d.is_zero() {
            return Err(format!("`{s}` must be greater than 0"));
        }
        Ok(Dur(d))
    }
}

impl From<Dur> for String {
    fn from(d: Dur) -> String {
        format!("{}ms", d.0.as_millis())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Experiment {
    pub title: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// Left out only for a fault-only run (`chaosctl inject` on a cluster): its verdict is then
    /// at best `completed`. A hypothesis given must have a probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steady_state_hypothesis: Option<Hypothesis>,
    #[serde(default)]
    pub during: During,
    #[serde(default)]
    pub recovery: Recovery,
    pub method: Vec<Step>,
    #[serde(default)]
    pub rollbacks: Vec<Command>,
    #[serde(default)]
    pub stop_conditions: Vec<Probe>,
    #[serde(default)]
    pub blast_radius: BlastRadius,
    /// Whose run order and verdicts: ours, or Chaos Toolkit's for a file imported from it.
    #[serde(default, skip_serializing_if = "Semantics::is_ours")]
    pub semantics: Semantics,
}

/// How a run proceeds and what its outcome is called.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Semantics {
    /// before; the method with the hypothesis probed during it; rollbacks; recovery; after. A
    /// steady state that does not hold before the method makes the run inconclusive (exit 3).
    #[default]
    Chaos,
    /// `chaos run`'s: before; the method, unprobed; after; rollbacks; no recovery phase. A
    /// steady state that does not hold before the method makes the run "failed" (exit 1; chaos
    /// run 1.19 exits 0 there, which would let a CI gate pass a run that tested nothing); the
    /// rollbacks still run unless a probe could not measure at all, as in `chaos run`.
    ChaosToolkit,
}

impl Semantics {
    fn is_ours(&self) -> bool {
        *self == Semantics::Chaos
    }
}

impl Experiment {
    /// The hypothesis's probes; none without a hypothesis.
    pub fn hypothesis_probes(&self) -> &[Probe] {
        self.steady_state_hypothesis
            .as_ref()
            .map_or(&[], |h| h.probes.as_slice())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Hypothesis {
    pub title: String,
    pub probes: Vec<Probe>,
}

/// Continuous probing while faults are active.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct During {
    #[serde(default = "one_second")]
    pub interval: Dur,
    /// Revert every fault at the first violation (the run is then "violated").
    #[serde(default = "yes")]
    pub stop_on_violation: bool,
}

impl Default for During {
    fn default() -> Self {
        During {
            interval: one_second(),
            stop_on_violation: true,
        }
    }
}

/// After the last revert: probe until the hypothesis holds again (the recovery time).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Recovery {
    #[serde(default = "thirty_seconds")]
    pub timeout: Dur,
    #[serde(default = "half_second")]
    pub interval: Dur,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            timeout: thirty_seconds(),
            interval: half_second(),
        }
    }
}

fn one_second() -> Dur {
    Dur(Duration::from_secs(1))
}
fn half_second() -> Dur {
    Dur(Duration::from_millis(500))
}
fn thirty_seconds() -> Dur {
    Dur(Duration::from_secs(30))
}
fn yes() -> bool {
    true
}

/// Limits the method must stay within; checked before anything runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BlastRadius {
    /// Agents one fault action may select (the fleet enforces it when it resolves selectors).
    pub max_agents: Option<u32>,
    /// Fault actions in the method.
    pub max_faults: Option<u32>,
    /// Longest the method may take (faults and pauses, parallel branches overlapping).
    pub max_duration: Option<Dur>,
}

/// One step of the method: `- fault: {...}`, `- pause: 5s`, `- parallel: [...]`,
/// `- command: {...}`, `- probe: {...}` or `- background: {STEP}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawStep", into = "RawStep")]
pub enum Step {
    Fault(Box<Fault>),
    Pause(Dur),
    Parallel(Vec<Step>),
    Command(Command),
    /// Measured once and recorded; its tolerance (if any) is reported but decides nothing.
    Probe(Box<Probe>),
    /// Starts the step and goes on with the next at once; the method ends when it has.
    Background(Box<Step>),
}

/// YAML has no one-key-map enums in serde_yaml 0.9's model (it uses tags), so a step is read
/// as a map with exactly one of these keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Box<Fault>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<Dur>,
    /// Kubernetes schemas cannot nest themselves: the API server keeps parallel branches as
    /// they are and the controller validates them when it reads the experiment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "nested_steps")]
    pub parallel: Option<Vec<Step>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Command>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Box<Probe>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "nested_step")]
    pub background: Option<Box<Step>>,
}

impl TryFrom<RawStep> for Step {
    type Error = String;
    fn try_from(r: RawStep) -> Result<Self, String> {
        let mut steps = Vec::new();
        if let Some(f) = r.fault {
            steps.push(Step::Fault(f));
        }
        if let Some(d) = r.pause {
            steps.push(Step::Pause(d));
        }
        if let Some(p) = r.parallel {
            if p.is_empty() {
                return Err("parallel: needs at least one step".into());
            }
            steps.push(Step::Parallel(p));
        }
        if let Some(c) = r.command {
            steps.push(Step::Command(c));
        }
        if let Some(p) = r.probe {
            steps.push(Step::Probe(p));
        }
        if let Some(b) = r.background {
            steps.push(Step::Background(b));
        }
        match steps.len() {
            1 => Ok(steps.remove(0)),
            n => Err(format!(
                "a step has exactly one of fault, pause, parallel, command, probe, background (this one has {n})"
            )),
        }
    }
}

impl From<Step> for RawStep {
    fn from(s: Step) -> RawStep {
        let mut r = RawStep::default();
        match s {
            Step::Fault(f) => r.fault = Some(f),
            Step::Pause(d) => r.pause = Some(d),
            Step::Parallel(p) => r.parallel = Some(p),
            Step::Command(c) => r.command = Some(c),
            Step::Probe(p) => r.probe = Some(p),
            Step::Background(b) => r.background = Some(b),
        }
        r
    }
}

fn nested_step(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})
}

fn nested_steps(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}

/// A validated type is described by the schema of what it is read from.
macro_rules! schema_as {
    ($($t:ty => $raw:ty),* $(,)?) => {$(
        impl JsonSchema for $t {
            fn inline_schema() -> bool {
                <$raw>::inline_schema()
            }
            fn schema_name() -> std::borrow::Cow<'static, str> {
                <$raw>::schema_name()
            }
            fn json_schema(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
                <$raw>::json_schema(g)
            }
        }
    )*};
}
schema_as!(Dur => String, Step => RawStep, Fault => RawFault, Probe => RawProbe, Tolerance => String);

/// Runs a program (no shell) and waits for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Command {
    pub name: String,
    pub run: Vec<String>,
    #[serde(default = "thirty_seconds")]
    pub timeout: Dur,
}

/// A fault action: what, where (agents and target), for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawFault", into = "RawFault")]
pub struct Fault {
    pub name: String,
    pub kind: String,
    /// Validated with the agent's own parser when the file was read.
    pub spec: pb::FaultSpec,
    pub selector: AgentSelector,
    /// None: active until the end of the method.
    pub duration: Option<Duration>,
    raw: Box<RawFault>,
}

/// Declares the fault kinds an action may name, once: the file's keys, [`RawFault::kinds`] and
/// [`RawFault::KIND_NAMES`] all come from this list, and each kind's parameters are the type
/// `chaosctl inject KIND` takes its flags from.
macro_rules! raw_fault {
    ($($field:ident: $ty:ty),* $(,)?) => {
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
        #[serde(deny_unknown_fields, rename_all = "kebab-case")]
        pub struct RawFault {
            pub name: String,
            $(
                #[serde(default, skip_serializing_if = "Option::is_none")]
                pub $field: Option<$ty>,
            )*
            #[serde(default)]
            pub target: RawTarget,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub duration: Option<Dur>,
        }

        impl RawFault {
            /// Every kind's name, as a file spells it.
            pub const KIND_NAMES: &'static [&'static str] = &[$(<$ty as Kind>::NAME),*];

            /// The kinds this action names, with their parameters (one, when it is valid).
            pub fn kinds(&self) -> Vec<(&'static str, &dyn Params)> {
                let mut named: Vec<(&'static str, &dyn Params)> = Vec::new();
                $(
                    if let Some(k) = &self.$field {
                        named.push((<$ty as Kind>::NAME, k));
                    }
                )*
                named
            }
        }
    };
}

raw_fault! {
    loss: params::Loss,
    corrupt: params::Corrupt,
    partition: params::Partition,
    latency: params::Latency,
    bandwidth: params::Bandwidth,
    reorder: params::Reorder,
    duplicate: params::Duplicate,
    dns: params::Dns,
    cpu: params::Cpu,
    pod_kill: params::PodKill,
    container_kill: params::ContainerKill,
    process_pause: params::ProcessPause,
    process_kill: params::ProcessKill,
    disk_fill: params::DiskFill,
    memory: params::Memory,
    clock_skew: params::ClockSkew,
}

/// Where a fault goes: which agents (by name or label) and, on each, what traffic.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawTarget {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub interface: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dest: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub direction: String,
    #[serde(default)]
    pub force: bool,
    /// Kubernetes pods to fault (the controller in Kubernetes mode resolves them to nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodSelector>,
}

/// Stands for "each chosen pod" in a spec until the controller fills in a real pod's UID,
/// so the agent's parser validates a pod-targeted spec like any other.
pub const ANY_POD: &str = "00000000-0000-0000-0000-000000000000";

impl From<Fault> for RawFault {
    fn from(f: Fault) -> RawFault {
        *f.raw
    }
}

impl TryFrom<RawFault> for Fault {
    type Error = String;
    fn try_from(r: RawFault) -> Result<Self, String> {
        Self::from_raw(r).map_err(|e| format!("fault.{e}"))
    }
}

impl Fault {
    fn from_raw(r: RawFault) -> Result<Self, String> {
        let t = &r.target;
        // With a pod target, "each chosen pod" stands where a node-level fault names one.
        let mut placed = r.clone();
        if t.pods.is_some() {
            if let Some(c) = &mut placed.cpu {
                if !c.target.is_empty() {
                    return Err("cpu: cgroup, pid and pod-uid exclude target.pods".into());
                }
                c.target.pod_uid = Some(ANY_POD.into());
            }
            for (kind, p) in [
                (
                    "process-pause",
                    placed.process_pause.as_mut().map(|p| &mut p.target),
                ),
                (
                    "process-kill",
                    placed.process_kill.as_mut().map(|p| &mut p.target),
                ),
                (
                    "clock-skew",
                    placed.clock_skew.as_mut().map(|p| &mut p.target),
                ),
            ] {
                if let Some(p) = p {
                    if p.pid.is_some() || p.cgroup.is_some() || p.pod_uid.is_some() {
                        return Err(format!(
                            "{kind}: pid, cgroup and pod-uid exclude target.pods"
                        ));
                    }
                    p.pod_uid = Some(ANY_POD.into());
                }
            }
            if let Some(m) = &mut placed.memory {
                if !m.target.is_empty() {
                    return Err("memory: cgroup, pid and pod-uid exclude target.pods".into());
                }
                m.target.pod_uid = Some(ANY_POD.into());
            }
            if let Some(d) = &mut placed.disk_fill {
                if d.pid.is_some() || d.pod_uid.is_some() {
                    return Err("disk-fill: pid and pod-uid exclude target.pods".into());
                }
                d.pod_uid = Some(ANY_POD.into());
            }
            if let Some(c) = &mut placed.container_kill {
                if c.pod_uid.is_some() || c.container_id.is_some() {
                    return Err(
                        "container-kill: pod-uid and container-id are for a node; target.pods chooses the pods"
                            .into(),
                    );
                }
                c.pod_uid = Some(ANY_POD.into());
            }
        }
        let named = placed.kinds();
        let (kind, params) = match named.as_slice() {
            [one] => *one,
            [] => {
                return Err(format!(
                    "needs one fault kind: {}",
                    RawFault::KIND_NAMES.join(", ")
                ));
            }
            many => {
                return Err(format!(
                    "has {} fault kinds ({}); one action applies one kind",
                    many.len(),
                    many.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                ));
            }
        };
        // The agent's errors name its flags; say where that is in this file instead.
        let place = |field: &str| {
            let f = field.trim_start_matches("--");
            match f {
                "dest" | "source" | "port" | "ports" | "protocol" | "direction" | "interface"
                | "netns" | "force" => format!("target.{f}"),
                "duration" => "duration".to_string(),
                _ => format!("{kind}.{f}"),
            }
        };
        let needs_pods = || format!("target.pods: {kind} needs a pod target");
        // pod-kill never reaches an agent: the controller does it through the API.
        let (k, network) = match &placed.pod_kill {
            Some(p) => {
                if t.pods.is_none() {
                    return Err(needs_pods());
                }
                let k = pb::fault_spec::Kind::PodKill(pb::PodKill {
                    grace_period_seconds: p.grace_period_seconds.map(i64::from),
                });
                (k, false)
            }
            None => {
                let domain = params
                    .kind()
                    .map_err(|e| format!("{}: {}", place(e.field), e.rule))?;
                let network = domain.is_network();
                let mut k = pb::FaultSpec::from(&FaultSpec {
                    kind: domain,
                    target: chaos_spec::Target::none(),
                    duration: Duration::ZERO,
                })
                .kind
                .ok_or_else(|| format!("{kind}: has no wire form"))?;
                // On a cluster the controller finds the container by name in each pod.
                if let (pb::fault_spec::Kind::ContainerKill(ck), Some(c)) =
                    (&mut k, &placed.container_kill)
                {
                    if t.pods.is_none() && c.container.is_some() {
                        return Err(
                            "container-kill.container: names a container in a chosen pod; needs target.pods (on a node give container-id)"
                                .into(),
                        );
                    }
                    ck.container_name = c.container.clone().unwrap_or_default();
                }
                (k, network)
            }
        };
        if let Some(p) = &t.pods {
            p.check().map_err(|e| format!("target.{e}"))?;
            if !t.agents.is_empty() || !t.labels.is_empty() {
                return Err(
                    "target.pods: the pods' nodes choose the agents; drop target.agents and target.labels"
                        .into(),
                );
            }
            if t.netns.is_some() {
                return Err("target.netns: a pod target uses each pod's own netns".into());
            }
        }
        // The agent holds the fault a little longer than the action: the runner reverts it on
        // time, and the agent's own deadline only backs that up.
        let spec = pb::FaultSpec {
            kind: Some(k),
            target: network.then(|| pb::Target {
                interface: t.interface.clone(),
                namespace: match &t.pods {
                    Some(_) => Some(pb::target::Namespace::PodUid(ANY_POD.into())),
                    None => t.netns.clone().map(pb::target::Namespace::Netns),
                },
                dest: t.dest.clone(),
                source: t.source.clone(),
                ports: t.ports.clone(),
                protocol: t.protocol.clone(),
                direction: t.direction.clone(),
                force: t.force,
            }),
            duration_ms: r
                .duration
                .map(|d| d.0.as_millis() as u64 + AGENT_DEADLINE_SLACK.as_millis() as u64)
                .unwrap_or(0),
        };
        if placed.pod_kill.is_none() {
            let parsed = FaultSpec::try_from(spec.clone())
                .map_err(|e| format!("{}: {}", place(e.field), e.rule))?;
            parsed
                .validate(chaos_spec::DEFAULT_MAX_DURATION)
                .map_err(|e| format!("{}: {}", place(e.field), e.rule))?;
        }
        Ok(Fault {
            name: r.name.clone(),
            kind: kind.to_string(),
            spec,
            selector: AgentSelector {
                agents: t.agents.clone(),
                labels: t.labels.clone(),
                max_agents: None,
                pods: t.pods.clone(),
            },
            duration: r.duration.map(|d| d.0),
            raw: Box::new(r),
        })
    }
}

/// How much longer than the action the agent keeps a fault on its own.
pub const AGENT_DEADLINE_SLACK: Duration = Duration::from_secs(30);

/// A probe: one way of measuring the system, with tolerances per measure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawProbe", into = "RawProbe")]
pub struct Probe {
    pub name: String,
    pub kind: ProbeKind,
    /// Measure name -> tolerance, e.g. "p99-ms" -> "< 300".
    pub tolerance: BTreeMap<String, Tolerance>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProbeKind {
    Http(HttpProbe),
    Prometheus(PrometheusProbe),
    Tcp(TcpProbe),
    Dns(DnsProbe),
    Command(CommandProbe),
}

impl ProbeKind {
    pub fn name(&self) -> &'static str {
        match self {
            ProbeKind::Http(_) => "http",
            ProbeKind::Prometheus(_) => "prometheus",
            ProbeKind::Tcp(_) => "tcp",
            ProbeKind::Dns(_) => "dns",
            ProbeKind::Command(_) => "command",
        }
    }

    /// The measures this kind of probe produces (tolerances may name only these).
    pub fn measures(&self) -> &'static [&'static str] {
        match self {
            ProbeKind::Http(_) => &[
                "p50-ms",
                "p95-ms",
                "p99-ms",
                "error-rate",
                "status",
                "requests",
                "body",
                "json",
                "json-count",
            ],
            ProbeKind::Prometheus(_) => &["value", "min", "max"],
            ProbeKind::Tcp(_) => &["ok", "connect-ms"],
            ProbeKind::Dns(_) => &["rcode", "answers", "ms"],
            ProbeKind::Command(_) => &["exit-code", "stdout", "ms"],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawProbe {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus: Option<PrometheusProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandProbe>,
    #[serde(default)]
    pub tolerance: BTreeMap<String, Tolerance>,
}

impl TryFrom<RawProbe> for Probe {
    type Error = String;
    fn try_from(r: RawProbe) -> Result<Self, String> {
        let mut kinds = Vec::new();
        if let Some(p) = r.http {
            check_target("http", &p.url, p.ca.as_deref())?;
            if !(p.rate > 0.0 && p.rate <= 1000.0) {
                return Err(format!(
                    "http.rate: must be in (0, 1000] requests/s (got {})",
                    p.rate
                ));
            }
            if let Some(path) = &p.json_path {
                serde_json_path::JsonPath::parse(path)
                    .map_err(|e| format!("http.json-path: `{path}` is not a JSONPath: {e}"))?;
            } else if let Some(m) = ["json", "json-count"]
                .into_iter()
                .find(|m| r.tolerance.contains_key(*m))
            {
                return Err(format!(
                    "tolerance.{m}: needs http.json-path, the JSONPath it measures"
                ));
            }
            kinds.push(ProbeKind::Http(p));
        }
        if let Some(p) = r.prometheus {
            check_target("prometheus", &p.url, p.ca.as_deref())?;
            kinds.push(ProbeKind::Prometheus(p));
        }
        if let Some(p) = r.tcp {
            kinds.push(ProbeKind::Tcp(p));
        }
        if let Some(p) = r.dns {
            kinds.push(ProbeKind::Dns(p));
        }
        if let Some(p) = r.command {
            if p.run.is_empty() {
                return Err("command.run: needs the program and its arguments".into());
            }
            kinds.push(ProbeKind::Command(p));
        }
        if kinds.len() != 1 {
            return Err(format!(
                "probe {:?} needs exactly one of http, prometheus, tcp, dns, command (has {})",
                r.name,
                kinds.len()
            ));
        }
        let kind = kinds.remove(0);
        for m in r.tolerance.keys() {
            if !kind.measures().contains(&m.as_str()) {
                return Err(format!(
                    "tolerance.{m}: unknown measure for a {} probe; it has {}",
                    kind.name(),
                    kind.measures().join(", ")
                ));
            }
        }
        Ok(Probe {
            name: r.name,
            kind,
            tolerance: r.tolerance,
        })
    }
}

/// A probe's URL, and its CA file when it names one: refused at load, before any fault.
fn check_target(kind: &str, url: &str, ca: Option<&std::path::Path>) -> Result<(), String> {
    crate::http_client::check_url(&format!("{kind}.url"), url)?;
    if let Some(ca) = ca {
        chaos_agent::tls::pem_roots(ca).map_err(|e| format!("{kind}.ca: {e}"))?;
    }
    Ok(())
}

impl From<Probe> for RawProbe {
    fn from(p: Probe) -> RawProbe {
        let mut r = RawProbe {
            name: p.name,
            http: None,
            prometheus: None,
            tcp: None,
            dns: None,
            command: None,
            tolerance: p.tolerance,
        };
        match p.kind {
            ProbeKind::Http(x) => r.http = Some(x),
            ProbeKind::Prometheus(x) => r.prometheus = Some(x),
            ProbeKind::Tcp(x) => r.tcp = Some(x),
            ProbeKind::Dns(x) => r.dns = Some(x),
            ProbeKind::Command(x) => r.command = Some(x),
        }
        r
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HttpProbe {
    pub url: String,
    #[serde(default = "get")]
    pub method: String,
    /// Requests per second, sent on schedule whether or not earlier ones answered.
    #[serde(default = "ten")]
    pub rate: f64,
    #[serde(default = "two_seconds")]
    pub window: Dur,
    #[serde(default = "one_second")]
    pub timeout: Dur,
    /// Statuses that count as success (default: 200-399).
    #[serde(default)]
    pub expect_status: Vec<u16>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// For https: a PEM file of the CAs to trust instead of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<std::path::PathBuf>,
    /// Sent with every request (e.g. a JSON document for a POST).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
    /// A JSONPath (RFC 9535) into the answer's body: its first match is the `json` measure and
    /// the number of matches `json-count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_path: Option<String>,
}

fn get() -> String {
    "GET".into()
}
fn ten() -> f64 {
    10.0
}
fn two_seconds() -> Dur {
    Dur(Duration::from_secs(2))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PrometheusProbe {
    /// The server, e.g. http://127.0.0.1:9090 (or https://).
    pub url: String,
    pub query: String,
    /// A range query over this window ending now (measures the last value, min and max).
    #[serde(default)]
    pub range: Option<Dur>,
    #[serde(default = "five_seconds")]
    pub step: Dur,
    #[serde(default = "two_seconds")]
    pub timeout: Dur,
    /// For https: a PEM file of the CAs to trust instead of the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<std::path::PathBuf>,
}

fn five_seconds() -> Dur {
    Dur(Duration::from_secs(5))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TcpProbe {
    /// ip:port
    pub address: std::net::SocketAddr,
    #[serde(default = "one_second")]
    pub timeout: Dur,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DnsProbe {
    /// ip:port of the server.
    pub server: std::net::SocketAddr,
    pub name: String,
    /// A, AAAA, TXT, ... (default A).
    #[serde(default = "type_a", rename = "type")]
    pub qtype: String,
    #[serde(default = "one_second")]
    pub timeout: Dur,
}

fn type_a() -> String {
    "A".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CommandProbe {
    pub run: Vec<String>,
    #[serde(default = "five_seconds")]
    pub timeout: Dur,
}

/// Every fault action of the method, depth first.
pub fn faults(steps: &[Step]) -> Vec<&Fault> {
    let mut out = Vec::new();
    for s in steps {
        match s {
            Step::Fault(f) => out.push(&**f),
            Step::Parallel(p) => out.extend(faults(p)),
            Step::Background(b) => out.extend(faults(std::slice::from_ref(b))),
            Step::Pause(_) | Step::Command(_) | Step::Probe(_) => {}
        }
    }
    out
}

/// How long the steps take at least: sequence adds, parallel takes the longest branch, a
/// background step overlaps the steps after it.
pub fn min_duration(steps: &[Step]) -> Duration {
    let one = |s: &Step| min_duration(std::slice::from_ref(s));
    // From the end, so that a background step can take the longer of itself and what follows.
    steps.iter().rev().fold(Duration::ZERO, |after, s| match s {
        Step::Fault(f) => f.duration.unwrap_or_default().saturating_add(after),
        Step::Pause(d) => d.0.saturating_add(after),
        Step::Parallel(p) => p
            .iter()
            .map(one)
            .max()
            .unwrap_or_default()
            .saturating_add(after),
        Step::Command(_) | Step::Probe(_) => after,
        Step::Background(b) => one(b).max(after),
    })
}
