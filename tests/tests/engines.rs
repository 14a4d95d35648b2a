//! What an engine's journal can do to its faults and to other engines: a journal write that
//! fails after the kernel change, other engines' writes in flight, hostile journals left by
//! dead owners. Real kernel objects in namespaces and cgroups the tests create.
use chaos_agent::spec::{CgroupRef, FaultKind, FaultSpec, Target};
use chaos_tests::cgroups::{TestCgroup, start_time};
use chaos_tests::*;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A tmpfs of one page (4 KiB) mounted for the test, unmounted on drop: the first write of a
/// journal fits; any rewrite (the staged file beside the current one) does not.
struct OnePageFs {
    dir: PathBuf,
}

impl OnePageFs {
    fn mount(dir: PathBuf) -> Self {
        std::fs::create_dir_all(&dir).expect("mount point");
        sh_ok(&format!(
            "mount -t tmpfs -o size=4k,mode=0700 chaos-test {}",
            dir.display()
        ));
        OnePageFs { dir }
    }
}

impl Drop for OnePageFs {
    fn drop(&mut self) {
        let _ = sh(&format!("umount {}", self.dir.display()));
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The journal's write after the kernel change fails (its filesystem is full): the apply
/// fails, and what it started is gone when the error comes back. Before, the worker ran on to
/// its deadline unlisted, and `revert` answered "no active fault".
#[test]
fn a_failed_journal_write_leaves_no_cpu_worker() {
    let _g = serial();
    let tmp = std::env::temp_dir().join(format!("chaos-engines-zomb-{}", std::process::id()));
    let fs = OnePageFs::mount(tmp.join("journal"));
    let cg = TestCgroup::new("zomb");
    let engine = engine_at(&fs.dir);

    let cpu = FaultSpec {
        kind: FaultKind::Cpu {
            workers: 1,
            load_percent: 50.0,
            cgroup: CgroupRef::Path(cg.path.clone()),
        },
        target: Target::none(),
        duration: Duration::from_secs(60),
    };
    let err = engine
        .apply(cpu)
        .expect_err("the journal cannot take the fault's workers");
    assert!(err.to_string().contains("journal"), "error: {err}");
    let left = cg.procs();
    assert!(
        left.is_empty(),
        "workers left after a failed apply: {left:?}"
    );
    assert!(engine.list().is_empty(), "listed: {:?}", engine.list());
    drop(engine);
    drop(fs);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// As above, for a network fault: traffic whole and nothing attached when the error comes.
#[test]
fn a_failed_journal_write_leaves_no_network_fault() {
    let _g = serial();
    let net = TestNet::new("zomn");
    let fs = OnePageFs::mount(net.tmp.join("journal"));
    let engine = engine_at(&fs.dir);
    let err = engine
        .apply(va_fault(&net, FaultKind::Partition, B4))
        .expect_err("the journal cannot take the fault's attachments");
    assert!(err.to_string().contains("journal"), "error: {err}");
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B4, 5150), 200).1,
        200,
        "the failed partition cut traffic"
    );
    assert!(engine.list().is_empty(), "listed: {:?}", engine.list());
    let residue = net.residue();
    assert!(residue.is_empty(), "left in the kernel: {residue:?}");
    drop(engine);
}

/// An engine starting in a journal directory leaves a live engine's staged write alone (it
/// deleted every `*.json.tmp`, and 20 of 448 operations of an agent beside `--local` runs
/// failed with "No such file or directory"); a dead engine's staged write goes.
#[test]
fn a_starting_engine_leaves_live_writes_in_flight_alone() {
    let _g = serial();
    let dir = std::env::temp_dir().join(format!("chaos-engines-tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    // A live process of ours (not this one: an engine's own files are never orphans).
    let mut live = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    let start = start_time(live.id()).expect("start time");
    let live_tmp = dir.join(format!("{}.{start}.json.tmp", live.id()));
    let dead_tmp = dir.join(format!("{}.1.json.tmp", u32::MAX - 1));
    std::fs::write(&live_tmp, b"{\"owner\"").expect("write");
    std::fs::write(&dead_tmp, b"{\"owner\"").expect("write");
    let started = Instant::now();
    drop(engine_at(&dir));
    let _ = live.kill();
    let _ = live.wait();
    assert!(live_tmp.exists(), "a live engine's write in flight deleted");
    assert!(!dead_tmp.exists(), "a dead engine's staged write kept");
    eprintln!("engine start and stop: {:?}", started.elapsed());
    let _ = std::fs::remove_dir_all(&dir);
}
