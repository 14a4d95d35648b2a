//! chaos-bench-host: the host faults beside their peers' methods, measured in the same run, as
//! JSON. Only filesystems, cgroups and processes this benchmark makes.
//!
//! - `disk_fill`: a 1 GiB ext4 (sparse image on a loop device) to 90 %: dd writing zeros
//!   (Litmus's method) against the engine's apply (fallocate), each level as `df` counts it.
//! - `memory`: 256 MiB in a memory cgroup: the bytes the cgroup is charged for against the ask,
//!   and the CPU spent holding them: our workers, then `stress-ng --vm --vm-keep` for the same
//!   bytes in the same cgroup.
//! - `process_pause`: from the apply to frozen (SIGSTOP for `--pid`, the cgroup freezer for
//!   `--cgroup`), beside `kill -STOP` run as a command; and from `kill -9` of `chaosctl --local`
//!   to thawed, with nothing restarted (the guard's work).
//!
//! Apply times are the in-process engine's `apply` (what the agent runs on a request), so
//! they leave out chaosctl's own start; "to frozen" is seen by a thread polling the target's
//! state while `apply` runs ("apply returned" adds the journal's write after the freeze).
//!
//! Usage: chaos-bench-host [--out FILE] [--trials N]
use chaos_agent::spec::{CgroupRef, FillLevel, MemorySize, MountRef, ProcessRef, Target};
use chaos_agent::{Engine, FaultKind, FaultSpec};
use chaos_tests::cgroups::{
    TestCgroup, cgroup_frozen, comm, measure_percent, memory_cgroup, memory_usage, sigstopped,
};
use chaos_tests::mounts::TestMount;
use chaos_tests::{LocalFault, arg, median, ms_after, watch};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn spec(kind: FaultKind) -> FaultSpec {
    FaultSpec {
        kind,
        target: Target::none(),
        duration: Duration::from_secs(300),
    }
}

/// How long `pred` takes to hold, polled every 100 µs from `since`; None after 5 s.
fn until(since: Instant, pred: impl Fn() -> bool) -> Option<f64> {
    while since.elapsed() < Duration::from_secs(5) {
        if pred() {
            return Some(since.elapsed().as_secs_f64() * 1e3);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    None
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn disk_fill(engine: &Arc<Engine>) -> serde_json::Value {
    let m = TestMount::ext4("bench", 1024);
    let (start_pct, avail) = m.level();
    let capacity = avail as f64 / (1.0 - start_pct / 100.0);
    let mib = ((capacity * 0.9 - (capacity - avail as f64)) / MIB as f64) as u64;
    let t = Instant::now();
    let dd = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}/dd", m.path()))
        .args([
            "bs=1M",
            &format!("count={mib}"),
            "conv=fsync",
            "status=none",
        ])
        .status()
        .expect("dd");
    let dd_ms = ms(t.elapsed());
    assert!(dd.success(), "dd");
    let (dd_pct, _) = m.level();
    std::fs::remove_file(m.dir.join("dd")).expect("rm dd");
    let _ = Command::new("sync").status();

    let t = Instant::now();
    let status = engine
        .apply(spec(FaultKind::DiskFill {
            path: m.path().into(),
            level: FillLevel::Percent(90.0),
            mount: MountRef::Own,
            force: false,
        }))
        .expect("disk-fill");
    let ours_ms = ms(t.elapsed());
    let (ours_pct, _) = m.level();
    engine.revert(&status.id).expect("revert disk-fill");
    let (after_pct, _) = m.level();
    json!({
        "filesystem": "ext4, 1 GiB, loop device",
        "asked_percent": 90.0,
        "dd": {"ms": dd_ms, "percent": dd_pct},
        "ours": {"ms": ours_ms, "percent": ours_pct, "error_percent_points": (ours_pct - 90.0).abs()},
        "ours_over_dd": ours_ms / dd_ms,
        "after_revert_percent": after_pct,
    })
}

/// CPU of `pids` over 3 s, as percent of one CPU.
fn cpu_of(pids: &[u32]) -> f64 {
    measure_percent(pids, Duration::from_secs(3))
}

fn memory(engine: &Arc<Engine>) -> serde_json::Value {
    const ASK: u64 = 256 * MIB;
    let (cg, dir) = memory_cgroup("bench-mem");
    let before = memory_usage(&dir);
    let t = Instant::now();
    let status = engine
        .apply(spec(FaultKind::Memory {
            size: MemorySize::Bytes(ASK),
            workers: 2,
            cgroup: CgroupRef::Path(cg.path.clone()),
            ramp_ms: 0,
            oom: false,
        }))
        .expect("memory");
    let apply_ms = ms(t.elapsed());
    let held = memory_usage(&dir).saturating_sub(before);
    let workers: Vec<u32> = cg
        .procs()
        .into_iter()
        .filter(|p| comm(*p) == "chaos-mem")
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let ours_cpu = cpu_of(&workers);
    engine.revert(&status.id).expect("revert memory");
    std::thread::sleep(Duration::from_millis(200));
    let after = memory_usage(&dir).saturating_sub(before);

    let mut peer = Command::new("stress-ng")
        .args(["--vm", "1", "--vm-bytes", &format!("{}M", ASK / MIB)])
        .args(["--vm-keep", "--timeout", "30s", "--quiet"])
        .stdout(Stdio::null())
        .spawn()
        .expect("stress-ng");
    cg.add(peer.id());
    // stress-ng forks its worker after the move, so the worker is charged here too.
    let t = Instant::now();
    let peer_reached = until(t, || {
        memory_usage(&dir).saturating_sub(before) >= ASK * 98 / 100
    });
    let peer_held = memory_usage(&dir).saturating_sub(before);
    let peer_cpu = cpu_of(&cg.procs());
    let _ = peer.kill();
    let _ = peer.wait();
    drop(cg);
    let err = |b: u64| (b as f64 - ASK as f64) / ASK as f64 * 100.0;
    json!({
        "asked_mib": ASK / MIB,
        "accounting": "the cgroup's memory.usage_in_bytes / memory.current",
        "ours": {
            "workers": workers.len(),
            "apply_ms": apply_ms,
            "held_mib": held as f64 / MIB as f64,
            "error_percent": err(held),
            "cpu_percent_of_one_while_holding": ours_cpu,
            "left_after_revert_mib": after as f64 / MIB as f64,
        },
        "stress_ng_vm_keep": {
            "reached_ms": peer_reached,
            "held_mib": peer_held as f64 / MIB as f64,
            "error_percent": err(peer_held),
            "cpu_percent_of_one_while_holding": peer_cpu,
        },
    })
}

/// A shell ticking every 10 ms (forking `sleep` each time, as a service forks workers), in its
/// own process group (killed on drop). Not a spinner: two of those would take both of this
/// machine's CPUs from the engine being timed.
struct Ticker(Child);

impl Ticker {
    fn start() -> Ticker {
        use std::os::unix::process::CommandExt;
        Ticker(
            Command::new("sh")
                .args(["-c", "while :; do sleep 0.01; done"])
                .process_group(0)
                .spawn()
                .expect("ticker"),
        )
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        // SAFETY: our own child; SIGCONT first so a stopped one can die.
        unsafe {
            libc::kill(-(self.0.id() as i32), libc::SIGCONT);
            libc::kill(-(self.0.id() as i32), libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

fn stats(v: &[f64]) -> serde_json::Value {
    let max = v.iter().copied().fold(f64::NAN, f64::max);
    json!({"trials": v, "median": median(v), "max": max})
}

fn process_pause(engine: &Arc<Engine>, trials: usize, journal: &Path) -> serde_json::Value {
    let mut by_pid = Vec::new();
    let mut apply_pid = Vec::new();
    let mut by_kill_stop = Vec::new();
    let mut thaw_after_kill9 = Vec::new();
    for _ in 0..trials {
        let s = Ticker::start();
        let pid = s.pid();
        let w = watch(Duration::from_micros(50), move || sigstopped(pid));
        let t = Instant::now();
        let status = engine
            .apply(spec(FaultKind::ProcessPause {
                target: ProcessRef::Pid(pid),
                name: String::new(),
            }))
            .expect("process-pause --pid");
        apply_pid.push(ms(t.elapsed()));
        by_pid.push(ms_after(t, w));
        engine.revert(&status.id).expect("revert pause");

        let w = watch(Duration::from_micros(50), move || sigstopped(pid));
        let t = Instant::now();
        let st = Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(st.success(), "kill -STOP");
        by_kill_stop.push(ms_after(t, w));
        // SAFETY: our own child.
        unsafe { libc::kill(s.pid() as i32, libc::SIGCONT) };

        let pid = s.pid().to_string();
        let fault = LocalFault::start(
            &["inject", "process-pause", "--pid", &pid, "--duration", "5m"],
            journal,
        );
        assert!(sigstopped(s.pid()), "not stopped at apply");
        fault.signal(libc::SIGKILL);
        let t = Instant::now();
        thaw_after_kill9.push(until(t, || !sigstopped(s.pid())).unwrap_or(f64::NAN));
        let _ = fault.wait(Duration::from_secs(5));
    }

    let mut freezers = serde_json::Map::new();
    let hierarchies = chaos_agent::cgroup::hierarchies().expect("mountinfo");
    for (label, v2) in [("freezer_v1", false), ("freezer_v2", true)] {
        let has = |h: &chaos_agent::cgroup::Hierarchy| {
            if v2 {
                h.v2
            } else {
                h.controllers.iter().any(|c| c == "freezer")
            }
        };
        if !hierarchies.iter().any(has) {
            continue;
        }
        let cg = TestCgroup::in_hierarchies(&format!("bench-{label}"), has);
        let tickers: Vec<Ticker> = (0..4).map(|_| Ticker::start()).collect();
        for s in &tickers {
            cg.add(s.pid());
        }
        let dir = cg.dirs[0].clone();
        let mut frozen = Vec::new();
        let mut apply = Vec::new();
        for _ in 0..trials {
            let d = dir.clone();
            let w = watch(Duration::from_micros(50), move || cgroup_frozen(&d, v2));
            let t = Instant::now();
            let status = engine
                .apply(spec(FaultKind::ProcessPause {
                    target: ProcessRef::Cgroup(cg.path.clone()),
                    name: String::new(),
                }))
                .expect("process-pause --cgroup");
            apply.push(ms(t.elapsed()));
            frozen.push(ms_after(t, w));
            engine.revert(&status.id).expect("revert pause");
        }
        freezers.insert(
            label.into(),
            json!({"processes": 4, "apply_to_frozen_ms": stats(&frozen), "apply_returned_ms": stats(&apply)}),
        );
        drop(tickers);
    }
    json!({
        "pid_sigstop": {"apply_to_frozen_ms": stats(&by_pid), "apply_returned_ms": stats(&apply_pid)},
        "kill_stop_command": {"to_frozen_ms": stats(&by_kill_stop)},
        "cgroup": freezers,
        "kill9_of_engine_to_thawed_ms": stats(&thaw_after_kill9),
        "targets_ms": {"frozen_within": 10.0, "thawed_after_death_within": 1000.0},
    })
}

fn main() {
    chaos_tests::require_root();
    let out = PathBuf::from(arg("--out", "bench-out/host.json"));
    let trials: usize = arg("--trials", "5").parse().expect("--trials");
    let dir = std::env::temp_dir().join(format!("chaos-bench-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let engine = chaos_tests::engine_at(&dir.join("engine-journal"));
    let report = json!({
        "disk_fill": disk_fill(&engine),
        "memory": memory(&engine),
        "process_pause": process_pause(&engine, trials, &dir.join("journal")),
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).expect("out dir");
    }
    std::fs::write(&out, format!("{report:#}\n")).expect("write");
    println!("{report}");
    let _ = std::fs::remove_dir_all(&dir);
}
