//! The eBPF datapath: loads one copy of `chaos.bpf.o` per fault, fills its maps from the
//! fault's target and attaches its classifiers to the target interface.
//!
//! Everything here that names an interface runs inside the target namespace (the caller puts
//! it on a [`crate::netns::Netns`] thread); map reads and TCX link fds work from any thread.
use crate::qdisc::{self, Netem, Shape, ShapeError, Snapshot};
use crate::spec::{FaultKind, FaultSpec, InvalidInput, LatencyBackend, invalid};
use aya::programs::links::Link as _;
use aya::programs::tc::{SchedClassifierLink, TcHandle};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use chaos_abi::{
    ACTION_CORRUPT, ACTION_DELAY, ACTION_DNS, ACTION_DROP, ACTION_NONE, ACTION_STEER, Endpoint,
    FAMILY_V4, FAMILY_V6, MATCH_DNS_NAMES, MATCH_PORTS, PROBABILITY_ONE, Rule,
};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, OnceLock};

/// The datapath object, built by `cargo xtask build-ebpf` and checked against its sources.
static OBJECT: &[u8] = aya::include_bytes_aligned!("../../agent-ebpf/chaos.bpf.o");

/// Filters we add to a clsact qdisc carry this handle, so they are recognisably ours.
pub const CLSACT_HANDLE: u32 = 0xC4A0_0001;
/// Our clsact priorities start here: below 49152 (the kernel's first automatic priority) so we
/// run before filters added without a priority.
pub const CLSACT_PRIORITY_BASE: u16 = 0x0C00;

/// The clsact priority of the classifier of the engine in registry slot `engine_slot`; its
/// mirred filter (ingress shaping before 6.4) is the next one. Two per engine, so engines never
/// share a (priority, handle) and none can replace or remove another's filter.
pub fn clsact_priority(engine_slot: u16) -> u16 {
    CLSACT_PRIORITY_BASE + 2 * engine_slot.min(crate::registry::SLOTS - 1)
}

/// Our IFB devices are named `chifb` and a hash of the interface they shape the ingress of.
pub const IFB_PREFIX: &str = "chifb";

/// How an engine attaches its classifiers: the mode, and its own clsact priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attach {
    pub mode: AttachMode,
    pub priority: u16,
}

/// The registry slot whose engine a clsact priority of ours belongs to; `None` outside our range.
pub fn slot_of_priority(priority: u16) -> Option<u16> {
    let offset = priority.checked_sub(CLSACT_PRIORITY_BASE)?;
    (offset < 2 * crate::registry::SLOTS).then_some(offset / 2)
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error(transparent)]
    Shape(#[from] ShapeError),
    #[error("{context}: {message}")]
    Kernel { context: String, message: String },
    #[error("{0}")]
    Unsupported(String),
    /// A kernel table of ours has no room left; the message names the limit.
    #[error("{0}")]
    Full(String),
    /// A journal named a kernel object that is not ours (by our marks): nothing was done.
    #[error("{0}")]
    NotOurs(String),
}

pub(crate) fn kernel(
    context: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error>) -> DatapathError {
    let context = context.into();
    move |e| {
        // aya's errors nest the useful part (the verifier log, errno) in their sources.
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        DatapathError::Kernel { context, message }
    }
}

macro_rules! ctx {
    ($e:expr, $($arg:tt)+) => {
        $e.map_err(|e| kernel(format!($($arg)+))(Box::new(e)))
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    Egress,
    Ingress,
}

impl Hook {
    /// The hooks a direction attaches to, egress first.
    pub fn for_direction(direction: crate::spec::Direction) -> impl Iterator<Item = Hook> {
        [
            (direction.egress(), Hook::Egress),
            (direction.ingress(), Hook::Ingress),
        ]
        .into_iter()
        .filter_map(|(on, hook)| on.then_some(hook))
    }

    pub(crate) fn attach_type(self) -> TcAttachType {
        match self {
            Hook::Egress => TcAttachType::Egress,
            Hook::Ingress => TcAttachType::Ingress,
        }
    }
    pub fn program(self) -> &'static str {
        match self {
            Hook::Egress => "chaos_egress",
            Hook::Ingress => "chaos_ingress",
        }
    }
}

/// TCX links are owned by a file descriptor and die with the process (kernel >= 6.6); clsact
/// filters persist and must be removed by us, which the journal makes possible after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttachMode {
    Tcx,
    Clsact,
}

impl AttachMode {
    pub fn detect() -> Self {
        if has_tcx() {
            AttachMode::Tcx
        } else {
            AttachMode::Clsact
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Tcx => "ebpf/tcx",
            AttachMode::Clsact => "ebpf/clsact",
        }
    }
}

/// TCX (BPF links on tc hooks) arrived in Linux 6.6.
pub fn has_tcx() -> bool {
    use aya::util::KernelVersion;
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

/// The names of the programs attached to `interface`'s TCX `hook`, whoever attached them, found
/// with BPF_PROG_QUERY (`tc filter show` does not list TCX links, nor does Debian 12's bpftool).
/// Empty on kernels without TCX. Must run inside the interface's namespace.
pub fn tcx_programs(interface: &str, hook: Hook) -> Result<Vec<String>, DatapathError> {
    if !has_tcx() {
        return Ok(Vec::new());
    }
    let (_, programs) = ctx!(
        SchedClassifier::query_tcx(interface, hook.attach_type()),
        "query tcx {} programs of {interface}",
        hook.program()
    )?;
    Ok(programs
        .iter()
        .map(|p| p.name_as_str().unwrap_or("?").to_string())
        .collect())
}

/// The ids and names of every loaded BPF program of ours (`chaos_*`; the kernel keeps 15
/// characters of a name, so `chaos_ingress_mirred` reads `chaos_ingress_m`), machine-wide.
pub fn loaded_chaos_programs() -> Result<Vec<(u32, String)>, DatapathError> {
    let mut found = Vec::new();
    for info in aya::programs::loaded_programs() {
        let info = ctx!(info, "list loaded BPF programs")?;
        if let Some(name) = info.name_as_str()
            && name.starts_with("chaos_")
        {
            found.push((info.id(), name.to_string()));
        }
    }
    Ok(found)
}

/// BPF links (TCX or any other kind), machine-wide, whose program is one of ours.
pub fn chaos_links() -> Result<usize, DatapathError> {
    let ours: Vec<u32> = loaded_chaos_programs()?
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    let mut n = 0;
    for info in aya::programs::loaded_links() {
        // A link released between listing and opening it is gone: not ours to count.
        let Ok(info) = info else { continue };
        if ours.contains(&info.program_id()) {
            n += 1;
        }
    }
    Ok(n)
}

/// Enough to find and remove one attachment without the process that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub interface: String,
    pub hook: Hook,
    pub mode: AttachMode,
    /// clsact only: where our filter sits.
    pub priority: u16,
    pub handle: u32,
    /// clsact only: we added the clsact qdisc, so we remove it again.
    pub created_clsact: bool,
}

/// A device carrying our root qdisc: the target interface (egress), or the IFB device its
/// ingress traffic is redirected through. Faults on one device share the root, one class each.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShapingSite {
    pub device: String,
    /// Set when `device` is an IFB we created to shape this interface's ingress.
    pub ifb_for: Option<String>,
}

impl ShapingSite {
    /// The site that shapes `hook` traffic of `interface`. The IFB's name is derived from the
    /// interface's (FNV-1a), so a later run finds it again; it fits IFNAMSIZ.
    pub fn for_hook(interface: &str, hook: Hook) -> Self {
        match hook {
            Hook::Egress => ShapingSite {
                device: interface.to_string(),
                ifb_for: None,
            },
            Hook::Ingress => {
                let hash = interface.bytes().fold(0x811c_9dc5u32, |h, b| {
                    (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
                });
                ShapingSite {
                    device: format!("{IFB_PREFIX}{hash:08x}"),
                    ifb_for: Some(interface.to_string()),
                }
            }
        }
    }
}

/// What to do about a site's root qdisc when a fault is installed there.
#[derive(Debug, Clone)]
pub enum RootPlan {
    /// Another fault of this engine already put our root there.
    Share,
    /// Put our root in place of the kernel's default (creating the IFB first for ingress).
    Create,
    /// Replace another tool's tree, snapshotted (and journaled) beforehand (`--force`).
    Replace(Snapshot),
}

/// Removes a site's root once its last fault is gone: our root qdisc, the tree it replaced put
/// back, the IFB deleted if we made it. Must run inside the target namespace. Missing is fine.
pub fn remove_site(site: &ShapingSite, replaced: Option<&Snapshot>) -> Result<(), DatapathError> {
    let context = || format!("remove the root qdisc of {}", site.device);
    if let Some(interface) = &site.ifb_for {
        if !is_our_ifb(site, interface)? {
            return Err(DatapathError::NotOurs(format!(
                "{} is not an IFB of ours (named for {interface}, with our root or none): left in place",
                site.device
            )));
        }
        return crate::netlink::link_del(&site.device)
            .map_err(|e| kernel(format!("delete {}", site.device))(Box::new(e)));
    }
    qdisc::remove_root(&site.device, replaced).map_err(|e| kernel(context())(Box::new(e)))
}

/// Whether `site.device` is a device we may delete: an IFB, under the name we derive from
/// `interface`, carrying our root or none (created, then its owner died before the root went
/// on). Journals are files anyone with access can write; a device is never deleted on a
/// journal's word alone. A device that is gone already counts as ours (nothing to delete).
fn is_our_ifb(site: &ShapingSite, interface: &str) -> Result<bool, DatapathError> {
    if ShapingSite::for_hook(interface, Hook::Ingress).device != site.device {
        return Ok(false);
    }
    match crate::netlink::link_kind(&site.device) {
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(true),
        Err(e) => return Err(kernel(format!("link {}", site.device))(Box::new(e))),
        Ok(kind) if kind.as_deref() != Some("ifb") => return Ok(false),
        Ok(_) => {}
    }
    Ok(!matches!(
        qdisc::root(&site.device)?,
        qdisc::Root::Foreign { .. }
    ))
}

/// The foreign root tree of `device`, snapshotted and proven restorable, for `--force`; `None`
/// if the root there is not someone else's. Must run inside the target namespace.
pub fn snapshot_foreign(device: &str) -> Result<Option<Snapshot>, DatapathError> {
    if !matches!(qdisc::root(device)?, qdisc::Root::Foreign { .. }) {
        return Ok(None);
    }
    let ifindex = crate::netlink::ifindex(device)
        .map_err(|e| kernel(format!("interface {device}"))(Box::new(e)))?;
    let snapshot =
        Snapshot::take(ifindex).map_err(|e| kernel(format!("snapshot {device}"))(Box::new(e)))?;
    snapshot.rehearse().map_err(|e| {
        DatapathError::Shape(ShapeError::Unrestorable {
            interface: device.to_string(),
            reason: e.to_string(),
        })
    })?;
    Ok(Some(snapshot))
}

/// Where the classifier sends a shaping fault's matched packets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Steering {
    pub classid: u32,
    /// The IFB ingress traffic is redirected to (0: none).
    pub redirect_ifindex: u32,
}

/// Packets netem may hold: 500 ms at ~20,000 packets/s without tail drops that would pose as
/// loss. (iproute2's default is 1,000.)
const NETEM_LIMIT: u32 = 10_000;

/// Whether a latency fault uses EDT: asked for, or needed (per-destination delays), or the
/// only way on this kernel (no netem, fq present, and nothing that needs netem).
fn uses_edt(kind: &FaultKind, has: impl Fn(&'static str) -> bool) -> Result<bool, DatapathError> {
    let FaultKind::Latency {
        jitter_ms,
        correlation,
        distribution,
        backend,
        per_destination,
        ..
    } = kind
    else {
        return Ok(false);
    };
    let needs_netem = *jitter_ms > 0.0 || *correlation > 0.0 || distribution.is_some();
    Ok(match backend {
        LatencyBackend::Edt => true,
        LatencyBackend::Netem => false,
        LatencyBackend::Auto if !per_destination.is_empty() => true,
        LatencyBackend::Auto if has("netem") || needs_netem => false,
        LatencyBackend::Auto if has("fq") => true,
        LatencyBackend::Auto => {
            return Err(ShapeError::Missing {
                kind: "netem (or sch_fq for the EDT backend)",
            }
            .into());
        }
    })
}

/// The shaping a kind needs, if any, with the latency backend resolved against this kernel.
pub fn shape_for(kind: &FaultKind) -> Result<Option<Shape>, DatapathError> {
    if uses_edt(kind, crate::caps::has_qdisc)? {
        return Ok(Some(Shape::Fq));
    }
    Ok(match *kind {
        FaultKind::Latency {
            ms,
            jitter_ms,
            correlation,
            distribution,
            ..
        } => Some(Shape::Netem(Netem {
            latency_ns: (ms * 1e6).round() as u64,
            jitter_ns: (jitter_ms * 1e6).round() as u64,
            delay_correlation: correlation,
            distribution,
            limit: NETEM_LIMIT,
            ..Netem::default()
        })),
        FaultKind::Reorder {
            percent,
            ms,
            correlation,
        } => Some(Shape::Netem(Netem {
            latency_ns: (ms * 1e6).round() as u64,
            reorder: percent,
            reorder_correlation: correlation,
            limit: NETEM_LIMIT,
            ..Netem::default()
        })),
        FaultKind::Duplicate { percent } => Some(Shape::Netem(Netem {
            duplicate: percent,
            limit: NETEM_LIMIT,
            ..Netem::default()
        })),
        FaultKind::Bandwidth { bytes_per_sec } => Some(Shape::Rate(bytes_per_sec)),
        _ => None,
    })
}

pub use chaos_spec::Counters;

/// Translate a spec into the rule the datapath evaluates, given the shaping chosen for it and
/// its deadline on the kernel's clock (CLOCK_MONOTONIC ns).
pub fn rule_for(
    spec: &FaultSpec,
    shape: Option<&Shape>,
    steering: Steering,
    deadline_ns: u64,
) -> Rule {
    let mut match_flags = 0;
    if !ports_of(spec).is_empty() {
        match_flags |= MATCH_PORTS;
    }
    let mut dns_rcode = 0;
    if let FaultKind::Dns { mode, domains } = &spec.kind {
        dns_rcode = mode.rcode();
        if !domains.is_empty() {
            match_flags |= MATCH_DNS_NAMES;
        }
    }
    let fraction = |percent: f64| ((percent / 100.0) * PROBABILITY_ONE as f64).round() as u64;
    let (action, after_hit, after_miss) = match spec.kind {
        FaultKind::Loss {
            percent,
            correlation,
        } => {
            // Two-state Markov chain with mean p and lag-1 correlation c (see chaos_abi::Rule).
            let (p, c) = (percent / 100.0, correlation / 100.0);
            (
                ACTION_DROP,
                fraction(100.0 * (p + c * (1.0 - p))),
                fraction(100.0 * p * (1.0 - c)),
            )
        }
        FaultKind::Corrupt { percent } => (ACTION_CORRUPT, fraction(percent), fraction(percent)),
        FaultKind::Partition => (ACTION_DROP, PROBABILITY_ONE, PROBABILITY_ONE),
        FaultKind::Dns { .. } => (ACTION_DNS, PROBABILITY_ONE, PROBABILITY_ONE),
        FaultKind::Latency { .. }
        | FaultKind::Bandwidth { .. }
        | FaultKind::Reorder { .. }
        | FaultKind::Duplicate { .. } => (ACTION_STEER, PROBABILITY_ONE, PROBABILITY_ONE),
        // Not a network fault: the engine never installs it here; a rule for it passes all.
        FaultKind::Cpu { .. }
        | FaultKind::ContainerKill { .. }
        | FaultKind::ProcessPause { .. }
        | FaultKind::ProcessKill { .. }
        | FaultKind::DiskFill { .. }
        | FaultKind::ClockSkew { .. }
        | FaultKind::Memory { .. } => (ACTION_NONE, 0, 0),
    };
    let (action, delay_ns) = match (shape, &spec.kind) {
        (Some(Shape::Fq), FaultKind::Latency { ms, .. }) => {
            (ACTION_DELAY, (ms * 1e6).round() as u64)
        }
        _ => (action, 0),
    };
    Rule {
        action,
        match_flags,
        probability_after_hit: after_hit.min(PROBABILITY_ONE),
        probability_after_miss: after_miss.min(PROBABILITY_ONE),
        delay_ns,
        classid: if action == ACTION_STEER {
            steering.classid
        } else {
            0
        },
        redirect_ifindex: if action == ACTION_STEER {
            steering.redirect_ifindex
        } else {
            0
        },
        dns_rcode,
        heartbeat_slot: 0,
        deadline_ns,
    }
}

/// The ports a fault matches: its own, or for DNS without any the DNS port.
pub(crate) fn ports_of(spec: &FaultSpec) -> Vec<crate::spec::PortRange> {
    match (&spec.kind, spec.target.ports.is_empty()) {
        (FaultKind::Dns { .. }, true) => vec![crate::spec::PortRange {
            first: 53,
            last: 53,
        }],
        _ => spec.target.ports.clone(),
    }
}

/// Where the IP header starts on this interface: after the Ethernet header, or at once on L3
/// devices. Also the check that the interface exists in the current namespace.
pub(crate) fn l3_offset(interface: &str) -> Result<u32, DatapathError> {
    let no_such = || {
        invalid(
            "--interface",
            format!("no interface `{interface}` in the target netns"),
        )
        .into()
    };
    // SAFETY: plain socket/ioctl with a zeroed, NUL-terminated ifreq we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(kernel("socket")(Box::new(std::io::Error::last_os_error())));
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr
            .ifr_name
            .iter_mut()
            .zip(interface.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        // The request type differs between libcs (c_ulong on glibc, c_int on musl).
        let rc = libc::ioctl(fd, libc::SIOCGIFHWADDR as _, &mut ifr);
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(if err.raw_os_error() == Some(libc::ENODEV) {
                no_such()
            } else {
                kernel(format!("link type of {interface}"))(Box::new(err))
            });
        }
        match ifr.ifr_ifru.ifru_hwaddr.sa_family {
            libc::ARPHRD_ETHER | libc::ARPHRD_LOOPBACK => Ok(14),
            libc::ARPHRD_NONE
            | libc::ARPHRD_PPP
            | libc::ARPHRD_TUNNEL
            | libc::ARPHRD_TUNNEL6
            | libc::ARPHRD_SIT
            | libc::ARPHRD_IPGRE => Ok(0),
            other => Err(invalid(
                "--interface",
                format!(
                    "`{interface}` has link type {other}; supported: Ethernet, loopback, L3 tunnels"
                ),
            )
            .into()),
        }
    }
}

pub fn endpoint(addr: SocketAddr) -> Endpoint {
    let mut e = Endpoint {
        port: addr.port(),
        ..Default::default()
    };
    match addr.ip() {
        IpAddr::V4(a) => {
            e.family = FAMILY_V4;
            e.addr[..4].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            e.family = FAMILY_V6;
            e.addr = a.octets();
        }
    }
    e
}

/// One loader for the process's life. `EbpfLoader::new` parses all of the kernel's BTF
/// (/sys/kernel/btf/vmlinux: ~28 MB of heap and ~50 ms) every time it is called, and our
/// object needs none of it: its programs read packets and their `__sk_buff`, never kernel
/// structures, so there is nothing to relocate (CO-RE). So the parse happens once, its result
/// is dropped at once, and every load after it reuses the loader. The object's own BTF is
/// still loaded into the kernel.
fn loader() -> &'static Mutex<EbpfLoader<'static>> {
    static LOADER: OnceLock<Mutex<EbpfLoader<'static>>> = OnceLock::new();
    LOADER.get_or_init(|| {
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        Mutex::new(loader)
    })
}

/// A fresh copy of the object with its maps created and both classifiers verified, not yet
/// attached anywhere. Loading and verifying is most of an apply's cost and needs no target, so
/// the engine keeps one ready (see `Engine::take_prepared`). Works in any namespace.
pub struct Prepared {
    ebpf: Ebpf,
}

impl Prepared {
    pub(crate) fn into_ebpf(self) -> Ebpf {
        self.ebpf
    }
}

/// Runs the `hook` classifier over `packet` `repeat` times in the kernel
/// (BPF_PROG_TEST_RUN) and returns the mean nanoseconds per run and the last verdict. For
/// benchmarks: the cost of the classifier alone, without any traffic or qdisc around it.
pub(crate) fn test_run(
    ebpf: &mut Ebpf,
    program: &str,
    packet: &[u8],
    repeat: u32,
) -> std::io::Result<(u32, i32)> {
    use std::os::fd::{AsFd, AsRawFd};
    let prog = loaded(ebpf, program).map_err(std::io::Error::other)?;
    let fd = prog
        .fd()
        .map_err(std::io::Error::other)?
        .as_fd()
        .as_raw_fd();
    // union bpf_attr, the `test` member (include/uapi/linux/bpf.h).
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&(fd as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(packet.as_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&repeat.to_ne_bytes());
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    // SAFETY: attr is a valid, zero-padded bpf_attr; data_in outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_TEST_RUN,
            attr.as_mut_ptr(),
            attr.len() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let retval = i32::from_ne_bytes(attr[4..8].try_into().unwrap_or_default());
    let duration = u32::from_ne_bytes(attr[36..40].try_into().unwrap_or_default());
    Ok((duration, retval))
}

pub fn prepare() -> Result<Prepared, DatapathError> {
    use aya::util::KernelVersion;
    // The rule walk is a bpf_loop (5.17): without it the verifier would refuse the classifier
    // with a message that names nothing a user can act on.
    if KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(5, 17, 0)) {
        return Err(DatapathError::Unsupported(
            "network faults need Linux 5.17 or later (the bpf_loop helper)".into(),
        ));
    }
    let loaded = loader()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .load(OBJECT);
    let mut ebpf = ctx!(loaded, "load chaos.bpf.o")?;
    for hook in [Hook::Egress, Hook::Ingress] {
        let prog = classifier(&mut ebpf, hook)?;
        ctx!(prog.load(), "load {} (verifier)", hook.program())?;
    }
    Ok(Prepared { ebpf })
}

/// The program `name`, loaded (verified) if it was not yet: the spare object loads the two
/// classifiers ahead of time, the mirred one is loaded when a fault needs it.
pub(crate) fn loaded<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    let prog: &mut SchedClassifier = ebpf
        .program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| DatapathError::Kernel {
            context: "chaos.bpf.o".into(),
            message: format!("has no classifier {name}"),
        })?;
    if prog.fd().is_err() {
        ctx!(prog.load(), "load {name} (verifier)")?;
    }
    Ok(prog)
}

fn classifier(ebpf: &mut Ebpf, hook: Hook) -> Result<&mut SchedClassifier, DatapathError> {
    ebpf.program_mut(hook.program())
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| DatapathError::Kernel {
            context: "chaos.bpf.o".into(),
            message: format!("has no classifier {}", hook.program()),
        })
}

/// Takes away what `install` put on these sites before it failed.
pub(crate) fn undo_sites(done: &[&(ShapingSite, RootPlan)], slot: u16) {
    for (site, plan) in done {
        let _ = qdisc::remove_class(&site.device, slot);
        match plan {
            RootPlan::Share => {}
            RootPlan::Create => {
                let _ = remove_site(site, None);
            }
            RootPlan::Replace(snapshot) => {
                let _ = remove_site(site, Some(snapshot));
            }
        }
    }
}

/// Puts the site's root in place if the plan says so, then the fault's class under it. On
/// failure, what this call created is gone again.
pub(crate) fn add_to_site(
    site: &ShapingSite,
    plan: &RootPlan,
    shape: &Shape,
    slot: u16,
) -> Result<(), DatapathError> {
    // Only what this call made is undone on failure: a root or IFB that was there already
    // (another engine's) is not ours to take away.
    let mut made_ifb = false;
    let replaced = match plan {
        RootPlan::Share => None,
        RootPlan::Create => {
            if site.ifb_for.is_some() {
                crate::netlink::ifb_add(&site.device).map_err(|e| match e.raw_os_error() {
                    Some(libc::EEXIST) => DatapathError::Shape(ShapeError::Busy {
                        interface: site.device.clone(),
                    }),
                    Some(libc::EOPNOTSUPP) => DatapathError::Shape(ShapeError::Missing {
                        kind: "ifb (for ingress shaping)",
                    }),
                    _ => kernel(format!("create IFB {}", site.device))(Box::new(e)),
                })?;
                made_ifb = true;
            }
            None
        }
        RootPlan::Replace(snapshot) => Some(snapshot),
    };
    let mut made_root = false;
    let result = (|| {
        if !matches!(plan, RootPlan::Share) {
            qdisc::install_root(&site.device, shape, replaced)?;
            made_root = true;
        }
        qdisc::add_class(&site.device, shape, slot)
    })();
    if let Err(e) = result {
        if made_root {
            let _ = remove_site(site, replaced);
        } else if made_ifb {
            let _ = crate::netlink::link_del(&site.device);
        }
        return Err(e.into());
    }
    Ok(())
}

/// Adds the clsact qdisc to `interface` if it has none. Returns whether it counts as ours to
/// remove: we made it, or only our filters are on it (another fault of ours made it; whichever
/// of us leaves it empty removes it).
pub(crate) fn ensure_clsact(interface: &str) -> Result<bool, DatapathError> {
    match aya::programs::tc::qdisc_add_clsact(interface) {
        Ok(()) => Ok(true),
        Err(e) if is_exists(&e) => Ok(crate::netlink::ifindex(interface)
            .and_then(crate::netlink::clsact_filter_handles)
            .is_ok_and(|h| !h.is_empty() && h.iter().all(|h| *h == CLSACT_HANDLE))),
        Err(e) => ctx!(Err(e), "add clsact qdisc to {interface}"),
    }
}

fn is_exists(e: &aya::programs::tc::TcError) -> bool {
    os_error(e) == Some(libc::EEXIST) || matches!(e, aya::programs::tc::TcError::AlreadyAttached)
}

/// Removes our clsact filters, then the clsact qdisc if we added it. Missing is fine: this also
/// runs for crash leftovers that may be half there. Must run inside the target namespace.
pub fn remove_clsact_attachments(records: &[AttachmentRecord]) -> Result<(), DatapathError> {
    let clsact = || records.iter().filter(|r| r.mode == AttachMode::Clsact);
    for record in clsact() {
        remove_filter(record)?;
    }
    for record in clsact().filter(|r| r.created_clsact) {
        crate::netlink::delete_clsact(&record.interface)
            .map_err(|e| kernel(format!("delete clsact on {}", record.interface))(Box::new(e)))?;
    }
    Ok(())
}

fn remove_filter(record: &AttachmentRecord) -> Result<(), DatapathError> {
    let link = match SchedClassifierLink::attached(
        &record.interface,
        record.hook.attach_type(),
        record.priority,
        TcHandle::from(record.handle),
        None,
    ) {
        Ok(link) => link,
        // The interface is gone, and its filters with it.
        Err(e)
            if e.raw_os_error() == Some(libc::ENODEV)
                || e.kind() == std::io::ErrorKind::NotFound =>
        {
            return Ok(());
        }
        Err(e) => return ctx!(Err(e), "find filter on {}", record.interface),
    };
    match link.detach() {
        Ok(()) => Ok(()),
        // ENOENT: no such filter; EINVAL: no clsact qdisc (so no filter) any more.
        Err(e)
            if matches!(
                os_error(&e),
                Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(kernel(format!("detach filter on {}", record.interface))(
            Box::new(e),
        )),
    }
}

fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && let Some(code) = io.raw_os_error()
        {
            return Some(code);
        }
        source = s.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Protocol;
    use crate::spec::{Direction, NetnsRef, Target};
    use chaos_abi::PortBitmap;
    use std::time::Duration;

    fn spec(kind: FaultKind) -> FaultSpec {
        FaultSpec {
            kind,
            target: Target {
                netns: NetnsRef::Current,
                interface: "eth0".into(),
                remote: vec![],
                local: vec!["10.0.0.1".parse().unwrap()],
                ports: vec![],
                protocol: Protocol::Udp,
                direction: Direction::Egress,
                force: false,
            },
            duration: Duration::from_secs(1),
        }
    }

    fn p(x: u64) -> f64 {
        x as f64 / PROBABILITY_ONE as f64
    }

    #[test]
    fn independent_loss_has_equal_chain_probabilities() {
        let r = rule_for(
            &spec(FaultKind::Loss {
                percent: 30.0,
                correlation: 0.0,
            }),
            None,
            Steering::default(),
            u64::MAX,
        );
        assert_eq!(r.action, ACTION_DROP);
        assert_eq!(r.probability_after_hit, r.probability_after_miss);
        assert!((p(r.probability_after_miss) - 0.3).abs() < 1e-9);
        assert_eq!(
            r.match_flags, 0,
            "CIDRs and protocol live in the table's sets and tries"
        );
    }

    #[test]
    fn correlated_loss_keeps_the_mean() {
        let r = rule_for(
            &spec(FaultKind::Loss {
                percent: 20.0,
                correlation: 75.0,
            }),
            None,
            Steering::default(),
            u64::MAX,
        );
        let (hit, miss) = (p(r.probability_after_hit), p(r.probability_after_miss));
        assert!((hit - 0.8).abs() < 1e-9, "P(l|l) = p + c(1-p)");
        assert!((miss - 0.05).abs() < 1e-9, "P(l|n) = p(1-c)");
        // Stationary loss probability of the chain: miss / (1 - hit + miss).
        assert!((miss / (1.0 - hit + miss) - 0.2).abs() < 1e-9);
    }

    #[test]
    fn edges() {
        let all = rule_for(
            &spec(FaultKind::Partition),
            None,
            Steering::default(),
            u64::MAX,
        );
        assert_eq!(
            (all.probability_after_hit, all.probability_after_miss),
            (PROBABILITY_ONE, PROBABILITY_ONE)
        );
        let full = rule_for(
            &spec(FaultKind::Loss {
                percent: 100.0,
                correlation: 100.0,
            }),
            None,
            Steering::default(),
            u64::MAX,
        );
        assert_eq!(full.probability_after_hit, PROBABILITY_ONE);
        let none = rule_for(
            &spec(FaultKind::Corrupt { percent: 0.0 }),
            None,
            Steering::default(),
            u64::MAX,
        );
        assert_eq!(
            (none.action, none.probability_after_miss),
            (ACTION_CORRUPT, 0)
        );
    }

    #[test]
    fn latency_backend_choice() {
        use crate::spec::DestDelay;
        let lat = |backend, jitter_ms, per_destination: Vec<DestDelay>| FaultKind::Latency {
            ms: 100.0,
            jitter_ms,
            correlation: 0.0,
            distribution: None,
            backend,
            per_destination,
        };
        let all = |_: &'static str| true;
        let fq_only = |k: &'static str| k == "fq";
        let neither = |_: &'static str| false;
        let dest: Vec<DestDelay> = vec!["10.0.0.5=250".parse().unwrap()];
        assert!(
            !uses_edt(&lat(LatencyBackend::Auto, 0.0, vec![]), all).unwrap(),
            "netem first"
        );
        assert!(
            uses_edt(&lat(LatencyBackend::Auto, 0.0, vec![]), fq_only).unwrap(),
            "fq when no netem"
        );
        assert!(
            !uses_edt(&lat(LatencyBackend::Auto, 5.0, vec![]), fq_only).unwrap(),
            "jitter needs netem"
        );
        assert!(
            uses_edt(&lat(LatencyBackend::Auto, 0.0, dest.clone()), all).unwrap(),
            "per destination"
        );
        assert!(uses_edt(&lat(LatencyBackend::Edt, 0.0, vec![]), all).unwrap());
        assert!(uses_edt(&lat(LatencyBackend::Auto, 0.0, vec![]), neither).is_err());
        let spec = FaultSpec {
            kind: lat(LatencyBackend::Edt, 0.0, dest),
            ..spec(FaultKind::Partition)
        };
        let r = rule_for(&spec, Some(&Shape::Fq), Steering::default(), u64::MAX);
        assert_eq!((r.action, r.delay_ns), (ACTION_DELAY, 100_000_000));
    }

    #[test]
    fn port_bitmap() {
        let mut b = PortBitmap::empty();
        b.set_range(6000, 6009);
        b.set_range(65535, 65535);
        assert!(b.contains(6000) && b.contains(6009) && b.contains(65535));
        assert!(!b.contains(5999) && !b.contains(6010) && !b.contains(0));
    }
}
