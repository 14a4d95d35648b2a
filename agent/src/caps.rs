//! What this kernel can do, detected rather than assumed (invariant 6). Qdisc kinds are probed
//! by creating one in a throwaway network namespace on a thread of its own.
use crate::netlink;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Feature {
    pub name: &'static str,
    pub present: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Backend {
    pub name: &'static str,
    pub available: bool,
    pub fault_kinds: Vec<&'static str>,
    /// Why it is unavailable and how to get it.
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Capabilities {
    pub arch: &'static str,
    pub kernel: String,
    pub features: Vec<Feature>,
    pub backends: Vec<Backend>,
}

impl Capabilities {
    pub fn has(&self, name: &str) -> bool {
        self.features.iter().any(|f| f.name == name && f.present)
    }
}

/// The kinds a backend runs, from the table of kinds.
fn kinds_on(backend: &str) -> Vec<&'static str> {
    crate::spec::KINDS
        .iter()
        .filter(|k| k.backends.contains(&backend))
        .map(|k| k.name)
        .collect()
}

/// Whether the kernel has a qdisc (or clsact) kind, probed in a throwaway namespace of its own:
/// a kind that exists leaves its qdisc on that namespace's `lo`, which would make the next
/// probe fail with EEXIST.
pub fn probe(kind: &'static str) -> Result<bool, String> {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("unshare(CLONE_NEWNET): {e}"))?;
        if kind == "clsact" {
            return Ok(aya::programs::tc::qdisc_add_clsact("lo").is_ok());
        }
        netlink::qdisc_kind_exists(kind).map_err(|e| format!("probe {kind}: {e}"))
    })
    .join()
    .unwrap_or_else(|_| Err("probe thread panicked".into()))
}

/// [`probe`], once per process: the backend choice for every latency fault asks.
pub fn has_qdisc(kind: &'static str) -> bool {
    static NETEM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    static FQ: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let cell = match kind {
        "netem" => &NETEM,
        "fq" => &FQ,
        _ => return probe(kind).unwrap_or(false),
    };
    *cell.get_or_init(|| probe(kind).unwrap_or(false))
}

/// Whether a tc program's bpf_redirect can feed an IFB device: before Linux 6.4 the redirect
/// does not mark the packet as redirected and IFB drops it (fixed by "bpf: Set skb redirect and
/// from_ingress info in __bpf_tx_skb").
/// `CHAOS_INGRESS_MIRRED=1` takes the older kernels' way on any kernel (tests of it).
pub fn has_ingress_redirect() -> bool {
    use aya::util::KernelVersion;
    std::env::var_os("CHAOS_INGRESS_MIRRED").is_none()
        && KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 4, 0))
}

pub fn detect() -> Capabilities {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut features = Vec::new();
    let tcx = crate::datapath::has_tcx();
    features.push(Feature {
        name: "tcx",
        present: tcx,
        detail: "BPF links on tc hooks (kernel >= 6.6)".into(),
    });
    features.push(Feature {
        name: "bpf_redirect_ifb",
        present: has_ingress_redirect(),
        detail: "bpf_redirect into an IFB for ingress shaping (kernel >= 6.4; before, a cls_bpf filter with a mirred action does it)"
            .into(),
    });
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    features.push(Feature {
        name: "btf",
        present: btf,
        detail: "/sys/kernel/btf/vmlinux".into(),
    });

    for name in ["clsact", "netem", "fq", "tbf", "htb"] {
        let (present, detail) = match probe(name) {
            Ok(present) if name == "clsact" => (
                present,
                "sch_ingress: clsact hooks for tc BPF filters".to_string(),
            ),
            Ok(present) => (present, format!("qdisc sch_{name}")),
            Err(e) => (false, format!("not probed: {e}")),
        };
        features.push(Feature {
            name,
            present,
            detail,
        });
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let v1: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup")).then(|| f.get(1).copied().unwrap_or(""))
        })
        .collect();
    let v2 = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"));
    features.push(Feature {
        name: "cgroup-v1",
        present: !v1.is_empty(),
        detail: format!("{} controllers mounted", v1.len()),
    });
    features.push(Feature {
        name: "cgroup-v2",
        present: v2.is_some(),
        detail: v2
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("not mounted")
            .to_string(),
    });

    let mut caps = Capabilities {
        arch: std::env::consts::ARCH,
        kernel,
        features,
        backends: Vec::new(),
    };
    let ebpf = |name, present: bool, missing: &str| Backend {
        name,
        available: present,
        fault_kinds: kinds_on(name),
        reason: if present {
            String::new()
        } else {
            missing.to_string()
        },
    };
    caps.backends.push(ebpf(
        "ebpf/tcx",
        caps.has("tcx"),
        "needs kernel >= 6.6 (clsact is used instead)",
    ));
    caps.backends.push(ebpf(
        "ebpf/clsact",
        caps.has("clsact"),
        "sch_ingress missing: modprobe sch_ingress cls_bpf (CONFIG_NET_SCH_INGRESS)",
    ));
    // Shaping: our HTB root with a netem leaf (latency, jitter) or a rate (bandwidth).
    let missing = |module: &str| {
        format!(
            "{module} missing: modprobe {module}, or install the distro's extra kernel modules package"
        )
    };
    let (has_netem, has_htb) = (caps.has("netem"), caps.has("htb"));
    caps.backends.push(Backend {
        name: "htb+netem",
        available: has_netem && has_htb,
        fault_kinds: kinds_on("htb+netem"),
        reason: if !has_htb {
            missing("sch_htb")
        } else if !has_netem {
            missing("sch_netem")
        } else {
            String::new()
        },
    });
    caps.backends.push(Backend {
        name: "htb",
        available: has_htb,
        fault_kinds: kinds_on("htb"),
        reason: if has_htb {
            String::new()
        } else {
            missing("sch_htb")
        },
    });
    let has_fq = caps.has("fq");
    caps.backends.push(Backend {
        name: "edt/fq",
        available: has_fq,
        fault_kinds: kinds_on("edt/fq"),
        reason: if has_fq {
            String::new()
        } else {
            missing("sch_fq")
        },
    });
    // CPU stress needs somewhere to put its workers: any mounted cgroup hierarchy.
    let cgroups = caps.has("cgroup-v1") || caps.has("cgroup-v2");
    let no_cgroups = "no cgroup hierarchy is mounted (mount cgroup2 on /sys/fs/cgroup)";
    caps.backends.push(Backend {
        name: "stress",
        available: cgroups,
        fault_kinds: kinds_on("stress"),
        reason: if cgroups {
            String::new()
        } else {
            no_cgroups.to_string()
        },
    });
    // A whole cgroup is frozen by the v2 freezer (cgroup.freeze, in every non-root v2 cgroup)
    // or the v1 freezer controller; without either, process-pause uses SIGSTOP.
    let hierarchies = crate::cgroup::hierarchies().unwrap_or_default();
    let freezer = hierarchies
        .iter()
        .any(|h| h.v2 || h.controllers.iter().any(|c| c == "freezer"));
    caps.backends.push(Backend {
        name: "freezer",
        available: freezer,
        fault_kinds: kinds_on("freezer"),
        reason: if freezer {
            String::new()
        } else {
            "neither cgroup2 nor the v1 freezer is mounted (process-pause falls back to SIGSTOP)"
                .to_string()
        },
    });
    // disk-fill needs nothing but a filesystem (fallocate, or writes where it is missing).
    caps.backends.push(Backend {
        name: "fallocate",
        available: true,
        fault_kinds: kinds_on("fallocate"),
        reason: String::new(),
    });
    // clock-skew needs room for its stub in the vDSO; a locked-down kernel refuses
    // bpf_probe_write_user, so there only the vDSO's reads move.
    let room = crate::clock::room();
    let writable = crate::clock::writes_allowed();
    caps.backends.push(Backend {
        name: "vdso+bpf",
        available: room.is_ok(),
        fault_kinds: kinds_on("vdso+bpf"),
        reason: match (room, crate::clock::lockdown()) {
            (Err(e), _) => e,
            (Ok(()), Some(mode)) if !writable => format!(
                "the kernel is locked down ({mode}): reads through the vDSO move, direct \
                 system calls keep true time"
            ),
            _ => String::new(),
        },
    });
    // Signals reach a pod's containers through the pod's cgroup.
    caps.backends.push(Backend {
        name: "signal",
        available: cgroups,
        fault_kinds: kinds_on("signal"),
        reason: if cgroups {
            String::new()
        } else {
            no_cgroups.to_string()
        },
    });
    caps
}
