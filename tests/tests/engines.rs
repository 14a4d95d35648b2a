//! What an engine's journal can do to its faults and to other engines: a journal write that
//! fails after the kernel change, other engines' writes in flight, hostile journals left by
//! dead owners. Real kernel objects in namespaces and cgroups the tests create.
use chaos_agent::datapath::AttachMode;
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

/// A dead owner's journal is a file, not proof: one whose ingress shaping site names the veth
/// itself (as a garbled or hostile journal may) must not make the next engine delete that
/// device. Before, starting an engine on it deleted `va`, and the pair with it.
#[test]
fn a_hostile_journal_cannot_make_an_engine_delete_a_device() {
    use chaos_agent::datapath::ShapingSite;
    use chaos_agent::journal::{JournalFile, Owner, SiteEntry};
    use chaos_agent::netns::Netns;
    let _g = serial();
    let net = TestNet::new("hostile");
    let journal = net.tmp.join("journal");
    std::fs::create_dir_all(&journal).expect("journal dir");
    let path = net.path(&net.a);
    let ns = Netns::open_path(&path, "--netns").expect("netns a");
    let file = JournalFile {
        owner: Owner {
            pid: u32::MAX - 1,
            start_time: 1,
        },
        faults: vec![],
        sites: vec![SiteEntry {
            site: ShapingSite {
                device: "va".into(),
                ifb_for: Some("va".into()),
            },
            netns_path: Some(path),
            netns_id: ns.id,
            replaced: None,
        }],
    };
    std::fs::write(
        journal.join(format!("{}.json", u32::MAX - 1)),
        serde_json::to_vec(&file).expect("json"),
    )
    .expect("write journal");
    let (engine, reclaimed) = chaos_agent::Engine::start(chaos_agent::EngineConfig {
        journal_dir: journal.clone(),
        ..Default::default()
    })
    .expect("engine");
    drop(engine);
    eprintln!("reclaim: {reclaimed:?}");
    let links = sh_ok(&format!("ip -n {} -o link show va", net.a));
    assert!(
        links.contains("va@"),
        "va deleted on a journal's word: {links}"
    );
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B4, 5160), 100).1,
        100,
        "the pair no longer carries traffic"
    );
    assert_eq!(reclaimed.qdiscs, 0, "counted as removed: {reclaimed:?}");
    assert!(
        reclaimed
            .refused
            .iter()
            .any(|e| e.contains("not an IFB of ours")),
        "the refusal is not reported: {reclaimed:?}"
    );
    assert!(
        !journal.join(format!("{}.json", u32::MAX - 1)).exists(),
        "the false claim is kept, to be refused at every start"
    );
}

fn engine_with(journal: PathBuf, attach: AttachMode) -> std::sync::Arc<chaos_agent::Engine> {
    chaos_agent::Engine::start(chaos_agent::EngineConfig {
        journal_dir: journal,
        attach,
        ..Default::default()
    })
    .expect("engine")
    .0
}

/// Two engines with clsact filters on one interface (the agent and a `chaosctl --local`): each
/// attaches at its own registry slot's priority, so the second applies, and its revert leaves
/// the first engine's partition in force. Before, both used one priority and handle: the
/// second failed with "Filter already exists" and its clean-up removed the first's partition.
#[test]
fn two_engines_on_clsact_keep_each_others_filters() {
    let _g = serial();
    let net = TestNet::new("clsdual");
    let first = engine_with(net.tmp.join("first"), AttachMode::Clsact);
    let second = engine_with(net.tmp.join("second"), AttachMode::Clsact);
    let to = addr(B4, 5400);
    let received = || udp_probe(&net.a, &net.b, to, 200).1;
    assert_eq!(received(), 200, "before any fault");
    let partition = first
        .apply(va_fault(&net, FaultKind::Partition, &format!("{B4}/32")))
        .expect("first engine's partition");
    assert_eq!(received(), 0, "under the first engine's partition");
    let loss = second
        .apply(va_fault(
            &net,
            FaultKind::Loss {
                percent: 50.0,
                correlation: 0.0,
            },
            &format!("{B4_OTHER}/32"),
        ))
        .expect("the second engine's fault on the same interface");
    assert_eq!(received(), 0, "after the second engine's apply");
    second.revert(&loss.id).expect("revert the second");
    assert_eq!(received(), 0, "after the second engine's revert");
    first.revert(&partition.id).expect("revert the first");
    assert_eq!(received(), 200, "after both reverts");
    drop((first, second));
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
}

/// A `chaosctl --local` killed -9 with clsact filters, an HTB root and an IFB in place, its
/// journal then overwritten with garbage: the sweep finds all three by their marks and removes
/// them, and leaves a live engine's filter and root in the other namespace alone. Before there
/// was no sweep: a garbage journal was skipped with a warning and its objects stayed forever.
#[test]
fn a_sweep_needs_no_journal_and_spares_the_living() {
    let _g = serial();
    let net = TestNet::new("sweepg");
    let dead_dir = net.tmp.join("dead");
    // The bystander: a live engine's clsact bandwidth fault on vb in the other namespace.
    let bystander = engine_with(net.tmp.join("live"), AttachMode::Clsact);
    let mut theirs = va_fault(
        &net,
        FaultKind::Bandwidth {
            bytes_per_sec: 625_000,
        },
        &format!("{A4}/32"),
    );
    theirs.target.netns = chaos_agent::spec::NetnsRef::Path(net.path(&net.b));
    theirs.target.interface = "vb".into();
    let theirs = bystander.apply(theirs).expect("bystander's fault");
    // What is there, without the packet statistics that change as traffic passes.
    let objects = || -> Vec<String> {
        residue_on(&net.b, "vb")
            .iter()
            .map(|l| {
                l.split(" direct_packets_stat")
                    .next()
                    .unwrap_or(l)
                    .to_string()
            })
            .collect()
    };
    let theirs_before = objects();

    let f = LocalFault::start(
        &[
            "inject",
            "bandwidth",
            "--rate",
            "5mbit",
            "--dest",
            B4,
            "--direction",
            "both",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--attach",
            "clsact",
            "--duration",
            "60s",
        ],
        &dead_dir,
    );
    f.signal(libc::SIGKILL);
    let _ = f.wait(Duration::from_secs(5));
    let left = net.residue();
    for what in [
        "tc filter ingress",
        "tc filter egress",
        "qdisc: qdisc htb c4a0:",
        "link: ",
    ] {
        assert!(
            left.iter().any(|l| l.starts_with(what)),
            "a dead engine should leave {what}: {left:?}"
        );
    }
    let mut garbled = 0;
    for entry in std::fs::read_dir(&dead_dir).expect("journal dir").flatten() {
        std::fs::write(entry.path(), b"\x00{not a journal").expect("garble");
        garbled += 1;
    }
    assert_eq!(garbled, 1, "the dead engine's journal");

    let sweeper = engine_at(&net.tmp.join("sweeper"));
    let started = Instant::now();
    let swept = sweeper
        .sweep(chaos_agent::engine::SweepScope::Node)
        .expect("sweep");
    let took = started.elapsed();
    println!(
        "swept {} namespaces in {took:?}: {:#?}",
        swept.namespaces, swept.removed
    );
    assert!(swept.errors.is_empty(), "{:?}", swept.errors);
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
    assert_eq!(
        objects(),
        theirs_before,
        "the live engine's filter and root were touched"
    );
    bystander.revert(&theirs.id).expect("revert the bystander");
    drop((bystander, sweeper));
    assert!(residue_on(&net.b, "vb").is_empty());
}

/// With an agent's engine running (its sweeper every few seconds), a `chaosctl --local` killed
/// -9 mid-fault on TCX: its HTB root and IFB (which, unlike TCX links, outlive it) are gone
/// within 5 s with nothing restarted, and the agent can then shape that interface itself.
/// Before, they stayed until an engine started in the same journal directory, and the agent
/// refused shaping there.
#[test]
fn a_running_agent_sweeps_a_dead_local_engines_leftovers() {
    let _g = serial();
    let net = TestNet::new("sweepa");
    let agent = engine_with(net.tmp.join("agent"), AttachMode::Tcx);
    agent.spawn_sweeper(chaos_agent::engine::SWEEP_EVERY);
    let f = LocalFault::start(
        &[
            "inject",
            "bandwidth",
            "--rate",
            "5mbit",
            "--dest",
            B4,
            "--direction",
            "both",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--attach",
            "tcx",
            "--duration",
            "60s",
        ],
        &net.tmp.join("local"),
    );
    f.signal(libc::SIGKILL);
    let killed = Instant::now();
    let _ = f.wait(Duration::from_secs(5));
    let mut left = net.residue();
    assert!(!left.is_empty(), "nothing to sweep: the test shows nothing");
    while !left.is_empty() && killed.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(50));
        left = net.residue();
    }
    let gone = killed.elapsed();
    println!("a dead --local's root and IFB gone {gone:?} after kill -9");
    assert!(left.is_empty(), "after {gone:?}: {left:?}");
    assert!(gone <= Duration::from_secs(5), "gone only after {gone:?}");
    let ours = agent
        .apply(va_fault(
            &net,
            FaultKind::Bandwidth {
                bytes_per_sec: 625_000,
            },
            &format!("{B4}/32"),
        ))
        .expect("the agent shapes the interface the dead engine used");
    agent.revert(&ours.id).expect("revert");
    drop(agent);
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
}
