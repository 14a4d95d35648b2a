//! Memory stress on the real kernel, through `chaosctl --local`: held bytes measured by the
//! cgroup's own accounting, the workers' CPU while holding (chaos-bench-host: stress-ng beside), a
//! percent of a memory limit, the headroom refusal, `--oom` against a limited cgroup with a
//! Python process in it, and `kill -9` of the engine. Only cgroups these tests create.
use chaos_tests::cgroups::*;
use chaos_tests::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn journal(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("chaos-mem-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("journal dir");
    d
}

fn set_limit(dir: &Path, bytes: u64) {
    let file = if dir.join("memory.limit_in_bytes").is_file() {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    };
    std::fs::write(dir.join(file), bytes.to_string()).expect("memory limit");
}

fn workers() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| comm(*p) == "chaos-mem")
        // A zombie holds no memory; this host's init reaps orphans when it gets to them.
        .filter(|p| {
            !std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
        })
        .collect()
}

const MIB: u64 = 1 << 20;

/// 64 MiB in 2 workers: the cgroup's usage grows by 64 MiB +-2 %, the workers spend at most 1 %
/// of one CPU holding it, and revert gives it all back. (chaos-bench-host measures stress-ng
/// --vm beside them.)
#[test]
fn held_bytes_match_the_cgroups_accounting_and_cost_no_cpu() {
    let _g = serial();
    let (cg, dir) = memory_cgroup("held");
    let before = memory_usage(&dir);
    let fault = LocalFault::start(
        &[
            "inject",
            "memory",
            "--bytes",
            "64MiB",
            "--workers",
            "2",
            "--cgroup",
            &cg.path,
            "--duration",
            "1m",
        ],
        &journal("held"),
    );
    let held = memory_usage(&dir).saturating_sub(before);
    let pids = workers();
    assert_eq!(pids.len(), 2, "{pids:?}");
    std::thread::sleep(Duration::from_millis(300));
    let ours = measure_percent(&pids, Duration::from_secs(3));
    let (status, out) = fault.stop();
    assert!(status.success(), "{out}");
    std::thread::sleep(Duration::from_millis(200));
    let after = memory_usage(&dir).saturating_sub(before);
    eprintln!(
        "memory 64 MiB: cgroup usage +{:.2} MiB; our workers {ours:.2} % of one CPU holding it; {:.2} MiB left after revert",
        held as f64 / MIB as f64,
        after as f64 / MIB as f64
    );
    let err = (held as f64 - (64 * MIB) as f64).abs() / (64 * MIB) as f64;
    assert!(
        err <= 0.02,
        "held {held} bytes, asked 64 MiB ({:.2} % off)",
        err * 100.0
    );
    assert!(ours <= 1.0, "holding costs {ours:.2} % of one CPU");
    assert!(after < 2 * MIB, "{after} bytes still held after revert");
    assert!(workers().is_empty(), "{:?}", workers());
    let reverted = json_event(&out, "reverted");
    assert!(
        reverted["counters"]["affected_bytes"].as_u64() >= Some(63 * MIB),
        "{reverted}"
    );
}

/// `--percent` of the cgroup's limit; an ask beyond the headroom is refused without --oom.
#[test]
fn percent_of_the_limit_and_the_headroom_refusal() {
    let _g = serial();
    let (cg, dir) = memory_cgroup("pct");
    set_limit(&dir, 128 * MIB);
    let before = memory_usage(&dir);
    let fault = LocalFault::start(
        &[
            "inject",
            "memory",
            "--percent",
            "25",
            "--cgroup",
            &cg.path,
            "--duration",
            "1m",
        ],
        &journal("pct"),
    );
    let held = memory_usage(&dir).saturating_sub(before);
    let (status, out) = fault.stop();
    assert!(status.success(), "{out}");
    eprintln!("25 % of 128 MiB: +{:.2} MiB", held as f64 / MIB as f64);
    let err = (held as f64 - (32 * MIB) as f64).abs() / (32 * MIB) as f64;
    assert!(err <= 0.02, "held {held}, asked 32 MiB");
    let out = Command::new(bin("chaosctl"))
        .args([
            "inject", "memory", "--bytes", "200MiB", "--cgroup", &cg.path,
        ])
        .args(["--duration", "10s", "--local"])
        .env("CHAOS_JOURNAL_DIR", journal("pct2"))
        .output()
        .expect("chaosctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("under its memory limit") && err.contains("--oom"),
        "{err}"
    );
    assert!(workers().is_empty());
}

/// `--oom` in a 64 MiB cgroup holding a 40 MiB Python process: asking 48 MiB makes the cgroup's
/// OOM killer act, and the fault reports it.
#[test]
fn oom_lets_the_cgroups_oom_killer_act_and_says_so() {
    let _g = serial();
    let (cg, dir) = memory_cgroup("oom");
    set_limit(&dir, 64 * MIB);
    // It waits for a line on stdin, so its memory is charged to the cgroup.
    let mut app = Command::new("python3")
        .args([
            "-c",
            "import sys, time; sys.stdin.readline(); x = bytearray(40 << 20); print('ready', flush=True); time.sleep(60)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    cg.add(app.id());
    {
        use std::io::{BufRead, Write};
        app.stdin
            .take()
            .expect("stdin")
            .write_all(b"go\n")
            .expect("go");
        let mut line = String::new();
        std::io::BufReader::new(app.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready");
        assert_eq!(line.trim(), "ready");
    }
    let fault = LocalFault::start(
        &[
            "inject",
            "memory",
            "--bytes",
            "48MiB",
            "--oom",
            "--cgroup",
            &cg.path,
            "--duration",
            "3s",
        ],
        &journal("oom"),
    );
    let (status, out) = fault.wait(Duration::from_secs(20));
    assert!(status.success(), "{out}");
    let reverted = json_event(&out, "reverted");
    let kills = reverted["counters"]["affected"].as_u64().unwrap_or(0);
    let lost = reverted["counters"]["matched"].as_u64().unwrap_or(0);
    let app_alive = app.try_wait().expect("try_wait").is_none();
    eprintln!(
        "--oom: {kills} OOM kill(s), {lost} of our workers; the app is {}",
        if app_alive { "alive" } else { "killed" }
    );
    assert!(kills >= 1, "no OOM kill reported: {reverted}");
    assert_eq!(
        u64::from(!app_alive) + lost,
        kills,
        "every kill is the app or a worker: {reverted}"
    );
    let _ = app.kill();
    let _ = app.wait();
}

/// `kill -9` of the engine: the workers die with it (their death signal) and the memory is
/// back within a second.
#[test]
fn kill_9_of_the_engine_frees_the_memory() {
    let _g = serial();
    let (cg, dir) = memory_cgroup("kill9");
    let before = memory_usage(&dir);
    let fault = LocalFault::start(
        &[
            "inject",
            "memory",
            "--bytes",
            "32MiB",
            "--cgroup",
            &cg.path,
            "--duration",
            "5m",
        ],
        &journal("kill9"),
    );
    assert!(memory_usage(&dir) > before + 30 * MIB);
    fault.signal(libc::SIGKILL);
    let killed = Instant::now();
    let mut freed = None;
    while killed.elapsed() < Duration::from_secs(3) {
        if memory_usage(&dir) < before + 2 * MIB && workers().is_empty() {
            freed = Some(killed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = fault.wait(Duration::from_secs(5));
    eprintln!("kill -9: memory back after {freed:?}");
    assert!(freed.expect("memory outlived the engine") < Duration::from_secs(1));
}

/// `--ramp 2s`: the held bytes grow with time, not at once: sampled every 100 ms, each sample's
/// share of the ask is within 0.15 of the ramp's elapsed share, and the whole ask is held once
/// the ramp is over.
#[test]
fn ramp_reaches_the_ask_over_its_duration() {
    let _g = serial();
    let (cg, dir) = memory_cgroup("ramp");
    let before = memory_usage(&dir);
    const ASK: u64 = 64 * MIB;
    const RAMP: Duration = Duration::from_secs(2);
    let fault = LocalFault::start(
        &[
            "inject",
            "memory",
            "--bytes",
            "64MiB",
            "--workers",
            "2",
            "--ramp",
            "2s",
            "--cgroup",
            &cg.path,
            "--duration",
            "1m",
        ],
        &journal("ramp"),
    );
    let applied = Instant::now();
    let mut samples = Vec::new();
    while applied.elapsed() < RAMP + Duration::from_millis(800) {
        let share = memory_usage(&dir).saturating_sub(before) as f64 / ASK as f64;
        let due = (applied.elapsed().as_secs_f64() / RAMP.as_secs_f64()).min(1.0);
        samples.push((due, share));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, out) = fault.stop();
    assert!(status.success(), "{out}");
    let line: Vec<String> = samples
        .iter()
        .map(|(d, s)| format!("{d:.2}:{s:.2}"))
        .collect();
    eprintln!("ramp 2 s, (elapsed share: held share) {}", line.join(" "));
    let off: Vec<&(f64, f64)> = samples
        .iter()
        .filter(|(d, s)| (s - d).abs() > 0.15)
        .collect();
    assert!(off.is_empty(), "samples off the ramp: {off:?}");
    let last = samples.last().map_or(0.0, |s| s.1);
    assert!(last >= 0.98, "held {last:.2} of the ask after the ramp");
}
