//! Shaping faults on this kernel: bandwidth through our HTB root (this host has HTB but no
//! netem, so latency itself is tested in the VM suite; here we test its refusal), ownership of
//! the root qdisc, and crash recovery of it.
use chaos_tests::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Received throughput in bit/s of a 2 s iperf3 TCP run from A to `to`.
fn iperf(net: &TestNet, to: &str, port: u16) -> f64 {
    iperf_dir(net, to, port, false)
}

/// Likewise, or with `reverse` from `to` to A (iperf3 -R: the data arrives on va's ingress).
fn iperf_dir(net: &TestNet, to: &str, port: u16, reverse: bool) -> f64 {
    let mut server = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.b,
            "iperf3",
            "-s",
            "-1",
            "-p",
            &port.to_string(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    let out = sh(&format!(
        "ip netns exec {} iperf3 -J -c {to} -p {port} -t 2 {}",
        net.a,
        if reverse { "-R" } else { "" }
    ));
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 json");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
}

fn root_qdisc(net: &TestNet) -> String {
    sh_ok(&format!(
        "ip netns exec {} tc qdisc show dev va root",
        net.a
    ))
    .trim()
    .to_string()
}

#[test]
fn bandwidth_limits_only_the_targeted_destination() {
    let _g = serial();
    let net = TestNet::new("bw");
    let fault = LocalFault::start(
        &[
            "inject",
            "bandwidth",
            "--rate",
            "20mbit",
            "--dest",
            B4,
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--interval",
            "0",
        ],
        &net.tmp.join("journal"),
    );
    let limited = iperf(&net, B4, 5301);
    let other = iperf(&net, B4_OTHER, 5302);
    let (status, _) = fault.stop();
    assert!(status.success());
    println!(
        "20mbit limit: {:.2} Mbit/s to the target, {:.0} Mbit/s to another address",
        limited / 1e6,
        other / 1e6
    );
    assert!(
        (18e6..=21e6).contains(&limited),
        "limited throughput {:.2} Mbit/s not within 18-21",
        limited / 1e6
    );
    assert!(
        other > 200e6,
        "untargeted destination was limited: {:.1} Mbit/s",
        other / 1e6
    );
    assert!(
        root_qdisc(&net).starts_with("qdisc noqueue 0: root"),
        "root not restored: {}",
        root_qdisc(&net)
    );
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
}

/// A root qdisc someone else configured is never replaced, and the refusal is one line.
#[test]
fn a_foreign_root_qdisc_is_left_alone() {
    let _g = serial();
    let net = TestNet::new("own");
    sh_ok(&format!(
        "ip netns exec {} tc qdisc add dev va root handle 1: tbf rate 1gbit burst 64k latency 50ms",
        net.a
    ));
    let before = root_qdisc(&net);
    let o = chaosctl(&[
        "inject",
        "bandwidth",
        "--rate",
        "1mbit",
        "--interface",
        "va",
        "--netns",
        &net.a,
        "--local",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("tbf") && err.contains("not ours") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(root_qdisc(&net), before, "the foreign root qdisc changed");
    let filters = sh_ok(&format!(
        "ip netns exec {} tc filter show dev va egress",
        net.a
    ));
    assert!(
        filters.trim().is_empty() && chaos_links() == 0,
        "classifier left behind: {filters}"
    );
}

/// Latency needs sch_netem. Whether this kernel has it is found by hand (a netem qdisc added
/// and removed with `tc` in the test's namespace), never from our own `doctor`. Where it is
/// missing (this host), the refusal names the module and how to get it; where it is present,
/// the fault's delay is measured at the receiver against the same hand-applied netem.
#[test]
fn latency_needs_netem_and_says_so() {
    let _g = serial();
    let net = TestNet::new("lat");
    let ns = net.a.clone();
    let hand = |cmd: &str| {
        sh(&format!(
            "ip netns exec {ns} tc qdisc {cmd} dev va root netem delay 50ms"
        ))
    };
    let has_netem = hand("add").status.success();
    let dst = addr(B4, 7300);
    if has_netem {
        let baseline = median(&udp_rtts(&net.a, &net.b, dst, 20));
        sh_ok(&format!("ip netns exec {} tc qdisc del dev va root", net.a));
        let fault = LocalFault::start(
            &[
                "inject",
                "latency",
                "--ms",
                "50",
                "--interface",
                "va",
                "--netns",
                &net.a,
                "--duration",
                "20s",
            ],
            &net.tmp,
        );
        let ours = median(&udp_rtts(&net.a, &net.b, dst, 20));
        let (status, out) = fault.stop();
        assert!(status.success(), "{out}");
        println!("median RTT: hand-applied netem {baseline:.2} ms, our 50 ms latency {ours:.2} ms");
        assert!(
            (ours - baseline).abs() <= 5.0 && ours >= 50.0,
            "our latency {ours:.2} ms vs hand-applied netem {baseline:.2} ms"
        );
    } else {
        let o = chaosctl(&[
            "inject",
            "latency",
            "--ms",
            "50",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--duration",
            "1s",
            "--local",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        println!("this kernel has no sch_netem; refusal: {}", err.trim());
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("sch_netem") && err.contains("modprobe"),
            "{err}"
        );
    }
    assert!(
        root_qdisc(&net).starts_with("qdisc noqueue 0: root"),
        "root left changed: {}",
        root_qdisc(&net)
    );
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
}

fn tc(net: &TestNet, what: &str) -> String {
    sh_ok(&format!("ip netns exec {} tc {what} show dev va", net.a))
}

/// Two shaping faults on one interface: one root of ours, a class each; each destination gets
/// its own limit; the root goes with the last fault, not the first.
#[test]
fn shaping_faults_share_our_root_each_in_its_own_class() {
    let _g = serial();
    let net = TestNet::new("share");
    let agent = Agent::start(&net, &[]);
    let inject = |rate: &str, dest: &str| {
        fault_id(&agent.chaosctl(&[
            "inject",
            "bandwidth",
            "--rate",
            rate,
            "--dest",
            dest,
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--json",
        ]))
    };
    let first = inject("20mbit", B4);
    let second = inject("5mbit", B4_OTHER);
    let classes = tc(&net, "class");
    assert!(
        classes.contains("c4a0:1 ") && classes.contains("rate 20Mbit"),
        "{classes}"
    );
    assert!(
        classes.contains("c4a0:2 ") && classes.contains("rate 5Mbit"),
        "{classes}"
    );
    let (to_first, to_second) = (iperf(&net, B4, 5311), iperf(&net, B4_OTHER, 5312));
    println!(
        "two faults: {:.2} Mbit/s to {B4} (20mbit), {:.2} Mbit/s to {B4_OTHER} (5mbit)",
        to_first / 1e6,
        to_second / 1e6
    );
    assert!((18e6..=21e6).contains(&to_first), "{to_first}");
    assert!((4.5e6..=5.25e6).contains(&to_second), "{to_second}");
    let o = agent.chaosctl(&["revert", &first]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let classes = tc(&net, "class");
    assert!(
        !classes.contains("c4a0:1 ") && classes.contains("c4a0:2 "),
        "{classes}"
    );
    assert!(
        root_qdisc(&net).contains("htb c4a0:"),
        "{}",
        root_qdisc(&net)
    );
    let o = agent.chaosctl(&["revert", &second]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
}

/// Ingress shaping: matched packets arriving on va are redirected through an IFB device whose
/// root is ours, then handed back; traffic from another address is untouched. The IFB goes
/// with the fault.
#[test]
fn ingress_bandwidth_goes_through_an_ifb_and_only_for_the_target() {
    ingress_bandwidth(&[]);
}

/// The same on the path kernels before 6.4 take (IFB drops what bpf_redirect hands it there):
/// a classic cls_bpf filter on clsact whose mirred action redirects to the IFB.
#[test]
fn ingress_bandwidth_through_cls_bpf_and_mirred_as_before_6_4() {
    ingress_bandwidth(&[("CHAOS_INGRESS_MIRRED", "1"), ("CHAOS_ATTACH", "clsact")]);
}

fn ingress_bandwidth(env: &[(&str, &str)]) {
    let _g = serial();
    let net = TestNet::new("ingr");
    let fault = LocalFault::start_env(
        &[
            "inject",
            "bandwidth",
            "--rate",
            "10mbit",
            "--dest",
            B4,
            "--direction",
            "ingress",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--interval",
            "0",
        ],
        &net.tmp.join("journal"),
        env,
    );
    let links = sh_ok(&format!("ip -n {} -o link show", net.a));
    assert!(links.contains(": chifb"), "no IFB device: {links}");
    assert!(
        root_qdisc(&net).starts_with("qdisc noqueue 0: root"),
        "ingress shaping touched va's root: {}",
        root_qdisc(&net)
    );
    let limited = iperf_dir(&net, B4, 5321, true);
    let other = iperf_dir(&net, B4_OTHER, 5322, true);
    let upload = iperf_dir(&net, B4, 5323, false);
    let filters = sh_ok(&format!(
        "ip netns exec {} tc filter show dev va ingress",
        net.a
    ));
    let (status, _) = fault.stop();
    assert!(status.success());
    println!(
        "ingress 10mbit ({env:?}; filters: {}): {:.2} Mbit/s from the target, {:.0} from another address, {:.0} to the target (egress)",
        filters.split_whitespace().collect::<Vec<_>>().join(" "),
        limited / 1e6,
        other / 1e6,
        upload / 1e6
    );
    assert!(
        (9e6..=10.5e6).contains(&limited),
        "limited ingress throughput {:.2} Mbit/s not within 9-10.5",
        limited / 1e6
    );
    assert!(other > 200e6, "untargeted source was limited: {other}");
    if env.iter().any(|(k, _)| *k == "CHAOS_INGRESS_MIRRED") {
        assert!(
            filters.contains("mirred") && filters.contains("chaos_ingress_mirred"),
            "not the mirred path: {filters}"
        );
    }
    assert!(upload > 200e6, "egress was limited: {upload}");
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
}

/// `--force` replaces another tool's root tree (htb with classes and u32 filters here) and
/// puts it back exactly: same qdiscs, classes and filters, byte for byte as the kernel reports
/// them. Also after a kill -9 (the journal holds the snapshot).
#[test]
fn force_replaces_a_foreign_tree_and_restores_it_exactly() {
    let _g = serial();
    let net = TestNet::new("force");
    let a = &net.a;
    for cmd in [
        "qdisc add dev va root handle 1: htb default 20",
        "class add dev va parent 1: classid 1:1 htb rate 100mbit",
        "class add dev va parent 1:1 classid 1:10 htb rate 50mbit ceil 100mbit prio 1",
        "class add dev va parent 1:1 classid 1:20 htb rate 10mbit ceil 100mbit",
        "filter add dev va parent 1: protocol ip prio 5 u32 match ip dst 10.213.0.3/32 flowid 1:10",
    ] {
        sh_ok(&format!("ip netns exec {a} tc {cmd} 2>/dev/null"));
    }
    let tree = || {
        format!(
            "{}{}{}",
            tc(&net, "qdisc"),
            tc(&net, "class"),
            tc(&net, "filter")
        )
    };
    let before = tree();
    let socket = net.tmp.join("agent.sock");
    let journal = net.tmp.join("journal");
    let mut agent = Agent::start_at(&socket, &journal, &[]);
    let args = [
        "inject",
        "bandwidth",
        "--rate",
        "20mbit",
        "--dest",
        B4,
        "--interface",
        "va",
        "--netns",
        a,
        "--json",
        "--force",
    ];
    let id = fault_id(&agent.chaosctl(&args));
    assert!(
        root_qdisc(&net).contains("htb c4a0:"),
        "{}",
        root_qdisc(&net)
    );
    let limited = iperf(&net, B4, 5331);
    assert!((18e6..=21e6).contains(&limited), "{limited}");
    let o = agent.chaosctl(&["revert", &id]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(tree(), before, "the foreign tree was not restored exactly");

    // A crash while the foreign tree is replaced: the next start restores it.
    fault_id(&agent.chaosctl(&args));
    agent.kill9();
    assert!(
        root_qdisc(&net).contains("htb c4a0:"),
        "{}",
        root_qdisc(&net)
    );
    let agent = Agent::start_at(&socket, &journal, &[]);
    assert_eq!(tree(), before, "not restored after kill -9 and restart");
    drop(agent);
    assert_eq!(chaos_links(), 0);
}

/// Our root qdisc outlives a killed agent (qdiscs are not fds); the next start removes it.
#[test]
fn kill9_with_a_shaping_fault_then_restart_removes_our_root_qdisc() {
    let _g = serial();
    let net = TestNet::new("bwkill");
    let socket = net.tmp.join("agent.sock");
    let journal = net.tmp.join("journal");
    for trial in 0..5 {
        let mut agent = Agent::start_at(&socket, &journal, &[]);
        let o = agent.chaosctl(&[
            "inject",
            "bandwidth",
            "--rate",
            "5mbit",
            "--interface",
            "va",
            "--netns",
            &net.a,
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            root_qdisc(&net).contains("htb c4a0:"),
            "trial {trial}: {}",
            root_qdisc(&net)
        );
        agent.kill9();
        assert!(
            root_qdisc(&net).contains("htb c4a0:"),
            "the qdisc should survive the crash"
        );
        let restarted = Instant::now();
        let agent = Agent::start_at(&socket, &journal, &[]);
        while !root_qdisc(&net).starts_with("qdisc noqueue 0: root") {
            assert!(
                restarted.elapsed() < Duration::from_secs(1),
                "trial {trial}: {}",
                root_qdisc(&net)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(agent);
    }
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
}

/// A chaos-agent holds a bandwidth cap on va; `chaosctl --local` asks for another on the same
/// interface. The second engine is refused in one line, and its refusal takes nothing of the
/// agent's away: the agent's cap holds before, after and until its revert (before the fix,
/// the refused engine's clean-up deleted the agent's `c4a0:` root, and the transfer went from
/// 5 to ~550 Mbit/s while `list` still showed the agent's fault).
#[test]
fn a_refused_second_engine_leaves_the_first_engines_root() {
    let _g = serial();
    let net = TestNet::new("bwtwo");
    let agent = Agent::start(&net, &[]);
    let o = agent.chaosctl(&[
        "inject",
        "bandwidth",
        "--rate",
        "5mbit",
        "--dest",
        B4,
        "--interface",
        "va",
        "--netns",
        &net.a,
        "--json",
    ]);
    let id = fault_id(&o);
    let before = iperf(&net, B4, 5311);
    let refused = Command::new(bin("chaosctl"))
        .args([
            "inject",
            "bandwidth",
            "--rate",
            "20mbit",
            "--dest",
            B4_OTHER,
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--local",
            "--duration",
            "30s",
        ])
        .env("CHAOS_JOURNAL_DIR", net.tmp.join("local-journal"))
        .output()
        .expect("chaosctl");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "second engine applied: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    assert!(
        root_qdisc(&net).contains("htb c4a0:"),
        "the agent's root went with the refusal: {}",
        root_qdisc(&net)
    );
    let after = iperf(&net, B4, 5312);
    println!(
        "agent's 5mbit: {:.2} Mbit/s before, {:.2} Mbit/s after the refused --local ({})",
        before / 1e6,
        after / 1e6,
        stderr.trim()
    );
    for (when, rate) in [("before", before), ("after", after)] {
        assert!(
            (4e6..=5.5e6).contains(&rate),
            "{when} the refusal: {:.2} Mbit/s under a 5mbit cap",
            rate / 1e6
        );
    }
    let o = agent.chaosctl(&["revert", &id]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(agent);
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
}
