//! clock-skew on the real kernel, through `chaosctl --local`. Targets are only processes these
//! tests start (a C reader compiled from tests/apps/clockprobe.c, which reads the clock every
//! 20 ms through the vDSO, a direct system call, gettimeofday and time; and its Go twin,
//! tests/apps/clockprobe.go, built static).
//!
//! This host's kernel is locked down (integrity), which refuses bpf_probe_write_user to
//! everyone: here the stub in the vDSO moves the clock itself, and direct system calls keep
//! true time. Where the kernel allows the helper (the VMs), direct calls move too; the tests
//! read the lockdown mode and expect whichever applies.
use chaos_tests::*;
use std::collections::HashMap;
use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const HOUR_MS: f64 = 3_600_000.0;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("chaos-clock-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

/// The process's whole [vdso] mapping.
fn vdso_image(pid: u32) -> Vec<u8> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    let line = maps
        .lines()
        .find(|l| l.ends_with("[vdso]"))
        .expect("[vdso]");
    let range = line.split_whitespace().next().expect("range");
    let (a, b) = range.split_once('-').expect("a-b");
    let (a, b) = (
        u64::from_str_radix(a, 16).expect("hex"),
        u64::from_str_radix(b, 16).expect("hex"),
    );
    let mut image = vec![0u8; (b - a) as usize];
    std::fs::File::open(format!("/proc/{pid}/mem"))
        .expect("mem")
        .read_exact_at(&mut image, a)
        .expect("read vdso");
    image
}

/// One line of clockprobe, as errors against true time (ms) when it was read here.
#[derive(Debug, Clone, Copy)]
struct Reading {
    vdso: f64,
    syscall: f64,
    gettimeofday: f64,
    time: f64,
    monotonic: f64,
    at: Instant,
}

/// A running clockprobe and the latest reading of each tag it prints (its own, a child's).
struct Probe {
    child: Child,
    latest: Arc<Mutex<HashMap<String, Reading>>>,
}

fn wall_ns() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as f64
}

fn mono_ns() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into our timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

impl Probe {
    fn start(bin: &std::path::Path, args: &[&str]) -> Probe {
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("clockprobe");
        let out = child.stdout.take().expect("stdout");
        let latest: Arc<Mutex<HashMap<String, Reading>>> = Default::default();
        let sink = latest.clone();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let (wall, mono) = (wall_ns(), mono_ns());
                let f: Vec<&str> = l.split_whitespace().collect();
                let n: Vec<f64> = f.iter().skip(2).filter_map(|v| v.parse().ok()).collect();
                if n.len() < 5 {
                    continue;
                }
                let r = Reading {
                    vdso: (n[0] - wall) / 1e6,
                    syscall: (n[1] - wall) / 1e6,
                    gettimeofday: (n[2] * 1e3 - wall) / 1e6,
                    // whole seconds: up to 1 s below
                    time: (n[3] * 1e9 - wall) / 1e6,
                    monotonic: (n[4] - mono) / 1e6,
                    at: Instant::now(),
                };
                sink.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(f[0].to_string(), r);
            }
        });
        let p = Probe { child, latest };
        p.reading(args.first().copied().unwrap_or("probe"));
        p
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first reading of `tag` made after this call.
    fn reading(&self, tag: &str) -> Reading {
        let asked = Instant::now();
        loop {
            let got = self
                .latest
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(tag)
                .copied();
            if let Some(r) = got.filter(|r| r.at > asked) {
                return r;
            }
            assert!(
                asked.elapsed() < Duration::from_secs(10),
                "{tag}: no reading (has the probe died?)"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// How long until a reading of `tag` satisfies `pred` (polled), None after `within`.
    fn until(
        &self,
        tag: &str,
        within: Duration,
        pred: impl Fn(&Reading) -> bool,
    ) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < within {
            if pred(&self.reading(tag)) {
                return Some(start.elapsed());
            }
        }
        None
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // The process group: a forked child goes too.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this kernel lets the kernel side move direct system calls.
fn direct_calls_move() -> bool {
    matches!(
        chaos_agent::clock::lockdown().as_deref(),
        None | Some("none")
    )
}

/// Every vDSO read path of `r` is `want_ms` off true time (within 1 s; time() is whole
/// seconds), the direct system call too where the kernel allows it, and monotonic untouched.
fn assert_moved(what: &str, r: &Reading, want_ms: f64) {
    let near = |v: f64, slack: f64| (v - want_ms).abs() < slack;
    assert!(near(r.vdso, 1000.0), "{what}: vDSO clock_gettime {r:?}");
    assert!(near(r.gettimeofday, 1000.0), "{what}: gettimeofday {r:?}");
    assert!(near(r.time + 500.0, 1500.0), "{what}: time {r:?}");
    let syscall_want = if direct_calls_move() { want_ms } else { 0.0 };
    assert!(
        (r.syscall - syscall_want).abs() < 1000.0,
        "{what}: direct syscall {r:?} (want {syscall_want} ms)"
    );
    assert!(r.monotonic.abs() < 1000.0, "{what}: monotonic moved {r:?}");
    // The offset itself, to the millisecond: the vDSO and the direct call are read
    // microseconds apart, so their difference is the offset (moved minus true, or nothing).
    let between = r.vdso - r.syscall - (want_ms - syscall_want);
    assert!(
        between.abs() < 1.0,
        "{what}: the offset is {between} ms off {r:?}"
    );
}

/// `chaosctl --local` moving `pid`'s clocks by `offset` for a minute, on `journal`.
fn skew(pid: &str, offset: &str, journal: &std::path::Path) -> LocalFault {
    LocalFault::start(
        &[
            "inject",
            "clock-skew",
            "--offset",
            offset,
            "--pid",
            pid,
            "--duration",
            "1m",
        ],
        journal,
    )
}

fn on_true_time(r: &Reading) -> bool {
    r.vdso.abs() < 1000.0 && r.syscall.abs() < 1000.0 && r.gettimeofday.abs() < 1000.0
}

/// `--pid`: the target, a child it forks after the fault began, and a program a child exec's
/// read the moved clock; a process beside them does not; revert puts the target's vDSO back
/// byte for byte and everyone on true time.
#[test]
fn the_target_its_forks_and_execs_move_and_no_one_else() {
    let _serial = serial();
    require_root();
    let dir = tmpdir("pid");
    let bin = c_app(&dir, "clockprobe");
    let forks = Probe::start(&bin, &["fork", "fork", "1500"]);
    let execs = Probe::start(&bin, &["exec", "exec", "1500"]);
    let neighbour = Probe::start(&bin, &["neighbour"]);
    let before = vdso_image(forks.pid());
    let programs = chaos_programs_loaded();
    let journal = dir.join("journal");
    let mut faults = Vec::new();
    for (probe, offset) in [(&forks, "+2h"), (&execs, "-30m")] {
        let pid = probe.pid().to_string();
        faults.push(skew(&pid, offset, &journal));
    }
    assert_moved("target", &forks.reading("fork"), 2.0 * HOUR_MS);
    assert_moved("target", &execs.reading("exec"), -0.5 * HOUR_MS);
    assert!(
        on_true_time(&neighbour.reading("neighbour")),
        "the neighbour moved"
    );
    // The fork inherits the patched page; the exec'd program gets a fresh vDSO, patched when
    // the kernel side reports the exec.
    assert_moved("forked child", &forks.reading("fork-fork"), 2.0 * HOUR_MS);
    // Past the heartbeat's bound: the fork's own copy of the page hears the beats too.
    std::thread::sleep(Duration::from_millis(1_500));
    assert_moved(
        "forked child, 1.5 s on",
        &forks.reading("fork-fork"),
        2.0 * HOUR_MS,
    );
    let patched_after = execs.until("exec-exec", Duration::from_secs(3), |r| {
        (r.vdso + 0.5 * HOUR_MS).abs() < 1000.0
    });
    eprintln!("exec'd program on the moved clock after {patched_after:?}");
    assert_moved(
        "exec'd program",
        &execs.reading("exec-exec"),
        -0.5 * HOUR_MS,
    );
    for fault in faults {
        let (status, _) = fault.stop();
        assert!(status.success(), "revert: {status}");
    }
    assert!(
        on_true_time(&forks.reading("fork")),
        "target still moved after revert"
    );
    assert!(
        on_true_time(&execs.reading("exec-exec")),
        "exec'd program still moved"
    );
    assert!(
        on_true_time(&forks.reading("fork-fork")),
        "forked child still moved after revert"
    );
    assert!(
        vdso_image(forks.pid()) == before,
        "the target's vDSO is not as it was"
    );
    assert_eq!(
        chaos_programs_loaded(),
        programs,
        "a clock program stayed loaded"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Nothing stays skewed without its owner: kill -9 of the engine, and an engine stopped
/// (SIGSTOP) with its fault's deadline far away, leave the target on true time within the
/// heartbeat's bound (1 s) plus a read.
#[test]
fn a_dead_or_frozen_engine_leaves_true_time_within_a_second() {
    let _serial = serial();
    require_root();
    let dir = tmpdir("owner");
    let bin = c_app(&dir, "clockprobe");
    for (what, signal) in [("kill -9", libc::SIGKILL), ("SIGSTOP", libc::SIGSTOP)] {
        let probe = Probe::start(&bin, &["probe"]);
        let pid = probe.pid().to_string();
        let before = vdso_image(probe.pid());
        let journal = dir.join(format!("journal-{signal}"));
        let fault = LocalFault::start(
            &[
                "inject",
                "clock-skew",
                "--offset",
                "+1h",
                "--pid",
                &pid,
                "--duration",
                "5m",
            ],
            &journal,
        );
        assert_moved(what, &probe.reading("probe"), HOUR_MS);
        // Past the bound, a live engine's beats keep it moved.
        std::thread::sleep(Duration::from_millis(1_500));
        assert_moved(
            &format!("{what}, 1.5 s on"),
            &probe.reading("probe"),
            HOUR_MS,
        );
        fault.signal(signal);
        let back = probe.until("probe", Duration::from_secs(5), on_true_time);
        eprintln!("{what} of the engine: true time again after {back:?}");
        let back = back.unwrap_or_else(|| panic!("{what}: still skewed 5 s after"));
        assert!(
            back < Duration::from_millis(1_500),
            "{what}: true time after {back:?}"
        );
        if signal == libc::SIGSTOP {
            fault.signal(libc::SIGCONT);
            let (status, _) = fault.stop();
            assert!(status.success(), "revert after SIGCONT: {status}");
        } else {
            let _ = fault.wait(Duration::from_secs(5));
            // The stub is still there (true time, through the system call): the next engine
            // on the journal puts the true vDSO back.
            assert!(vdso_image(probe.pid()) != before, "nothing left to restore");
            let (_engine, reclaimed) = chaos_agent::Engine::start(chaos_agent::EngineConfig {
                journal_dir: journal.clone(),
                ..Default::default()
            })
            .expect("engine");
            assert_eq!(reclaimed.undone, 1, "{reclaimed:?}");
            assert!(
                vdso_image(probe.pid()) == before,
                "the next engine left the stub"
            );
        }
        assert!(
            vdso_image(probe.pid()) == before,
            "{what}: the vDSO is not as it was"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad input is one line and exit 2 before anything else is looked at.
#[test]
fn bad_clock_skew_input_is_one_line_and_exit_2() {
    require_root();
    let own = std::process::id().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--offset", "0s", "--pid", "4"], "moves nothing"),
        (
            &["--offset", "1h", "--drift-ppm", "2000000", "--pid", "4"],
            "--drift-ppm",
        ),
        (
            &["--offset", "1h", "--clocks", "utc", "--pid", "4"],
            "not a clock",
        ),
        (&["--offset", "5y", "--pid", "4"], "--offset"),
        (&["--offset", "400d", "--pid", "4"], "longest duration"),
        (&["--offset", "1h", "--cgroup", "/"], "the root cgroup"),
        (&["--offset", "1h", "--pid", "1"], "init is never a target"),
        (
            &["--offset", "1h", "--pid", &own],
            "this engine or one of its ancestors",
        ),
        (
            &["--offset", "1h", "--pid", "4194304"],
            "no process 4194304",
        ),
        (&["--offset", "1h"], "exactly one of --pid"),
    ];
    let journal = tmpdir("bad");
    let programs = chaos_programs_loaded();
    for (args, want) in cases {
        let out = Command::new(bin("chaosctl"))
            .args(["inject", "clock-skew"])
            .args(*args)
            .args(["--duration", "10s", "--local"])
            .env("CHAOS_JOURNAL_DIR", &journal)
            .output()
            .expect("chaosctl");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
    assert_eq!(chaos_programs_loaded(), programs);
    let _ = std::fs::remove_dir_all(&journal);
}

/// Real programs a target starts while the fault is on: `date` and `openssl x509 -checkend`
/// (a certificate valid for one more day reads as expired two days ahead), each a fresh exec
/// that lives for milliseconds; before the fault and after revert, true time.
#[test]
fn date_and_openssl_started_by_the_target_see_the_moved_clock() {
    let _serial = serial();
    require_root();
    let dir = tmpdir("exec");
    let cert = dir.join("cert.pem");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=chaos-clock-test",
            "-keyout",
        ])
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let script = format!(
        "while :; do echo \"$(date +%s) $(openssl x509 -checkend 0 -noout -in {} >/dev/null \
         && echo valid || echo expired)\"; sleep 0.05; done",
        cert.display()
    );
    let mut shell = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh");
    let out = shell.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((l, wall_ns())).is_err() {
                break;
            }
        }
    });
    // The next line printed after now: (date's error in s, openssl's verdict).
    let next = || {
        while lines.try_recv().is_ok() {}
        let (line, at) = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("the script prints");
        let (secs, verdict) = line.split_once(' ').expect("two fields");
        let secs: f64 = secs.parse().expect("date +%s");
        (secs - at / 1e9, verdict.to_string())
    };
    let (err, verdict) = next();
    assert!(
        err.abs() < 2.0 && verdict == "valid",
        "before: {err} s, {verdict}"
    );
    let pid = shell.id().to_string();
    let fault = skew(&pid, "+2d", &dir.join("journal"));
    // A line printed now may hold a `date` run before the apply: past one round of the loop.
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        let (err, verdict) = next();
        assert!(
            (err - 172_800.0).abs() < 2.0,
            "date is {err} s off, not two days"
        );
        assert_eq!(verdict, "expired", "openssl two days ahead");
    }
    let (status, _) = fault.stop();
    assert!(status.success(), "revert: {status}");
    std::thread::sleep(Duration::from_millis(300));
    let (err, verdict) = next();
    assert!(
        err.abs() < 2.0 && verdict == "valid",
        "after: {err} s, {verdict}"
    );
    let _ = shell.kill();
    let _ = shell.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A static Go binary (CGO_ENABLED=0: no libc; the runtime finds and calls the vDSO's
/// functions itself, on its own stack) reads the moved clock through `time.Now()` and
/// `syscall.Gettimeofday`, its direct system calls as this kernel allows, and true time again
/// after revert, with its vDSO as it was.
#[test]
fn a_static_go_binary_reads_the_moved_clock() {
    let _serial = serial();
    require_root();
    let dir = tmpdir("go");
    let bin = dir.join("clockprobe-go");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("apps/clockprobe.go");
    let st = Command::new("go")
        .arg("build")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", dir.join("gocache"))
        .env("GOPATH", dir.join("gopath"))
        .env("GO111MODULE", "off")
        .status()
        .expect("go (golang-go; scripts/setup.sh installs it)");
    assert!(st.success(), "go build clockprobe.go");
    let go = Probe::start(&bin, &["go"]);
    let before = vdso_image(go.pid());
    let pid = go.pid().to_string();
    let fault = skew(&pid, "+3d", &dir.join("journal"));
    assert_moved("Go target", &go.reading("go"), 72.0 * HOUR_MS);
    let (status, _) = fault.stop();
    assert!(status.success(), "revert: {status}");
    assert!(
        on_true_time(&go.reading("go")),
        "the Go target is still moved after revert"
    );
    assert!(
        vdso_image(go.pid()) == before,
        "the Go target's vDSO is not as it was"
    );
    drop(go);
    let _ = std::fs::remove_dir_all(&dir);
}
