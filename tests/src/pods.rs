//! Synthetic Kubernetes pods on this host: kubepods-style cgroup directories, created for real
//! in the v2 hierarchy and the v1 `cpu` one, holding real processes (a container's and the
//! pause process) in a real network namespace the test created. Removed on drop.
use crate::{sh, sh_ok};
use chaos_agent::pod::PodUid;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A pod made of cgroup directories and processes; torn down on drop.
pub struct FakePod {
    pub netns: String,
    /// Created directories, parents first.
    dirs: Vec<PathBuf>,
    pub children: Vec<Child>,
}

impl Drop for FakePod {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for d in self.dirs.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
        let _ = sh(&format!("ip netns del {} 2>/dev/null", self.netns));
    }
}

/// Pods that nest in directories the first one created: torn down last first, also when a
/// test fails half way.
pub struct Pods(pub Vec<FakePod>);

impl Drop for Pods {
    fn drop(&mut self) {
        while let Some(p) = self.0.pop() {
            drop(p);
        }
    }
}

/// The v2 hierarchy and the v1 one carrying `cpu`: (mount point, name in /proc/PID/cgroup).
pub fn hierarchies() -> Vec<(PathBuf, String)> {
    let mut out = vec![];
    for h in chaos_agent::cgroup::hierarchies().expect("mountinfo") {
        if h.root != "/" {
            continue;
        }
        if h.v2 {
            out.push((h.mount.clone(), String::new()));
        } else if h.controllers.iter().any(|c| c == "cpu") {
            out.push((h.mount.clone(), h.controllers.join(",")));
        }
    }
    assert!(
        !out.is_empty(),
        "no v2 or v1 cpu cgroup hierarchy on this host"
    );
    out
}

fn mkdirs(base: &Path, rel: &str, dirs: &mut Vec<PathBuf>) {
    let mut p = base.to_path_buf();
    for seg in rel.trim_start_matches('/').split('/') {
        p.push(seg);
        if !p.exists() {
            std::fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
            dirs.push(p.clone());
        }
    }
}

fn join(hier: &[(PathBuf, String)], rel: &str, pid: u32) {
    for (mount, _) in hier {
        let f = mount.join(rel.trim_start_matches('/')).join("cgroup.procs");
        std::fs::write(&f, pid.to_string()).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}

/// A process in namespace `ns` running `program` (so its comm is the program's file name).
fn start(ns: &str, program: &Path) -> Child {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(program)
        .arg("1000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn")
}

/// Builds a pod: a container process started first (older), then the pause process.
pub fn fake_pod(
    i: usize,
    pod_dir: &str,
    container_seg: &str,
    sandbox_seg: &str,
    with_pause: bool,
) -> FakePod {
    let netns = format!("cht-pod-{}-{i}", std::process::id());
    let _ = sh(&format!("ip netns del {netns} 2>/dev/null"));
    sh_ok(&format!("ip netns add {netns}"));
    let hier = hierarchies();
    let mut pod = FakePod {
        netns: netns.clone(),
        dirs: vec![],
        children: vec![],
    };
    let container_dir = format!("{pod_dir}/{container_seg}");
    let sandbox_dir = format!("{pod_dir}/{sandbox_seg}");
    for (mount, _) in &hier {
        mkdirs(mount, &container_dir, &mut pod.dirs);
        mkdirs(mount, &sandbox_dir, &mut pod.dirs);
    }
    let app = start(&netns, Path::new("/bin/sleep"));
    join(&hier, &container_dir, app.id());
    pod.children.push(app);
    std::thread::sleep(Duration::from_millis(20));
    if with_pause {
        let pause = std::env::temp_dir().join(format!("chaos-pods-{}/pause", std::process::id()));
        std::fs::create_dir_all(pause.parent().unwrap()).unwrap();
        if !pause.exists() {
            std::fs::copy("/bin/sleep", &pause).unwrap();
        }
        let p = start(&netns, &pause);
        join(&hier, &sandbox_dir, p.id());
        pod.children.push(p);
    }
    // Let `ip netns exec` exec the program so /proc shows its comm.
    std::thread::sleep(Duration::from_millis(100));
    pod
}

pub fn uid(i: usize) -> PodUid {
    format!("{:08x}-0d4e-4f5a-8b6c-{:012x}", std::process::id(), i)
        .parse()
        .unwrap()
}

pub const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd01";
pub const SID: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba98765432aa";
