//! Where a process belongs: resolving a CPU fault's target (`--cgroup PATH` or `--pid PID`) to
//! directories in the mounted cgroup hierarchies.
//!
//! A host may mount the unified (v2) hierarchy, v1 hierarchies (one per controller set, e.g.
//! `cpu`, `cpuacct`, `memory`, `name=systemd`), or both ("hybrid": v1 controllers plus a
//! controllerless v2 hierarchy at `/sys/fs/cgroup/unified`). A target is resolved in every
//! hierarchy, so our workers sit beside the target in each one, as a process of the pod would.
use crate::spec::{CgroupRef, InvalidInput, invalid};
use std::path::{Path, PathBuf};

/// One mounted hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted.
    pub mount: PathBuf,
    /// The cgroup path the mount shows as its root (`/` unless a subtree is mounted, as in a
    /// container with a cgroup namespace it does not share).
    pub root: String,
    /// v1: the controllers (or `name=...`) this hierarchy carries; empty for v2.
    pub controllers: Vec<String>,
    pub v2: bool,
}

impl Hierarchy {
    /// The directory of cgroup `path` (as /proc/PID/cgroup names it) in this mount, if the
    /// mount shows it.
    fn dir_of(&self, path: &str) -> Option<PathBuf> {
        let rel = if self.root == "/" {
            path
        } else {
            let rest = path.strip_prefix(self.root.as_str())?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            rest
        };
        Some(self.mount.join(rel.trim_start_matches('/')))
    }

    pub fn name(&self) -> String {
        if self.v2 {
            "unified".into()
        } else {
            self.controllers.join(",")
        }
    }
}

/// A target resolved to directories: at most one in the v2 hierarchy, any number of v1 ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    pub v2: Option<PathBuf>,
    pub v1: Vec<PathBuf>,
}

impl Placement {
    pub fn is_empty(&self) -> bool {
        self.v2.is_none() && self.v1.is_empty()
    }

    pub fn dirs(&self) -> impl Iterator<Item = &PathBuf> {
        self.v2.iter().chain(self.v1.iter())
    }
}

/// The cgroup hierarchies mounted here, from /proc/self/mountinfo. (The first mount of a
/// hierarchy wins; bind mounts of the same one would only repeat it.)
pub fn hierarchies() -> std::io::Result<Vec<Hierarchy>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The v1 controllers the kernel knows (a v1 mount's super options list the ones it carries,
/// among flags like `rw`, `xattr`, `clone_children`).
const V1_CONTROLLERS: &[&str] = &[
    "cpuset",
    "cpu",
    "cpuacct",
    "blkio",
    "io",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "perf_event",
    "net_prio",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
    "debug",
];

fn parse_mountinfo(text: &str) -> Vec<Hierarchy> {
    let mut out: Vec<Hierarchy> = Vec::new();
    for line in text.lines() {
        // id parent major:minor root mount-point options [optional fields...] - fstype source super
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let right: Vec<&str> = right.split(' ').collect();
        let (Some(root), Some(mount), Some(fstype)) = (fields.get(3), fields.get(4), right.first())
        else {
            continue;
        };
        let h = match *fstype {
            "cgroup2" => Hierarchy {
                mount: PathBuf::from(unescape(mount)),
                root: unescape(root),
                controllers: Vec::new(),
                v2: true,
            },
            "cgroup" => {
                let mut controllers: Vec<String> = right
                    .get(2)
                    .copied()
                    .unwrap_or("")
                    .split(',')
                    .filter(|o| o.starts_with("name=") || V1_CONTROLLERS.contains(o))
                    .map(str::to_string)
                    .collect();
                controllers.sort();
                Hierarchy {
                    mount: PathBuf::from(unescape(mount)),
                    root: unescape(root),
                    controllers,
                    v2: false,
                }
            }
            _ => continue,
        };
        if !out
            .iter()
            .any(|o| o.v2 == h.v2 && o.controllers == h.controllers)
        {
            out.push(h);
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Resolves a target to the directories our workers join.
///
/// `Path`: the same path in every hierarchy where it exists (hierarchies where it does not
/// exist keep the workers where the engine is); a path that exists in none is bad input naming
/// `--cgroup`. `Pid`: that process's own cgroup in every hierarchy it is in (/proc/PID/cgroup),
/// root cgroups included, since a worker would otherwise stay in the engine's.
pub fn resolve(target: &CgroupRef) -> Result<Placement, InvalidInput> {
    let hierarchies = hierarchies()
        .map_err(|e| invalid("--cgroup", format!("cannot read /proc/self/mountinfo: {e}")))?;
    if hierarchies.is_empty() {
        return Err(invalid("--cgroup", "no cgroup hierarchy is mounted here"));
    }
    match target {
        CgroupRef::Path(path) => resolve_path(&hierarchies, path),
        CgroupRef::Pid(pid) => {
            let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .map_err(|_| invalid("--pid", format!("no process {pid}")))?;
            let placement = resolve_proc(&hierarchies, &text);
            if placement.is_empty() {
                return Err(invalid(
                    "--pid",
                    format!("process {pid} is in no cgroup mounted here"),
                ));
            }
            Ok(placement)
        }
        CgroupRef::Pod(uid) => {
            let pod = crate::pod::scan_uid(Path::new("/proc"), uid)?;
            resolve_path(&hierarchies, pod.cgroup())
        }
    }
}

fn resolve_path(hierarchies: &[Hierarchy], path: &str) -> Result<Placement, InvalidInput> {
    let mut placement = Placement::default();
    for h in hierarchies {
        let Some(dir) = h.dir_of(path) else { continue };
        if !dir.join("cgroup.procs").is_file() {
            continue;
        }
        if h.v2 {
            placement.v2 = Some(dir);
        } else {
            placement.v1.push(dir);
        }
    }
    if placement.is_empty() {
        let mounts: Vec<String> = hierarchies
            .iter()
            .map(|h| h.mount.display().to_string())
            .collect();
        return Err(invalid(
            "--cgroup",
            format!(
                "`{path}` exists in no cgroup hierarchy (looked under {})",
                mounts.join(", ")
            ),
        ));
    }
    Ok(placement)
}

fn resolve_proc(hierarchies: &[Hierarchy], text: &str) -> Placement {
    let mut placement = Placement::default();
    for line in text.lines() {
        // hierarchy-id:controller-list:path; v2 is "0::path".
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(ctrls), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let v2 = id == "0" && ctrls.is_empty();
        let mut want: Vec<String> = ctrls
            .split(',')
            .filter(|c| !c.is_empty())
            .map(str::to_string)
            .collect();
        want.sort();
        let Some(h) = hierarchies
            .iter()
            .find(|h| h.v2 == v2 && (v2 || h.controllers == want))
        else {
            continue;
        };
        let Some(dir) = h.dir_of(path) else { continue };
        if !dir.join("cgroup.procs").is_file() {
            continue;
        }
        if v2 {
            placement.v2 = Some(dir);
        } else {
            placement.v1.push(dir);
        }
    }
    placement
}

/// Moves `pid` into `dir` (its `cgroup.procs`).
pub fn join(dir: &Path, pid: u32) -> std::io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), pid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 30 0:22 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs ro,mode=755
25 24 0:23 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
26 24 0:24 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
27 24 0:25 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
28 24 0:26 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
29 24 0:27 /kubepods /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
30 24 0:28 / /sys/fs/cgroup/net\\040x rw,relatime - cgroup cgroup rw,net_cls,net_prio
";

    #[test]
    fn mountinfo() {
        let h = parse_mountinfo(HYBRID);
        assert_eq!(h.len(), 6);
        assert!(h[0].v2);
        assert_eq!(h[0].mount, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(h[1].controllers, ["cpu"]);
        assert_eq!(h[3].controllers, ["name=systemd"]);
        assert_eq!(h[4].root, "/kubepods");
        assert_eq!(h[5].mount, PathBuf::from("/sys/fs/cgroup/net x"));
        assert_eq!(h[5].controllers, ["net_cls", "net_prio"]);
    }

    #[test]
    fn dirs_respect_the_mount_root() {
        let h = parse_mountinfo(HYBRID);
        assert_eq!(
            h[1].dir_of("/chaos/pod1"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu/chaos/pod1"))
        );
        assert_eq!(h[1].dir_of("/"), Some(PathBuf::from("/sys/fs/cgroup/cpu")));
        assert_eq!(
            h[4].dir_of("/kubepods/pod1"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/pod1"))
        );
        assert_eq!(h[4].dir_of("/kubepodsx"), None);
        assert_eq!(h[4].dir_of("/other"), None);
    }
}
