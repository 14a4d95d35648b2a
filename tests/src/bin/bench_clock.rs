//! chaos-bench-clock: what clock-skew costs a target and how exact it is, through
//! `chaosctl --local`, written as JSON. The baseline is the same program's reads before the
//! fault (the vDSO) and after revert, measured in the same run.
//!
//! - `cost_ns_per_call`: clock_gettime(CLOCK_REALTIME) (moved) and CLOCK_MONOTONIC (not moved,
//!   but through the stub's system call) in tests/apps/clockcost.c: before, during, after.
//! - `offset_error_ms`: per reading of tests/apps/clockprobe.c, the vDSO read minus the direct
//!   system call made microseconds later, minus the offset expected between them (the whole
//!   offset where the kernel is locked down and direct calls keep true time, none elsewhere).
//! - `exec_first_read_moved`: whether the first read of a program a target execs is moved.
//! - `kill9_until_true_time_ms`: from kill -9 of the engine to the target's first true read.
//!
//! Usage: chaos-bench-clock [--out FILE] [--trials N]
use chaos_tests::{LocalFault, arg, c_app};
use serde_json::json;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant, SystemTime};

const OFFSET_MS: f64 = 3_600_000.0;

/// A child printing lines, each with the wall time (ns) it was read here.
fn spawn(bin: &Path, args: &[&str]) -> (Child, Receiver<(String, f64)>) {
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((l, wall_ns())).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

fn wall_ns() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as f64
}

/// The next `n` lines printed after now.
fn fresh(rx: &Receiver<(String, f64)>, n: usize) -> Vec<(String, f64)> {
    while rx.try_recv().is_ok() {}
    (0..n)
        .map(|_| rx.recv_timeout(Duration::from_secs(10)).expect("a line"))
        .collect()
}

fn numbers(line: &str) -> Vec<f64> {
    line.split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn skew(pid: u32, journal: &Path, duration: &str) -> LocalFault {
    let pid = pid.to_string();
    LocalFault::start(
        &[
            "inject",
            "clock-skew",
            "--offset",
            "+1h",
            "--pid",
            &pid,
            "--duration",
            duration,
        ],
        journal,
    )
}

fn lockdown() -> String {
    chaos_agent::clock::lockdown().unwrap_or_else(|| "none".into())
}

fn kill(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

fn main() {
    let out = PathBuf::from(arg("--out", "bench-out/clock.json"));
    let trials: usize = arg("--trials", "5").parse().expect("--trials");
    let dir = std::env::temp_dir().join(format!("chaos-bench-clock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let journal = dir.join("journal");
    let (cost, probe) = (c_app(&dir, "clockcost"), c_app(&dir, "clockprobe"));
    let locked = lockdown() != "none";
    let between_want = if locked { OFFSET_MS } else { 0.0 };

    // Cost per call: before, during, after, in one process.
    let (child, rx) = spawn(&cost, &[]);
    let pair = |lines: Vec<(String, f64)>| {
        let v: Vec<Vec<f64>> = lines.iter().map(|(l, _)| numbers(l)).collect();
        (
            median(v.iter().map(|n| n[0]).collect()),
            median(v.iter().map(|n| n[1]).collect()),
        )
    };
    let before = pair(fresh(&rx, 5));
    let fault = skew(child.id(), &journal, "5m");
    let _ = fresh(&rx, 1);
    let during = pair(fresh(&rx, 5));
    let _ = fault.stop();
    let _ = fresh(&rx, 1);
    let after = pair(fresh(&rx, 5));
    kill(child);

    // Offset error and exec, then kill -9 of the engine, `trials` times.
    let mut errors = Vec::new();
    let mut exec_moved = Vec::new();
    let mut kill9 = Vec::new();
    for _ in 0..trials {
        let (child, rx) = spawn(&probe, &["probe", "exec", "300"]);
        let _ = fresh(&rx, 1);
        let fault = skew(child.id(), &journal, "5m");
        let started = Instant::now();
        let mut first_exec: Option<bool> = None;
        while started.elapsed() < Duration::from_secs(2) {
            let Ok((line, at)) = rx.recv_timeout(Duration::from_secs(5)) else {
                break;
            };
            let n = numbers(&line);
            if n.len() < 6 {
                continue;
            }
            let vdso = (n[1] - at) / 1e6;
            if line.starts_with("probe-exec ") && first_exec.is_none() {
                first_exec = Some((vdso - OFFSET_MS).abs() < 1000.0);
            }
            if started.elapsed() > Duration::from_millis(100) {
                errors.push(((n[1] - n[2]) / 1e6 - between_want).abs());
            }
        }
        exec_moved.push(first_exec.unwrap_or(false));
        fault.signal(libc::SIGKILL);
        let killed = Instant::now();
        let mut back = None;
        while killed.elapsed() < Duration::from_secs(5) {
            let Ok((line, at)) = rx.recv_timeout(Duration::from_secs(5)) else {
                break;
            };
            let n = numbers(&line);
            if n.len() >= 6 && ((n[1] - at) / 1e6).abs() < 1000.0 {
                back = Some(killed.elapsed().as_secs_f64() * 1e3);
                break;
            }
        }
        kill9.push(back.unwrap_or(f64::NAN));
        let _ = fault.wait(Duration::from_secs(5));
        kill(child);
    }
    let report = json!({
        "lockdown": lockdown(),
        "direct_system_calls_moved": !locked,
        "cost_ns_per_call": {
            "realtime": {"before": before.0, "during": during.0, "after": after.0},
            "monotonic_unmoved": {"before": before.1, "during": during.1, "after": after.1},
            "realtime_during_over_before": during.0 / before.0,
        },
        "offset_error_ms": {
            "readings": errors.len(),
            "p50": percentile(errors.clone(), 0.5),
            "p99": percentile(errors.clone(), 0.99),
            "max": percentile(errors, 1.0),
        },
        "exec_first_read_moved": exec_moved,
        "kill9_until_true_time_ms": {
            "trials": kill9,
            "heartbeat_bound_ms": 1000.0,
        },
    });
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).expect("out dir");
    }
    std::fs::write(&out, format!("{report:#}\n")).expect("write");
    println!("{report}");
    let _ = std::fs::remove_dir_all(&dir);
}
