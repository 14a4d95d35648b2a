//! chaos-demo: two network namespaces, a real 30 % loss fault applied by `chaosctl --local`,
//! and the loss measured where it matters: at the receiver, while the sender sees no error.
use chaos_tests::{B4, LocalFault, TestNet, UdpReceiver, addr, json_event, udp_send};
use std::time::Duration;

const DATAGRAMS: u64 = 5_000;

fn measure(net: &TestNet, port: u16) -> (u64, u64) {
    let rx = UdpReceiver::start(&net.b, addr(B4, port), Duration::from_millis(400));
    let report = udp_send(&net.a, addr(B4, port), DATAGRAMS, 64);
    let (seqs, _) = rx.finish();
    (seqs.len() as u64, report.send_errors + report.errqueue)
}

fn line(label: &str, received: u64, errors: u64) {
    let lost = DATAGRAMS - received;
    println!(
        "{label:<28} sent {DATAGRAMS}  received {received}  lost {lost} ({:.1} %)  sender errors {errors}",
        100.0 * lost as f64 / DATAGRAMS as f64
    );
}

fn main() {
    let net = TestNet::new("demo");
    println!(
        "namespaces {} (10.213.0.1) <-veth-> {} ({B4})\n",
        net.a, net.b
    );
    let (rx, err) = measure(&net, 5400);
    line("before the fault:", rx, err);

    let args = [
        "inject",
        "loss",
        "--percent",
        "30",
        "--interface",
        "va",
        "--netns",
        &net.a,
        "--interval",
        "0",
    ];
    println!("\n$ chaosctl {} --local", args.join(" "));
    let fault = LocalFault::start(&args, &net.tmp.join("journal"));
    let (rx, err) = measure(&net, 5401);
    line("with 30 % loss on va egress:", rx, err);
    let (status, out) = fault.stop();
    let reverted = json_event(&out, "reverted");
    println!(
        "chaosctl exited {status}; fault counters at revert: {}",
        reverted["counters"]
    );

    let (rx_after, err_after) = measure(&net, 5402);
    line("\nafter revert:", rx_after, err_after);
    let residue = net.residue();
    println!(
        "kernel residue after revert: {}",
        if residue.is_empty() {
            "none".to_string()
        } else {
            format!("{residue:?}")
        }
    );
    let measured = 100.0 * (DATAGRAMS - rx) as f64 / DATAGRAMS as f64;
    println!(
        "\nrequested 30 % loss, measured {measured:.1} % at the receiver, {err} errors at the sender"
    );
    if !(25.0..=35.0).contains(&measured)
        || err != 0
        || rx_after != DATAGRAMS
        || !residue.is_empty()
    {
        eprintln!("demo: the fault did not behave as requested");
        std::process::exit(1);
    }
}
