//! Faults on the real kernel, in namespaces the tests create (see src/lib.rs).
use chaos_tests::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn stop(fault: LocalFault) -> std::process::ExitStatus {
    fault.stop().0
}

/// 30 % loss on A's egress: the receiver's count is within the 99.9 % binomial bounds over
/// 20,000 datagrams, the sender sees no error at all, and the counters agree with the receiver.
#[test]
fn loss_is_accurate_and_invisible_to_the_sender() {
    let _g = serial();
    let net = TestNet::new("loss");
    let journal = net.tmp.join("journal");
    let child = LocalFault::start(
        &[
            "inject",
            "loss",
            "--percent",
            "30",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--duration",
            "60s",
            "--interval",
            "0",
        ],
        &journal,
    );
    let n = 20_000;
    let rx = UdpReceiver::start(&net.b, addr(B4, 5000), Duration::from_millis(500));
    let report = udp_send(&net.a, addr(B4, 5000), n, 64);
    let (seqs, _) = rx.finish();
    let out = {
        let status = stop(child);
        assert!(status.success(), "chaosctl exit {status}");
        std::fs::read_dir(&journal).map(|d| d.count()).unwrap_or(0)
    };
    assert_eq!(out, 0, "journal left behind after a clean revert");
    assert_eq!(chaos_programs_loaded(), 0, "BPF programs outlived chaosctl");

    assert_eq!(
        report.send_errors, 0,
        "sender saw local send errors: loss must look like network loss"
    );
    assert_eq!(report.errqueue, 0, "sender's error queue got reports");
    assert_eq!(report.sent, n);
    let lost = n - seqs.len() as u64;
    let (lo, hi) = binomial_bounds(n, 0.30);
    println!(
        "sent {n}, received {}, lost {lost} ({:.2} %), bounds [{lo:.0}, {hi:.0}]",
        seqs.len(),
        100.0 * lost as f64 / n as f64
    );
    assert!(
        (lo..=hi).contains(&(lost as f64)),
        "lost {lost} outside 99.9% bounds [{lo:.0}, {hi:.0}]"
    );
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
}

/// Correlated loss keeps the mean and makes losses come in bursts.
#[test]
fn correlated_loss_is_bursty_with_the_same_mean() {
    let _g = serial();
    let net = TestNet::new("burst");
    let child = LocalFault::start(
        &[
            "inject",
            "loss",
            "--percent",
            "20",
            "--correlation",
            "75",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--protocol",
            "udp",
            "--interval",
            "0",
        ],
        &net.tmp.join("journal"),
    );
    let n = 20_000u64;
    let rx = UdpReceiver::start(&net.b, addr(B4, 5001), Duration::from_millis(500));
    let report = udp_send(&net.a, addr(B4, 5001), n, 64);
    let (seqs, _) = rx.finish();
    assert!(stop(child).success());
    assert_eq!(report.send_errors, 0);
    let mut received = vec![false; n as usize];
    for s in seqs {
        received[s as usize] = true;
    }
    let lost: Vec<bool> = received.iter().map(|r| !r).collect();
    let total = lost.iter().filter(|l| **l).count() as f64;
    let (mut after_loss, mut loss_after_loss) = (0.0, 0.0);
    for w in lost.windows(2) {
        if w[0] {
            after_loss += 1.0;
            if w[1] {
                loss_after_loss += 1.0;
            }
        }
    }
    let p = total / n as f64;
    let p_burst = loss_after_loss / after_loss;
    println!(
        "loss {:.2} %, P(loss | previous lost) {:.2}",
        100.0 * p,
        p_burst
    );
    // Expected mean 0.20, P(l|l) = p + c(1-p) = 0.80. Per-CPU chains interleave a little, so
    // the bounds are looser than for independent loss, and still far from independence (0.20).
    assert!((0.17..=0.23).contains(&p), "mean loss {p}");
    assert!(p_burst > 0.6, "losses are not bursty: P(l|l) = {p_burst}");
}

/// TCP through 5 % loss: the transfer completes intact, with retransmissions, and the writer
/// never sees an error.
#[test]
fn tcp_completes_under_loss_with_retransmissions() {
    let _g = serial();
    let net = TestNet::new("tcp");
    let child = LocalFault::start(
        &[
            "inject",
            "loss",
            "--percent",
            "5",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--protocol",
            "tcp",
            "--interval",
            "0",
        ],
        &net.tmp.join("journal"),
    );
    let size = 4 << 20;
    let listener = in_ns(&net.b, || {
        TcpListener::bind(addr(B4, 5201)).expect("listen")
    });
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut data = Vec::new();
        s.read_to_end(&mut data).expect("read");
        data
    });
    let before = in_ns(&net.a, tcp_retrans_segs);
    let elapsed = in_ns(&net.a, move || {
        let start = Instant::now();
        let mut s = TcpStream::connect(addr(B4, 5201)).expect("connect");
        let payload: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        s.write_all(&payload)
            .expect("write must not fail under loss");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        drop(s);
        start.elapsed()
    });
    let data = server.join().expect("server");
    // After the receiver has everything: write_all returns once the data is queued, and the
    // retransmissions come after that.
    let retrans = in_ns(&net.a, tcp_retrans_segs) - before;
    let (status, out) = child.stop();
    assert!(status.success());
    let reverted = json_event(&out, "reverted");
    assert_eq!(data.len(), size, "transfer incomplete");
    assert!(
        data.iter().enumerate().all(|(i, b)| *b == (i % 253) as u8),
        "data damaged"
    );
    println!(
        "4 MiB in {elapsed:?}, {retrans} retransmitted segments, counters {}",
        reverted["counters"]
    );
    assert!(retrans > 0, "no retransmissions: was anything lost?");
    assert!(reverted["counters"]["affected"].as_u64().unwrap() > 0);
}

/// Partition (both directions): nothing crosses, the sender sees no error, and all flows again
/// after revert.
#[test]
fn partition_drops_everything_silently_then_reverts() {
    let _g = serial();
    let net = TestNet::new("part");
    let child = LocalFault::start(
        &[
            "inject",
            "partition",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--direction",
            "both",
            "--interval",
            "0",
        ],
        &net.tmp.join("journal"),
    );
    let (report, got) = udp_probe(&net.a, &net.b, addr(B4, 5002), 500);
    assert_eq!(
        (report.send_errors, report.errqueue),
        (0, 0),
        "sender saw the partition"
    );
    assert_eq!(got, 0, "A->B datagrams crossed the partition");
    let (_, got_back) = udp_probe(&net.b, &net.a, addr(A4, 5003), 500);
    assert_eq!(got_back, 0, "B->A datagrams crossed the partition");
    let (_, got6) = udp_probe(&net.a, &net.b, addr(B6, 5004), 200);
    assert_eq!(got6, 0, "IPv6 crossed the partition");
    assert!(
        !tcp_reachable(&net.a, &net.b, addr(B4, 5005)),
        "TCP crossed the partition"
    );
    assert!(stop(child).success());
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
    let (_, after) = udp_probe(&net.a, &net.b, addr(B4, 5006), 200);
    assert_eq!(after, 200, "traffic still blocked after revert");
}

/// Only the targeted IPv4 and IPv6 destinations are cut; other addresses on the same interface
/// are not.
#[test]
fn dest_filter_hits_only_the_targeted_addresses() {
    let _g = serial();
    let net = TestNet::new("dest");
    let child = LocalFault::start(
        &[
            "inject",
            "partition",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--dest",
            &format!("{B4}/32"),
            "--dest",
            &format!("{B6}/128"),
            "--interval",
            "0",
        ],
        &net.tmp.join("journal"),
    );
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B4, 5010), 200).1,
        0,
        "targeted IPv4 not cut"
    );
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B6, 5011), 200).1,
        0,
        "targeted IPv6 not cut"
    );
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B4_OTHER, 5012), 200).1,
        200,
        "other IPv4 was hit"
    );
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B6_OTHER, 5013), 200).1,
        200,
        "other IPv6 was hit"
    );
    assert!(stop(child).success());
}

/// A /24 prefix and a source (local) filter.
#[test]
fn cidr_prefixes_and_source_filter() {
    let _g = serial();
    let net = TestNet::new("cidr");
    // Remote in 10.213.0.0/24 but local address must be A6's family: IPv4 local CIDR given, so
    // only IPv4 packets from 10.213.0.1 match.
    let child = LocalFault::start(
        &[
            "inject",
            "partition",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--dest",
            "10.213.0.0/24",
            "--source",
            &format!("{A4}/32"),
            "--interval",
            "0",
        ],
        &net.tmp.join("journal"),
    );
    assert_eq!(udp_probe(&net.a, &net.b, addr(B4, 5020), 200).1, 0);
    assert_eq!(udp_probe(&net.a, &net.b, addr(B4_OTHER, 5021), 200).1, 0);
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B6, 5022), 200).1,
        200,
        "IPv6 matched IPv4-only CIDRs"
    );
    assert!(stop(child).success());
}

/// Ports, ranges and protocol.
#[test]
fn port_and_protocol_filters() {
    let _g = serial();
    let net = TestNet::new("port");
    let child = LocalFault::start(
        &[
            "inject",
            "partition",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--port",
            "6000-6009",
            "--port",
            "7000",
            "--protocol",
            "udp",
            "--interval",
            "0",
        ],
        &net.tmp.join("journal"),
    );
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B4, 6000), 100).1,
        0,
        "first port of the range"
    );
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B4, 6009), 100).1,
        0,
        "last port of the range"
    );
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B6, 7000), 100).1,
        0,
        "single port over IPv6"
    );
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B4, 6010), 100).1,
        100,
        "port outside the range"
    );
    assert!(
        tcp_reachable(&net.a, &net.b, addr(B4, 6001)),
        "tcp hit by a udp-only fault"
    );
    assert!(stop(child).success());

    let child = LocalFault::start(
        &[
            "inject",
            "partition",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--protocol",
            "icmp",
            "--interval",
            "0",
        ],
        &net.tmp.join("journal"),
    );
    let ping = sh(&format!(
        "ip netns exec {} ping -c 3 -i 0.1 -W 1 {B4}",
        net.a
    ));
    assert!(!ping.status.success(), "ping got through an icmp partition");
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B4, 6020), 100).1,
        100,
        "udp hit by an icmp fault"
    );
    assert!(stop(child).success());
}

/// Ingress only: what B sends to A is cut, what A sends reaches B.
#[test]
fn ingress_direction() {
    let _g = serial();
    let net = TestNet::new("ingr");
    let child = LocalFault::start(
        &[
            "inject",
            "partition",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--direction",
            "ingress",
            "--dest",
            B4,
            "--interval",
            "0",
        ],
        &net.tmp.join("journal"),
    );
    assert_eq!(
        udp_probe(&net.b, &net.a, addr(A4, 5030), 200).1,
        0,
        "B->A not cut on A's ingress"
    );
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B4, 5031), 200).1,
        200,
        "A->B was cut by an ingress fault"
    );
    assert!(stop(child).success());
}

/// Corruption: the damaged share of datagrams (damaged on arrival, or dropped by a checksum
/// check) is within binomial bounds, and matches the affected counter.
#[test]
fn corrupt_damages_the_requested_share() {
    let _g = serial();
    let net = TestNet::new("corr");
    let child = LocalFault::start(
        &[
            "inject",
            "corrupt",
            "--percent",
            "10",
            "--interface",
            "va",
            "--netns",
            &net.a,
            "--protocol",
            "udp",
            "--interval",
            "0",
        ],
        &net.tmp.join("journal"),
    );
    let n = 20_000;
    let rx = UdpReceiver::start(&net.b, addr(B4, 5040), Duration::from_millis(500));
    let report = udp_send(&net.a, addr(B4, 5040), n, 256);
    let (seqs, damaged) = rx.finish();
    let (status, out) = child.stop();
    assert!(status.success());
    let affected = json_event(&out, "reverted")["counters"]["affected"]
        .as_u64()
        .unwrap();
    assert_eq!(report.send_errors, 0);
    let dropped = n - seqs.len() as u64;
    let hit = damaged + dropped;
    let (lo, hi) = binomial_bounds(n, 0.10);
    println!(
        "damaged on arrival {damaged}, dropped {dropped}, affected counter {affected}, bounds [{lo:.0}, {hi:.0}]"
    );
    // The share is judged on what the classifier corrupted (the draw itself): the receiver's
    // count runs ~3 % low (a flip in the sequence number hides a damaged datagram), which put
    // an honest run below the bounds on the receiver's count in CI (1847 of [1860, 2140]).
    // That the receiver saw what the counter says is checked next.
    assert!(
        (lo..=hi).contains(&(affected as f64)),
        "corrupted {affected} outside [{lo:.0}, {hi:.0}]"
    );
    // A flip in the 8-byte sequence number can make a datagram look undamaged or be miscounted;
    // allow for that sliver (8 of 256 bytes).
    let slack = (affected as f64 * 0.05) as u64 + 5;
    assert!(
        hit.abs_diff(affected) <= slack,
        "receiver saw {hit}, counter says {affected}"
    );
}

/// The classifier itself ends a fault: a partition's rule drops a packet while its deadline is
/// ahead and its owner's heartbeat is fresh, and passes it once the deadline is past or the
/// beat is older than the bound (2 s), with no process doing anything (BPF_PROG_TEST_RUN).
#[test]
fn the_kernel_ends_a_rule_at_its_deadline_or_when_its_owner_stops_beating() {
    use chaos_agent::datapath::Hook;
    use chaos_agent::heartbeat::monotonic_ns;
    use chaos_agent::spec::{Direction, FaultKind, FaultSpec, NetnsRef, Protocol, Target};
    let _g = serial();
    require_root();
    // Egress drop is a redirect to an ifindex that cannot exist: TC_ACT_REDIRECT.
    const DROP: i32 = 7;
    const PASS: i32 = -1;
    let spec = FaultSpec {
        kind: FaultKind::Partition,
        target: Target {
            netns: NetnsRef::Current,
            interface: "lo".into(),
            remote: vec![],
            local: vec![],
            ports: vec![],
            protocol: Protocol::All,
            direction: Direction::Egress,
            force: false,
        },
        duration: Duration::from_secs(60),
    };
    let verdict = |deadline: u64, beat_age: u64| {
        let mut p = detached_table();
        p.load_rule(&spec, None, Default::default(), deadline)
            .expect("load rule");
        p.beat_at(monotonic_ns().saturating_sub(beat_age))
            .expect("beat");
        let (_, v) = p
            .test_run(Hook::Egress.program(), &udp_frame(b"x", false), 1)
            .expect("test_run");
        v
    };
    let s = 1_000_000_000;
    let ahead = monotonic_ns() + 60 * s;
    assert_eq!(verdict(ahead, 0), DROP, "a live rule drops");
    assert_eq!(verdict(ahead, s), DROP, "a beat 1 s old is fresh");
    assert_eq!(verdict(monotonic_ns() - 1, 0), PASS, "past its deadline");
    assert_eq!(verdict(ahead, 3 * s), PASS, "owner silent for 3 s");
}

/// 1,000 faults on one interface are 1,000 rows of one table: one classifier per hook (TCX
/// allows 64 programs), each apply after the first a map write, and traffic to addresses none
/// of them names untouched; the 1,001st (a partition of B) still acts.
#[test]
fn a_thousand_faults_share_one_classifier() {
    use chaos_agent::FaultKind;
    use chaos_agent::datapath::{self, Hook};
    let _g = serial();
    let net = TestNet::new("many");
    let engine = engine_at(&net.tmp.join("journal"));
    let mut apply_ms = Vec::new();
    for i in 0..1000u32 {
        let dest = format!("10.100.{}.{}/32", i / 250, i % 250 + 1);
        let spec = va_fault(
            &net,
            FaultKind::Loss {
                percent: 100.0,
                correlation: 0.0,
            },
            &dest,
        );
        let started = Instant::now();
        engine
            .apply(spec)
            .unwrap_or_else(|e| panic!("fault {i}: {e}"));
        apply_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let attached = in_ns(&net.a, || datapath::tcx_programs("va", Hook::Egress)).expect("query");
    if datapath::has_tcx() {
        assert_eq!(attached.len(), 1, "programs on va egress: {attached:?}");
    }
    // The table's two classifiers and the engine's spare object's two.
    let loaded = chaos_programs_loaded();
    assert!(loaded <= 4, "{loaded} programs loaded for 1,000 faults");
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B4, 5140), 200).1,
        200,
        "unnamed traffic hit"
    );
    let cut = engine
        .apply(va_fault(&net, FaultKind::Partition, B4))
        .expect("partition");
    assert_eq!(
        udp_probe(&net.a, &net.b, addr(B4, 5141), 200).1,
        0,
        "the 1,001st fault"
    );
    engine.revert(&cut.id).expect("revert");
    assert_eq!(udp_probe(&net.a, &net.b, addr(B4, 5142), 200).1, 200);
    let mut sorted = apply_ms[1..].to_vec();
    sorted.sort_by(f64::total_cmp);
    println!(
        "1,000 faults on va: first apply {:.1} ms, the rest p50 {:.2} p99 {:.2} ms",
        apply_ms[0],
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.99)
    );
    for r in engine.revert_all() {
        r.expect("revert");
    }
    assert!(net.residue().is_empty(), "{:?}", net.residue());
}

/// How matching rules compose, measured at the receiver: two 30 % losses to one destination
/// lose 1-(0.7)(0.7) = 51 %; a partition and a bandwidth cap to one destination drop all and
/// shape none (a lost packet is affected by the drop only).
#[test]
fn matching_rules_compose_as_documented() {
    use chaos_agent::FaultKind;
    let _g = serial();
    let net = TestNet::new("compose");
    let engine = engine_at(&net.tmp.join("journal"));
    let loss = || FaultKind::Loss {
        percent: 30.0,
        correlation: 0.0,
    };
    let a = engine.apply(va_fault(&net, loss(), B4)).expect("loss a");
    let b = engine.apply(va_fault(&net, loss(), B4)).expect("loss b");
    let n = 10_000;
    let (report, got) = udp_probe(&net.a, &net.b, addr(B4, 5150), n);
    assert_eq!(report.send_errors, 0);
    let (lo, hi) = binomial_bounds(n, 0.51);
    let lost = (n as usize - got) as f64;
    assert!(
        lost >= lo && lost <= hi,
        "two 30 % losses lost {lost} of {n}, expected [{lo}, {hi}]"
    );
    let ca = engine.status(&a.id).expect("a").counters;
    let cb = engine.status(&b.id).expect("b").counters;
    assert!(
        ca.matched >= n && cb.matched >= n,
        "both match every packet: {ca:?} {cb:?}"
    );
    assert_eq!(
        ca.affected + cb.affected,
        lost as u64,
        "each lost packet is one rule's drop"
    );
    engine.revert(&a.id).expect("revert");
    engine.revert(&b.id).expect("revert");

    let cut = engine
        .apply(va_fault(&net, FaultKind::Partition, B4))
        .expect("partition");
    let cap = engine
        .apply(va_fault(
            &net,
            FaultKind::Bandwidth {
                bytes_per_sec: 125_000,
            },
            B4,
        ))
        .expect("bandwidth");
    let (_, got) = udp_probe(&net.a, &net.b, addr(B4, 5151), 500);
    assert_eq!(got, 0, "the partition wins");
    let shaped = engine.status(&cap.id).expect("cap").counters;
    assert!(
        shaped.matched >= 500 && shaped.affected == 0,
        "a dropped packet is not shaped: {shaped:?}"
    );
    println!(
        "two 30 % losses: lost {lost} of {n} (expected 51 %); partition + bandwidth: 0 of 500, bandwidth affected {}",
        shaped.affected
    );
    engine.revert(&cut.id).expect("revert");
    engine.revert(&cap.id).expect("revert");
    assert!(net.residue().is_empty(), "{:?}", net.residue());
}

/// The receiver every "0 received" check relies on keeps listening until its sender is done:
/// a sender that starts well after the receiver's idle period is still counted in full.
#[test]
fn the_udp_receiver_waits_for_a_late_sender() {
    let _g = serial();
    let net = TestNet::new("rxwait");
    let rx = UdpReceiver::start(&net.b, addr(B4, 5090), Duration::from_millis(200));
    std::thread::sleep(Duration::from_millis(1000));
    let report = udp_send(&net.a, addr(B4, 5090), 100, 64);
    let (seqs, _) = rx.finish();
    assert_eq!((report.sent, seqs.len()), (100, 100));
}

/// One packet of the classifier differential test.
#[derive(Debug, Clone, Copy)]
struct Packet {
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    /// 6 TCP, 17 UDP, 1 ICMP (58 for IPv6).
    protocol: u8,
    sport: u16,
    dport: u16,
}

impl Packet {
    /// The packet as an Ethernet frame.
    fn frame(&self) -> Vec<u8> {
        use std::net::IpAddr;
        let l4: Vec<u8> = match self.protocol {
            6 => {
                let mut t = Vec::new();
                t.extend_from_slice(&self.sport.to_be_bytes());
                t.extend_from_slice(&self.dport.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xFF, 0xFF, 0, 0, 0, 0]);
                t.extend_from_slice(b"payload");
                t
            }
            17 => {
                let mut u = Vec::new();
                u.extend_from_slice(&self.sport.to_be_bytes());
                u.extend_from_slice(&self.dport.to_be_bytes());
                u.extend_from_slice(&(8u16 + 7).to_be_bytes());
                u.extend_from_slice(&[0, 0]);
                u.extend_from_slice(b"payload");
                u
            }
            p => vec![if p == 58 { 128 } else { 8 }, 0, 0, 0, 0, 1, 0, 1],
        };
        let mut f = vec![0u8; 12];
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
                f.extend_from_slice(&(20 + l4.len() as u16).to_be_bytes());
                f.extend_from_slice(&[0, 0, 0x40, 0, 64, self.protocol, 0, 0]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                f.extend_from_slice(&[0x86, 0xDD, 0x60, 0, 0, 0]);
                f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                f.extend_from_slice(&[self.protocol, 64]);
                f.extend_from_slice(&s.octets());
                f.extend_from_slice(&d.octets());
            }
            _ => unreachable!("one family per packet"),
        }
        f.extend_from_slice(&l4);
        f
    }
}

/// The reference: whether `spec`'s target matches `p` on `egress` (or ingress), written from
/// the documented semantics, independently of the classifier and its tries and bitsets.
fn reference_matches(spec: &chaos_agent::FaultSpec, p: &Packet, egress: bool) -> bool {
    use chaos_agent::spec::{Cidr, Direction, Protocol};
    let t = &spec.target;
    let hook = match t.direction {
        Direction::Egress => egress,
        Direction::Ingress => !egress,
        Direction::Both => true,
    };
    let (remote, local) = if egress {
        (p.dst, p.src)
    } else {
        (p.src, p.dst)
    };
    let within = |cidrs: &[Cidr], a: std::net::IpAddr| {
        cidrs.is_empty() || cidrs.iter().any(|c| contains(c, a))
    };
    let protocol = match t.protocol {
        Protocol::All => true,
        Protocol::Tcp => p.protocol == 6,
        Protocol::Udp => p.protocol == 17,
        Protocol::Icmp => p.protocol == 1 || p.protocol == 58,
    };
    let has_ports = p.protocol == 6 || p.protocol == 17;
    let ports = t.ports.is_empty()
        || (has_ports
            && t.ports.iter().any(|r| {
                (r.first..=r.last).contains(&p.sport) || (r.first..=r.last).contains(&p.dport)
            }));
    hook && protocol && ports && within(&t.remote, remote) && within(&t.local, local)
}

fn contains(c: &chaos_agent::spec::Cidr, a: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    let (net, addr, bits): (u128, u128, u32) = match (c.addr, a) {
        (IpAddr::V4(n), IpAddr::V4(a)) => (u32::from(n).into(), u32::from(a).into(), 32),
        (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(n), u128::from(a), 128),
        _ => return false,
    };
    let prefix = u32::from(c.prefix);
    let shift = bits - prefix;
    prefix == 0 || (net >> shift) == (addr >> shift)
}

/// The classifier against the reference matcher: 60 tables of 1-6 random partition rules
/// (remote and local CIDRs of every length over a small address pool, so prefixes nest and
/// overlap; port ranges; protocols; directions), each probed with 300 random IPv4/IPv6
/// TCP/UDP/ICMP packets on both hooks through BPF_PROG_TEST_RUN. A packet is dropped exactly
/// when some rule matches it.
#[test]
fn the_classifier_matches_exactly_what_the_reference_matches() {
    use chaos_agent::datapath::Hook;
    use chaos_agent::heartbeat::monotonic_ns;
    use chaos_agent::spec::{
        Cidr, Direction, FaultKind, FaultSpec, NetnsRef, PortRange, Protocol, Target,
    };
    use std::net::IpAddr;
    let _g = serial();
    require_root();
    const PASS: i32 = -1;
    let v4: Vec<IpAddr> = [
        "10.213.0.1",
        "10.213.0.2",
        "10.213.7.9",
        "10.9.0.1",
        "192.0.2.77",
    ]
    .iter()
    .map(|a| a.parse().expect("ip"))
    .collect();
    let v6: Vec<IpAddr> = [
        "fd00:213::1",
        "fd00:213::2",
        "fd00:213:0:7::9",
        "2001:db8::77",
    ]
    .iter()
    .map(|a| a.parse().expect("ip"))
    .collect();
    let ports = [53u16, 80, 443, 8080, 40000];
    let mut rng = Rng(0xC4A0_D1FF_0001);
    let cidr = |rng: &mut Rng| {
        let v6_addr = rng.below(3) == 0;
        let pool = if v6_addr { &v6 } else { &v4 };
        let addr = pool[rng.below(pool.len())];
        let max = if v6_addr { 128 } else { 32 };
        let prefix = [max, max, max - 8, max - 16, 8, 0][rng.below(6)] as u8;
        // The network address, as a user would write it (the parser may insist on it).
        let masked = match addr {
            IpAddr::V4(a) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(prefix))
                };
                IpAddr::V4((u32::from(a) & m).into())
            }
            IpAddr::V6(a) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(prefix))
                };
                IpAddr::V6((u128::from(a) & m).into())
            }
        };
        Cidr {
            addr: masked,
            prefix,
        }
    };
    let (mut checked, mut dropped) = (0u64, 0u64);
    for round in 0..60 {
        let mut table = detached_table();
        let mut specs = Vec::new();
        for _ in 0..1 + rng.below(6) {
            let spec = FaultSpec {
                kind: FaultKind::Partition,
                target: Target {
                    netns: NetnsRef::Current,
                    interface: "lo".into(),
                    remote: (0..rng.below(4)).map(|_| cidr(&mut rng)).collect(),
                    local: (0..rng.below(3)).map(|_| cidr(&mut rng)).collect(),
                    ports: (0..rng.below(3))
                        .map(|_| {
                            let a = ports[rng.below(ports.len())];
                            let b = ports[rng.below(ports.len())];
                            PortRange {
                                first: a.min(b),
                                last: a.max(b),
                            }
                        })
                        .collect(),
                    protocol: [Protocol::All, Protocol::Tcp, Protocol::Udp, Protocol::Icmp]
                        [rng.below(4)],
                    direction: [Direction::Egress, Direction::Ingress, Direction::Both]
                        [rng.below(3)],
                    force: false,
                },
                duration: Duration::from_secs(60),
            };
            table
                .load_rule(&spec, None, Default::default(), u64::MAX)
                .unwrap_or_else(|e| panic!("round {round}: load {spec:?}: {e}"));
            specs.push(spec);
        }
        table.beat_at(monotonic_ns()).expect("beat");
        for _ in 0..300 {
            let pool = if rng.below(2) == 0 { &v4 } else { &v6 };
            let six = pool[0].is_ipv6();
            let packet = Packet {
                src: pool[rng.below(pool.len())],
                dst: pool[rng.below(pool.len())],
                protocol: [6, 17, if six { 58 } else { 1 }][rng.below(3)],
                sport: ports[rng.below(ports.len())],
                dport: ports[rng.below(ports.len())],
            };
            for (hook, egress) in [(Hook::Egress, true), (Hook::Ingress, false)] {
                let want = specs.iter().any(|s| reference_matches(s, &packet, egress));
                let (_, verdict) = table
                    .test_run(hook.program(), &packet.frame(), 1)
                    .expect("test_run");
                assert_eq!(
                    verdict != PASS,
                    want,
                    "round {round}, {hook:?}: {packet:?} against {:#?}",
                    specs.iter().map(|s| &s.target).collect::<Vec<_>>()
                );
                checked += 1;
                dropped += u64::from(want);
            }
        }
    }
    println!("classifier differential: {checked} packets, {dropped} dropped, 0 disagreements");
    assert!(
        dropped > checked / 10 && dropped < checked * 9 / 10,
        "{dropped}/{checked}: too one-sided to tell"
    );
}

/// No --interface: the fault lands on the target namespace's default-route interface and the
/// applied line says which; without a default route it is refused in one line naming the
/// candidates, and nothing is applied.
#[test]
fn a_network_fault_without_interface_takes_the_default_route() {
    let _g = serial();
    let net = TestNet::new("defrt");
    // A second interface the default route does not use, listed first, so picking the first
    // interface rather than the route's would show.
    sh_ok(&format!(
        "set -e; ip -n {a} link add vx type veth peer name vy; ip -n {a} link set vx up",
        a = net.a
    ));
    let journal = net.tmp.join("journal");
    let none = chaosctl(&[
        "inject",
        "partition",
        "--local",
        "--netns",
        &net.a,
        "--duration",
        "5s",
    ]);
    let err = String::from_utf8_lossy(&none.stderr);
    assert_eq!(none.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("no default route") && err.contains("va") && err.contains("vx"),
        "{err}"
    );
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());

    sh_ok(&format!(
        "ip -n {} route add default via {B4} dev va",
        net.a
    ));
    let child = LocalFault::start(
        &["inject", "partition", "--netns", &net.a, "--interval", "0"],
        &journal,
    );
    let applied: serde_json::Value = serde_json::from_str(&child.applied).expect("json");
    assert_eq!(applied["interface"], "va", "{applied}");
    assert!(
        applied["summary"]
            .as_str()
            .is_some_and(|s| s.starts_with("partition on va (netns ")),
        "{applied}"
    );
    let (_, got) = udp_probe(&net.a, &net.b, addr(B4, 5031), 200);
    assert_eq!(got, 0, "the default route's interface was not cut");
    assert!(stop(child).success());
    assert!(net.residue().is_empty(), "residue: {:?}", net.residue());
    let (_, after) = udp_probe(&net.a, &net.b, addr(B4, 5032), 200);
    assert_eq!(after, 200, "traffic still blocked after revert");
}
