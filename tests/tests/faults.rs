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
    let (retrans, elapsed) = in_ns(&net.a, move || {
        let before = tcp_retrans_segs();
        let start = Instant::now();
        let mut s = TcpStream::connect(addr(B4, 5201)).expect("connect");
        let payload: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        s.write_all(&payload)
            .expect("write must not fail under loss");
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        drop(s);
        (tcp_retrans_segs() - before, start.elapsed())
    });
    let data = server.join().expect("server");
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
    assert!(
        (lo..=hi).contains(&(hit as f64)),
        "damaged {hit} outside [{lo:.0}, {hi:.0}]"
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
    use chaos_agent::datapath::{self, Hook};
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
        let mut p = datapath::prepare().expect("prepare");
        p.configure(&spec, None, Default::default(), 14, &[], deadline)
            .expect("configure");
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
