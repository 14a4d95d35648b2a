//! What an engine's journal can do to its faults and to other engines: a journal write that
//! fails after the kernel change, other engines' writes in flight, hostile journals left by
//! dead owners. Real kernel objects in namespaces and cgroups the tests create.
use chaos_agent::datapath::AttachMode;
use chaos_agent::spec::{CgroupRef, FaultKind, FaultSpec, Target};
use chaos_tests::cgroups::{TestCgroup, start_time};
use chaos_tests::*;
use std::path::PathBuf;
use std::process::Command;
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

/// A `chaosctl --local` bandwidth fault on A's `va`, both directions (our root, an IFB), attached
/// by `attach`, killed -9 once applied; returns when it was killed, after it is reaped.
fn kill9_local_shaper(net: &TestNet, attach: &str, journal: &std::path::Path) -> Instant {
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
            attach,
            "--duration",
            "60s",
        ],
        journal,
    );
    f.signal(libc::SIGKILL);
    let killed = Instant::now();
    let _ = f.wait(Duration::from_secs(5));
    killed
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

    kill9_local_shaper(&net, "clsact", &dead_dir);
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
    let killed = kill9_local_shaper(&net, "tcx", &net.tmp.join("local"));
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

/// One side of the interleaving: the faults it holds (id, shaping?).
#[derive(Default)]
struct Held(Vec<(String, bool)>);

impl Held {
    fn shaping(&self) -> usize {
        self.0.iter().filter(|(_, s)| *s).count()
    }
}

/// A real chaos-agent (TCX) and a `--local`-style engine (clsact) in one journal directory,
/// 1,000 interleaved applies and reverts of loss and bandwidth faults on one interface, with
/// `chaosctl cleanup` (a third engine starting, sweeping the node and stopping) every 100
/// operations and the agent's own sweeps running. After every operation the kernel holds
/// exactly what both engines say they hold: the agent's TCX program while it has a fault, the
/// other's clsact filter at its own priority while it has one, our root with one class per
/// shaping fault. A shaping fault where the other engine holds the root is refused with one
/// line and changes nothing; every revert finds its fault (none lost, none removed by the
/// other, no zombie); cleanup never removes anything of a live engine's.
#[test]
fn two_engines_interleave_1000_operations_without_harm() {
    use chaos_agent::datapath::{self, Hook};
    let _g = serial();
    let net = TestNet::new("inter");
    let dir = net.tmp.join("journal");
    let agent = Agent::start_at(&net.tmp.join("agent.sock"), &dir, &["--attach", "tcx"]);
    let local = engine_with(dir.clone(), AttachMode::Clsact);
    let priority = datapath::clsact_priority(local.registry_slot());
    let (mut theirs, mut ours) = (Held::default(), Held::default());
    let mut rng = Rng(0x5eed_1000);
    let (mut applied, mut reverted, mut refused, mut cleanups) = (0, 0, 0, 0);
    let a = net.a.clone();
    let check = |theirs: &Held, ours: &Held, op: usize| {
        let tcx = in_ns(&a, || datapath::tcx_programs("va", Hook::Egress)).expect("tcx");
        assert_eq!(
            tcx.len(),
            usize::from(!theirs.0.is_empty()),
            "op {op}: the agent's TCX programs on va: {tcx:?}"
        );
        let filters = sh_ok(&format!("tc -n {a} filter show dev va egress"));
        let ours_there = filters
            .lines()
            .any(|l| l.contains(&format!("pref {priority} ")) && l.contains("handle 0xc4a00001"));
        assert_eq!(
            ours_there,
            !ours.0.is_empty(),
            "op {op}: the local engine's filter at priority {priority}: {filters}"
        );
        let shaping = theirs.shaping() + ours.shaping();
        let classes = sh_ok(&format!("tc -n {a} class show dev va"))
            .lines()
            .filter(|l| l.starts_with("class htb c4a0:"))
            .count();
        assert_eq!(classes, shaping, "op {op}: classes under our root");
        let root = sh_ok(&format!("tc -n {a} qdisc show dev va"));
        assert_eq!(
            root.contains("htb c4a0:"),
            shaping > 0,
            "op {op}: our root: {root}"
        );
    };
    let ops = 1000;
    for op in 0..ops {
        let shaping = rng.below(3) == 0;
        let dest = [B4, B4_OTHER][rng.below(2)];
        let cidr = format!("{dest}/32");
        match rng.below(4) {
            // The agent applies (its shaping is refused where the local engine holds the root).
            0 => {
                let mut args = vec!["inject"];
                if shaping {
                    args.extend(["bandwidth", "--rate", "50mbit"]);
                } else {
                    args.extend(["loss", "--percent", "10"]);
                }
                args.extend([
                    "--interface",
                    "va",
                    "--netns",
                    &net.a,
                    "--dest",
                    &cidr,
                    "--duration",
                    "10m",
                    "--json",
                ]);
                let o = agent.chaosctl(&args);
                if shaping && ours.shaping() > 0 {
                    let err = String::from_utf8_lossy(&o.stderr);
                    assert_eq!(o.status.code(), Some(2), "op {op}: {err}");
                    assert_eq!(err.trim().lines().count(), 1, "op {op}: {err}");
                    refused += 1;
                } else {
                    theirs.0.push((fault_id(&o), shaping));
                    applied += 1;
                }
            }
            // The local engine applies.
            1 => {
                let kind = if shaping {
                    FaultKind::Bandwidth {
                        bytes_per_sec: 6_250_000,
                    }
                } else {
                    FaultKind::Loss {
                        percent: 10.0,
                        correlation: 0.0,
                    }
                };
                match local.apply(va_fault(&net, kind, &cidr)) {
                    Ok(f) => {
                        assert!(
                            !(shaping && theirs.shaping() > 0),
                            "op {op}: shaped under the agent's root"
                        );
                        ours.0.push((f.id, shaping));
                        applied += 1;
                    }
                    Err(e) => {
                        assert!(
                            shaping && theirs.shaping() > 0 && e.is_user_error(),
                            "op {op}: {e}"
                        );
                        refused += 1;
                    }
                }
            }
            2 if !theirs.0.is_empty() => {
                let (id, _) = theirs.0.remove(rng.below(theirs.0.len()));
                let o = agent.chaosctl(&["revert", &id]);
                assert!(
                    o.status.success(),
                    "op {op}: the agent lost {id}: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                reverted += 1;
            }
            3 if !ours.0.is_empty() => {
                let (id, _) = ours.0.remove(rng.below(ours.0.len()));
                local
                    .revert(&id)
                    .unwrap_or_else(|e| panic!("op {op}: the local engine lost {id}: {e}"));
                reverted += 1;
            }
            _ => {}
        }
        check(&theirs, &ours, op);
        if op % 100 == 99 {
            let o = Command::new(bin("chaosctl"))
                .args(["cleanup", "--json"])
                .env("CHAOS_JOURNAL_DIR", net.tmp.join("cleanup"))
                .output()
                .expect("chaosctl cleanup");
            let v: serde_json::Value = serde_json::from_slice(&o.stdout)
                .unwrap_or_else(|e| panic!("cleanup: {e}: {}", String::from_utf8_lossy(&o.stderr)));
            assert!(o.status.success(), "op {op}: cleanup failed: {v}");
            assert_eq!(
                v["removed"],
                serde_json::json!([]),
                "op {op}: cleanup removed: {v}"
            );
            check(&theirs, &ours, op);
            cleanups += 1;
        }
    }
    let listed = agent.chaosctl(&["list", "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("list");
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(theirs.0.len()),
        "the agent's list"
    );
    assert_eq!(local.list().len(), ours.0.len(), "the local engine's list");
    println!(
        "{ops} operations: {applied} applied, {refused} refused (the other's root), {reverted} reverted, {cleanups} cleanups; none lost"
    );
    let o = agent.chaosctl(&["revert", "--all"]);
    assert!(o.status.success());
    for r in local.revert_all() {
        r.expect("revert");
    }
    drop((agent, local));
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
    assert_eq!(
        std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0),
        0,
        "journal files left"
    );
}
