//! process-pause on the VMs' kernels (Debian 6.1, both arches): SIGSTOP of a process tree and
//! the cgroup v2 freezer (mounted here: the VM's init mounts none), thawed at revert, when the
//! engine is killed -9, and at the deadline while the engine is itself stopped. The targets are
//! this binary's own `pause-tick` children. Prints `BENCH_PAUSE {json}`.
use super::{Checks, engine};
use chaos_agent::spec::{FaultKind, FaultSpec, ProcessRef, Target};
use chaos_tests::cgroups::{TestCgroup, cgroup_frozen, sigstopped};
use chaos_tests::{ms_after, time_until, watch};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const JOURNAL: &str = "/run/chaos-journal-pause";
/// TCG runs every guest instruction through the emulator: the slack allowed past a deadline.
const DEADLINE_SLACK: Duration = Duration::from_millis(600);

/// `chaos-vmtest pause-tick FILE [child]`: appends a byte to FILE every 10 ms, and with `child`
/// first starts another ticker on FILE.child (a descendant the pause must reach).
pub fn tick() -> ! {
    let file = std::env::args().nth(2).expect("pause-tick FILE");
    let _child = (std::env::args().nth(3).as_deref() == Some("child")).then(|| {
        Command::new(std::env::current_exe().expect("exe"))
            .args(["pause-tick", &format!("{file}.child")])
            .spawn()
            .expect("child ticker")
    });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&file)
        .expect("tick file");
    loop {
        let _ = f.write_all(b"x");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `chaos-vmtest hold-pause JOURNAL pid:N|cgroup:PATH SECONDS`: an engine in its own process
/// (so kill -9 and SIGSTOP of it are real) holding a pause; prints `held`, then waits.
pub fn hold() -> ! {
    let arg = |i| std::env::args().nth(i).unwrap_or_default();
    let e = engine(&arg(2));
    let target = parse_target(&arg(3));
    let secs = arg(4).parse().expect("hold-pause SECONDS");
    match e.apply(pause(target, Duration::from_secs(secs))) {
        Ok(_) => println!("held"),
        Err(err) => println!("failed: {err}"),
    }
    std::thread::sleep(Duration::from_secs(600));
    std::process::exit(0)
}

fn parse_target(s: &str) -> ProcessRef {
    match s.split_once(':') {
        Some(("pid", pid)) => ProcessRef::Pid(pid.parse().expect("pid")),
        Some(("cgroup", path)) => ProcessRef::Cgroup(path.into()),
        _ => panic!("hold-pause target: pid:N or cgroup:PATH, not {s}"),
    }
}

fn pause(target: ProcessRef, duration: Duration) -> FaultSpec {
    FaultSpec {
        kind: FaultKind::ProcessPause {
            target,
            name: String::new(),
        },
        target: Target::none(),
        duration,
    }
}

/// A `pause-tick` child (with its own child when asked), killed with its tree on drop.
struct Ticker {
    child: Child,
    file: PathBuf,
    with_child: bool,
}

impl Ticker {
    fn start(name: &str, with_child: bool) -> Ticker {
        let file = PathBuf::from(format!("/run/pause-{name}.ticks"));
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_file(format!("{}.child", file.display()));
        let mut cmd = Command::new(std::env::current_exe().expect("exe"));
        cmd.arg("pause-tick").arg(&file);
        if with_child {
            cmd.arg("child");
        }
        let t = Ticker {
            child: cmd.stdin(Stdio::null()).spawn().expect("ticker"),
            file,
            with_child,
        };
        assert!(
            t.runs_within(Duration::from_secs(5)),
            "ticker {name} never ticked"
        );
        t
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child it started (the only entry of its children file).
    fn child_pid(&self) -> Option<u32> {
        let pid = self.pid();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    fn sizes(&self) -> (u64, u64) {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let child = PathBuf::from(format!("{}.child", self.file.display()));
        (size(&self.file), size(&child))
    }

    /// Whether it (and, when it has one, its child) appends within `within`.
    fn runs_within(&self, within: Duration) -> bool {
        let before = self.sizes();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let now = self.sizes();
            if now.0 > before.0 && (!self.with_child || now.1 > before.1) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Whether neither it nor its child appends within `within`.
    fn still_for(&self, within: Duration) -> bool {
        let before = self.sizes();
        std::thread::sleep(within);
        self.sizes() == before
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let pids: Vec<u32> = self.child_pid().into_iter().chain([self.pid()]).collect();
        for pid in pids {
            // SAFETY: our own children; SIGCONT first so a stopped one can die.
            unsafe {
                libc::kill(pid as i32, libc::SIGCONT);
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        let _ = self.child.wait();
    }
}

/// Live guards (the process that thaws without the engine): none may outlive its pause.
fn guards() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| chaos_tests::cgroups::comm(*p) == "chaos-guard")
        .filter(|p| chaos_tests::cgroups::run_state(*p) != 'Z')
        .collect()
}

/// The VM's init mounts no cgroup file system: cgroup v2 at /sys/fs/cgroup, as systemd would.
fn mount_cgroup2() -> Result<(), String> {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .map_err(|e| e.to_string())?
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("cgroup2"));
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/cgroup").map_err(|e| e.to_string())?;
    let st = Command::new("/bin/mount")
        .args(["-t", "cgroup2", "none", "/sys/fs/cgroup"])
        .status()
        .map_err(|e| e.to_string())?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("mount -t cgroup2: {st}"))
    }
}

/// An engine in its own process holding a pause of `target` for `secs`.
fn holder(target: &str, secs: u64) -> Result<Child, String> {
    super::held_child(&["hold-pause", JOURNAL, target, &secs.to_string()])
}

pub fn process_pause(c: &mut Checks) {
    let e = engine(JOURNAL);
    let mut json = Vec::new();

    // --pid: the process and the child it started stop; a neighbour runs on.
    let target = Ticker::start("target", true);
    let neighbour = Ticker::start("neighbour", false);
    let (pid, child) = (target.pid(), target.child_pid().unwrap_or(0));
    let w = watch(Duration::from_micros(100), move || {
        sigstopped(pid) && sigstopped(child)
    });
    let t = Instant::now();
    let applied = e.apply(pause(ProcessRef::Pid(pid), Duration::from_secs(120)));
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;
    let stopped_ms = ms_after(t, w);
    match applied {
        Ok(f) => {
            let at_return = sigstopped(pid) && sigstopped(child);
            let still = target.still_for(Duration::from_millis(300));
            let others = neighbour.runs_within(Duration::from_millis(300));
            c.check(
                "process-pause --pid: it and its child stopped by apply's return, the neighbour runs",
                f.backend.contains("signal") && at_return && still && others,
                format!(
                    "method {}, stopped at return {at_return}, still 300 ms {still}, neighbour \
                     ran {others}; apply {apply_ms:.1} ms, stopped {stopped_ms:.1} ms after it \
                     began; guards {:?}",
                    f.backend,
                    guards()
                ),
            );
            let reverted = e.revert(&f.id);
            let resumed = target.runs_within(Duration::from_secs(1));
            let left = time_until(Duration::from_secs(2), || guards().is_empty()).is_none();
            c.check(
                "process-pause --pid: revert resumes both, no guard left",
                reverted.is_ok() && resumed && !left,
                format!(
                    "revert {:?}, resumed {resumed}, guards {:?}",
                    reverted.err(),
                    guards()
                ),
            );
        }
        Err(err) => c.check("process-pause --pid: apply", false, err.to_string()),
    }
    json.push(format!(
        "\"pid_apply_ms\":{apply_ms:.1},\"pid_apply_to_stopped_ms\":{stopped_ms:.1}"
    ));

    // The cgroup v2 freezer: a whole cgroup.
    let cgroup = match mount_cgroup2() {
        Ok(()) => Some(TestCgroup::in_hierarchies("pause", |h| h.v2)),
        Err(err) => {
            c.check("process-pause: cgroup v2 mounted", false, err);
            None
        }
    };
    if let Some(cg) = &cgroup {
        let frozen_t = Ticker::start("frozen", false);
        cg.add(frozen_t.pid());
        let dir = cg.dirs[0].clone();
        let d = dir.clone();
        let w = watch(Duration::from_micros(100), move || cgroup_frozen(&d, true));
        let t = Instant::now();
        let applied = e.apply(pause(
            ProcessRef::Cgroup(cg.path.clone()),
            Duration::from_secs(120),
        ));
        let apply_ms = t.elapsed().as_secs_f64() * 1e3;
        let frozen_ms = ms_after(t, w);
        match applied {
            Ok(f) => {
                let at_return = cgroup_frozen(&dir, true);
                let still = frozen_t.still_for(Duration::from_millis(300));
                c.check(
                    "process-pause --cgroup: the v2 freezer holds the cgroup",
                    f.backend == "freezer/v2" && at_return && still,
                    format!(
                        "method {}, frozen at return {at_return}, still 300 ms {still}; apply \
                         {apply_ms:.1} ms, frozen {frozen_ms:.1} ms after it began",
                        f.backend
                    ),
                );
                let reverted = e.revert(&f.id);
                let thawed = !cgroup_frozen(&dir, true);
                let resumed = frozen_t.runs_within(Duration::from_secs(1));
                c.check(
                    "process-pause --cgroup: revert thaws it",
                    reverted.is_ok() && thawed && resumed,
                    format!(
                        "revert {:?}, thawed {thawed}, resumed {resumed}",
                        reverted.err()
                    ),
                );
            }
            Err(err) => c.check("process-pause --cgroup: apply", false, err.to_string()),
        }
        json.push(format!(
            "\"cgroup_v2_apply_ms\":{apply_ms:.1},\"cgroup_v2_apply_to_frozen_ms\":{frozen_ms:.1}"
        ));
    }
    drop(e);

    // kill -9 of the engine, nothing restarted: the guard thaws at once.
    let mut kill9 = Vec::new();
    let in_cg = cgroup.as_ref().map(|cg| {
        let t = Ticker::start("kill9-cgroup", false);
        cg.add(t.pid());
        (format!("cgroup:{}", cg.path), t)
    });
    let by_pid = Ticker::start("kill9-pid", false);
    let cases = [(format!("pid:{}", by_pid.pid()), &by_pid)]
        .into_iter()
        .chain(in_cg.as_ref().map(|(s, t)| (s.clone(), t)));
    for (what, ticker) in cases {
        match holder(&what, 300) {
            Ok(mut h) => {
                let paused = ticker.still_for(Duration::from_millis(200));
                let before = ticker.sizes();
                let killed = Instant::now();
                let _ = h.kill();
                let _ = h.wait();
                // Within one tick (10 ms) of the thaw.
                let resumed = time_until(Duration::from_secs(3), || ticker.sizes() != before)
                    .map(|_| killed.elapsed());
                let left = time_until(Duration::from_secs(2), || guards().is_empty()).is_none();
                let ms = resumed.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
                kill9.push(format!("{ms:.1}"));
                c.check(
                    &format!("process-pause {what}: kill -9 of the engine thaws within 1 s"),
                    paused && resumed.is_some_and(|d| d < Duration::from_secs(1)) && !left,
                    format!(
                        "paused before {paused}; running again {ms:.1} ms after the kill; \
                         guards {:?}",
                        guards()
                    ),
                );
            }
            Err(err) => c.check(&format!("process-pause {what}: holder"), false, err),
        }
    }
    json.push(format!("\"kill9_to_thawed_ms\":[{}]", kill9.join(",")));

    // An engine stopped (SIGSTOP) past its deadline: the guard still thaws on time.
    let late = Ticker::start("deadline", false);
    match holder(&format!("pid:{}", late.pid()), 2) {
        Ok(mut h) => {
            let applied = Instant::now();
            // SAFETY: our own child, the holding engine.
            unsafe { libc::kill(h.id() as i32, libc::SIGSTOP) };
            let pid = late.pid();
            let thawed =
                time_until(Duration::from_secs(6), || !sigstopped(pid)).map(|_| applied.elapsed());
            // SAFETY: as above.
            unsafe { libc::kill(h.id() as i32, libc::SIGCONT) };
            let _ = h.kill();
            let _ = h.wait();
            let over = thawed.map(|d| d.as_secs_f64() * 1e3 - 2000.0);
            c.check(
                "process-pause: with its engine stopped, the pause ends at its 2 s deadline",
                thawed.is_some_and(|d| {
                    d >= Duration::from_millis(1900) && d <= Duration::from_secs(2) + DEADLINE_SLACK
                }) && late.runs_within(Duration::from_secs(1)),
                format!("thawed {thawed:?} after apply returned"),
            );
            json.push(format!(
                "\"deadline_overshoot_ms\":{:.1}",
                over.unwrap_or(f64::NAN)
            ));
        }
        Err(err) => c.check("process-pause: deadline holder", false, err),
    }
    println!("BENCH_PAUSE {{{}}}", json.join(",").replace("NaN", "null"));
}
