//! Finding a pod's network namespace and cgroups from its UID: synthetic kubepods-style cgroup
//! trees (cgroupfs and systemd drivers; containerd, CRI-O and Docker names; nested prefixes),
//! created for real in this host's v2 and v1 `cpu` hierarchies, holding real processes in real
//! network namespaces the test created. Everything is removed on drop.
use chaos_agent::pod::{self, Anchor, PodError, PodUid};
use chaos_tests::pods::{CID, FakePod, Pods, SID, fake_pod, hierarchies, uid};
use chaos_tests::{require_root, serial, sh_ok};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

/// A pod's cgroup path, its container's cgroup name and its sandbox's, for a uid.
type Layout = Box<dyn Fn(&PodUid) -> (String, String, String)>;

#[test]
fn every_layout_resolves_the_pods_netns_through_its_pause_process() {
    let _g = serial();
    require_root();
    let root = format!("chaos-test-pods-{}", std::process::id());
    let layouts: Vec<(&str, Layout)> = vec![
        (
            "cgroupfs burstable (containerd, k3s)",
            Box::new(|u: &PodUid| {
                (
                    format!("/kubepods/burstable/pod{u}"),
                    CID.into(),
                    SID.into(),
                )
            }),
        ),
        (
            "cgroupfs guaranteed",
            Box::new(|u: &PodUid| (format!("/kubepods/pod{u}"), CID.into(), SID.into())),
        ),
        (
            "systemd containerd",
            Box::new(|u: &PodUid| {
                let s = u.to_string().replace('-', "_");
                (
                    format!(
                        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{s}.slice"
                    ),
                    format!("cri-containerd-{CID}.scope"),
                    format!("cri-containerd-{SID}.scope"),
                )
            }),
        ),
        (
            "systemd CRI-O",
            Box::new(|u: &PodUid| {
                let s = u.to_string().replace('-', "_");
                (
                    format!("/kubepods.slice/kubepods-pod{s}.slice"),
                    format!("crio-{CID}.scope"),
                    format!("crio-{SID}.scope"),
                )
            }),
        ),
        (
            "systemd Docker best effort",
            Box::new(|u: &PodUid| {
                let s = u.to_string().replace('-', "_");
                (
                    format!(
                        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{s}.slice"
                    ),
                    format!("docker-{CID}.scope"),
                    format!("docker-{SID}.scope"),
                )
            }),
        ),
        (
            "nested (a kind node in Docker)",
            Box::new(|u: &PodUid| {
                (
                    format!("/docker/{SID}/kubepods/besteffort/pod{u}"),
                    CID.into(),
                    SID.into(),
                )
            }),
        ),
    ];
    let mut guards = Pods(vec![]);
    for (i, (name, layout)) in layouts.iter().enumerate() {
        let u = uid(i);
        let (pod_dir, container, sandbox) = layout(&u);
        let pod_dir = format!("/{root}{pod_dir}");
        let fake = fake_pod(i, &pod_dir, &container, &sandbox, true);
        let found = pod::scan(Path::new("/proc"), &u).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (p, anchor) = found.netns_process();
        assert_eq!(
            (p.comm.as_str(), anchor),
            ("pause", Anchor::Sandbox),
            "{name}: {found:?}"
        );
        assert_eq!(p.pid, fake.children[1].id(), "{name}");
        let (ns_file, _) = found.netns_path(Path::new("/proc"));
        let want = std::fs::metadata(format!("/run/netns/{}", fake.netns))
            .unwrap()
            .ino();
        assert_eq!(
            std::fs::metadata(&ns_file).unwrap().ino(),
            want,
            "{name}: not the pod's netns"
        );
        let containers = found.containers();
        assert_eq!(containers.len(), 1, "{name}: {containers:?}");
        assert_eq!(containers[CID], vec![fake.children[0].id()], "{name}");
        for (_, key) in hierarchies() {
            assert_eq!(
                found.cgroups.get(&key),
                Some(&pod_dir),
                "{name}: cgroup in hierarchy {key:?}"
            );
        }
        guards.0.push(fake);
    }
    // Each pod found only its own processes.
    for (i, g) in guards.0.iter().enumerate() {
        let found = pod::scan(Path::new("/proc"), &uid(i)).unwrap();
        let pids: Vec<u32> = found.processes.iter().map(|p| p.pid).collect();
        let mut want: Vec<u32> = g.children.iter().map(|c| c.id()).collect();
        want.sort();
        assert_eq!(pids, want);
    }
    drop(guards);
    for (mount, _) in hierarchies() {
        let _ = std::fs::remove_dir(mount.join(&root));
        assert!(
            !mount.join(&root).exists(),
            "left {}",
            mount.join(&root).display()
        );
    }
}

#[test]
fn without_a_pause_process_the_oldest_one_anchors_the_netns() {
    let _g = serial();
    require_root();
    let root = format!("chaos-test-pods-{}", std::process::id());
    let u = uid(50);
    let pod_dir = format!("/{root}-nopause/kubepods/burstable/pod{u}");
    let fake = fake_pod(50, &pod_dir, CID, SID, false);
    let found = pod::scan(Path::new("/proc"), &u).unwrap();
    let (p, anchor) = found.netns_process();
    assert_eq!((p.pid, anchor), (fake.children[0].id(), Anchor::Oldest));
    drop(fake);
    for (mount, _) in hierarchies() {
        let _ = std::fs::remove_dir(mount.join(format!("{root}-nopause")));
    }
}

#[test]
fn unknown_and_malformed_uids_are_refused_in_one_line() {
    let u = uid(99);
    assert_eq!(
        pod::scan(Path::new("/proc"), &u).unwrap_err().to_string(),
        format!("pod {u}: no process of it runs on this node (no /proc/*/cgroup names it)")
    );
    let e = "pod-1".parse::<PodUid>().unwrap_err();
    assert_eq!(e, PodError::BadUid("pod-1".into()));
    assert_eq!(
        e.to_string(),
        "invalid pod uid: `pod-1` must be a UUID like 6f1c2a3b-0d4e-4f5a-8b6c-7d8e9f0a1b2c"
    );
}

/// `--pod-uid` end to end: the engine resolves the pod to its pause process and faults the
/// pod's own netns (a partition on its loopback, proven with traffic inside it), and CPU
/// stress lands in the pod's own cgroup; both revert cleanly.
#[test]
fn pod_uid_targets_the_pods_netns_and_cgroup() {
    let _g = serial();
    require_root();
    let root = format!("chaos-test-pods-{}-uid", std::process::id());
    let u = uid(60);
    let pod_dir = format!("/{root}/kubepods/burstable/pod{u}");
    let fake = fake_pod(60, &pod_dir, CID, SID, true);
    sh_ok(&format!("ip -n {} link set lo up", fake.netns));
    let tmp = std::env::temp_dir().join(format!("chaos-pods-{}-uid", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let to = chaos_tests::addr("127.0.0.1", 5301);
    let (_, before) = chaos_tests::udp_probe(&fake.netns, &fake.netns, to, 100);
    assert_eq!(before, 100, "the pod's loopback works before the fault");
    let uid = u.to_string();
    let fault = chaos_tests::LocalFault::start(
        &[
            "inject",
            "partition",
            "--interface",
            "lo",
            "--pod-uid",
            &uid,
            "--interval",
            "0",
        ],
        &tmp.join("journal"),
    );
    let (_, during) = chaos_tests::udp_probe(&fake.netns, &fake.netns, to, 100);
    let (status, _) = fault.stop();
    assert_eq!(during, 0, "the partition did not reach the pod's netns");
    assert!(status.success());
    let (_, after) = chaos_tests::udp_probe(&fake.netns, &fake.netns, to, 100);
    assert_eq!(after, 100, "traffic still blocked after revert");

    let pod_procs = |fake: &FakePod| -> Vec<u32> {
        let (mount, _) = &hierarchies()[0];
        let f = mount
            .join(pod_dir.trim_start_matches('/'))
            .join("cgroup.procs");
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let mine: Vec<u32> = fake.children.iter().map(|c| c.id()).collect();
        text.lines()
            .filter_map(|l| l.parse().ok())
            .filter(|p| !mine.contains(p))
            .collect()
    };
    // CPU stress lands in the pod's cgroup from the host's cgroup namespace, and from a
    // private one: an agent in a container usually has its own (containerd's default on
    // cgroup v2), where /proc/PID/cgroup shows the pod as `/../...`; mountinfo shows the mounts'
    // roots relative to the same namespace, and paths map through them.
    let pid = std::process::id();
    let agent_cgs: Vec<std::path::PathBuf> = hierarchies()
        .iter()
        .map(|(mount, _)| mount.join(format!("chaos-test-agent-{pid}")))
        .collect();
    let mut join = String::new();
    for cg in &agent_cgs {
        std::fs::create_dir(cg).expect("the agent's cgroup");
        join.push_str(&format!("echo $$ > {}/cgroup.procs && ", cg.display()));
    }
    let shown = chaos_tests::sh(&format!(
        "sh -c '{join}exec unshare --cgroup cat /proc/{}/cgroup'",
        fake.children[1].id()
    ));
    let shown = String::from_utf8_lossy(&shown.stdout).to_string();
    assert!(
        shown.contains("/../"),
        "not a private cgroup namespace: {shown}"
    );
    let private = format!("{join}exec unshare --cgroup \"$@\"");
    for wrapper in [vec![], vec!["sh", "-c", private.as_str(), "sh"]] {
        assert!(pod_procs(&fake).is_empty());
        let cpu = chaos_tests::LocalFault::start_wrapped(
            &wrapper,
            &[
                "inject",
                "cpu",
                "--workers",
                "1",
                "--load",
                "20",
                "--pod-uid",
                &uid,
                "--interval",
                "0",
            ],
            &tmp.join("journal"),
            &[],
        );
        let workers = pod_procs(&fake);
        let (status, out) = cpu.stop();
        assert_eq!(
            workers.len(),
            1,
            "{wrapper:?}: one worker in the pod's own cgroup: {workers:?}"
        );
        assert!(status.success(), "{status}: {out}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(pod_procs(&fake).is_empty(), "the worker outlived the fault");
    }
    for cg in &agent_cgs {
        let _ = std::fs::remove_dir(cg);
        assert!(!cg.exists(), "left {}", cg.display());
    }

    let bad = chaos_tests::chaosctl(&[
        "inject",
        "loss",
        "--percent",
        "5",
        "--interface",
        "lo",
        "--pod-uid",
        "pod-1",
        "--local",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--pod-uid") && err.lines().count() == 1,
        "{err}"
    );
    drop(fake);
    let _ = std::fs::remove_dir_all(&tmp);
    for (mount, _) in hierarchies() {
        for d in [
            format!("{root}/kubepods/burstable"),
            format!("{root}/kubepods"),
            root.clone(),
        ] {
            let _ = std::fs::remove_dir(mount.join(d));
        }
    }
}

/// container-kill through the engine: the container's process (found through the pod's
/// cgroup) gets the signal, the pod's pause process does not; a wrong container id is one
/// line naming the flag.
#[test]
fn container_kill_signals_the_container_and_spares_the_sandbox() {
    use std::os::unix::process::ExitStatusExt;
    let _g = serial();
    require_root();
    let root = format!("chaos-test-pods-{}-kill", std::process::id());
    let u = uid(70);
    let pod_dir = format!("/{root}/kubepods/besteffort/pod{u}");
    let mut fake = fake_pod(70, &pod_dir, CID, SID, true);
    let tmp = std::env::temp_dir().join(format!("chaos-pods-{}-kill", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let uid = u.to_string();
    let bad = chaos_tests::chaosctl(&[
        "inject",
        "container-kill",
        "--pod-uid",
        &uid,
        "--container-id",
        "abcdefabcdef",
        "--local",
    ]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--container-id") && err.lines().count() == 1,
        "{err}"
    );
    assert!(
        fake.children[0].try_wait().unwrap().is_none(),
        "a refused kill killed"
    );

    let kill = chaos_tests::LocalFault::start(
        &[
            "inject",
            "container-kill",
            "--pod-uid",
            &uid,
            "--container-id",
            &CID[..12],
            "--interval",
            "0",
        ],
        &tmp.join("journal"),
    );
    let (status, out) = kill.stop();
    assert!(status.success(), "{status}: {out}");
    let died = fake.children[0].wait().unwrap();
    assert_eq!(
        died.signal(),
        Some(libc::SIGKILL),
        "the container's process: {died:?}"
    );
    assert!(
        fake.children[1].try_wait().unwrap().is_none(),
        "the pause process was signalled"
    );
    let reverted = chaos_tests::json_event(&out, "reverted");
    assert_eq!(reverted["counters"]["affected"], 1, "{reverted}");
    drop(fake);
    let _ = std::fs::remove_dir_all(&tmp);
    for (mount, _) in hierarchies() {
        for d in [
            format!("{root}/kubepods/besteffort"),
            format!("{root}/kubepods"),
            root.clone(),
        ] {
            let _ = std::fs::remove_dir(mount.join(d));
        }
    }
}
