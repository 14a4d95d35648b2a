//! chaos-vmtest: the eBPF faults on real Debian kernels under QEMU (tests/vm), x86_64 and arm64
//! (a Raspberry Pi class CPU). The VM's init has made namespaces `a` and `b` joined by veth
//! `va` (10.0.0.1) <-> `vb` (10.0.0.2). Debian's 6.1 kernel has no TCX, so this is also where
//! the clsact path and its crash recovery run natively. Prints one line per check; exits 1 if
//! any failed.
use chaos_agent::datapath::AttachMode;
use chaos_agent::spec::{Direction, FaultKind, FaultSpec, NetnsRef, Protocol, Target};
use chaos_agent::{Engine, EngineConfig, caps};
use chaos_tests::{UdpReceiver, addr, binomial_bounds, median, udp_rtts, udp_send};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const B: &str = "10.0.0.2";
const OTHER: &str = "10.0.0.3";

fn spec(kind: FaultKind, direction: Direction) -> FaultSpec {
    FaultSpec {
        kind,
        target: Target {
            netns: NetnsRef::Path("/run/netns/a".into()),
            interface: "va".into(),
            remote: vec![],
            local: vec![],
            ports: vec![],
            protocol: Protocol::Udp,
            direction,
        },
        duration: Duration::from_secs(120),
    }
}

fn engine(journal: &str) -> Arc<Engine> {
    let config = EngineConfig {
        journal_dir: journal.into(),
        ..EngineConfig::default()
    };
    Engine::start(config).expect("engine").0
}

/// tc filters and the clsact qdisc on va: what a fault may leave behind.
fn residue() -> String {
    let mut out = String::new();
    for args in [
        vec!["-n", "a", "filter", "show", "dev", "va", "egress"],
        vec!["-n", "a", "filter", "show", "dev", "va", "ingress"],
        vec!["-n", "a", "qdisc", "show", "dev", "va"],
    ] {
        let o = Command::new("/sbin/tc").args(&args).output().expect("tc");
        for line in String::from_utf8_lossy(&o.stdout).lines() {
            // The default root qdisc of a veth is noqueue; anything else is ours.
            if !line.starts_with("qdisc noqueue") && !line.trim().is_empty() {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

fn udp(count: u64, port: u16) -> (u64, u64) {
    let rx = UdpReceiver::start("b", addr(B, port), Duration::from_millis(800));
    let report = udp_send("a", addr(B, port), count, 64);
    let (seqs, _) = rx.finish();
    (seqs.len() as u64, report.send_errors + report.errqueue)
}

struct Checks(u32);

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: String) {
        println!("{} {name}: {detail}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            self.0 += 1;
        }
    }
}

fn main() {
    // Child mode for the crash test: apply a fault, report, then wait to be killed.
    if std::env::args().nth(1).as_deref() == Some("hold-fault") {
        let e = engine("/run/chaos-journal");
        e.apply(spec(FaultKind::Partition, Direction::Both))
            .expect("apply");
        println!("held");
        std::thread::sleep(Duration::from_secs(600));
        return;
    }
    let mut c = Checks(0);
    let found = caps::detect();
    let kernel = found.kernel.clone();
    println!("kernel {kernel} arch {}", found.arch);
    c.check(
        "netem and fq detected",
        found.has("netem") && found.has("fq"),
        format!(
            "{:?}",
            found
                .features
                .iter()
                .map(|f| (f.name, f.present, f.detail.clone()))
                .collect::<Vec<_>>()
        ),
    );
    let mode = AttachMode::detect();
    c.check(
        "attach mode follows the kernel",
        mode == if found.has("tcx") {
            AttachMode::Tcx
        } else {
            AttachMode::Clsact
        },
        mode.name().to_string(),
    );

    let e = engine("/run/chaos-journal");
    // Loss: 5,000 datagrams under TCG (the host test runs 20,000).
    let f = e
        .apply(spec(
            FaultKind::Loss {
                percent: 30.0,
                correlation: 0.0,
            },
            Direction::Egress,
        ))
        .expect("apply loss");
    let n = 5_000;
    let (got, errors) = udp(n, 5000);
    let ended = e.revert(&f.id).expect("revert");
    let lost = n - got;
    let (lo, hi) = binomial_bounds(n, 0.3);
    c.check(
        "loss 30 % within 99.9 % bounds",
        (lo..=hi).contains(&(lost as f64)),
        format!(
            "lost {lost} of {n}, bounds [{lo:.0}, {hi:.0}], counter {}",
            ended.counters.affected
        ),
    );
    c.check(
        "sender sees no error",
        errors == 0,
        format!("{errors} send errors"),
    );
    c.check(
        "counters agree with the receiver",
        ended.counters.affected == lost,
        format!("affected {} lost {lost}", ended.counters.affected),
    );
    c.check("no residue after revert", residue().is_empty(), residue());

    let f = e
        .apply(spec(FaultKind::Partition, Direction::Both))
        .expect("apply partition");
    let (got, errors) = udp(300, 5001);
    c.check(
        "partition cuts everything silently",
        got == 0 && errors == 0,
        format!("received {got}, sender errors {errors}"),
    );
    e.revert(&f.id).expect("revert");
    let (got, _) = udp(300, 5002);
    c.check(
        "traffic flows after revert",
        got == 300,
        format!("received {got} of 300"),
    );

    // Latency (netem under our HTB root), only towards 10.0.0.2; 10.0.0.3 on the same
    // interface must not be delayed.
    let ok = Command::new("/bin/ip")
        .args(["-n", "b", "addr", "add", "10.0.0.3/24", "dev", "vb"])
        .status()
        .expect("ip");
    assert!(ok.success(), "add 10.0.0.3");
    let probes = 40;
    let base_hit = median(&udp_rtts("a", "b", addr(B, 7000), probes));
    let base_other = median(&udp_rtts("a", "b", addr(OTHER, 7001), probes));
    let mut lat = spec(
        FaultKind::Latency {
            ms: 100.0,
            jitter_ms: 0.0,
            correlation: 0.0,
        },
        Direction::Egress,
    );
    lat.target.remote = vec![format!("{B}/32").parse().expect("cidr")];
    lat.target.protocol = Protocol::All;
    let f = e.apply(lat).expect("apply latency");
    let hit = udp_rtts("a", "b", addr(B, 7002), probes);
    let other = udp_rtts("a", "b", addr(OTHER, 7003), probes);
    let tree = residue();
    e.revert(&f.id).expect("revert latency");
    let min = hit.iter().copied().fold(f64::INFINITY, f64::min);
    let (m_hit, m_other) = (median(&hit), median(&other));
    c.check(
        "netem tree while active",
        tree.contains("htb c4a0:") && tree.contains("netem c4a1:"),
        tree.replace('\n', " | "),
    );
    c.check(
        "100 ms: every RTT at least 100 ms",
        min >= 100.0 && hit.iter().all(|r| !r.is_nan()),
        format!("min {min:.2} ms over {probes} probes, baseline median {base_hit:.2} ms"),
    );
    c.check(
        "100 ms: median within +5 ms",
        m_hit <= base_hit + 105.0,
        format!(
            "median {m_hit:.2} ms (baseline {base_hit:.2} ms, added {:.2} ms)",
            m_hit - base_hit
        ),
    );
    c.check(
        "other destination not delayed",
        (m_other - base_other).abs() <= 1.0,
        format!("median {m_other:.2} ms vs {base_other:.2} ms before"),
    );
    c.check(
        "revert restores the default root qdisc",
        residue().is_empty(),
        residue(),
    );

    let mut jit = spec(
        FaultKind::Latency {
            ms: 50.0,
            jitter_ms: 20.0,
            correlation: 0.0,
        },
        Direction::Egress,
    );
    jit.target.protocol = Protocol::All;
    let f = e.apply(jit).expect("apply jitter");
    let rtts = udp_rtts("a", "b", addr(B, 7004), 60);
    e.revert(&f.id).expect("revert jitter");
    let lo = rtts.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = rtts.iter().copied().fold(0.0, f64::max);
    let mean = rtts.iter().sum::<f64>() / rtts.len() as f64;
    let sd = (rtts.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / rtts.len() as f64).sqrt();
    c.check(
        "jitter 50 +- 20 ms: spread within bounds",
        lo >= 30.0 && hi <= 75.0 + base_hit && sd > 5.0,
        format!("min {lo:.1} max {hi:.1} mean {mean:.1} sd {sd:.1} ms"),
    );
    drop(e);

    // Crash recovery: a child applies, is killed -9; a new engine removes what it left.
    let me = std::env::current_exe().expect("exe");
    let mut child = Command::new(me)
        .arg("hold-fault")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("child");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    let before = residue();
    let _ = child.kill();
    let _ = child.wait();
    let left_by_crash = residue();
    let started = std::time::Instant::now();
    let e = engine("/run/chaos-journal");
    let cleaned = started.elapsed();
    c.check(
        "kill -9 then restart leaves no residue",
        !before.is_empty() && residue().is_empty(),
        format!(
            "attached before kill: {}; after kill: {}; after restart ({cleaned:?}): '{}'",
            before.lines().count(),
            left_by_crash.lines().count(),
            residue().trim()
        ),
    );
    drop(e);
    if c.0 > 0 {
        println!("{} checks failed", c.0);
        std::process::exit(1);
    }
    println!("all checks passed on {kernel}");
}
