//! CPU stress on the real kernel: achieved load measured from /proc/PID/stat, workers in the
//! requested cgroups, nothing left after revert or after `kill -9` of the agent, bad input
//! refused. Real processes, in cgroups the tests create (and remove, even on failure).
use chaos_agent::engine::{Engine, EngineConfig};
use chaos_agent::journal::{Entry, JournalFile, Owner};
use chaos_agent::netns::NetnsId;
use chaos_agent::spec::{CgroupRef, FaultKind, FaultSpec, Target};
use chaos_tests::cgroups::*;
use chaos_tests::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("chaos-stress-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

fn cpu(workers: u32, load_percent: f64, cgroup: CgroupRef) -> FaultSpec {
    FaultSpec {
        kind: FaultKind::Cpu {
            workers,
            load_percent,
            cgroup,
        },
        target: Target::none(),
        duration: Duration::from_secs(120),
    }
}

/// Waits until every (pid, start time) is gone; returns the ones still there at the deadline.
fn wait_gone(workers: &[(u32, u64)], within: Duration) -> Vec<u32> {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<u32> = workers
            .iter()
            .filter(|(p, s)| !process_gone(*p, *s))
            .map(|(p, _)| *p)
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// 1 worker at 50 %: measured over 10 s, within 3 percentage points; in every hierarchy of the
/// cgroup; gone (reaped, not a zombie) after revert.
#[test]
fn one_worker_holds_50_percent_inside_the_cgroup_and_revert_removes_it() {
    let _g = serial();
    let cg = TestCgroup::new("load");
    let journal = tmpdir("load");
    let engine = engine_at(&journal);
    let f = engine
        .apply(cpu(1, 50.0, CgroupRef::Path(cg.path.clone())))
        .expect("apply");
    assert_eq!(f.backend, "stress/clone3", "this kernel has clone3");
    let pids = cg.procs();
    assert_eq!(pids.len(), 1, "one worker in {}: {pids:?}", cg.path);
    for dir in &cg.dirs {
        assert_eq!(
            TestCgroup::procs_in(dir),
            pids,
            "worker not in {}",
            dir.display()
        );
    }
    let pid = pids[0];
    assert_eq!(comm(pid), "chaos-cpu");
    let start = start_time(pid).expect("worker start time");
    let journal_text =
        std::fs::read_to_string(journal.join(format!("{}.json", std::process::id())))
            .expect("journal written");
    let file: JournalFile = serde_json::from_str(&journal_text).expect("journal json");
    assert_eq!(
        file.faults[0].workers,
        [Owner {
            pid,
            start_time: start
        }],
        "journal names the worker"
    );

    std::thread::sleep(Duration::from_secs(1));
    let measured = measure_percent(&[pid], Duration::from_secs(10));
    eprintln!("requested 50 %, measured {measured:.2} % over 10 s");
    assert!(
        (measured - 50.0).abs() <= 3.0,
        "measured {measured:.2} % of one CPU, want 50 +- 3"
    );
    assert!(
        engine.status(&f.id).expect("status").counters.cpu_time_us > 4_000_000,
        "cpu time counter"
    );

    let ended = engine.revert(&f.id).expect("revert");
    assert!(
        ended.counters.cpu_time_us > 5_000_000,
        "{:?}",
        ended.counters
    );
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "worker {pid} still exists after revert (a zombie is a leak too)"
    );
    assert!(
        cg.procs().is_empty(),
        "left in the cgroup: {:?}",
        cg.procs()
    );
    assert!(
        !journal
            .join(format!("{}.json", std::process::id()))
            .exists(),
        "journal entry outlived the revert"
    );
    drop(engine);
    let _ = std::fs::remove_dir_all(&journal);
}

/// `--pid`: workers join the target process's own cgroups.
#[test]
fn workers_join_the_cgroups_of_a_pid() {
    let _g = serial();
    let cg = TestCgroup::new("pid");
    let journal = tmpdir("pid");
    let mut target = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("sleep");
    cg.add(target.id());
    let engine = engine_at(&journal);
    let f = engine
        .apply(cpu(2, 10.0, CgroupRef::Pid(target.id())))
        .expect("apply");
    for dir in &cg.dirs {
        let mut procs = TestCgroup::procs_in(dir);
        procs.retain(|p| *p != target.id());
        assert_eq!(procs.len(), 2, "workers in {}: {procs:?}", dir.display());
        assert!(procs.iter().all(|p| comm(*p) == "chaos-cpu"));
    }
    engine.revert(&f.id).expect("revert");
    assert_eq!(cg.procs(), [target.id()], "only the target is left");
    let _ = target.kill();
    let _ = target.wait();
    drop(engine);
    let _ = std::fs::remove_dir_all(&journal);
}

/// A real chaos-agent, driven by chaosctl; `kill -9` of the agent ends every worker (their
/// parent-death signal), and a new agent on the same journal finds nothing left to kill.
#[test]
fn kill_9_of_the_agent_leaves_no_worker() {
    let _g = serial();
    let cg = TestCgroup::new("kill9");
    let dir = tmpdir("kill9");
    let (socket, journal) = (dir.join("agent.sock"), dir.join("journal"));
    let mut agent = Agent::start_at(&socket, &journal, &[]);
    let o = agent.chaosctl(&[
        "inject",
        "cpu",
        "--workers",
        "3",
        "--load",
        "20",
        "--cgroup",
        &cg.path,
        "--duration",
        "1m",
        "--json",
    ]);
    assert!(
        o.status.success(),
        "inject: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let applied = json_event(&String::from_utf8_lossy(&o.stdout), "applied");
    assert_eq!(applied["backend"], "stress/clone3");
    let o = agent.chaosctl(&["list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).expect("list json");
    assert_eq!(listed[0]["kind"], "cpu", "{listed}");
    assert_eq!(listed[0]["target"], format!("cgroup {}", cg.path));

    // A cgroup that exists nowhere: refused by the agent, exit 2, one line.
    let o = agent.chaosctl(&[
        "inject",
        "cpu",
        "--load",
        "10",
        "--cgroup",
        "/chaos-no-such-cgroup",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--cgroup"), "{err}");

    let pids = cg.procs();
    assert_eq!(pids.len(), 3, "{pids:?}");
    let workers: Vec<(u32, u64)> = pids
        .iter()
        .map(|p| (*p, start_time(*p).expect("start time")))
        .collect();
    let killed_at = Instant::now();
    agent.kill9();
    let left = wait_gone(&workers, Duration::from_secs(2));
    assert!(left.is_empty(), "workers outlived the agent: {left:?}");
    eprintln!(
        "all {} workers gone {:?} after kill -9 of the agent",
        workers.len(),
        killed_at.elapsed()
    );

    // The next agent reclaims the orphaned journal; no worker was left for it.
    let agent2 = Agent::start_at(&socket, &journal, &[]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let old = journal.join(format!("{}.json", agent.child.id()));
    while old.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!old.exists(), "orphaned journal not reclaimed");
    drop(agent2);
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `chaosctl --local`: Ctrl-C reverts (final CPU time reported, worker reaped); `kill -9` of
/// chaosctl ends its workers too (the engine runs in that process).
#[test]
fn local_runs_revert_on_sigint_and_die_with_chaosctl() {
    let _g = serial();
    let cg = TestCgroup::new("local");
    let journal = tmpdir("local");
    let args = [
        "inject",
        "cpu",
        "--load",
        "30",
        "--cgroup",
        &cg.path,
        "--duration",
        "1m",
    ];
    let fault = LocalFault::start(&args, &journal);
    let pids = cg.procs();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let worker = (pids[0], start_time(pids[0]).expect("start"));
    std::thread::sleep(Duration::from_millis(500));
    let (status, out) = fault.stop();
    assert!(status.success(), "{out}");
    let reverted = json_event(&out, "reverted");
    assert!(
        reverted["counters"]["cpu_time_us"].as_u64().unwrap_or(0) > 0,
        "{reverted}"
    );
    assert!(wait_gone(&[worker], Duration::from_secs(1)).is_empty());
    assert!(cg.procs().is_empty());

    let fault = LocalFault::start(&args, &journal);
    let pids = cg.procs();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let worker = (pids[0], start_time(pids[0]).expect("start"));
    // SAFETY: signalling the chaosctl we started.
    unsafe { libc::kill(fault.pid() as i32, libc::SIGKILL) };
    let left = wait_gone(&[worker], Duration::from_secs(2));
    assert!(left.is_empty(), "worker outlived chaosctl: {left:?}");
    let _ = fault.wait(Duration::from_secs(5));
    let _ = std::fs::remove_dir_all(&journal);
}

/// The workers spend the target's own CPU budget: with the cgroup's quota at 30 % of one CPU,
/// two workers asking 50 % each get 30 % between them.
#[test]
fn workers_are_held_to_the_cgroups_cpu_quota() {
    let _g = serial();
    let cg = TestCgroup::new("quota");
    let v1 = cg
        .dirs
        .iter()
        .find(|d| d.join("cpu.cfs_quota_us").is_file())
        .cloned();
    match &v1 {
        Some(dir) => {
            std::fs::write(dir.join("cpu.cfs_period_us"), "100000").expect("period");
            std::fs::write(dir.join("cpu.cfs_quota_us"), "30000").expect("quota");
        }
        None => {
            let v2 = cg.v2.clone().expect("a cgroup with a cpu controller");
            std::fs::write(v2.join("cpu.max"), "30000 100000")
                .expect("cpu.max (is the cpu controller enabled for this cgroup?)");
        }
    }
    let journal = tmpdir("quota");
    let engine = engine_at(&journal);
    let f = engine
        .apply(cpu(2, 50.0, CgroupRef::Path(cg.path.clone())))
        .expect("apply");
    let pids = cg.procs();
    assert_eq!(pids.len(), 2, "{pids:?}");
    std::thread::sleep(Duration::from_secs(1));
    let measured = measure_percent(&pids, Duration::from_secs(5));
    eprintln!("2 workers x 50 % under a 30 % quota: measured {measured:.2} % together");
    assert!(
        (measured - 30.0).abs() <= 3.0,
        "measured {measured:.2} % together; the quota allows 30 %"
    );
    engine.revert(&f.id).expect("revert");
    drop(engine);
    let _ = std::fs::remove_dir_all(&journal);
}

/// The fallback for kernels or seccomp profiles without clone3: fork, then placement through
/// cgroup.procs in every hierarchy (v2 included) before the worker runs.
#[test]
fn forked_workers_are_placed_and_hold_their_load() {
    use chaos_agent::stress::{CpuStress, Method};
    let _g = serial();
    let cg = TestCgroup::new("fork");
    let placement =
        chaos_agent::cgroup::resolve(&CgroupRef::Path(cg.path.clone())).expect("resolve");
    assert_eq!(placement.dirs().count(), cg.dirs.len(), "{placement:?}");
    let stress = CpuStress::start_with(&placement, 1, 40.0, Method::Fork).expect("start");
    assert_eq!(stress.method(), Method::Fork);
    let pid = stress.owners()[0].pid;
    for dir in &cg.dirs {
        assert_eq!(TestCgroup::procs_in(dir), [pid], "{}", dir.display());
    }
    std::thread::sleep(Duration::from_millis(500));
    let measured = measure_percent(&[pid], Duration::from_secs(5));
    eprintln!("forked worker: requested 40 %, measured {measured:.2} % over 5 s");
    assert!((measured - 40.0).abs() <= 3.0, "measured {measured:.2} %");
    stress.stop().expect("stop");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

/// Belt and braces behind the death signal: an engine that finds a journal of a dead engine
/// kills the workers it names that are still alive, and never a process that reused a pid
/// (same pid, other start time).
#[test]
fn a_new_engine_kills_survivors_but_not_reused_pids() {
    let _g = serial();
    let journal = tmpdir("reclaim");
    let spawn = || {
        std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("sleep")
    };
    let (mut survivor, mut bystander) = (spawn(), spawn());
    let survivor_start = start_time(survivor.id()).expect("start");
    let bystander_start = start_time(bystander.id()).expect("start");
    let entry = Entry {
        id: "f-deadbeef".into(),
        spec: cpu(2, 50.0, CgroupRef::Path("/x".into())),
        deadline_unix_ms: 0,
        netns_path: None,
        netns_id: NetnsId { dev: 0, ino: 0 },
        attachments: vec![],
        undo: vec![],
        workers: vec![
            Owner {
                pid: survivor.id(),
                start_time: survivor_start,
            },
            // The pid was reused: same number, another process.
            Owner {
                pid: bystander.id(),
                start_time: bystander_start + 1,
            },
        ],
    };
    let file = JournalFile {
        owner: Owner {
            pid: u32::MAX - 1,
            start_time: 1,
        },
        faults: vec![entry],
        sites: vec![],
    };
    std::fs::write(
        journal.join("4294967294.json"),
        serde_json::to_vec(&file).expect("json"),
    )
    .expect("write journal");
    let (engine, reclaimed) = Engine::start(EngineConfig {
        journal_dir: journal.clone(),
        ..EngineConfig::default()
    })
    .expect("engine");
    assert_eq!(reclaimed.workers, 1, "{reclaimed:?}");
    let status = survivor.wait().expect("wait");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "survivor not killed");
    assert!(
        bystander.try_wait().expect("try_wait").is_none(),
        "a process that reused a recorded pid was killed"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    drop(engine);
    let _ = std::fs::remove_dir_all(&journal);
}

/// Bad input: exit 2, one line naming the field, nothing started.
#[test]
fn bad_input_exits_2_with_one_line_and_starts_nothing() {
    let _g = serial();
    let cg = TestCgroup::new("bad");
    let journal = tmpdir("bad");
    let before = all_workers();
    let p = cg.path.as_str();
    let cases: [(&[&str], &str); 9] = [
        (
            &["--workers", "0", "--load", "50", "--cgroup", p],
            "--workers",
        ),
        (
            &["--workers", "1025", "--load", "50", "--cgroup", p],
            "--workers",
        ),
        (&["--load", "150", "--cgroup", p], "--load"),
        (&["--load", "0", "--cgroup", p], "--load"),
        (&["--load", "50"], "--cgroup"),
        (&["--load", "50", "--cgroup", p, "--pid", "1"], "--cgroup"),
        (&["--load", "50", "--cgroup", "relative/path"], "--cgroup"),
        (
            &["--load", "50", "--cgroup", "/chaos-no-such-cgroup"],
            "--cgroup",
        ),
        (&["--load", "50", "--pid", "0"], "--pid"),
    ];
    for (args, field) in cases {
        let out = std::process::Command::new(bin("chaosctl"))
            .args(["inject", "cpu"])
            .args(args)
            .args(["--duration", "5s", "--local"])
            .env("CHAOS_JOURNAL_DIR", &journal)
            .output()
            .expect("chaosctl");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(
            err.starts_with(&format!("chaosctl: invalid {field}")),
            "{args:?}: {err}"
        );
    }
    assert!(cg.procs().is_empty(), "started: {:?}", cg.procs());
    assert_eq!(all_workers(), before, "a worker was started");
    let _ = std::fs::remove_dir_all(&journal);
}
