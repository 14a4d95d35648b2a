//! chaos-vmtest: the eBPF faults on real Debian kernels under QEMU (tests/vm), x86_64 and arm64
//! (a Raspberry Pi class CPU). The VM's init has made namespaces `a` and `b` joined by veth
//! `va` (10.0.0.1) <-> `vb` (10.0.0.2). Debian's 6.1 kernel has no TCX, so this is also where
//! the clsact path and its crash recovery run natively. Prints one line per check; exits 1 if
//! any failed.
use chaos_agent::datapath::AttachMode;
use chaos_agent::spec::{Direction, FaultKind, FaultSpec, NetnsRef, Protocol, Target};
use chaos_agent::{Engine, EngineConfig, caps};
use chaos_tests::{UdpReceiver, addr, binomial_bounds, udp_send};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

const B: &str = "10.0.0.2";

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
