//! chaos-bench-cpu: how close the CPU stress fault gets to the load it is asked for, beside
//! `stress-ng --cpu 1 --cpu-load P` measured the same way, and what the agent itself spends
//! while its workers run. Written as JSON.
//!
//! For each requested load (25, 50, 90 %) and round: one worker through a real `chaos-agent`
//! (applied with chaosctl, in a cgroup the benchmark creates), then one stress-ng worker. Each
//! is given 1 s to settle, then its utime + stime from /proc/PID/stat is read over the window;
//! the agent's own utime + stime is read over the same window as ours. Rounds are
//! interleaved (ours, stress-ng, next load, ...) so drift in the machine's other load hits both
//! alike.
//!
//! Usage: chaos-bench-cpu [--out FILE] [--rounds N] [--seconds S]
use chaos_tests::cgroups::{TestCgroup, clock_ticks_per_sec, cpu_ns_all_threads, cpu_ticks};
use chaos_tests::{Agent, arg, fault_id, sh};
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LOADS: [f64; 3] = [25.0, 50.0, 90.0];
const SETTLE: Duration = Duration::from_secs(1);

/// Percent of one CPU each pid used over `window`, read together.
fn measure(pids: &[u32], window: Duration) -> Vec<f64> {
    let read = || pids.iter().map(|p| cpu_ticks(*p)).collect::<Vec<_>>();
    let (t0, c0) = (Instant::now(), read());
    std::thread::sleep(window);
    let (c1, wall) = (read(), t0.elapsed().as_secs_f64());
    c0.iter()
        .zip(&c1)
        .map(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => {
                b.saturating_sub(*a) as f64 / clock_ticks_per_sec() / wall * 100.0
            }
            _ => panic!("a measured process disappeared: {pids:?}"),
        })
        .collect()
}

/// Our worker's load, and the agent's own CPU over the same window (all its threads, from
/// schedstat in nanoseconds: the agent's figure is far below the 10 ms tick resolution).
fn ours(agent: &Agent, cg: &TestCgroup, load: f64, window: Duration) -> (f64, f64) {
    let o = agent.chaosctl(&[
        "inject",
        "cpu",
        "--workers",
        "1",
        "--load",
        &load.to_string(),
        "--cgroup",
        &cg.path,
        "--duration",
        "10m",
        "--json",
    ]);
    let id = fault_id(&o);
    let pids = cg.procs();
    assert_eq!(pids.len(), 1, "one worker: {pids:?}");
    std::thread::sleep(SETTLE);
    let agent_pid = agent.child.id();
    let (t0, a0) = (
        Instant::now(),
        cpu_ns_all_threads(agent_pid).expect("agent"),
    );
    let worker = measure(&[pids[0]], window)[0];
    let a1 = cpu_ns_all_threads(agent_pid).expect("agent");
    let agent_pct = a1.saturating_sub(a0) as f64 / 1e9 / t0.elapsed().as_secs_f64() * 100.0;
    let o = agent.chaosctl(&["revert", &id]);
    assert!(o.status.success(), "revert");
    (worker, agent_pct)
}

/// The pid of stress-ng's worker (its child), once it exists.
fn stress_ng_worker(parent: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(pid) = children
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .next()
        {
            return pid;
        }
        assert!(Instant::now() < deadline, "stress-ng started no worker");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stress_ng(load: f64, window: Duration) -> f64 {
    let mut child = Command::new("stress-ng")
        .args([
            "--cpu",
            "1",
            "--cpu-load",
            &format!("{}", load.round() as u32),
            "--timeout",
            "600s",
            "--quiet",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn stress-ng");
    let worker = stress_ng_worker(child.id());
    std::thread::sleep(SETTLE);
    let m = measure(&[worker], window);
    // SAFETY: signalling our own child; stress-ng stops its workers on SIGTERM.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    m[0]
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn summary(requested: f64, rounds: &[f64]) -> serde_json::Value {
    let m = median(rounds);
    json!({
        "median_percent": m,
        "error_pp": m - requested,
        "max_abs_error_pp": rounds.iter().map(|r| (r - requested).abs()).fold(0.0, f64::max),
        "rounds_percent": rounds,
    })
}

fn main() {
    let out_path = arg("--out", "bench-out/cpu.json");
    let rounds: usize = arg("--rounds", "3").parse().expect("--rounds");
    let seconds: f64 = arg("--seconds", "10").parse().expect("--seconds");
    let window = Duration::from_secs_f64(seconds);
    let version = sh("stress-ng --version");
    if !version.status.success() {
        panic!("stress-ng is missing: apt-get install stress-ng");
    }
    let cg = TestCgroup::new("bench");
    let dir = std::env::temp_dir().join(format!("chaos-bench-cpu-{}", std::process::id()));
    let agent = Agent::start_at(&dir.join("agent.sock"), &dir.join("journal"), &[]);

    let mut ours_pct = vec![Vec::new(); LOADS.len()];
    let mut agent_pct = vec![Vec::new(); LOADS.len()];
    let mut theirs_pct = vec![Vec::new(); LOADS.len()];
    for round in 0..rounds {
        for (i, load) in LOADS.iter().enumerate() {
            let (w, a) = ours(&agent, &cg, *load, window);
            let s = stress_ng(*load, window);
            eprintln!(
                "round {round} load {load}%: ours {w:.2}% (agent {a:.3}%), stress-ng {s:.2}%"
            );
            ours_pct[i].push(w);
            agent_pct[i].push(a);
            theirs_pct[i].push(s);
        }
    }
    let rows: Vec<_> = LOADS
        .iter()
        .enumerate()
        .map(|(i, load)| {
            let (o, s) = (median(&ours_pct[i]), median(&theirs_pct[i]));
            json!({
                "requested_percent": load,
                "ours": summary(*load, &ours_pct[i]),
                "stress_ng": summary(*load, &theirs_pct[i]),
                "agent_percent_of_one_cpu": median(&agent_pct[i]),
                "ours_within_3pp": (o - load).abs() <= 3.0,
                "ours_at_least_as_close_as_stress_ng": (o - load).abs() <= (s - load).abs(),
            })
        })
        .collect();
    let report = json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "arch": std::env::consts::ARCH,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "stress_ng": String::from_utf8_lossy(&version.stdout).trim(),
        "method": "1 worker each; utime+stime from /proc/PID/stat over the window after 1 s to settle; rounds interleaved",
        "seconds_per_measurement": seconds,
        "rounds": rounds,
        "loads": rows,
        "targets": { "max_abs_error_pp": 3.0, "at_least_as_close_as_stress_ng": true },
    });
    drop(agent);
    drop(cg);
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(parent) = std::path::Path::new(&out_path).parent() {
        std::fs::create_dir_all(parent).expect("out dir");
    }
    let text = serde_json::to_string_pretty(&report).expect("json");
    std::fs::write(&out_path, &text).expect("write");
    println!("{text}");
}
