//! Helpers for CPU stress tests: a cgroup the test owns, and CPU time measured from
//! /proc/PID/stat.
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A cgroup named after the test and its pid, created in the v1 hierarchies that carry `cpu`
/// or `cpuacct` and in the v2 hierarchy (controllerless in a hybrid setup; creating one there
/// is allowed). Removed on drop, even when the test fails: anything still inside is killed
/// first (only our workers and the test's own helpers are ever put there).
pub struct TestCgroup {
    /// Relative to the hierarchies' roots, as `--cgroup` takes it.
    pub path: String,
    /// The directories created, v2 first when there is one.
    pub dirs: Vec<PathBuf>,
    pub v2: Option<PathBuf>,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        Self::in_hierarchies(tag, |h| {
            h.v2 || h.controllers.iter().any(|c| c == "cpu" || c == "cpuacct")
        })
    }

    /// A cgroup in the hierarchies `wanted` picks (e.g. only the v1 freezer, or only v2).
    pub fn in_hierarchies(
        tag: &str,
        wanted: impl Fn(&chaos_agent::cgroup::Hierarchy) -> bool,
    ) -> Self {
        crate::require_root();
        let path = format!("/chaos-test-{tag}-{}", std::process::id());
        let hierarchies = chaos_agent::cgroup::hierarchies().expect("read mountinfo");
        let mut cg = TestCgroup {
            path: path.clone(),
            dirs: Vec::new(),
            v2: None,
        };
        for h in &hierarchies {
            if !wanted(h) || h.root != "/" {
                continue;
            }
            let dir = h.mount.join(path.trim_start_matches('/'));
            let _ = std::fs::create_dir(&dir);
            if dir.join("cgroup.procs").is_file() {
                if h.v2 {
                    cg.v2 = Some(dir.clone());
                    cg.dirs.insert(0, dir);
                } else {
                    cg.dirs.push(dir);
                }
            }
        }
        assert!(
            !cg.dirs.is_empty(),
            "no wanted cgroup hierarchy to create {path} in: {hierarchies:?}"
        );
        cg
    }

    /// The pids in `cgroup.procs` of one of our directories.
    pub fn procs_in(dir: &std::path::Path) -> Vec<u32> {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// The pids in the first directory (all directories should agree; see `procs_in`).
    pub fn procs(&self) -> Vec<u32> {
        Self::procs_in(&self.dirs[0])
    }

    /// Puts a process into every directory of this cgroup.
    pub fn add(&self, pid: u32) {
        for dir in &self.dirs {
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                .unwrap_or_else(|e| panic!("add {pid} to {}: {e}", dir.display()));
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // A frozen process dies only once thawed: thaw first (a test may fail mid-pause).
        for dir in &self.dirs {
            let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
            let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut left = 0;
            for dir in &self.dirs {
                for pid in Self::procs_in(dir) {
                    left += 1;
                    // SAFETY: only processes this test put into its own cgroup.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
            for dir in &self.dirs {
                let _ = std::fs::remove_dir(dir);
            }
            if left == 0 && self.dirs.iter().all(|d| !d.exists()) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Fields of /proc/PID/stat after the command name (field 3 is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU time of every thread of a process in nanoseconds (the first field of each
/// /proc/PID/task/TID/schedstat): finer than the 10 ms ticks of /proc/PID/stat, for small
/// figures such as an idle daemon's. Threads that ended since are not counted.
pub fn cpu_ns_all_threads(pid: u32) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    Some(
        tasks
            .filter_map(|t| {
                let text = std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok()?;
                text.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum(),
    )
}

/// Start time in clock ticks since boot: with the pid, names one process.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Percent of one CPU that `pids` used together over `window` (utime + stime from
/// /proc/PID/stat, as `top` and `ps` compute it).
pub fn measure_percent(pids: &[u32], window: Duration) -> f64 {
    let sum = || pids.iter().filter_map(|p| cpu_ticks(*p)).sum::<u64>();
    let (t0, c0) = (Instant::now(), sum());
    std::thread::sleep(window);
    let (c1, wall) = (sum(), t0.elapsed());
    (c1.saturating_sub(c0)) as f64 / clock_ticks_per_sec() / wall.as_secs_f64() * 100.0
}

/// The process `pid` that started at `start` is gone: no such pid, another process under
/// it, or a zombie (dead, holding no CPU, waiting for its new parent to reap it).
pub fn process_gone(pid: u32, start: u64) -> bool {
    match stat_fields(pid) {
        None => true,
        Some(f) => {
            f.get(19).and_then(|s| s.parse::<u64>().ok()) != Some(start)
                || f.first().is_some_and(|s| s == "Z" || s == "X")
        }
    }
}

/// The command name of a process.
pub fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Every process named `chaos-cpu` on the machine (our workers).
pub fn all_workers() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            comm(*pid) == "chaos-cpu" && !process_gone(*pid, start_time(*pid).unwrap_or(0))
        })
        .collect()
}

/// A cgroup with memory accounting (the v1 memory hierarchy here, v2 where it has the
/// controller) and the directory whose accounting counts.
pub fn memory_cgroup(tag: &str) -> (TestCgroup, PathBuf) {
    let cg = TestCgroup::in_hierarchies(tag, |h| {
        h.controllers.iter().any(|c| c == "memory")
            || (h.v2
                && std::fs::read_to_string(h.mount.join("cgroup.controllers"))
                    .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory")))
    });
    let dir = cg
        .dirs
        .iter()
        .find(|d| d.join("memory.limit_in_bytes").is_file() || d.join("memory.max").is_file())
        .cloned()
        .expect("a cgroup with memory accounting");
    (cg, dir)
}

/// The memory a cgroup is charged for, as its own accounting counts it (v1 or v2).
pub fn memory_usage(dir: &std::path::Path) -> u64 {
    ["memory.usage_in_bytes", "memory.current"]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .and_then(|t| t.trim().parse().ok())
        .expect("memory usage")
}

/// A process's state letter (R, S, T, Z...); '?' when it is gone.
pub fn run_state(pid: u32) -> char {
    stat_fields(pid)
        .and_then(|f| f.first().and_then(|s| s.chars().next()))
        .unwrap_or('?')
}

/// Whether `pid` is paused by a SIGSTOP: stopped (T), or holding the SIGSTOP pending, which it
/// acts on before it runs any of its own code again (a shell waits so in vfork, state D, for a
/// child stopped before its exec).
pub fn sigstopped(pid: u32) -> bool {
    run_state(pid) == 'T' || chaos_agent::process::stop_pending(pid)
}

/// Whether the test's freezer cgroup `dir` (v2 or v1) is frozen, as the engine judges it.
pub fn cgroup_frozen(dir: &std::path::Path, v2: bool) -> bool {
    use chaos_agent::undo::Undo;
    let dir = dir.to_path_buf();
    chaos_agent::undo::cgroup_frozen(&if v2 {
        Undo::CgroupV2(dir)
    } else {
        Undo::CgroupV1(dir)
    })
}
