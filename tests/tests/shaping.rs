//! Shaping faults on this kernel: bandwidth through our HTB root (this host has HTB but no
//! netem, so latency itself is tested in the VM suite; here we test its refusal), ownership of
//! the root qdisc, and crash recovery of it.
use chaos_tests::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Received throughput in bit/s of a 2 s iperf3 TCP run from A to `to`.
fn iperf(net: &TestNet, to: &str, port: u16) -> f64 {
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
        "ip netns exec {} iperf3 -J -c {to} -p {port} -t 2",
        net.a
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
    assert!(err.contains("tbf") && err.contains("not ours"), "{err}");
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

/// Latency needs sch_netem. Where the kernel lacks it (this host), the refusal names the module
/// and how to get it; where it has it, the fault applies.
#[test]
fn latency_needs_netem_and_says_so() {
    let _g = serial();
    let net = TestNet::new("lat");
    let caps = chaosctl(&["doctor", "--json"]);
    let caps: serde_json::Value = serde_json::from_slice(&caps.stdout).expect("doctor json");
    let has_netem = caps["features"]
        .as_array()
        .expect("features")
        .iter()
        .any(|f| f["name"] == "netem" && f["present"] == true);
    let args = [
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
    ];
    let o = chaosctl(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    if has_netem {
        assert!(
            o.status.success(),
            "latency failed on a kernel with netem: {err}"
        );
    } else {
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
