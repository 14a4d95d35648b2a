//! Fan-out benchmark: time from a chaosctl-equivalent Apply on the controller's API until every
//! agent has acknowledged the fault, with 1, 10, 100 and 1,000 real agent processes (the null
//! backend: no kernel, so a thousand fit on one machine) joined over mutual TLS on loopback.
//! The baseline, in the same run, is the same Apply sent straight to one agent's unix socket.
//! Writes JSON to --out.
use chaos_proto::agent::v1 as pb;
use chaos_proto::agent::v1::agent_client::AgentClient;
use chaos_proto::fleet::v1 as fleet;
use chaos_proto::fleet::v1::controller_client::ControllerClient;
use chaos_tests::{arg, percentile};
use serde_json::json;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Children die with us, even on a panic or a kill -9 of the benchmark.
fn spawn(cmd: &mut Command) -> Child {
    // SAFETY: prctl in the child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(|a, b| a.total_cmp(b));
    json!({"p50": percentile(&v, 0.5), "p99": percentile(&v, 0.99), "max": v.last().copied().unwrap_or(f64::NAN), "n": v.len()})
}

fn loss_spec() -> pb::FaultSpec {
    pb::FaultSpec {
        kind: Some(pb::fault_spec::Kind::Loss(pb::Loss {
            percent: 10.0,
            correlation: 0.0,
        })),
        target: Some(pb::Target {
            interface: "eth0".into(),
            ..Default::default()
        }),
        duration_ms: 60_000,
    }
}

async fn controller_client(dir: &Path, port: u16) -> ControllerClient<Channel> {
    let read = |n: &str| std::fs::read(dir.join(n)).expect("read cert");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read("user-bench.pem"),
            read("user-bench-key.pem"),
        ))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("connect to the controller");
    ControllerClient::new(ch)
}

#[tokio::main]
async fn main() {
    let rounds: usize = arg("--rounds", "50").parse().expect("--rounds");
    let out = PathBuf::from(arg("--out", "bench-out/fleet.json"));
    let sizes: Vec<usize> = arg("--agents", "1,10,100,1000")
        .split(',')
        .map(|s| s.parse().expect("--agents"))
        .collect();
    let bin_dir = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let tmp = std::env::temp_dir().join(format!("chaos-bench-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let tls = tmp.join("tls");
    let ok = Command::new(bin_dir.join("chaosctl"))
        .args(["certs", "init", "--dir"])
        .arg(&tls)
        .args(["--node", "fleet", "--user", "bench"])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "certs init failed");
    // SAFETY: raising our own soft limit to the hard one; children inherit it.
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut l);
        l.rlim_cur = l.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &l);
    }
    let port = 17000 + (std::process::id() % 1000) as u16;
    let controller = spawn(
        Command::new(bin_dir.join("chaos-controller"))
            .args([
                "--listen",
                &format!("https://127.0.0.1:{port}"),
                "--tls-dir",
            ])
            .arg(&tls)
            .args(["--state-dir"])
            .arg(tmp.join("state"))
            .env("RUST_LOG", "warn"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut client = controller_client(&tls, port).await;
    let mut agents: Vec<Child> = vec![];
    let spawn_agent = |i: usize, socket: Option<&Path>| {
        let mut c = Command::new(bin_dir.join("chaos-agent"));
        c.args([
            "--backend",
            "null",
            "--controller",
            &format!("https://localhost:{port}"),
            "--tls-dir",
        ])
        .arg(&tls)
        .args([
            "--tls-name",
            "fleet",
            "--node-name",
            &format!("node-{i:04}"),
            "--label",
            "bench=yes",
        ])
        .env("RUST_LOG", "warn");
        if let Some(s) = socket {
            c.arg("--socket").arg(s);
        }
        spawn(&mut c)
    };
    // Agent 0 also serves a unix socket: the direct (baseline) path.
    let sock = tmp.join("agent0.sock");
    agents.push(spawn_agent(0, Some(&sock)));

    let mut results = vec![];
    let mut controller_rss = 0;
    for &n in &sizes {
        while agents.len() < n {
            agents.push(spawn_agent(agents.len(), None));
        }
        let started = Instant::now();
        loop {
            let have = client
                .list_agents(fleet::ListAgentsRequest {})
                .await
                .map(|r| r.into_inner().agents.len())
                .unwrap_or(0);
            if have >= n {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "only {have} of {n} agents joined"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let join_s = started.elapsed().as_secs_f64();
        let sel = fleet::Selector {
            agents: vec![],
            labels: [("bench".to_string(), "yes".to_string())].into(),
        };
        let (mut apply, mut revert) = (vec![], vec![]);
        for _ in 0..rounds {
            let t = Instant::now();
            let r = client
                .apply(fleet::FleetApplyRequest {
                    selector: Some(sel.clone()),
                    spec: Some(loss_spec()),
                })
                .await
                .expect("apply");
            apply.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(r.into_inner().faults.len(), n, "every agent applied");
            let t = Instant::now();
            let r = client
                .revert(fleet::FleetRevertRequest {
                    node_name: String::new(),
                    id: String::new(),
                    all: true,
                })
                .await
                .expect("revert");
            revert.push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(r.into_inner().reverted.len(), n, "every agent reverted");
        }
        controller_rss = rss_kib(controller.id());
        eprintln!(
            "{n:>5} agents: apply p50 {:.2} p99 {:.2} ms, revert p50 {:.2} p99 {:.2} ms, controller {} KiB",
            percentile(&sorted(&apply), 0.5),
            percentile(&sorted(&apply), 0.99),
            percentile(&sorted(&revert), 0.5),
            percentile(&sorted(&revert), 0.99),
            controller_rss
        );
        results.push(json!({"agents": n, "join_s": join_s, "apply_ms": stats(apply), "revert_ms": stats(revert), "controller_rss_kib": controller_rss}));
    }

    // Baseline: one agent, directly on its unix socket, same spec.
    let ch = chaos_tests::agent_channel(sock.clone()).await;
    let mut direct = AgentClient::new(ch);
    let (mut apply, mut revert) = (vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        let f = direct
            .apply(pb::ApplyRequest {
                spec: Some(loss_spec()),
            })
            .await
            .expect("direct apply")
            .into_inner()
            .fault
            .unwrap();
        apply.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        direct
            .revert(pb::RevertRequest {
                id: f.id,
                all: false,
            })
            .await
            .expect("direct revert");
        revert.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let agent_rss = rss_kib(agents[agents.len() - 1].id());
    let doc = json!({
        "what": "fan-out: Apply through the controller until every agent acknowledged (null backend, mTLS, loopback)",
        "rounds": rounds,
        "fanout": results,
        "baseline_direct_unix_socket": {"apply_ms": stats(apply), "revert_ms": stats(revert)},
        "controller_rss_kib_at_largest": controller_rss,
        "agent_rss_kib": agent_rss,
        "targets": {"p99_ms_at_100": 100, "p99_ms_at_1000": 1000},
    });
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(&out, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("{}", serde_json::to_string_pretty(&doc).unwrap());
    for mut a in agents {
        let _ = a.kill();
        let _ = a.wait();
    }
    let mut c = controller;
    let _ = c.kill();
    let _ = c.wait();
    let _ = std::fs::remove_dir_all(&tmp);
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}
