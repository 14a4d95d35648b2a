//! clock-skew on the real kernel, through `chaosctl --local`. Targets are only processes these
//! tests start (a C reader compiled from tests/apps/clockprobe.c).
//!
//! This host's kernel is locked down (integrity): bpf_probe_write_user, which moves a read's
//! result, is refused to everyone, so here the fault must be refused in one line with nothing
//! touched: no program loaded, the target's vDSO byte for byte as it was, the target still
//! reading true time.
use chaos_tests::*;
use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("chaos-clock-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

/// The clock reader, built once per test run.
fn clockprobe(dir: &std::path::Path) -> PathBuf {
    let out = dir.join("clockprobe");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("apps/clockprobe.c");
    let st = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc");
    assert!(st.success(), "cc clockprobe.c");
    out
}

fn lockdown() -> Option<String> {
    if !std::path::Path::new("/sys/kernel/security/lockdown").exists() {
        sh("mount -t securityfs securityfs /sys/kernel/security");
    }
    let text = std::fs::read_to_string("/sys/kernel/security/lockdown").ok()?;
    let mode = text.split_whitespace().find(|w| w.starts_with('['))?;
    Some(mode.trim_matches(['[', ']']).to_string())
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

struct Probe {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Probe {
    fn start(bin: &std::path::Path) -> Probe {
        let mut child = Command::new(bin)
            .arg("probe")
            .stdout(Stdio::piped())
            .spawn()
            .expect("clockprobe");
        let out = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let p = Probe { child, lines };
        p.lines
            .recv_timeout(Duration::from_secs(10))
            .expect("clockprobe prints");
        p
    }

    /// The next reading's vDSO and syscall realtime minus true time, in ms.
    fn error_ms(&self) -> (f64, f64) {
        while self.lines.try_recv().is_ok() {}
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .expect("clockprobe still prints");
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos() as f64;
        let f: Vec<f64> = line
            .split_whitespace()
            .skip(2)
            .filter_map(|v| v.parse().ok())
            .collect();
        ((f[0] - now) / 1e6, (f[1] - now) / 1e6)
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Under lockdown: one line naming it, exit 1, nothing loaded, the target untouched.
#[test]
fn a_locked_down_kernel_refuses_clock_skew_in_one_line_and_nothing_is_touched() {
    let _serial = serial();
    require_root();
    let Some(mode) = lockdown().filter(|m| m != "none") else {
        eprintln!("skipped: this kernel is not locked down (the refusal is for locked-down ones)");
        return;
    };
    let dir = tmpdir("lockdown");
    let probe = Probe::start(&clockprobe(&dir));
    let pid = probe.child.id();
    let before = vdso_image(pid);
    let programs = chaos_programs_loaded();
    let out = Command::new(bin("chaosctl"))
        .args(["inject", "clock-skew", "--offset", "+2h", "--pid"])
        .arg(pid.to_string())
        .args(["--duration", "5s", "--local"])
        .env("CHAOS_JOURNAL_DIR", dir.join("journal"))
        .output()
        .expect("chaosctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!("locked down ({mode})")) && err.contains("nothing was applied"),
        "{err}"
    );
    assert_eq!(
        chaos_programs_loaded(),
        programs,
        "a clock program stayed loaded"
    );
    assert!(vdso_image(pid) == before, "the target's vDSO changed");
    let (vdso, syscall) = probe.error_ms();
    assert!(
        vdso.abs() < 1000.0 && syscall.abs() < 1000.0,
        "{vdso} {syscall} ms"
    );
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
