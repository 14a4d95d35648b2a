//! A Kubernetes pod's processes, network namespace and cgroups, found from its UID alone by
//! reading /proc/*/cgroup: no CRI socket, so it works the same with containerd, CRI-O and
//! Docker (cri-dockerd), with the cgroupfs and the systemd cgroup drivers, on cgroup v1 and v2.
//!
//! Kubelet names a pod's cgroup after its UID: `pod<uid>` with the cgroupfs driver
//! (`/kubepods/burstable/pod6f1c.../<container id>`), `kubepods-<qos>-pod<uid with _>.slice`
//! with the systemd driver (`.../kubepods-burstable-pod6f1c_....slice/cri-containerd-<id>.scope`).
//! The pod segment may sit anywhere in the path (kind, k3d and nested runtimes add prefixes).
//!
//! For the network namespace the pod's sandbox ("pause") process is preferred: it lives as
//! long as the pod, so a fault entered through it survives container restarts.
use crate::spec::{FaultSpec, InvalidInput, NetnsRef, invalid};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use chaos_spec::pod::{PodError, PodUid};

/// Where a cgroup path puts a process relative to a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPath {
    /// The pod's own cgroup (everything up to and including the pod segment).
    pub pod_cgroup: String,
    /// The container's id when the process sits in a container's cgroup below the pod's.
    pub container: Option<String>,
}

/// Whether `path` (one line's path of /proc/PID/cgroup) is inside pod `uid`'s cgroup.
pub fn match_path(path: &str, uid: &PodUid) -> Option<PodPath> {
    let dashed = format!("pod{}", uid.as_str());
    let underscored = format!("pod{}.slice", uid.as_str().replace('-', "_"));
    let segments: Vec<&str> = path.split('/').collect();
    let i = segments.iter().position(|s| {
        *s == dashed || (s.contains("kubepods") && s.ends_with(&format!("-{underscored}")))
    })?;
    let container = segments.get(i + 1).and_then(|s| container_id(s));
    Some(PodPath {
        pod_cgroup: segments[..=i].join("/"),
        container,
    })
}

/// A container id from its cgroup's name: `<64 hex>` (cgroupfs), `cri-containerd-<id>.scope`,
/// `crio-<id>.scope`, `docker-<id>.scope`. CRI-O's `crio-conmon-<id>.scope` is the monitor,
/// not the container.
fn container_id(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
        .iter()
        .find_map(|p| s.strip_prefix(p))
        .unwrap_or(s);
    (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

/// One process of the pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProcess {
    pub pid: u32,
    pub comm: String,
    /// Start time (clock ticks after boot, /proc/PID/stat field 22).
    pub start: u64,
    pub container: Option<String>,
}

/// What a scan found for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub uid: PodUid,
    pub processes: Vec<PodProcess>,
    /// The pod's cgroup in each hierarchy, keyed by the hierarchy's controllers as
    /// /proc/PID/cgroup names them ("" for v2, "cpu,cpuacct", ...).
    pub cgroups: BTreeMap<String, String>,
}

/// How the netns process was chosen, for logs and dry runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// The pod's sandbox (pause) process: survives container restarts.
    Sandbox,
    /// No pause process (a VM sandbox, a runtime without one): the pod's oldest process.
    Oldest,
}

impl Pod {
    /// The process whose network namespace is the pod's.
    pub fn netns_process(&self) -> (&PodProcess, Anchor) {
        if let Some(p) = self
            .processes
            .iter()
            .filter(|p| p.comm == "pause")
            .min_by_key(|p| p.start)
        {
            return (p, Anchor::Sandbox);
        }
        // Scans only return pods with at least one process.
        let oldest = self
            .processes
            .iter()
            .min_by_key(|p| (p.start, p.pid))
            .unwrap_or(&self.processes[0]);
        (oldest, Anchor::Oldest)
    }

    /// The pod's network namespace file.
    pub fn netns_path(&self, proc_root: &Path) -> (PathBuf, Anchor) {
        let (p, a) = self.netns_process();
        (proc_root.join(p.pid.to_string()).join("ns/net"), a)
    }

    /// The pod's own cgroup path: the v2 one, else the one of the hierarchy with the cpu
    /// controller (kubelet uses one path in every hierarchy).
    pub fn cgroup(&self) -> &str {
        self.cgroups
            .get("")
            .or_else(|| {
                self.cgroups
                    .iter()
                    .find(|(k, _)| k.split(',').any(|c| c == "cpu"))
                    .map(|(_, v)| v)
            })
            .or_else(|| self.cgroups.values().next())
            .map(String::as_str)
            .unwrap_or("/")
    }

    /// Container processes (not the sandbox), grouped by container id.
    pub fn containers(&self) -> BTreeMap<String, Vec<u32>> {
        let mut out: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for p in &self.processes {
            if let Some(c) = p.container.as_ref().filter(|_| p.comm != "pause") {
                out.entry(c.clone()).or_default().push(p.pid);
            }
        }
        out
    }
}

fn start_time(proc_root: &Path, pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// [`scan`] for a UID as a spec carries it, with errors that name the spec's field.
pub fn scan_uid(proc_root: &Path, uid: &str) -> Result<Pod, InvalidInput> {
    let field = "--pod-uid";
    let uid: PodUid = uid
        .parse()
        .map_err(|e: PodError| invalid(field, e.to_string()))?;
    scan(proc_root, &uid).map_err(|e| invalid(field, e.to_string()))
}

/// Resolves a pod target to its sandbox process, so the engine and its journal deal in a
/// process (whose namespace outlives container restarts) and never see a pod again.
pub fn resolve(mut spec: FaultSpec, proc_root: &Path) -> Result<FaultSpec, InvalidInput> {
    if let NetnsRef::Pod(uid) = &spec.target.netns {
        let pod = scan_uid(proc_root, uid)?;
        let (p, anchor) = pod.netns_process();
        tracing::info!(pod = %uid, pid = p.pid, comm = %p.comm, ?anchor, "pod netns");
        spec.target.netns = NetnsRef::Pid(p.pid);
    }
    Ok(spec)
}

/// Scans `proc_root` (normally /proc, the host's with hostPID) for pod `uid`'s processes.
pub fn scan(proc_root: &Path, uid: &PodUid) -> Result<Pod, PodError> {
    let entries = std::fs::read_dir(proc_root)
        .map_err(|e| PodError::Io(proc_root.display().to_string(), e.to_string()))?;
    let mut pod = Pod {
        uid: uid.clone(),
        processes: vec![],
        cgroups: BTreeMap::new(),
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go during a scan: unreadable ones are skipped.
        let Ok(text) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        let mut found: Option<PodPath> = None;
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), Some(c)) => (a, b, c),
                _ => continue,
            };
            if let Some(m) = match_path(path, uid) {
                pod.cgroups
                    .entry(controllers.to_string())
                    .or_insert_with(|| m.pod_cgroup.clone());
                if found.as_ref().is_none_or(|f| f.container.is_none()) {
                    found = Some(m);
                }
            }
        }
        let Some(m) = found else { continue };
        let comm = std::fs::read_to_string(entry.path().join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        pod.processes.push(PodProcess {
            pid,
            comm,
            start: start_time(proc_root, pid).unwrap_or(u64::MAX),
            container: m.container,
        });
    }
    if pod.processes.is_empty() {
        return Err(PodError::NotFound(uid.to_string()));
    }
    pod.processes.sort_by_key(|p| p.pid);
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6f1c2a3b-0d4e-4f5a-8b6c-7d8e9f0a1b2c";
    const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn uid() -> PodUid {
        UID.parse().unwrap()
    }

    #[test]
    fn uids_are_checked_and_canonical() {
        assert_eq!(uid().to_string(), UID);
        let under: PodUid = UID.replace('-', "_").to_uppercase().parse().unwrap();
        assert_eq!(under, uid());
        for bad in [
            "",
            "pod6f1c",
            "6f1c2a3b-0d4e-4f5a-8b6c",
            "6f1c2a3b-0d4e-4f5a-8b6c-7d8e9f0a1b2x",
            "../../etc",
        ] {
            assert_eq!(
                bad.parse::<PodUid>(),
                Err(PodError::BadUid(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn real_world_layouts_match_and_lookalikes_do_not() {
        let u = UID.replace('-', "_");
        let yes = |path: String, pod: String, container: Option<&str>| {
            let want = PodPath {
                pod_cgroup: pod,
                container: container.map(str::to_string),
            };
            assert_eq!(match_path(&path, &uid()), Some(want), "{path}");
        };
        // cgroupfs driver: burstable, best effort, guaranteed (no QoS directory), the pod itself.
        for qos in ["burstable/", "besteffort/", ""] {
            let pod = format!("/kubepods/{qos}pod{UID}");
            yes(format!("{pod}/{CID}"), pod.clone(), Some(CID));
            yes(pod.clone(), pod, None);
        }
        // systemd driver: containerd, CRI-O, Docker (cri-dockerd).
        let slice =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice");
        yes(
            format!("{slice}/cri-containerd-{CID}.scope"),
            slice.clone(),
            Some(CID),
        );
        yes(
            format!("{slice}/crio-{CID}.scope"),
            slice.clone(),
            Some(CID),
        );
        yes(
            format!("{slice}/docker-{CID}.scope"),
            slice.clone(),
            Some(CID),
        );
        // CRI-O's monitor sits in the pod but is no container.
        yes(
            format!("{slice}/crio-conmon-{CID}.scope"),
            slice.clone(),
            None,
        );
        let guaranteed = format!("/kubepods.slice/kubepods-pod{u}.slice");
        yes(
            format!("{guaranteed}/cri-containerd-{CID}.scope"),
            guaranteed.clone(),
            Some(CID),
        );
        // Nested: a kind/k3d node in Docker, kubelet.slice prefixes.
        let nested = format!("/docker/{CID}/kubepods/burstable/pod{UID}");
        yes(format!("{nested}/{CID}"), nested.clone(), Some(CID));
        let kubelet = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{u}.slice"
        );
        yes(
            format!("{kubelet}/cri-containerd-{CID}.scope"),
            kubelet.clone(),
            Some(CID),
        );
        // Lookalikes: a pod whose uid extends this one, a prefix, a uid in a unit name.
        for no in [
            format!("/kubepods/burstable/pod{UID}0/{CID}"),
            format!("/kubepods/burstable/xpod{UID}/{CID}"),
            format!("/system.slice/pod{UID}.service"),
            format!("/kubepods.slice/kubepods-pod{u}0.slice/cri-containerd-{CID}.scope"),
            "/user.slice/user-0.slice/session-1.scope".to_string(),
        ] {
            assert_eq!(match_path(&no, &uid()), None, "{no}");
        }
    }
}
