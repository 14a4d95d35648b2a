//! chaos-bench: the datapath's cost and the engine's speed, measured on this kernel and written
//! as JSON. Every figure sits beside its baseline from the same run.
//!
//! 1. Untargeted throughput: iperf3 (TCP) across a veth with no classifier, then with a fault
//!    whose target has 1, 1,000 and 65,536 CIDR entries that the traffic does not match.
//!    Rounds are interleaved (baseline, 1, 1k, 64k, ...) so drift hits every case alike.
//! 2. Apply and revert latency of the engine (in-process, as `chaosctl --local` and the agent
//!    use it), p50/p99 over 200 runs, for a typical fault and for one with 65,536 entries.
//!
//! Usage: chaos-bench [--out FILE] [--rounds N] [--seconds S] [--runs N]
use chaos_agent::datapath::AttachMode;
use chaos_agent::spec::{Cidr, Direction, FaultKind, FaultSpec, NetnsRef, Protocol, Target};
use chaos_agent::{Engine, EngineConfig};
use chaos_tests::{B4, Dnsmasq, TestNet, addr, arg, dns_ask, percentile, sh};
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

/// `n` distinct /32s in 10.100.0.0/16 and beyond: none of them is B's address.
fn cidrs(n: usize) -> Vec<Cidr> {
    (0..n as u32)
        .map(|i| Cidr {
            addr: IpAddr::V4(Ipv4Addr::from(0x0A64_0000u32 + i)),
            prefix: 32,
        })
        .collect()
}

fn spec(net: &TestNet, remote: Vec<Cidr>) -> FaultSpec {
    FaultSpec {
        kind: FaultKind::Loss {
            percent: 50.0,
            correlation: 0.0,
        },
        target: Target {
            netns: NetnsRef::Path(net.path(&net.a)),
            interface: "va".into(),
            remote,
            local: vec![],
            ports: vec![],
            protocol: Protocol::All,
            direction: Direction::Egress,
            force: false,
        },
        duration: Duration::from_secs(600),
    }
}

fn iperf(net: &TestNet, seconds: u32) -> f64 {
    let out = sh(&format!(
        "ip netns exec {} iperf3 -J -A 0,1 -c {B4} -t {seconds} -p 5299",
        net.a
    ));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("bits_per_second")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn latencies(
    engine: &std::sync::Arc<Engine>,
    net: &TestNet,
    entries: usize,
    runs: usize,
) -> serde_json::Value {
    let (mut apply, mut revert, mut disarm) = (Vec::new(), Vec::new(), Vec::new());
    let remote = cidrs(entries);
    for _ in 0..runs {
        // Faults are applied seconds apart in practice; give the engine the moment it needs to
        // prepare its spare object, as it would have. (The first apply of a fresh engine has
        // none: see `cold_apply_ms`.)
        std::thread::sleep(Duration::from_millis(60));
        let s = spec(net, remote.clone());
        let t = Instant::now();
        let f = engine.apply(s).expect("apply");
        apply.push(t.elapsed().as_secs_f64() * 1e3);
        // A fault lives for seconds; let the spare's preparation (started by the apply) finish
        // rather than compete with the revert for the two CPUs.
        std::thread::sleep(Duration::from_millis(60));
        let t = Instant::now();
        let ended = engine.revert(&f.id).expect("revert");
        revert.push(t.elapsed().as_secs_f64() * 1e3);
        disarm.push(ended.disarmed_after.expect("disarm time").as_secs_f64() * 1e3);
    }
    for v in [&mut apply, &mut revert, &mut disarm] {
        v.sort_by(|a, b| a.total_cmp(b));
    }
    json!({
        "entries": entries,
        "runs": runs,
        "apply_ms": { "p50": percentile(&apply, 0.5), "p99": percentile(&apply, 0.99), "max": apply[apply.len() - 1] },
        "revert_ms": { "p50": percentile(&revert, 0.5), "p99": percentile(&revert, 0.99), "max": revert[revert.len() - 1] },
        "revert_until_traffic_unaffected_ms": { "p50": percentile(&disarm, 0.5), "p99": percentile(&disarm, 0.99), "max": disarm[disarm.len() - 1] },
    })
}

/// A 64-byte Ethernet/IPv4/UDP frame (or its IPv6 twin) from 10.213.0.1 to 10.213.0.2: none
/// of the benchmark's CIDRs contain it.
fn frame(v6: bool) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    if v6 {
        f.extend([0x86, 0xdd, 0x60, 0, 0, 0, 0, 16, 17, 64]);
        f.extend([0xfd, 0, 0x02, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend([0xfd, 0, 0x02, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    } else {
        f.extend([0x08, 0x00, 0x45, 0, 0, 50, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend([10, 213, 0, 1, 10, 213, 0, 2]);
    }
    f.extend([0x30, 0x39, 0x14, 0xb4, 0, 30, 0, 0]); // udp 12345 -> 5300
    f.resize(f.len().max(64), 0xab);
    f
}

/// The classifier's own cost per unmatched packet (BPF_PROG_TEST_RUN, 10^6 runs each), by
/// number of remote CIDRs and of faults on the interface (rows of one table, each with CIDRs of
/// its own). Baseline: a rule for another protocol, which leaves no candidate rule.
fn classifier_cost(net: &TestNet) -> serde_json::Value {
    use chaos_agent::datapath::Hook;
    const PASS: i32 = -1;
    let mut rows = Vec::new();
    let cases: [(&str, usize, usize); 6] = [
        ("baseline: other protocol", 1, 0),
        ("1 entry", 1, 1),
        ("1,000 entries", 1, 1000),
        ("65,536 entries", 1, 65_536),
        ("100 faults, 1 entry each", 100, 1),
        ("1,000 faults, 1 entry each", 1000, 1),
    ];
    for (label, faults, n) in cases {
        let mut table = chaos_tests::detached_table();
        let all = cidrs(faults * n);
        for f in 0..faults {
            let mut s = spec(net, all[f * n..(f + 1) * n].to_vec());
            if n == 0 {
                s.target.protocol = Protocol::Tcp;
            }
            table
                .load_rule(&s, None, Default::default(), u64::MAX)
                .expect("load rule");
        }
        let prepared = &mut table;
        let mut row = json!({ "case": label, "entries": n, "faults": faults });
        for (family, v6) in [("ipv4", false), ("ipv6", true)] {
            let mut runs: Vec<f64> = (0..5)
                .map(|_| {
                    let (ns, verdict) = prepared
                        .test_run(Hook::Egress.program(), &frame(v6), 1_000_000)
                        .expect("test_run");
                    assert_eq!(verdict, PASS, "unmatched packet not passed");
                    ns as f64
                })
                .collect();
            row[format!("{family}_ns_per_packet")] = json!(median(&mut runs));
        }
        rows.push(row);
    }
    json!(rows)
}

/// DNS failure: answer latency of the datapath's NXDOMAIN vs dnsmasq's own answers in the
/// same run (alternating queries), and how many queries each way were handled as they should.
fn dns_latency(
    engine: &std::sync::Arc<Engine>,
    net: &TestNet,
    queries: usize,
) -> serde_json::Value {
    use chaos_agent::dns::DnsMode;
    let _server = Dnsmasq::start(&net.b, &net.a, &net.tmp, &[B4], &["ok.test/10.1.1.1"]);
    let mut s = spec(net, vec![]);
    s.kind = FaultKind::Dns {
        mode: DnsMode::Nxdomain,
        domains: vec!["*.blocked.test".parse().expect("pattern")],
    };
    s.target.protocol = Protocol::All;
    let f = engine.apply(s).expect("apply dns");
    let (mut injected, mut served) = (Vec::new(), Vec::new());
    let (mut injected_ok, mut served_ok) = (0, 0);
    let wait = Duration::from_secs(1);
    for i in 0..queries {
        if let Some((3, t)) = dns_ask(&net.a, addr(B4, 53), &format!("h{i}.blocked.test"), wait) {
            injected_ok += 1;
            injected.push(t.as_secs_f64() * 1e3);
        }
        if let Some((0, t)) = dns_ask(&net.a, addr(B4, 53), "ok.test", wait) {
            served_ok += 1;
            served.push(t.as_secs_f64() * 1e3);
        }
    }
    engine.revert(&f.id).expect("revert dns");
    injected.sort_by(f64::total_cmp);
    served.sort_by(f64::total_cmp);
    let stats = |v: &[f64]| {
        if v.is_empty() {
            return json!(null);
        }
        json!({"p50": percentile(v, 0.5), "p99": percentile(v, 0.99)})
    };
    json!({
        "queries_each": queries,
        "matching_answered_nxdomain": injected_ok,
        "other_answered_by_server": served_ok,
        "injected_answer_ms": stats(&injected),
        "server_answer_ms": stats(&served),
    })
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let out_path = arg("--out", "bench-out/bench.json");
    let rounds: usize = arg("--rounds", "3").parse().expect("--rounds");
    let seconds: u32 = arg("--seconds", "3").parse().expect("--seconds");
    let runs: usize = arg("--runs", "200").parse().expect("--runs");
    if sh("command -v iperf3").stdout.is_empty() {
        panic!("iperf3 is missing: apt-get install iperf3");
    }
    let net = TestNet::new("bench");
    // The agent's journal lives on /run (tmpfs) in production; measure the same.
    let journal = std::path::PathBuf::from(format!("/run/chaos-bench-{}", std::process::id()));
    let attach = AttachMode::detect();
    let (engine, _) = Engine::start(EngineConfig {
        journal_dir: journal,
        attach,
        ..EngineConfig::default()
    })
    .expect("engine");

    let _server = ServerGuard(
        std::process::Command::new("ip")
            .args(["netns", "exec", &net.b, "iperf3", "-s", "-p", "5299"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("iperf3 -s"),
    );
    std::thread::sleep(Duration::from_millis(300));

    let cases: [Option<usize>; 4] = [None, Some(1), Some(1000), Some(65_536)];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for (i, case) in cases.iter().enumerate() {
            let fault = case.map(|n| engine.apply(spec(&net, cidrs(n))).expect("apply"));
            let bps = iperf(&net, seconds);
            if let Some(f) = &fault {
                let f = engine.status(&f.id).expect("status");
                assert_eq!(
                    f.counters.matched, 0,
                    "the benchmark traffic must not match"
                );
                assert!(
                    f.counters.seen > 0,
                    "the classifier saw nothing: not on the path?"
                );
            }
            if let Some(f) = fault {
                engine.revert(&f.id).expect("revert");
            }
            eprintln!("round {round} entries {case:?}: {:.2} Gbit/s", bps / 1e9);
            results[i].push(bps);
        }
    }
    let baseline = median(&mut results[0].clone());
    let throughput: Vec<_> = cases
        .iter()
        .zip(results.iter_mut())
        .map(|(case, r)| {
            let m = median(r);
            json!({
                "entries": case.unwrap_or(0),
                "classifier": case.is_some(),
                "median_gbit_s": m / 1e9,
                "ratio_to_baseline": m / baseline,
                "rounds_gbit_s": r.iter().map(|b| b / 1e9).collect::<Vec<_>>(),
            })
        })
        .collect();

    let cost = classifier_cost(&net);
    let typical = latencies(&engine, &net, 1, runs);
    let large = latencies(&engine, &net, 65_536, (runs / 10).max(5));
    let dns = dns_latency(&engine, &net, 1000);
    let report = json!({
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "arch": std::env::consts::ARCH,
        "attach": attach.name(),
        "iperf3_seconds_per_run": seconds,
        "rounds": rounds,
        "untargeted_throughput": throughput,
        "classifier_cost_unmatched": cost,
        "apply_revert_latency": [typical, large],
        "dns_failure": dns,
        "targets": {
            "dns_injected_share": 1.0,
            "dns_injected_answer_ms_above_server_max": 1.0,
            "untargeted_throughput_ratio_at_65536_min": 0.98,
            "apply_p99_ms_max": 20.0,
            "revert_p99_ms_max": 10.0,
        },
    });
    if let Some(dir) = std::path::Path::new(&out_path).parent() {
        std::fs::create_dir_all(dir).expect("out dir");
    }
    std::fs::write(
        &out_path,
        serde_json::to_string_pretty(&report).expect("json"),
    )
    .expect("write");
    println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    drop(engine);
}

struct ServerGuard(std::process::Child);

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
