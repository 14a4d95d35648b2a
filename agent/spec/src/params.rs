//! Each fault kind's parameters as a person writes them, declared once: `chaosctl inject KIND`
//! derives its flags (clap) and an experiment file its `KIND:` mapping (serde, and the CRD's
//! schema through schemars) from the same struct, and [`Params::kind`] turns either into the
//! [`FaultKind`] the engine runs. A flag and its file key may be spelled differently
//! (`--domain` repeated, `domains:` a list); the value and its parser are the same.
use crate::{
    CgroupRef, FaultKind, FillLevel, InvalidInput, MemorySize, MountRef, ProcessRef, SkewedClock,
    kinds, parse_millis, parse_percent, parse_rate,
};
use clap::Args;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A kind's parameters: what the engine runs. Targets the parameters do not carry (the
/// interface, the netns) come from elsewhere.
pub trait Params {
    fn kind(&self) -> Result<FaultKind, InvalidInput>;
}

/// A kind's name: the subcommand (`chaosctl inject NAME`) and the file's key.
pub trait Kind {
    const NAME: &'static str;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Loss {
    /// Percent of matched packets dropped.
    #[arg(long, value_parser = parse_percent)]
    pub percent: f64,
    /// Lag-1 correlation of losses in percent (bursty loss).
    #[arg(long, default_value_t = 0.0, value_parser = parse_percent)]
    #[serde(default)]
    pub correlation: f64,
}

impl Kind for Loss {
    const NAME: &'static str = kinds::LOSS.name;
}

impl Params for Loss {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        Ok(FaultKind::Loss {
            percent: self.percent,
            correlation: self.correlation,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Corrupt {
    /// Percent of matched packets that get one payload bit flipped.
    #[arg(long, value_parser = parse_percent)]
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Duplicate {
    /// Percent of matched packets sent twice.
    #[arg(long, value_parser = parse_percent)]
    pub percent: f64,
}

impl Kind for Corrupt {
    const NAME: &'static str = kinds::CORRUPT.name;
}

impl Params for Corrupt {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        Ok(FaultKind::Corrupt {
            percent: self.percent,
        })
    }
}

impl Kind for Duplicate {
    const NAME: &'static str = kinds::DUPLICATE.name;
}

impl Params for Duplicate {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        Ok(FaultKind::Duplicate {
            percent: self.percent,
        })
    }
}

/// Partition has no parameters. `{}` in a file; Kubernetes refuses `additionalProperties:
/// false` in a CRD (it prunes unknown fields instead), so the schema is written by hand.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, Args)]
#[group(skip)]
#[serde(deny_unknown_fields)]
pub struct Partition {}

impl JsonSchema for Partition {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Empty".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "object"})
    }
}

impl Kind for Partition {
    const NAME: &'static str = kinds::PARTITION.name;
}

impl Params for Partition {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        Ok(FaultKind::Partition)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Latency {
    /// Added delay in milliseconds (the flag also takes 500ms or 0.5s).
    #[arg(long, value_parser = parse_millis)]
    pub ms: f64,
    /// Random variation of the delay, plus or minus, in milliseconds.
    #[arg(long, default_value_t = 0.0, value_parser = parse_millis)]
    #[serde(default)]
    pub jitter_ms: f64,
    /// Correlation between successive delays, percent.
    #[arg(long, default_value_t = 0.0, value_parser = parse_percent)]
    #[serde(default)]
    pub correlation: f64,
    /// Shape of the jitter: normal, pareto or paretonormal (default: uniform).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<String>,
    /// auto (netem if the kernel has it, else EDT), netem, or edt (constant delays held by an
    /// fq root; scales to many destinations).
    #[arg(long, default_value = "auto")]
    #[serde(default)]
    pub backend: String,
    /// A delay for one destination, CIDR=MS (repeatable; EDT).
    #[arg(long = "dest-ms")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dest_ms: Vec<String>,
}

impl Kind for Latency {
    const NAME: &'static str = kinds::LATENCY.name;
}

impl Params for Latency {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        Ok(FaultKind::Latency {
            ms: self.ms,
            jitter_ms: self.jitter_ms,
            correlation: self.correlation,
            distribution: match self.distribution.as_deref() {
                None | Some("") => None,
                Some(d) => Some(d.parse()?),
            },
            backend: self.backend.parse()?,
            per_destination: self
                .dest_ms
                .iter()
                .map(|d| d.parse())
                .collect::<Result<_, _>>()?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Reorder {
    /// Percent of matched packets sent at once.
    #[arg(long, value_parser = parse_percent)]
    pub percent: f64,
    /// The delay of the packets that are not sent at once, in milliseconds.
    #[arg(long, value_parser = parse_millis)]
    pub ms: f64,
    /// Correlation between successive choices, percent.
    #[arg(long, default_value_t = 0.0, value_parser = parse_percent)]
    #[serde(default)]
    pub correlation: f64,
}

impl Kind for Reorder {
    const NAME: &'static str = kinds::REORDER.name;
}

impl Params for Reorder {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        Ok(FaultKind::Reorder {
            percent: self.percent,
            ms: self.ms,
            correlation: self.correlation,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Bandwidth {
    /// tc syntax: 1mbit, 500kbit, 10gbit, 2mbps.
    #[arg(long)]
    pub rate: String,
}

impl Kind for Bandwidth {
    const NAME: &'static str = kinds::BANDWIDTH.name;
}

impl Params for Bandwidth {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        Ok(FaultKind::Bandwidth {
            bytes_per_sec: parse_rate(&self.rate)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Dns {
    /// timeout, nxdomain, servfail or refused.
    #[arg(long)]
    pub mode: String,
    /// example.com (that name) or *.example.com (names below it); repeatable. None: every
    /// name.
    #[arg(long = "domain")]
    #[serde(default)]
    pub domains: Vec<String>,
}

impl Kind for Dns {
    const NAME: &'static str = kinds::DNS.name;
}

impl Params for Dns {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        Ok(FaultKind::Dns {
            mode: self.mode.parse()?,
            domains: self
                .domains
                .iter()
                .map(|d| d.parse())
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Which processes' cgroups a host fault acts in: exactly one of the three (or, in an
/// experiment on a cluster, none: each chosen pod's own).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CgroupTarget {
    /// The cgroup, relative to the hierarchies' roots (e.g. /chaos/pod1).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The cgroups of this process.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The cgroup of this Kubernetes pod (found on the agent's node by its UID).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

impl CgroupTarget {
    pub fn is_empty(&self) -> bool {
        self.cgroup.is_none() && self.pid.is_none() && self.pod_uid.is_none()
    }

    pub fn cgroup_ref(&self) -> Result<CgroupRef, InvalidInput> {
        CgroupRef::from_flags(self.cgroup.as_deref(), self.pid, self.pod_uid.as_deref())
    }
}

/// CPU stress: workers inside the target's cgroups, each holding a share of one CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Cpu {
    /// How many worker processes.
    #[arg(long, default_value_t = 1)]
    #[serde(default = "one")]
    pub workers: u32,
    /// Percent of one CPU each worker holds (1-100).
    #[arg(long, value_parser = parse_percent)]
    pub load: f64,
    #[command(flatten)]
    #[serde(flatten)]
    pub target: CgroupTarget,
}

fn one() -> u32 {
    1
}

impl Kind for Cpu {
    const NAME: &'static str = kinds::CPU.name;
}

impl Params for Cpu {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        Ok(FaultKind::Cpu {
            workers: self.workers,
            load_percent: self.load,
            cgroup: self.target.cgroup_ref()?,
        })
    }
}

/// Signals a container's processes once (found through the pod's cgroup; the sandbox is
/// spared, so the pod stays and the container restarts under its restartPolicy).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ContainerKill {
    /// The pod's UID (on a node; on a cluster the pods are chosen by their selector).
    #[arg(long, conflicts_with = "namespace")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The container's id (12 or more hex digits); every container when omitted.
    #[arg(long, conflicts_with = "namespace")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// On a cluster: the container's name in each chosen pod; every container when omitted.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// KILL (default), TERM, INT or HUP.
    #[arg(long, default_value = "KILL")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
}

impl Kind for ContainerKill {
    const NAME: &'static str = kinds::CONTAINER_KILL.name;
}

impl Params for ContainerKill {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        let Some(pod) = &self.pod_uid else {
            return Err(crate::invalid(
                "--pod-uid",
                "is required on a node (or --namespace, to choose pods in a cluster)",
            ));
        };
        crate::check_pod_uid("--pod-uid", pod)?;
        Ok(FaultKind::ContainerKill {
            pod: pod.clone(),
            container: self.container_id.clone().unwrap_or_default(),
            signal: self.signal.as_deref().unwrap_or("KILL").parse()?,
        })
    }
}

/// Which processes a process fault acts on: exactly one of `pid`, `cgroup`, `pod-uid`, and
/// optionally a name they must match.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProcessTarget {
    /// This process and its descendants (not the rest of its cgroup).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Every process in this cgroup (relative to the hierarchies' roots, e.g. /chaos/pod1) and
    /// below it.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The processes of this Kubernetes pod's containers (found on the agent's node by UID;
    /// the sandbox is spared).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Only processes whose name (comm) or command line matches this regex.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ProcessTarget {
    pub fn process_ref(&self) -> Result<ProcessRef, InvalidInput> {
        ProcessRef::from_flags(self.pid, self.cgroup.as_deref(), self.pod_uid.as_deref())
    }

    fn name(&self) -> String {
        self.name.clone().unwrap_or_default()
    }
}

/// Freezes processes (the cgroup freezer for a whole cgroup, SIGSTOP otherwise) until the
/// fault ends; they are thawed even if the engine dies.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProcessPause {
    #[command(flatten)]
    #[serde(flatten)]
    pub target: ProcessTarget,
}

impl Kind for ProcessPause {
    const NAME: &'static str = kinds::PROCESS_PAUSE.name;
}

impl Params for ProcessPause {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        Ok(FaultKind::ProcessPause {
            target: self.target.process_ref()?,
            name: self.target.name(),
        })
    }
}

/// Signals processes once, or every `interval` while the fault lasts (a crash loop).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ProcessKill {
    #[command(flatten)]
    #[serde(flatten)]
    pub target: ProcessTarget,
    /// KILL (default), TERM, INT or HUP.
    #[arg(long, default_value = "KILL")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<String>,
    /// Signal again every DURATION (e.g. 10s) until the fault ends; once when omitted.
    /// (`--interval` is the counter lines' period in every command.)
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
}

impl Kind for ProcessKill {
    const NAME: &'static str = kinds::PROCESS_KILL.name;
}

impl Params for ProcessKill {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        let interval_ms = match &self.every {
            None => 0,
            Some(text) => {
                let d =
                    crate::parse_duration(text).map_err(|e| crate::invalid("--every", e.rule))?;
                u64::try_from(d.as_millis())
                    .map_err(|_| crate::invalid("--every", "is too long"))?
            }
        };
        Ok(FaultKind::ProcessKill {
            target: self.target.process_ref()?,
            name: self.target.name(),
            signal: self.signal.as_deref().unwrap_or("KILL").parse()?,
            interval_ms,
        })
    }
}

/// Moves the clocks of the target processes only (their vDSO and system-call reads, their
/// threads, what they fork and exec meanwhile); true time comes back at the end, or within 1 s
/// of the engine's death.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClockSkew {
    /// How far to move the clocks: 2h, +90s, -30m, 30d.
    #[arg(long, allow_hyphen_values = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<String>,
    /// Let the clocks also run fast (positive) or slow (negative) by N parts per million.
    #[arg(long, allow_hyphen_values = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_ppm: Option<i64>,
    /// The clocks to move, comma-separated: realtime (the default: also gettimeofday and
    /// time), tai, monotonic, boottime.
    #[arg(long, value_delimiter = ',')]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clocks: Vec<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub target: ProcessTarget,
}

impl Kind for ClockSkew {
    const NAME: &'static str = kinds::CLOCK_SKEW.name;
}

impl Params for ClockSkew {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        let offset_ns = match &self.offset {
            Some(text) => crate::parse_offset("--offset", text)?,
            None => 0,
        };
        Ok(FaultKind::ClockSkew {
            target: self.target.process_ref()?,
            name: self.target.name(),
            offset_ns,
            drift_ppm: self.drift_ppm.unwrap_or(0),
            clocks: SkewedClock::parse_list(&self.clocks)?,
        })
    }
}

/// Memory stress: workers inside the target's cgroups touching and holding memory (asleep:
/// no CPU spent while holding).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Memory {
    /// How much, between all workers (e.g. 256MiB, 1G).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
    /// How much, as a percent of the cgroup's memory limit (of the node's memory without one).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    /// How many worker processes share it.
    #[arg(long, default_value_t = 1)]
    #[serde(default = "one")]
    pub workers: u32,
    /// Reach the full amount gradually over this long (e.g. 30s).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<String>,
    /// Let the cgroup's OOM killer act (and report what it killed); without it an ask beyond
    /// the cgroup's headroom is refused.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub oom: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub target: CgroupTarget,
}

impl Kind for Memory {
    const NAME: &'static str = kinds::MEMORY.name;
}

impl Params for Memory {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        let size = match (&self.bytes, self.percent) {
            (Some(b), None) => MemorySize::Bytes(crate::parse_size("--bytes", b)?),
            (None, Some(p)) => MemorySize::Percent(p),
            _ => {
                return Err(crate::invalid(
                    "--bytes",
                    "give exactly one of --bytes SIZE or --percent P",
                ));
            }
        };
        let ramp_ms = match &self.ramp {
            None => 0,
            Some(t) => {
                let d = crate::parse_duration(t).map_err(|e| crate::invalid("--ramp", e.rule))?;
                u64::try_from(d.as_millis()).map_err(|_| crate::invalid("--ramp", "is too long"))?
            }
        };
        Ok(FaultKind::Memory {
            size,
            workers: self.workers,
            cgroup: self.target.cgroup_ref()?,
            ramp_ms,
            oom: self.oom,
        })
    }
}

/// Fills a filesystem to a level and holds it (one file of a reserved name, fallocated).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DiskFill {
    /// A directory on the filesystem to fill, as the target sees it.
    #[arg(long)]
    pub path: String,
    /// Fill until this percent of the filesystem is used (as df counts it).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fill_percent: Option<f64>,
    /// Fill until only SIZE is left available (e.g. 10MiB; 0 for a full disk).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leave: Option<String>,
    /// Take SIZE (e.g. 512MiB, 1G).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
    /// The path as this process sees it (its mount namespace and root).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The path inside this Kubernetes pod's containers (found on the agent's node by UID).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// Fill it even if it is the filesystem holding the engine's journal.
    #[arg(long = "force")]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

impl Kind for DiskFill {
    const NAME: &'static str = kinds::DISK_FILL.name;
}

impl Params for DiskFill {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        let level = match (&self.fill_percent, &self.leave, &self.bytes) {
            (Some(p), None, None) => FillLevel::Percent(*p),
            (None, Some(s), None) => FillLevel::Leave(crate::parse_size("--leave", s)?),
            (None, None, Some(s)) => FillLevel::Bytes(crate::parse_size("--bytes", s)?),
            _ => {
                return Err(crate::invalid(
                    "--fill-percent",
                    "give exactly one of --fill-percent P, --leave SIZE or --bytes SIZE",
                ));
            }
        };
        let mount = match (self.pid, &self.pod_uid) {
            (None, None) => MountRef::Own,
            (Some(pid), None) => MountRef::Pid(pid),
            (None, Some(uid)) => MountRef::Pod(uid.clone()),
            _ => return Err(crate::invalid("--pid", "give --pid or --pod-uid, not both")),
        };
        Ok(FaultKind::DiskFill {
            path: self.path.clone(),
            level,
            mount,
            force: self.force,
        })
    }
}

/// Deletes pods through the cluster's API (the controller does it; no agent runs this kind).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, Args)]
#[group(skip)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PodKill {
    /// Seconds of grace (0: force); each pod's own terminationGracePeriodSeconds when
    /// omitted.
    #[arg(long = "grace-period")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period_seconds: Option<u32>,
}

impl Kind for PodKill {
    const NAME: &'static str = kinds::POD_KILL.name;
}

impl Params for PodKill {
    fn kind(&self) -> Result<FaultKind, InvalidInput> {
        Err(crate::invalid(
            "kind",
            "pod-kill is done by chaos-controller through the Kubernetes API, not by an agent",
        ))
    }
}
