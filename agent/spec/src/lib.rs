//! chaos-spec: what a fault is, independent of how it is applied: kind, target, duration,
//! counters. Parsing and validation of user input live here, once, for the CLI, experiment
//! files and the gRPC boundary alike. Deliberately light (serde, thiserror and the map ABI's
//! constants, clap and schemars for [`params`]; no aya, tokio or tonic), so the experiment model and the CLI need not link the
//! engine to speak about faults.
pub mod dns;
pub mod netem_dist;
pub mod params;
pub mod pod;

pub use crate::netem_dist::Distribution;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// Bad input: names the field and the rule it broke. Printed as one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {}", one_line(rule, ERROR_LINE_MAX))]
pub struct InvalidInput {
    pub field: &'static str,
    pub rule: String,
}

/// The longest error line printed: the rules quote their input, and the input is anyone's.
pub const ERROR_LINE_MAX: usize = 400;

/// `text` as an error line may show it: control characters escaped (a newline in the input
/// must not forge a second log line) and cut to `max` bytes, marked with `...`.
pub fn one_line(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max && !text.chars().any(char::is_control) {
        return text.into();
    }
    let mut out = String::with_capacity(max.min(text.len()) + 3);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
        if out.len() >= max {
            out.truncate(out.floor_char_boundary(max));
            out.push_str("...");
            break;
        }
    }
    out.into()
}

pub fn invalid(field: &'static str, rule: impl Into<String>) -> InvalidInput {
    InvalidInput {
        field,
        rule: rule.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// Drop `percent` of matched packets; `correlation` (percent) makes losses bursty.
    Loss { percent: f64, correlation: f64 },
    /// Flip one payload bit in `percent` of matched packets.
    Corrupt { percent: f64 },
    /// Drop every matched packet.
    Partition,
    /// Delay matched packets (netem): `ms` plus or minus `jitter_ms`, with `correlation`
    /// (percent) between successive delays.
    Latency {
        ms: f64,
        jitter_ms: f64,
        correlation: f64,
        #[serde(default)]
        distribution: Option<Distribution>,
        #[serde(default)]
        backend: LatencyBackend,
        /// Delays for particular destinations (EDT only); they are matched as remote CIDRs.
        #[serde(default)]
        per_destination: Vec<DestDelay>,
    },
    /// Send `percent` of matched packets at once and delay the rest by `ms`, so they overtake.
    Reorder {
        percent: f64,
        ms: f64,
        correlation: f64,
    },
    /// Send `percent` of matched packets twice. (No correlation: iproute2 no longer sends
    /// netem's duplicate correlation, and we encode what `tc` encodes.)
    Duplicate { percent: f64 },
    /// Limit matched traffic to `rate` bytes per second.
    Bandwidth { bytes_per_sec: u64 },
    /// Fail DNS queries leaving the interface whose name matches `domains` (every name if
    /// empty): dropped, or answered at once in the datapath with the mode's RCODE.
    Dns {
        mode: crate::dns::DnsMode,
        #[serde(default)]
        domains: Vec<crate::dns::DomainPattern>,
    },
    /// `workers` processes inside the target's cgroups, each holding `load_percent` of one CPU.
    /// The target is a cgroup, not an interface, so it lives here; `FaultSpec::target` is
    /// unused for this kind (`Target::none()`).
    Cpu {
        workers: u32,
        load_percent: f64,
        cgroup: CgroupRef,
    },
    /// Signal the processes of one container of a pod (every container when `container` is
    /// empty), once, at apply; the sandbox (pause) process is spared. Nothing to revert.
    ContainerKill {
        pod: String,
        container: String,
        signal: KillSignal,
    },
    /// Freeze the target processes until the fault ends. A guard process, not the engine,
    /// holds the thaw: it thaws them at the deadline, or at once if the engine dies.
    ProcessPause {
        target: ProcessRef,
        /// A regex the process's name (comm) or command line must match; empty: every one.
        #[serde(default)]
        name: String,
    },
    /// Signal the target processes at apply and, with `interval_ms`, again every interval
    /// until the fault ends (a crash loop: each round finds the processes anew).
    ProcessKill {
        target: ProcessRef,
        #[serde(default)]
        name: String,
        signal: KillSignal,
        #[serde(default)]
        interval_ms: u64,
    },
    /// `workers` processes inside the target's cgroups touching and holding `size` between
    /// them, reached over `ramp_ms`. With `oom`, the cgroup's OOM killer may act (and the fault
    /// reports it); without, an ask beyond the cgroup's headroom is refused and the workers are
    /// the OOM killer's first choice.
    Memory {
        size: MemorySize,
        workers: u32,
        cgroup: CgroupRef,
        #[serde(default)]
        ramp_ms: u64,
        #[serde(default)]
        oom: bool,
    },
    /// Move the clocks of the target processes (and of what they fork or exec meanwhile) by
    /// `offset_ns`, plus `drift_ppm` parts per million of the time since the apply. No other
    /// process's clock moves; true time comes back at revert, at the deadline, and within 1 s
    /// of the engine's death.
    ClockSkew {
        target: ProcessRef,
        #[serde(default)]
        name: String,
        offset_ns: i64,
        #[serde(default)]
        drift_ppm: i64,
        clocks: Vec<SkewedClock>,
    },
    /// Fill the filesystem holding `path` (as `mount` sees it) to `level`, with one file of a
    /// reserved name, and hold the level until the fault ends.
    DiskFill {
        path: String,
        level: FillLevel,
        mount: MountRef,
        /// Fill it even if it also holds the engine's journal.
        #[serde(default)]
        force: bool,
    },
}

/// A clock a clock-skew fault moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkewedClock {
    /// CLOCK_REALTIME and its coarse and alarm forms; gettimeofday.
    Realtime,
    /// CLOCK_TAI.
    Tai,
    /// CLOCK_MONOTONIC, its raw and coarse forms.
    Monotonic,
    /// CLOCK_BOOTTIME and its alarm form.
    Boottime,
}

impl SkewedClock {
    pub const ALL: [SkewedClock; 4] = [
        SkewedClock::Realtime,
        SkewedClock::Tai,
        SkewedClock::Monotonic,
        SkewedClock::Boottime,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SkewedClock::Realtime => "realtime",
            SkewedClock::Tai => "tai",
            SkewedClock::Monotonic => "monotonic",
            SkewedClock::Boottime => "boottime",
        }
    }

    /// A `--clocks` list: sorted, each once; realtime when empty.
    pub fn parse_list(names: &[String]) -> Result<Vec<SkewedClock>, InvalidInput> {
        let mut clocks = names
            .iter()
            .map(|c| c.parse())
            .collect::<Result<Vec<SkewedClock>, _>>()?;
        if clocks.is_empty() {
            clocks.push(SkewedClock::Realtime);
        }
        clocks.sort();
        clocks.dedup();
        Ok(clocks)
    }

    /// The clock ids (clock_gettime's first argument) it stands for.
    pub fn ids(self) -> &'static [u32] {
        match self {
            // REALTIME, REALTIME_COARSE, REALTIME_ALARM
            SkewedClock::Realtime => &[0, 5, 8],
            SkewedClock::Tai => &[11],
            // MONOTONIC, MONOTONIC_RAW, MONOTONIC_COARSE
            SkewedClock::Monotonic => &[1, 4, 6],
            // BOOTTIME, BOOTTIME_ALARM
            SkewedClock::Boottime => &[7, 9],
        }
    }
}

impl std::str::FromStr for SkewedClock {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        SkewedClock::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                invalid(
                    "--clocks",
                    format!(
                        "`{}` is not a clock: realtime, tai, monotonic or boottime",
                        s.chars().take(40).collect::<String>()
                    ),
                )
            })
    }
}

/// The largest `--drift-ppm` either way (one second per second: the clock stands still or runs
/// at twice its rate).
pub const MAX_DRIFT_PPM: i64 = 1_000_000;

/// A signed offset: `2h`, `+90s`, `-30m`, `1d12h`, in nanoseconds.
pub fn parse_offset(field: &'static str, s: &str) -> Result<i64, InvalidInput> {
    let t = s.trim();
    let (negative, rest) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let d = parse_duration(rest).map_err(|e| invalid(field, e.rule))?;
    let ns = i64::try_from(d.as_nanos()).map_err(|_| invalid(field, "is too large"))?;
    Ok(if negative { -ns } else { ns })
}

/// An offset in nanoseconds as a user writes it: +2h, -90s, +1500ms.
pub fn format_offset(ns: i64) -> String {
    let sign = if ns < 0 { '-' } else { '+' };
    let abs = Duration::from_nanos(ns.unsigned_abs());
    if !abs.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{sign}{}ns", abs.as_nanos());
    }
    format!("{sign}{}", format_duration(abs))
}

/// How much memory a memory fault holds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemorySize {
    Bytes(u64),
    /// Percent of the cgroup's memory limit, or of the node's memory when it has none.
    Percent(f64),
}

/// Most memory workers one fault may start.
pub const MAX_MEMORY_WORKERS: u32 = 64;

/// How full a disk-fill makes its filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FillLevel {
    /// Used space this percent of the capacity an application sees (as `df` counts it).
    Percent(f64),
    /// Leave this many bytes available.
    Leave(u64),
    /// Take this many bytes.
    Bytes(u64),
}

impl fmt::Display for FillLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FillLevel::Percent(p) => write!(f, "to {p} % full"),
            FillLevel::Leave(b) => write!(f, "leaving {}", format_size(*b)),
            FillLevel::Bytes(b) => write!(f, "by {}", format_size(*b)),
        }
    }
}

/// Whose view of the file system a disk-fill's path is in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MountRef {
    /// The engine's own.
    #[default]
    Own,
    /// The mount namespace (and root) of a process.
    Pid(u32),
    /// A Kubernetes pod's containers' (by pod UID).
    Pod(String),
}

impl fmt::Display for MountRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MountRef::Own => Ok(()),
            MountRef::Pid(pid) => write!(f, " as pid {pid} sees it"),
            MountRef::Pod(uid) => write!(f, " in pod {uid}"),
        }
    }
}

/// The largest size a user may name: 1 PiB is beyond any disk we fill.
pub const MAX_SIZE: u64 = 1 << 50;

/// Parses `256MiB`, `1GiB`, `512M`, `1G`, `10k` or plain bytes: `K`/`M`/`G`/`T` (or `KB`...)
/// are powers of 1000, `KiB`/`MiB`/`GiB`/`TiB` (or `Ki`...) powers of 1024.
pub fn parse_size(field: &'static str, s: &str) -> Result<u64, InvalidInput> {
    let bad = || {
        invalid(
            field,
            format!("`{s}` must look like 256MiB, 1GiB, 512M, 1G or 4096"),
        )
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let mult: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = (n * mult).round();
    if !(bytes.is_finite() && bytes <= MAX_SIZE as f64) {
        return Err(invalid(field, format!("`{s}` must be at most 1PiB")));
    }
    Ok(bytes as u64)
}

/// `1073741824` as `1GiB`, `1500000` as `1.4MiB`.
pub fn format_size(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 || v.fract() == 0.0 {
        format!("{v}{}", UNITS[i])
    } else {
        format!("{v:.1}{}", UNITS[i])
    }
}

/// Which processes a process fault acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessRef {
    /// This process and its descendants (never the rest of its cgroup).
    Pid(u32),
    /// Every process in this cgroup and the cgroups below it.
    Cgroup(String),
    /// The processes of a Kubernetes pod's containers, by pod UID (its sandbox is spared).
    Pod(String),
}

impl ProcessRef {
    /// Exactly one of `--pid PID`, `--cgroup PATH` and `--pod-uid UID`.
    pub fn from_flags(
        pid: Option<u32>,
        cgroup: Option<&str>,
        pod_uid: Option<&str>,
    ) -> Result<Self, InvalidInput> {
        match (pid, cgroup, pod_uid) {
            (Some(pid), None, None) => Ok(ProcessRef::Pid(pid)),
            (None, Some(path), None) => Ok(ProcessRef::Cgroup(path.to_string())),
            (None, None, Some(uid)) => Ok(ProcessRef::Pod(uid.to_string())),
            _ => Err(invalid(
                "--pid",
                "give exactly one of --pid PID, --cgroup PATH or --pod-uid UID",
            )),
        }
    }

    fn validate(&self) -> Result<(), InvalidInput> {
        match self {
            ProcessRef::Pid(0 | 1) => Err(invalid(
                "--pid",
                "must be a process id greater than 1 (init is never a target)",
            )),
            ProcessRef::Pid(_) => Ok(()),
            ProcessRef::Pod(uid) => check_pod_uid("--pod-uid", uid),
            ProcessRef::Cgroup(p) if p.trim_end_matches('/').is_empty() => Err(invalid(
                "--cgroup",
                "the root cgroup holds every process on the host; name a cgroup below it",
            )),
            ProcessRef::Cgroup(p) => CgroupRef::Path(p.clone()).validate(),
        }
    }
}

impl fmt::Display for ProcessRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessRef::Pid(pid) => write!(f, "pid {pid} and its descendants"),
            ProcessRef::Cgroup(p) => write!(f, "the processes of cgroup {p}"),
            ProcessRef::Pod(uid) => write!(f, "the containers of pod {uid}"),
        }
    }
}

/// The longest `--name` pattern (a regex compiled on the agent: bounded so a hostile pattern
/// costs nothing).
pub const MAX_NAME_PATTERN: usize = 256;
/// The shortest `--every` between process-kill rounds.
pub const MIN_KILL_INTERVAL: Duration = Duration::from_millis(100);

/// A `--name` pattern, compiled with a bounded program size.
pub fn name_pattern(pattern: &str) -> Result<regex::Regex, InvalidInput> {
    if pattern.len() > MAX_NAME_PATTERN {
        return Err(invalid(
            "--name",
            format!("must be at most {MAX_NAME_PATTERN} characters"),
        ));
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| invalid("--name", format!("`{pattern}` is not a regex: {e}")))
}

/// The signals container-kill sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KillSignal {
    Kill,
    Term,
    Int,
    Hup,
}

impl KillSignal {
    pub fn number(self) -> i32 {
        match self {
            KillSignal::Kill => libc::SIGKILL,
            KillSignal::Term => libc::SIGTERM,
            KillSignal::Int => libc::SIGINT,
            KillSignal::Hup => libc::SIGHUP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KillSignal::Kill => "KILL",
            KillSignal::Term => "TERM",
            KillSignal::Int => "INT",
            KillSignal::Hup => "HUP",
        }
    }
}

impl FromStr for KillSignal {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        match s.trim_start_matches("SIG").to_ascii_uppercase().as_str() {
            "" | "KILL" => Ok(KillSignal::Kill),
            "TERM" => Ok(KillSignal::Term),
            "INT" => Ok(KillSignal::Int),
            "HUP" => Ok(KillSignal::Hup),
            _ => Err(invalid(
                "--signal",
                format!("`{s}` must be KILL, TERM, INT or HUP"),
            )),
        }
    }
}

/// Where CPU stress runs: a cgroup path relative to the hierarchies' roots (`/chaos/pod1`),
/// or the cgroups of a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupRef {
    Path(String),
    Pid(u32),
    /// A Kubernetes pod's own cgroup, by UID (canonical form); the engine resolves it to a
    /// path through [`crate::pod::resolve`] before anything runs.
    Pod(String),
}

impl CgroupRef {
    /// Exactly one of `--cgroup PATH`, `--pid PID` and `--pod-uid UID`.
    pub fn from_flags(
        cgroup: Option<&str>,
        pid: Option<u32>,
        pod_uid: Option<&str>,
    ) -> Result<Self, InvalidInput> {
        match (cgroup, pid, pod_uid) {
            (Some(path), None, None) => Ok(CgroupRef::Path(path.to_string())),
            (None, Some(pid), None) => Ok(CgroupRef::Pid(pid)),
            (None, None, Some(uid)) => Ok(CgroupRef::Pod(uid.to_string())),
            _ => Err(invalid(
                "--cgroup",
                "give exactly one of --cgroup PATH, --pid PID or --pod-uid UID",
            )),
        }
    }

    fn validate(&self) -> Result<(), InvalidInput> {
        match self {
            CgroupRef::Pid(0) => Err(invalid("--pid", "must be a process id greater than 0")),
            CgroupRef::Pid(_) => Ok(()),
            CgroupRef::Pod(uid) => check_pod_uid("--pod-uid", uid),
            CgroupRef::Path(p) => {
                if !p.starts_with('/')
                    || p.contains('\0')
                    || p.len() > 4096
                    || p.split('/').any(|c| c == ".." || c == ".")
                {
                    Err(invalid(
                        "--cgroup",
                        format!(
                            "`{p}` must be an absolute cgroup path like /chaos/pod1 (no . or ..)"
                        ),
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// A pod UID must be a UUID; checked where specs are parsed, so the controller refuses a
/// typo before it reaches an agent.
pub fn check_pod_uid(field: &'static str, uid: &str) -> Result<(), InvalidInput> {
    uid.parse::<crate::pod::PodUid>()
        .map(|_| ())
        .map_err(|e| invalid(field, e.to_string()))
}

impl fmt::Display for CgroupRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupRef::Path(p) => write!(f, "cgroup {p}"),
            CgroupRef::Pid(pid) => write!(f, "cgroups of pid {pid}"),
            CgroupRef::Pod(uid) => write!(f, "cgroup of pod {uid}"),
        }
    }
}

/// A fault's counters. Packets are counted as segments (a GSO/TSO super-packet of n segments
/// counts n, as the wire and the receiver see it); bytes as the hook sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub seen: u64,
    pub matched: u64,
    pub affected: u64,
    /// CPU faults: CPU time (user + system) the workers have consumed, in microseconds.
    #[serde(default)]
    pub cpu_time_us: u64,
    #[serde(default)]
    pub seen_bytes: u64,
    #[serde(default)]
    pub matched_bytes: u64,
    #[serde(default)]
    pub affected_bytes: u64,
}

/// Most CPU stress workers one fault may start.
pub const MAX_CPU_WORKERS: u32 = 1024;

/// How latency is applied: netem under our HTB root (jitter, distributions), or earliest
/// departure times set by the classifier and held by an fq root (constant delays, per
/// destination, scales to many destinations). `Auto` takes netem when the kernel has it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyBackend {
    #[default]
    Auto,
    Netem,
    Edt,
}

impl FromStr for LatencyBackend {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "" | "auto" => Ok(LatencyBackend::Auto),
            "netem" => Ok(LatencyBackend::Netem),
            "edt" => Ok(LatencyBackend::Edt),
            _ => Err(invalid(
                "--backend",
                format!("`{s}` must be auto, netem or edt"),
            )),
        }
    }
}

/// `CIDR=MS`: this destination gets this delay.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DestDelay {
    pub cidr: Cidr,
    pub ms: f64,
}

impl FromStr for DestDelay {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        let bad = |rule: String| invalid("--dest-ms", rule);
        let (cidr, ms) = s
            .split_once('=')
            .ok_or_else(|| bad(format!("`{s}` must look like 10.0.0.5=250")))?;
        let cidr: Cidr = cidr.parse().map_err(|e: InvalidInput| bad(e.rule))?;
        let ms: f64 = ms
            .parse()
            .map_err(|_| bad(format!("`{ms}` in `{s}` is not a number of milliseconds")))?;
        if !(ms.is_finite() && ms > 0.0 && ms <= 600_000.0) {
            return Err(bad(format!(
                "delay in `{s}` must be greater than 0 and at most 600000"
            )));
        }
        Ok(DestDelay { cidr, ms })
    }
}

/// One row of the table of kinds: what `doctor`, error texts, the model and the CLI say about a
/// kind, declared once. [`FaultKind::info`] maps every variant to its row (an exhaustive
/// match), and [`KINDS`] lists the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KindInfo {
    pub name: &'static str,
    /// Acts on an interface's traffic (takes a [`Target`]), or on the host.
    pub network: bool,
    /// Needs a qdisc tree on the interface (the others act in the classifier or on the host).
    pub shapes: bool,
    /// The backends, as `doctor` names them, that can run it; any one available will do.
    pub backends: &'static [&'static str],
}

const EBPF: &[&str] = &["ebpf/tcx", "ebpf/clsact"];

pub mod kinds {
    use super::{EBPF, KindInfo};
    const fn net(name: &'static str, backends: &'static [&'static str]) -> KindInfo {
        KindInfo {
            name,
            network: true,
            shapes: false,
            backends,
        }
    }
    const fn shaping(name: &'static str, backends: &'static [&'static str]) -> KindInfo {
        KindInfo {
            name,
            network: true,
            shapes: true,
            backends,
        }
    }
    const fn host(name: &'static str, backends: &'static [&'static str]) -> KindInfo {
        KindInfo {
            name,
            network: false,
            shapes: false,
            backends,
        }
    }
    pub const LOSS: KindInfo = net("loss", EBPF);
    pub const CORRUPT: KindInfo = net("corrupt", EBPF);
    pub const PARTITION: KindInfo = net("partition", EBPF);
    pub const DNS: KindInfo = net("dns", EBPF);
    pub const LATENCY: KindInfo = shaping("latency", &["htb+netem", "edt/fq"]);
    pub const REORDER: KindInfo = shaping("reorder", &["htb+netem"]);
    pub const DUPLICATE: KindInfo = shaping("duplicate", &["htb+netem"]);
    pub const BANDWIDTH: KindInfo = shaping("bandwidth", &["htb"]);
    pub const CPU: KindInfo = host("cpu", &["stress"]);
    pub const CONTAINER_KILL: KindInfo = host("container-kill", &["signal"]);
    pub const PROCESS_PAUSE: KindInfo = host("process-pause", &["freezer", "signal"]);
    pub const PROCESS_KILL: KindInfo = host("process-kill", &["signal"]);
    pub const DISK_FILL: KindInfo = host("disk-fill", &["fallocate"]);
    pub const MEMORY: KindInfo = host("memory", &["stress"]);
    pub const CLOCK_SKEW: KindInfo = host("clock-skew", &["vdso+bpf"]);
    /// Not an agent's: chaos-controller deletes pods through the Kubernetes API.
    pub const POD_KILL: KindInfo = host("pod-kill", &["kubernetes"]);
}

/// Every kind an agent runs, in the order help and `doctor` list them.
pub const KINDS: &[KindInfo] = &[
    kinds::LOSS,
    kinds::CORRUPT,
    kinds::PARTITION,
    kinds::LATENCY,
    kinds::REORDER,
    kinds::DUPLICATE,
    kinds::BANDWIDTH,
    kinds::DNS,
    kinds::CPU,
    kinds::MEMORY,
    kinds::CONTAINER_KILL,
    kinds::PROCESS_PAUSE,
    kinds::PROCESS_KILL,
    kinds::DISK_FILL,
    kinds::CLOCK_SKEW,
];

/// The names in [`KINDS`], for error texts: "loss, corrupt, ... or container-kill".
pub fn kind_names() -> String {
    let names: Vec<&str> = KINDS.iter().map(|k| k.name).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

impl FaultKind {
    /// This kind's row in the table of kinds.
    pub fn info(&self) -> &'static KindInfo {
        match self {
            FaultKind::Loss { .. } => &kinds::LOSS,
            FaultKind::Corrupt { .. } => &kinds::CORRUPT,
            FaultKind::Partition => &kinds::PARTITION,
            FaultKind::Latency { .. } => &kinds::LATENCY,
            FaultKind::Bandwidth { .. } => &kinds::BANDWIDTH,
            FaultKind::Reorder { .. } => &kinds::REORDER,
            FaultKind::Duplicate { .. } => &kinds::DUPLICATE,
            FaultKind::Dns { .. } => &kinds::DNS,
            FaultKind::Cpu { .. } => &kinds::CPU,
            FaultKind::ContainerKill { .. } => &kinds::CONTAINER_KILL,
            FaultKind::ProcessPause { .. } => &kinds::PROCESS_PAUSE,
            FaultKind::ProcessKill { .. } => &kinds::PROCESS_KILL,
            FaultKind::DiskFill { .. } => &kinds::DISK_FILL,
            FaultKind::Memory { .. } => &kinds::MEMORY,
            FaultKind::ClockSkew { .. } => &kinds::CLOCK_SKEW,
        }
    }

    pub fn name(&self) -> &'static str {
        self.info().name
    }

    /// Network kinds act on an interface (`FaultSpec::target`); the others do not.
    pub fn is_network(&self) -> bool {
        self.info().network
    }

    /// Shaping kinds need a qdisc tree on the interface; the others act in the classifier.
    pub fn shapes(&self) -> bool {
        self.info().shapes
    }
}

/// Which network namespace the target interface lives in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetnsRef {
    /// The caller's own namespace (only when asked for explicitly, by giving no netns flag).
    Current,
    /// A netns file: `/run/netns/NAME` for a name, or any path given.
    Path(PathBuf),
    /// The namespace of a process.
    Pid(u32),
    /// A Kubernetes pod's namespace, by UID; the engine resolves it to its sandbox process
    /// through [`crate::pod::resolve`] before anything runs.
    Pod(String),
}

impl NetnsRef {
    /// `NAME` means `/run/netns/NAME`; anything with a `/` is a path.
    pub fn named(name_or_path: &str) -> Result<Self, InvalidInput> {
        if name_or_path.is_empty() {
            return Err(invalid("--netns", "must be a name or a path"));
        }
        if name_or_path.contains('/') {
            Ok(NetnsRef::Path(PathBuf::from(name_or_path)))
        } else {
            Ok(NetnsRef::Path(
                PathBuf::from("/run/netns").join(name_or_path),
            ))
        }
    }

    /// The namespace file; `None` for the current namespace and for a pod not yet resolved.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            NetnsRef::Current | NetnsRef::Pod(_) => None,
            NetnsRef::Path(p) => Some(p.clone()),
            NetnsRef::Pid(pid) => Some(PathBuf::from(format!("/proc/{pid}/ns/net"))),
        }
    }
}

impl fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetnsRef::Current => write!(f, "current netns"),
            NetnsRef::Path(p) => write!(f, "netns {}", p.display()),
            NetnsRef::Pid(pid) => write!(f, "netns of pid {pid}"),
            NetnsRef::Pod(uid) => write!(f, "netns of pod {uid}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = InvalidInput;
    /// `10.0.0.0/8`, `fd00::/64`, or a bare address (a /32 or /128). Host bits must be zero,
    /// so a typo like `10.0.0.1/8` is caught rather than silently widened.
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        let bad = || format!("`{s}` is not a CIDR (e.g. 10.0.0.0/24 or fd00::/64)");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| invalid("CIDR", bad()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| {
                invalid(
                    "CIDR",
                    format!("prefix of `{s}` must be between 0 and {max}"),
                )
            })?,
            None => max,
        };
        let cidr = Cidr { addr, prefix };
        if cidr.network_bytes() != cidr.addr_bytes() {
            return Err(invalid(
                "CIDR",
                format!("`{s}` has host bits set beyond /{prefix}"),
            ));
        }
        Ok(cidr)
    }
}

impl Cidr {
    pub fn addr_bytes(&self) -> Vec<u8> {
        match self.addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }

    fn network_bytes(&self) -> Vec<u8> {
        let mut b = self.addr_bytes();
        for (i, byte) in b.iter_mut().enumerate() {
            let keep = (self.prefix as usize).saturating_sub(i * 8).min(8);
            *byte &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
        }
        b
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl FromStr for PortRange {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    invalid(
                        "--port",
                        format!("`{s}` must be a port 1-65535 or a range A-B"),
                    )
                })
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if first > last {
            return Err(invalid("--port", format!("range `{s}` must be ascending")));
        }
        Ok(PortRange { first, last })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    All,
    Tcp,
    Udp,
    Icmp,
}

impl FromStr for Protocol {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "" | "all" => Ok(Protocol::All),
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            "icmp" => Ok(Protocol::Icmp),
            _ => Err(invalid(
                "--protocol",
                format!("`{s}` must be one of tcp, udp, icmp, all"),
            )),
        }
    }
}

/// Relative to the target interface: egress is traffic leaving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    Egress,
    Ingress,
    Both,
}

impl Direction {
    pub fn egress(self) -> bool {
        matches!(self, Direction::Egress | Direction::Both)
    }
    pub fn ingress(self) -> bool {
        matches!(self, Direction::Ingress | Direction::Both)
    }
}

impl FromStr for Direction {
    type Err = InvalidInput;
    fn from_str(s: &str) -> Result<Self, InvalidInput> {
        match s {
            "" | "egress" => Ok(Direction::Egress),
            "ingress" => Ok(Direction::Ingress),
            "both" => Ok(Direction::Both),
            _ => Err(invalid(
                "--direction",
                format!("`{s}` must be egress, ingress or both"),
            )),
        }
    }
}

/// Which packets a fault touches. `remote` CIDRs are the far end (the destination of egress
/// packets, the source of ingress ones), `local` the near end, so `--dest X --direction both`
/// cuts X off in both directions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub netns: NetnsRef,
    /// Empty until the engine resolves it: the interface of the namespace's default route.
    pub interface: String,
    pub remote: Vec<Cidr>,
    pub local: Vec<Cidr>,
    pub ports: Vec<PortRange>,
    pub protocol: Protocol,
    pub direction: Direction,
    /// Replace a root qdisc another tool put on the interface (snapshotted, restored on revert).
    #[serde(default)]
    pub force: bool,
}

impl Target {
    /// No network target: for kinds that are not network faults.
    pub fn none() -> Self {
        Target {
            netns: NetnsRef::Current,
            interface: String::new(),
            remote: Vec::new(),
            local: Vec::new(),
            ports: Vec::new(),
            protocol: Protocol::All,
            direction: Direction::Egress,
            force: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultSpec {
    pub kind: FaultKind,
    pub target: Target,
    #[serde(with = "duration_ms")]
    pub duration: Duration,
}

pub const DEFAULT_DURATION: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(3600);
/// The longest delay (and jitter) a fault may ask for, in milliseconds: ten minutes.
pub const MAX_DELAY_MS: f64 = 600_000.0;

/// What a fault does and to what, for the lines a person reads during an incident:
/// `loss 5% on eth0 (netns /run/netns/web) to 10.0.0.1/32 port 443 egress`. Every kind is
/// matched here, so a new one cannot be printed as something else.
/// `, named /REGEX/` when a name filter is set.
fn named(f: &mut fmt::Formatter<'_>, name: &str) -> fmt::Result {
    if name.is_empty() {
        Ok(())
    } else {
        write!(f, " named /{name}/")
    }
}

/// `1500` as `1.5s`, `250` as `250ms`, `60000` as `60s`.
fn format_millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}s", ms as f64 / 1000.0)
    }
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pct = |p: f64| format!("{}%", p);
        match &self.kind {
            FaultKind::Loss {
                percent,
                correlation,
            } => {
                write!(f, "loss {}", pct(*percent))?;
                if *correlation > 0.0 {
                    write!(f, " (correlation {})", pct(*correlation))?;
                }
            }
            FaultKind::Corrupt { percent } => write!(f, "corrupt {}", pct(*percent))?,
            FaultKind::Partition => write!(f, "partition")?,
            FaultKind::Latency {
                ms,
                jitter_ms,
                per_destination,
                ..
            } => {
                write!(f, "latency {ms} ms")?;
                if *jitter_ms > 0.0 {
                    write!(f, " ± {jitter_ms} ms")?;
                }
                if !per_destination.is_empty() {
                    write!(f, " (+{} per-destination delays)", per_destination.len())?;
                }
            }
            FaultKind::Reorder { percent, ms, .. } => {
                write!(f, "reorder {} (the rest delayed {ms} ms)", pct(*percent))?
            }
            FaultKind::Duplicate { percent } => write!(f, "duplicate {}", pct(*percent))?,
            FaultKind::Bandwidth { bytes_per_sec } => {
                write!(f, "bandwidth {}", format_rate(*bytes_per_sec))?
            }
            FaultKind::Dns { mode, domains } => {
                write!(f, "dns {}", mode.name())?;
                if !domains.is_empty() {
                    let names: Vec<String> = domains.iter().map(|d| d.to_string()).collect();
                    write!(f, " for {}", names.join(","))?;
                }
            }
            FaultKind::Cpu {
                workers,
                load_percent,
                cgroup,
            } => return write!(f, "cpu {workers} x {} in {cgroup}", pct(*load_percent)),
            FaultKind::ContainerKill {
                pod,
                container,
                signal,
            } => {
                let which = if container.is_empty() {
                    "every container"
                } else {
                    container
                };
                return write!(
                    f,
                    "container-kill SIG{} to {which} of pod {pod}",
                    signal.name()
                );
            }
            FaultKind::ProcessPause { target, name } => {
                write!(f, "process-pause of {target}")?;
                return named(f, name);
            }
            FaultKind::ProcessKill {
                target,
                name,
                signal,
                interval_ms,
            } => {
                write!(f, "process-kill SIG{} to {target}", signal.name())?;
                named(f, name)?;
                if *interval_ms > 0 {
                    write!(f, ", every {}", format_millis(*interval_ms))?;
                }
                return Ok(());
            }
            FaultKind::DiskFill {
                path, level, mount, ..
            } => return write!(f, "disk-fill of {path}{mount} {level}"),
            FaultKind::ClockSkew {
                target,
                name,
                offset_ns,
                drift_ppm,
                clocks,
            } => {
                write!(f, "clock-skew {} of {target}", format_offset(*offset_ns))?;
                named(f, name)?;
                if *drift_ppm != 0 {
                    write!(f, ", drifting {drift_ppm:+} ppm")?;
                }
                let names: Vec<&str> = clocks.iter().map(|c| c.name()).collect();
                return write!(f, " ({})", names.join(","));
            }
            FaultKind::Memory {
                size,
                workers,
                cgroup,
                ramp_ms,
                oom,
            } => {
                match size {
                    MemorySize::Bytes(b) => write!(f, "memory {}", format_size(*b))?,
                    MemorySize::Percent(p) => write!(f, "memory {p} % of the limit")?,
                }
                write!(f, " in {workers} worker(s) in {cgroup}")?;
                if *ramp_ms > 0 {
                    write!(f, ", ramped over {}", format_millis(*ramp_ms))?;
                }
                if *oom {
                    write!(f, ", OOM killer allowed")?;
                }
                return Ok(());
            }
        }
        let t = &self.target;
        write!(
            f,
            " on {}",
            if t.interface.is_empty() {
                "the default route's interface"
            } else {
                &t.interface
            }
        )?;
        if t.netns != NetnsRef::Current {
            write!(f, " ({})", t.netns)?;
        }
        let list = |v: &[Cidr]| {
            v.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        if !t.remote.is_empty() {
            write!(f, " to {}", list(&t.remote))?;
        }
        if !t.local.is_empty() {
            write!(f, " from {}", list(&t.local))?;
        }
        if t.protocol != Protocol::All {
            write!(f, " {}", format!("{:?}", t.protocol).to_lowercase())?;
        }
        if !t.ports.is_empty() {
            let ports: Vec<String> = t.ports.iter().map(|p| p.to_string()).collect();
            write!(f, " port {}", ports.join(","))?;
        }
        write!(f, " {}", format!("{:?}", t.direction).to_lowercase())
    }
}

/// `--ms`: milliseconds as a number, or with a unit people type anyway (`500ms`, `0.5s`).
pub fn parse_millis(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (t, 1.0)
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .map(|v| v * scale)
        .ok_or_else(|| format!("`{s}` is not a number of milliseconds (500, 500ms or 0.5s)"))
}

/// `--percent`: a number, with or without `%`.
pub fn parse_percent(s: &str) -> Result<f64, String> {
    let t = s.trim();
    t.strip_suffix('%')
        .unwrap_or(t)
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| format!("`{s}` is not a percentage (5 or 5%)"))
}

/// A rate as people say it, in bits: 125000 bytes/s is `1 Mbit/s`.
pub fn format_rate(bytes_per_sec: u64) -> String {
    let bits = bytes_per_sec as f64 * 8.0;
    let (v, unit) = [(1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")]
        .into_iter()
        .find(|(scale, _)| bits >= *scale)
        .map_or((bits, "bit/s"), |(scale, u)| (bits / scale, u));
    let v = (v * 100.0).round() / 100.0;
    format!("{v} {unit}")
}

impl FaultSpec {
    /// Checks everything that can be checked without the kernel.
    pub fn validate(&self, max_duration: Duration) -> Result<(), InvalidInput> {
        check_cidr_count("--dest", self.target.remote.len())?;
        check_cidr_count("--source", self.target.local.len())?;
        let percent = |field: &'static str, p: f64| {
            if p.is_finite() && (0.0..=100.0).contains(&p) {
                Ok(())
            } else {
                Err(invalid(
                    field,
                    format!("must be between 0 and 100 (got {p})"),
                ))
            }
        };
        let delay_ms = |ms: f64| {
            if ms.is_finite() && ms > 0.0 && ms <= MAX_DELAY_MS {
                Ok(())
            } else {
                Err(invalid(
                    "--ms",
                    format!("must be greater than 0 and at most {MAX_DELAY_MS} (got {ms})"),
                ))
            }
        };
        match self.kind {
            FaultKind::Loss {
                percent: p,
                correlation,
            } => {
                percent("--percent", p)?;
                percent("--correlation", correlation)?;
            }
            FaultKind::Corrupt { percent: p } => percent("--percent", p)?,
            FaultKind::Partition => {}
            FaultKind::Latency {
                ms,
                jitter_ms,
                correlation,
                distribution,
                ref backend,
                ref per_destination,
            } => {
                delay_ms(ms)?;
                if !(jitter_ms.is_finite() && (0.0..=MAX_DELAY_MS).contains(&jitter_ms)) {
                    return Err(invalid(
                        "--jitter-ms",
                        format!("must be between 0 and {MAX_DELAY_MS} (got {jitter_ms})"),
                    ));
                }
                if (*backend == LatencyBackend::Edt || !per_destination.is_empty())
                    && self.target.direction != Direction::Egress
                {
                    return Err(invalid(
                        "--direction",
                        "the edt backend delays egress only (ingress latency uses netem, through an IFB device)",
                    ));
                }
                let uses_netem_only =
                    jitter_ms > 0.0 || distribution.is_some() || correlation > 0.0;
                if *backend == LatencyBackend::Edt && uses_netem_only {
                    return Err(invalid(
                        "--backend",
                        "edt gives constant delays: --jitter-ms, --correlation and --distribution need netem",
                    ));
                }
                if !per_destination.is_empty()
                    && (*backend == LatencyBackend::Netem || uses_netem_only)
                {
                    return Err(invalid(
                        "--dest-ms",
                        "per-destination delays need the edt backend (no jitter, correlation or distribution)",
                    ));
                }
                if distribution.is_some() && jitter_ms == 0.0 {
                    return Err(invalid(
                        "--distribution",
                        "needs --jitter-ms greater than 0 (it shapes the jitter)",
                    ));
                }
                percent("--correlation", correlation)?;
            }
            FaultKind::Reorder {
                percent: p,
                ms,
                correlation,
            } => {
                percent("--percent", p)?;
                percent("--correlation", correlation)?;
                delay_ms(ms)?;
            }
            FaultKind::Duplicate { percent: p } => {
                percent("--percent", p)?;
            }
            FaultKind::Bandwidth { bytes_per_sec } => {
                if bytes_per_sec == 0 {
                    return Err(invalid("--rate", "must be greater than 0"));
                }
            }
            FaultKind::Dns { ref domains, .. } => {
                if self.target.direction != Direction::Egress {
                    return Err(invalid(
                        "--direction",
                        "dns acts on queries leaving the interface (egress): target the client's interface",
                    ));
                }
                if domains.len() > chaos_abi::MAX_DNS_PATTERNS as usize {
                    return Err(invalid(
                        "--domain",
                        format!("at most {} patterns", chaos_abi::MAX_DNS_PATTERNS),
                    ));
                }
                if self.target.protocol == Protocol::Icmp {
                    return Err(invalid("--protocol", "dns queries travel over udp or tcp"));
                }
            }
            FaultKind::Cpu {
                workers,
                load_percent,
                ref cgroup,
            } => {
                if !(1..=MAX_CPU_WORKERS).contains(&workers) {
                    return Err(invalid(
                        "--workers",
                        format!("must be between 1 and {MAX_CPU_WORKERS} (got {workers})"),
                    ));
                }
                if !(load_percent.is_finite() && (1.0..=100.0).contains(&load_percent)) {
                    return Err(invalid(
                        "--load",
                        format!(
                            "must be between 1 and 100 percent of one CPU (got {load_percent})"
                        ),
                    ));
                }
                cgroup.validate()?;
            }
            FaultKind::ContainerKill {
                ref pod,
                ref container,
                ..
            } => {
                check_pod_uid("--pod-uid", pod)?;
                let id_like =
                    container.len() >= 12 && container.bytes().all(|b| b.is_ascii_hexdigit());
                if !container.is_empty() && !id_like {
                    return Err(invalid(
                        "--container-id",
                        format!("`{container}` must be a container id (at least 12 hex digits)"),
                    ));
                }
            }
            FaultKind::ProcessPause {
                ref target,
                ref name,
            } => {
                target.validate()?;
                name_pattern(name)?;
            }
            FaultKind::ClockSkew {
                ref target,
                ref name,
                offset_ns,
                drift_ppm,
                ref clocks,
            } => {
                target.validate()?;
                name_pattern(name)?;
                if !(-MAX_DRIFT_PPM..=MAX_DRIFT_PPM).contains(&drift_ppm) {
                    return Err(invalid(
                        "--drift-ppm",
                        format!(
                            "must be between -{MAX_DRIFT_PPM} and {MAX_DRIFT_PPM} (got {drift_ppm})"
                        ),
                    ));
                }
                if offset_ns == 0 && drift_ppm == 0 {
                    return Err(invalid(
                        "--offset",
                        "moves nothing: give a non-zero --offset or --drift-ppm",
                    ));
                }
                let longest = i64::try_from(LONGEST_DURATION.as_nanos()).unwrap_or(i64::MAX);
                if offset_ns.unsigned_abs() > longest.unsigned_abs() {
                    return Err(invalid(
                        "--offset",
                        format!("must be within ±{}", format_duration(LONGEST_DURATION)),
                    ));
                }
                if clocks.is_empty() {
                    return Err(invalid(
                        "--clocks",
                        "name at least one of realtime, tai, monotonic, boottime",
                    ));
                }
            }
            FaultKind::Memory {
                size,
                workers,
                ref cgroup,
                ramp_ms,
                ..
            } => {
                if !(1..=MAX_MEMORY_WORKERS).contains(&workers) {
                    return Err(invalid(
                        "--workers",
                        format!("must be between 1 and {MAX_MEMORY_WORKERS} (got {workers})"),
                    ));
                }
                match size {
                    MemorySize::Bytes(0) => {
                        return Err(invalid("--bytes", "must be greater than 0"));
                    }
                    MemorySize::Percent(p) if !(p.is_finite() && p > 0.0 && p <= 100.0) => {
                        return Err(invalid(
                            "--percent",
                            format!("must be greater than 0 and at most 100 (got {p})"),
                        ));
                    }
                    _ => {}
                }
                if Duration::from_millis(ramp_ms) > self.duration {
                    return Err(invalid(
                        "--ramp",
                        "is longer than the fault's --duration; the memory would never be all held",
                    ));
                }
                cgroup.validate()?;
            }
            FaultKind::DiskFill {
                ref path,
                level,
                ref mount,
                ..
            } => {
                if !path.starts_with('/')
                    || path.contains('\0')
                    || path.len() > 4096
                    || path.split('/').any(|c| c == "..")
                {
                    return Err(invalid(
                        "--path",
                        format!("`{path}` must be an absolute directory path (no ..)"),
                    ));
                }
                match level {
                    FillLevel::Percent(p) if !(p.is_finite() && p > 0.0 && p <= 100.0) => {
                        return Err(invalid(
                            "--fill-percent",
                            format!("must be greater than 0 and at most 100 (got {p})"),
                        ));
                    }
                    FillLevel::Bytes(0) => {
                        return Err(invalid("--bytes", "must be greater than 0"));
                    }
                    _ => {}
                }
                match mount {
                    MountRef::Pid(0) => {
                        return Err(invalid("--pid", "must be a process id greater than 0"));
                    }
                    MountRef::Pod(uid) => check_pod_uid("--pod-uid", uid)?,
                    _ => {}
                }
            }
            FaultKind::ProcessKill {
                ref target,
                ref name,
                interval_ms,
                ..
            } => {
                target.validate()?;
                name_pattern(name)?;
                let min = MIN_KILL_INTERVAL.as_millis() as u64;
                if interval_ms > 0 && interval_ms < min {
                    return Err(invalid(
                        "--every",
                        format!("must be at least {min}ms (got {interval_ms}ms)"),
                    ));
                }
                if Duration::from_millis(interval_ms) > self.duration {
                    return Err(invalid(
                        "--every",
                        format!(
                            "{} is longer than the fault's --duration {}; it would never repeat",
                            format_millis(interval_ms),
                            format_millis(self.duration.as_millis() as u64)
                        ),
                    ));
                }
            }
        }
        self.validate_duration(max_duration)?;
        if !self.kind.is_network() {
            return Ok(());
        }
        if self.target.force && !self.kind.shapes() {
            return Err(invalid(
                "--force",
                format!(
                    "only shaping faults replace a root qdisc; {} needs no --force",
                    self.kind.name()
                ),
            ));
        }
        let iface = &self.target.interface;
        // Empty: the engine picks the default route's interface in the target namespace.
        if iface.len() > 15 || iface.contains(['/', ' ', '\0']) {
            return Err(invalid(
                "--interface",
                format!("`{iface}` is not an interface name"),
            ));
        }
        if let NetnsRef::Pid(0) = self.target.netns {
            return Err(invalid("--pid", "must be a process id greater than 0"));
        }
        Ok(())
    }

    fn validate_duration(&self, max_duration: Duration) -> Result<(), InvalidInput> {
        if self.duration.is_zero() {
            return Err(invalid("--duration", "must be greater than 0"));
        }
        if self.duration > max_duration {
            return Err(invalid(
                "--duration",
                format!(
                    "must be at most {} (the agent's maximum; got {})",
                    format_duration(max_duration),
                    format_duration(self.duration)
                ),
            ));
        }
        Ok(())
    }
}

/// Parses a rate as tc does: `1mbit`, `500kbit`, `10gbit`, `100bit` (bits per second, decimal
/// prefixes) or `1mbps`, `64kbps` (bytes per second). Returns bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, InvalidInput> {
    let bad = || {
        invalid(
            "--rate",
            format!("`{s}` must look like 1mbit, 500kbit, 10gbit or 2mbps"),
        )
    };
    let lower = s.trim().to_ascii_lowercase();
    let split = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (num, unit) = lower.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let bits_per_sec = match unit {
        "bit" => n,
        "kbit" => n * 1e3,
        "mbit" => n * 1e6,
        "gbit" => n * 1e9,
        "tbit" => n * 1e12,
        "bps" => n * 8.0,
        "kbps" => n * 8e3,
        "mbps" => n * 8e6,
        "gbps" => n * 8e9,
        _ => return Err(bad()),
    };
    let bytes = (bits_per_sec / 8.0).round();
    if !(1.0..=1e13).contains(&bytes) {
        return Err(invalid(
            "--rate",
            format!("`{s}` must be between 8bit and 80tbit"),
        ));
    }
    Ok(bytes as u64)
}

/// A `key=value` label (agents' `--label`, chaosctl's `--selector`); the error is clap's value
/// message.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("`{s}` must be key=value")),
    }
}

/// Parses `500ms`, `30s`, `5m`, `1h`, `1m30s`. A bare number is refused: its unit is a guess.
pub fn parse_duration(s: &str) -> Result<Duration, InvalidInput> {
    let bad = || {
        invalid(
            "--duration",
            format!("`{s}` must look like 30s, 5m, 1h30m or 500ms"),
        )
    };
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            _ => return Err(bad()),
        };
        total = total.saturating_add(unit);
        rest = &rest[unit_len..];
    }
    // A bound for every duration anyone gives us, so none overflows a sum or a cast to
    // milliseconds on its way (a u64-max hour count once reached an agent wrapped to 29 s).
    if total > LONGEST_DURATION {
        return Err(invalid(
            "--duration",
            format!(
                "`{}` is longer than {}, the longest duration accepted",
                s.chars().take(40).collect::<String>(),
                format_duration(LONGEST_DURATION)
            ),
        ));
    }
    Ok(total)
}

/// The longest duration any field accepts (a year and a day); agents cap faults far lower.
pub const LONGEST_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}s", ms / 1000)
    }
}

mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Parses repeated CIDR flags, naming the flag in errors.
pub fn parse_cidrs(field: &'static str, values: &[String]) -> Result<Vec<Cidr>, InvalidInput> {
    check_cidr_count(field, values.len())?;
    values
        .iter()
        .map(|v| {
            v.parse::<Cidr>().map_err(|e| InvalidInput {
                field,
                rule: e.rule,
            })
        })
        .collect()
}

/// One fault's CIDRs on one end fit the kernel's table (which the faults on an interface share).
fn check_cidr_count(field: &'static str, n: usize) -> Result<(), InvalidInput> {
    if n > chaos_abi::MAX_CIDRS as usize {
        return Err(invalid(
            field,
            format!("at most {} CIDRs per fault (got {n})", chaos_abi::MAX_CIDRS),
        ));
    }
    Ok(())
}

pub fn parse_ports(values: &[String]) -> Result<Vec<PortRange>, InvalidInput> {
    values.iter().map(|v| v.parse()).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn offsets_read_with_a_sign_and_write_back_alike() {
        assert_eq!(parse_offset("--offset", "2h").unwrap(), 7_200_000_000_000);
        assert_eq!(parse_offset("--offset", "+90s").unwrap(), 90_000_000_000);
        assert_eq!(
            parse_offset("--offset", "-30m").unwrap(),
            -1_800_000_000_000
        );
        assert_eq!(
            parse_offset("--offset", "30d").unwrap(),
            30 * 86_400 * 1_000_000_000
        );
        assert_eq!(format_offset(-1_800_000_000_000), "-30m");
        assert_eq!(format_offset(1_500_000_000), "+1500ms");
        let e = parse_offset("--offset", "--5s").unwrap_err();
        assert_eq!(e.field, "--offset");
        assert!(
            parse_offset("--offset", "400d").is_err(),
            "beyond the longest duration"
        );
    }

    #[test]
    fn clock_skew_refusals_name_the_field() {
        let spec = |offset_ns, drift_ppm, target| FaultSpec {
            kind: FaultKind::ClockSkew {
                target,
                name: String::new(),
                offset_ns,
                drift_ppm,
                clocks: vec![SkewedClock::Realtime],
            },
            target: Target::none(),
            duration: Duration::from_secs(10),
        };
        let field = |s: FaultSpec| s.validate(Duration::from_secs(3600)).unwrap_err().field;
        assert_eq!(field(spec(0, 0, ProcessRef::Pid(42))), "--offset");
        assert_eq!(
            field(spec(1, 2_000_000, ProcessRef::Pid(42))),
            "--drift-ppm"
        );
        assert_eq!(field(spec(1, 0, ProcessRef::Pid(1))), "--pid");
        assert_eq!(
            field(spec(1, 0, ProcessRef::Cgroup("/".into()))),
            "--cgroup"
        );
        assert!(
            spec(-1, 0, ProcessRef::Pid(42))
                .validate(Duration::from_secs(3600))
                .is_ok()
        );
        assert_eq!("tai".parse::<SkewedClock>().unwrap(), SkewedClock::Tai);
        assert_eq!("utc".parse::<SkewedClock>().unwrap_err().field, "--clocks");
    }

    #[test]
    fn error_lines_escape_control_characters_and_stop_at_the_limit() {
        assert_eq!(one_line("plain", 10), "plain");
        assert_eq!(one_line("a\nb\tc", 10), "a\\nb\\tc");
        assert_eq!(one_line(&"é".repeat(300), 9), "éééé...");
        let e = invalid(
            "--pod-uid",
            format!("`{}` must be a UUID", "x\n".repeat(100_000)),
        );
        let line = e.to_string();
        assert!(
            !line.contains('\n') && line.len() < ERROR_LINE_MAX + 40,
            "{line}"
        );
    }

    use super::*;

    #[test]
    fn cidrs() {
        assert_eq!("10.0.0.0/8".parse::<Cidr>().unwrap().prefix, 8);
        assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().prefix, 32);
        assert_eq!("fd00:213::/64".parse::<Cidr>().unwrap().prefix, 64);
        assert!("10.0.0.1/8".parse::<Cidr>().is_err(), "host bits");
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("banana".parse::<Cidr>().is_err());
        let many: Vec<String> = (0..=chaos_abi::MAX_CIDRS)
            .map(|i| format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255))
            .collect();
        let e = parse_cidrs("--source", &many).unwrap_err();
        assert_eq!(e.field, "--source");
        assert_eq!(e.rule, "at most 65536 CIDRs per fault (got 65537)");
        assert_eq!(
            parse_cidrs("--dest", &many[1..]).map(|c| c.len()),
            Ok(65_536)
        );
        let e = parse_cidrs("--dest", &["1.2.3.4/40".into()]).unwrap_err();
        assert_eq!(e.field, "--dest");
    }

    #[test]
    fn ports() {
        assert_eq!(
            "80".parse::<PortRange>().unwrap(),
            PortRange {
                first: 80,
                last: 80
            }
        );
        assert_eq!(
            "1-65535".parse::<PortRange>().unwrap(),
            PortRange {
                first: 1,
                last: 65535
            }
        );
        assert!("0".parse::<PortRange>().is_err());
        assert!("65536".parse::<PortRange>().is_err());
        assert!("90-80".parse::<PortRange>().is_err());
        assert!("http".parse::<PortRange>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        for bad in ["", "30", "s", "1x", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        // Huge values are refused with the limit named, never saturated or wrapped.
        for huge in [
            "18446744073709551615s",
            "18446744073709551615h",
            "8785h",
            "99999999999999999999s",
        ] {
            let e = parse_duration(huge).unwrap_err();
            assert!(
                e.rule.contains("8784h") || e.rule.contains("must look like"),
                "{huge}: {}",
                e.rule
            );
        }
        assert_eq!(parse_duration("8784h").unwrap(), LONGEST_DURATION);
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(300)), "5m");
    }

    fn spec(kind: FaultKind, duration: Duration) -> FaultSpec {
        FaultSpec {
            kind,
            target: Target {
                netns: NetnsRef::Current,
                interface: "veth0".into(),
                remote: vec![],
                local: vec![],
                ports: vec![],
                protocol: Protocol::All,
                direction: Direction::Egress,
                force: false,
            },
            duration,
        }
    }

    #[test]
    fn validation_names_the_field() {
        let max = DEFAULT_MAX_DURATION;
        let s = spec(
            FaultKind::Loss {
                percent: 150.0,
                correlation: 0.0,
            },
            DEFAULT_DURATION,
        );
        assert_eq!(s.validate(max).unwrap_err().field, "--percent");
        let s = spec(
            FaultKind::Loss {
                percent: 10.0,
                correlation: -1.0,
            },
            DEFAULT_DURATION,
        );
        assert_eq!(s.validate(max).unwrap_err().field, "--correlation");
        let s = spec(FaultKind::Corrupt { percent: f64::NAN }, DEFAULT_DURATION);
        assert_eq!(s.validate(max).unwrap_err().field, "--percent");
        let s = spec(FaultKind::Partition, Duration::ZERO);
        assert_eq!(s.validate(max).unwrap_err().field, "--duration");
        let s = spec(FaultKind::Partition, max + Duration::from_secs(1));
        assert_eq!(s.validate(max).unwrap_err().field, "--duration");
        assert!(spec(FaultKind::Partition, max).validate(max).is_ok());
        let mut s = spec(FaultKind::Partition, DEFAULT_DURATION);
        s.target.interface = "a-very-long-interface-name".into();
        assert_eq!(s.validate(max).unwrap_err().field, "--interface");
    }

    #[test]
    fn numbers_take_the_units_people_type() {
        assert_eq!(parse_millis("500"), Ok(500.0));
        assert_eq!(parse_millis("500ms"), Ok(500.0));
        assert_eq!(parse_millis("0.5s"), Ok(500.0));
        assert!(
            parse_millis("5m")
                .unwrap_err()
                .contains("number of milliseconds")
        );
        assert!(parse_millis("inf").is_err());
        assert_eq!(parse_percent("5%"), Ok(5.0));
        assert_eq!(parse_percent("12.5"), Ok(12.5));
        assert!(parse_percent("five").unwrap_err().contains("percentage"));
        assert_eq!(format_rate(parse_rate("1mbps").unwrap()), "8 Mbit/s");
        assert_eq!(format_rate(parse_rate("500kbit").unwrap()), "500 kbit/s");
    }

    #[test]
    fn cpu_validation() {
        let max = DEFAULT_MAX_DURATION;
        let cpu = |workers, load_percent, cgroup| FaultSpec {
            kind: FaultKind::Cpu {
                workers,
                load_percent,
                cgroup,
            },
            target: Target::none(),
            duration: DEFAULT_DURATION,
        };
        let path = || CgroupRef::Path("/chaos/pod1".into());
        assert!(
            cpu(1, 50.0, path()).validate(max).is_ok(),
            "no interface needed"
        );
        assert!(
            cpu(MAX_CPU_WORKERS, 100.0, CgroupRef::Pid(1))
                .validate(max)
                .is_ok()
        );
        let field = |s: FaultSpec| s.validate(max).unwrap_err().field;
        assert_eq!(field(cpu(0, 50.0, path())), "--workers");
        assert_eq!(field(cpu(MAX_CPU_WORKERS + 1, 50.0, path())), "--workers");
        assert_eq!(field(cpu(1, 0.5, path())), "--load");
        assert_eq!(field(cpu(1, f64::NAN, path())), "--load");
        assert_eq!(field(cpu(1, 101.0, path())), "--load");
        assert_eq!(field(cpu(1, 50.0, CgroupRef::Pid(0))), "--pid");
        for bad in ["chaos", "/a/../b", "/a/./b"] {
            assert_eq!(field(cpu(1, 50.0, CgroupRef::Path(bad.into()))), "--cgroup");
        }
        assert_eq!(
            CgroupRef::from_flags(None, None, None).unwrap_err().field,
            "--cgroup"
        );
        assert_eq!(
            CgroupRef::from_flags(Some("/a"), Some(1), None)
                .unwrap_err()
                .field,
            "--cgroup"
        );
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1mbit").unwrap(), 125_000);
        assert_eq!(parse_rate("10Gbit").unwrap(), 1_250_000_000);
        assert_eq!(parse_rate("2mbps").unwrap(), 2_000_000);
        assert_eq!(parse_rate("1.5mbit").unwrap(), 187_500);
        for bad in ["", "10", "mbit", "1 mbit", "1xbit", "0mbit", "-1mbit"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn edt_is_egress_only_and_force_only_for_shaping() {
        let mut s = spec(
            FaultKind::Latency {
                ms: 100.0,
                jitter_ms: 0.0,
                correlation: 0.0,
                distribution: None,
                backend: LatencyBackend::Auto,
                per_destination: vec![],
            },
            DEFAULT_DURATION,
        );
        assert!(s.validate(DEFAULT_MAX_DURATION).is_ok());
        s.target.direction = Direction::Both;
        assert!(s.validate(DEFAULT_MAX_DURATION).is_ok(), "netem via IFB");
        if let FaultKind::Latency { backend, .. } = &mut s.kind {
            *backend = LatencyBackend::Edt;
        }
        assert_eq!(
            s.validate(DEFAULT_MAX_DURATION).unwrap_err().field,
            "--direction"
        );
        let mut p = spec(FaultKind::Partition, DEFAULT_DURATION);
        p.target.force = true;
        assert_eq!(
            p.validate(DEFAULT_MAX_DURATION).unwrap_err().field,
            "--force"
        );
        let s = spec(
            FaultKind::Latency {
                ms: 0.0,
                jitter_ms: 0.0,
                correlation: 0.0,
                distribution: None,
                backend: LatencyBackend::Auto,
                per_destination: vec![],
            },
            DEFAULT_DURATION,
        );
        assert_eq!(s.validate(DEFAULT_MAX_DURATION).unwrap_err().field, "--ms");
    }

    #[test]
    fn netns_names() {
        assert_eq!(
            NetnsRef::named("a").unwrap(),
            NetnsRef::Path("/run/netns/a".into())
        );
        assert_eq!(
            NetnsRef::named("/x/y").unwrap(),
            NetnsRef::Path("/x/y".into())
        );
    }
}
