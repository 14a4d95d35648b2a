//! process-pause and process-kill on the real kernel, through `chaosctl --local` (the engine in
//! its own process, so `kill -9` and SIGSTOP of it are real). Targets are only processes these
//! tests start, in cgroups they create: a ticker that appends a line every 20 ms shows whether
//! it runs. Measured: time from apply to frozen, and from the engine's death (or deadline) to
//! thawed.
use chaos_tests::cgroups::*;
use chaos_tests::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("chaos-process-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

/// A shell appending a line to its file every 20 ms (and forking `sleep` to wait).
struct Ticker {
    child: Child,
    file: PathBuf,
}

impl Ticker {
    fn start(dir: &Path, name: &str) -> Ticker {
        let file = dir.join(format!("{name}.ticks"));
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while :; do echo x >> {}; sleep 0.02; done",
                file.display()
            ))
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("ticker");
        let t = Ticker { child, file };
        t.wait_ticking();
        t
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn ticks(&self) -> usize {
        std::fs::read_to_string(&self.file)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// Whether it ticks within `within` (a frozen ticker does not).
    fn ticks_within(&self, within: Duration) -> bool {
        let before = self.ticks();
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.ticks() > before {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn wait_ticking(&self) {
        assert!(
            self.ticks_within(Duration::from_secs(5)),
            "ticker {} never ticked",
            self.pid()
        );
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        // SAFETY: our own child's process group (it and its `sleep`s); SIGCONT first so a
        // stopped one can die.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGCONT);
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Processes named chaos-thaw (the guards): none may outlive its pause.
fn guards() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| comm(*p) == "chaos-guard" && run_state(*p) != 'Z')
        .collect()
}

/// `--pid`: the process and its descendants stop (state T) by the time apply returns, a
/// process beside them keeps running; revert (Ctrl-C) resumes them and leaves no guard.
#[test]
fn pause_by_pid_stops_the_tree_and_not_its_neighbour() {
    let _g = serial();
    let dir = tmpdir("pid");
    let target = Ticker::start(&dir, "target");
    let neighbour = Ticker::start(&dir, "neighbour");
    let pid = target.pid().to_string();
    let started = Instant::now();
    let fault = LocalFault::start(
        &["inject", "process-pause", "--pid", &pid, "--duration", "1m"],
        &dir.join("journal"),
    );
    let applied_after = started.elapsed();
    assert!(sigstopped(target.pid()), "target not stopped at apply");
    assert!(fault.applied.contains("signal/stop"), "{}", fault.applied);
    assert!(
        !target.ticks_within(Duration::from_millis(400)),
        "target ticked while paused"
    );
    assert!(
        neighbour.ticks_within(Duration::from_millis(400)),
        "the neighbour was paused too"
    );
    assert_eq!(guards().len(), 1, "one guard while paused: {:?}", guards());
    let (status, out) = fault.stop();
    assert!(status.success(), "{out}");
    let reverted = json_event(&out, "reverted");
    assert!(
        reverted["counters"]["affected"].as_u64() >= Some(1),
        "{reverted}"
    );
    assert!(
        target.ticks_within(Duration::from_secs(1)),
        "target not resumed after revert"
    );
    assert!(
        guards().is_empty(),
        "a guard outlived the revert: {:?}",
        guards()
    );
    eprintln!("pause --pid: chaosctl applied and stopped the target in {applied_after:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A whole cgroup goes to the cgroup freezer, v1 (freezer.state) and v2 (cgroup.freeze), each
/// where this host has it; revert thaws it.
#[test]
fn a_whole_cgroup_is_frozen_by_the_freezer() {
    let _g = serial();
    let dir = tmpdir("freezer");
    let hierarchies = chaos_agent::cgroup::hierarchies().expect("mountinfo");
    let mut tried = 0;
    for (label, v2) in [("freezer/v1", false), ("freezer/v2", true)] {
        let has = hierarchies.iter().any(|h| {
            if v2 {
                h.v2
            } else {
                h.controllers.iter().any(|c| c == "freezer")
            }
        });
        if !has {
            eprintln!("{label}: not mounted here, skipped");
            continue;
        }
        tried += 1;
        let cg = TestCgroup::in_hierarchies(if v2 { "frz2" } else { "frz1" }, |h| {
            if v2 {
                h.v2
            } else {
                h.controllers.iter().any(|c| c == "freezer")
            }
        });
        let target = Ticker::start(&dir, label.replace('/', "-").as_str());
        cg.add(target.pid());
        let cgdir = cg.dirs[0].clone();
        let frozen = || cgroup_frozen(&cgdir, v2);
        let fault = LocalFault::start(
            &[
                "inject",
                "process-pause",
                "--cgroup",
                &cg.path,
                "--duration",
                "1m",
            ],
            &dir.join("journal"),
        );
        assert!(fault.applied.contains(label), "{label}: {}", fault.applied);
        assert!(frozen(), "{label}: not frozen at apply");
        assert!(
            !target.ticks_within(Duration::from_millis(300)),
            "{label}: ticked while frozen"
        );
        let (status, out) = fault.stop();
        assert!(status.success(), "{out}");
        assert!(!frozen(), "{label}: still frozen after revert");
        assert!(
            target.ticks_within(Duration::from_secs(1)),
            "{label}: not resumed"
        );
        drop(target);
    }
    assert!(tried > 0, "neither freezer is mounted here");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `kill -9` of the engine mid-pause, nothing restarted: the guard thaws the target at once
/// (SIGSTOP'd processes and a frozen cgroup alike), then exits.
#[test]
fn kill_9_of_the_engine_thaws_within_a_second() {
    let _g = serial();
    let dir = tmpdir("kill9");
    let cg = TestCgroup::in_hierarchies("kill9", |h| {
        h.v2 || h.controllers.iter().any(|c| c == "freezer")
    });
    let by_pid = Ticker::start(&dir, "by-pid");
    let in_cgroup = Ticker::start(&dir, "in-cgroup");
    cg.add(in_cgroup.pid());
    let pid = by_pid.pid().to_string();
    for (what, args, ticker) in [
        ("--pid", ["--pid", pid.as_str()], &by_pid),
        ("--cgroup", ["--cgroup", cg.path.as_str()], &in_cgroup),
    ] {
        let mut all = vec!["inject", "process-pause"];
        all.extend_from_slice(&args);
        all.extend_from_slice(&["--duration", "5m"]);
        let fault = LocalFault::start(&all, &dir.join("journal"));
        assert!(
            !ticker.ticks_within(Duration::from_millis(200)),
            "{what}: not paused"
        );
        let before = ticker.ticks();
        fault.signal(libc::SIGKILL);
        // Within one tick period (20 ms) of the thaw.
        let resumed = time_until(Duration::from_secs(3), || ticker.ticks() > before);
        let _ = fault.wait(Duration::from_secs(5));
        let thawed = ticker.ticks_within(Duration::from_secs(1));
        eprintln!("{what}: kill -9 of the engine, target running again after {resumed:?}");
        assert!(thawed, "{what}: still paused after the engine's death");
        let resumed = resumed.expect("resumed");
        assert!(
            resumed < Duration::from_secs(1),
            "{what}: thawed {resumed:?} after kill -9"
        );
        assert!(
            time_until(Duration::from_secs(2), || guards().is_empty()).is_some(),
            "{what}: the guard did not exit: {:?}",
            guards()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An engine that is itself stopped (SIGSTOP, a debugger, a frozen VM) still ends its pause on
/// time: the guard thaws at the deadline.
#[test]
fn a_stopped_engine_still_ends_the_pause_at_its_deadline() {
    let _g = serial();
    let dir = tmpdir("stopped");
    let target = Ticker::start(&dir, "target");
    let pid = target.pid().to_string();
    let fault = LocalFault::start(
        &["inject", "process-pause", "--pid", &pid, "--duration", "2s"],
        &dir.join("journal"),
    );
    let applied = Instant::now();
    fault.signal(libc::SIGSTOP);
    let thawed = time_until(Duration::from_secs(6), || !sigstopped(target.pid()));
    fault.signal(libc::SIGCONT);
    let (status, out) = fault.wait(Duration::from_secs(10));
    let thawed = thawed.expect("never thawed while the engine was stopped");
    eprintln!("engine stopped: target thawed {thawed:?} after apply (deadline 2 s)");
    assert!(status.success(), "{out}");
    assert!(
        thawed >= Duration::from_millis(1900) && thawed < Duration::from_millis(2500),
        "thawed {thawed:?} after apply, deadline 2 s"
    );
    assert!(target.ticks_within(Duration::from_secs(1)));
    let _ = applied;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The engine and its guard both killed (a container's cgroup killed whole): the journal names
/// what was stopped, and the next engine thaws it.
#[test]
fn the_next_engine_thaws_what_a_dead_engine_and_guard_left() {
    let _g = serial();
    let dir = tmpdir("journal");
    let journal = dir.join("journal");
    let target = Ticker::start(&dir, "target");
    let pid = target.pid().to_string();
    let fault = LocalFault::start(
        &["inject", "process-pause", "--pid", &pid, "--duration", "5m"],
        &journal,
    );
    let guard = guards();
    assert_eq!(guard.len(), 1, "{guard:?}");
    // SAFETY: the guard our chaosctl started; then chaosctl itself.
    unsafe { libc::kill(guard[0] as i32, libc::SIGKILL) };
    assert!(time_until(Duration::from_secs(2), || guards().is_empty()).is_some());
    fault.signal(libc::SIGKILL);
    let _ = fault.wait(Duration::from_secs(5));
    assert!(
        !target.ticks_within(Duration::from_millis(500)),
        "thawed without an engine or guard (the test would prove nothing)"
    );
    let (_engine, reclaimed) = chaos_agent::Engine::start(chaos_agent::EngineConfig {
        journal_dir: journal.clone(),
        ..Default::default()
    })
    .expect("engine");
    // The ticker and the `sleep` it had forked, if any.
    assert!((1..=2).contains(&reclaimed.undone), "{reclaimed:?}");
    assert!(
        target.ticks_within(Duration::from_secs(1)),
        "not thawed by the next engine"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `process-kill --every`: a crash loop. A supervisor restarts its `sleep` child; every round
/// kills the current one, the supervisor (whose name does not match) lives on.
#[test]
fn process_kill_every_interval_is_a_crash_loop() {
    let _g = serial();
    let dir = tmpdir("crash");
    let cg = TestCgroup::new("crash");
    // It waits for a line on stdin, so its children are born inside the cgroup.
    let mut supervisor = Command::new("sh")
        .arg("-c")
        .arg("read go; while :; do sleep 100; done")
        .stdin(Stdio::piped())
        .spawn()
        .expect("supervisor");
    cg.add(supervisor.id());
    {
        use std::io::Write;
        let mut stdin = supervisor.stdin.take().expect("stdin");
        stdin.write_all(b"go\n").expect("go");
    }
    assert!(
        time_until(Duration::from_secs(2), || cg.procs().len() == 2).is_some(),
        "{:?}",
        cg.procs()
    );
    let fault = LocalFault::start(
        &[
            "inject",
            "process-kill",
            "--cgroup",
            &cg.path,
            "--name",
            "^sleep$",
            "--every",
            "300ms",
            "--duration",
            "2s",
        ],
        &dir.join("journal"),
    );
    let (status, out) = fault.wait(Duration::from_secs(10));
    assert!(status.success(), "{out}");
    let reverted = json_event(&out, "reverted");
    let killed = reverted["counters"]["affected"].as_u64().unwrap_or(0);
    eprintln!("crash loop: 2 s every 300 ms killed {killed} sleeps: {reverted}");
    // Rounds at 0, 0.3, ... 1.8 s: 7, less any the supervisor had not yet restarted.
    assert!((5..=7).contains(&killed), "killed {killed}, want 5-7");
    assert!(
        supervisor.try_wait().expect("try_wait").is_none(),
        "the supervisor was killed"
    );
    let _ = supervisor.kill();
    let _ = supervisor.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad targets are one line, exit 2, nothing paused: this test (the engine's ancestor), the
/// root cgroup, init, a bad regex, an interval under the floor, a pid that does not exist.
#[test]
fn bad_process_targets_are_one_line_and_exit_2() {
    let own = std::process::id().to_string();
    let cases: &[(&[&str], &str)] = &[
        (
            &["process-pause", "--pid", &own],
            "this engine or one of its ancestors",
        ),
        (&["process-pause", "--cgroup", "/"], "the root cgroup"),
        (&["process-kill", "--pid", "1"], "init is never a target"),
        (&["process-kill", "--pid", "4", "--name", "("], "--name"),
        (
            &["process-kill", "--pid", "4", "--every", "10ms"],
            "at least 100ms",
        ),
        (&["process-pause", "--pid", "4194304"], "no process 4194304"),
        (&["process-pause"], "exactly one of --pid"),
    ];
    let journal = tmpdir("bad");
    for (args, want) in cases {
        let out = Command::new(bin("chaosctl"))
            .arg("inject")
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
    assert!(guards().is_empty());
    let _ = std::fs::remove_dir_all(&journal);
}
