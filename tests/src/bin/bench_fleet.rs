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

async fn controller_channel(dir: &Path, port: u16) -> Channel {
    let read = |n: &str| std::fs::read(dir.join(n)).expect("read cert");
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(
            read("user-bench.pem"),
            read("user-bench-key.pem"),
        ))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("connect to the controller")
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
    let channel = controller_channel(&tls, port).await;
    let mut client = ControllerClient::new(channel.clone());
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
        let sel = sel_all();
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
    let hostile = hostile_experiments(&channel, controller.id(), &sel_all()).await;
    let doc = json!({
        "what": "fan-out: Apply through the controller until every agent acknowledged (null backend, mTLS, loopback)",
        "rounds": rounds,
        "fanout": results,
        "baseline_direct_unix_socket": {"apply_ms": stats(apply), "revert_ms": stats(revert)},
        "controller_rss_kib_at_largest": controller_rss,
        "agent_rss_kib": agent_rss,
        "hostile_experiments": hostile,
        "targets": {"p99_ms_at_100": 100, "p99_ms_at_1000": 1000, "hostile_controller_cpu_ms_per_request_max": 100},
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

fn sel_all() -> fleet::Selector {
    fleet::Selector {
        agents: vec![],
        labels: [("bench".to_string(), "yes".to_string())].into(),
    }
}

/// The controller's CPU time so far (all threads, exited ones included), in ms.
fn cpu_ms(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("controller stat");
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks * 1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Experiment texts an attacker holding a user certificate can send, each as large as the
/// transport lets through (tonic's 4 MiB) or as the loader's own bound (1 MiB) at its worst.
fn hostile_texts() -> Vec<(&'static str, String)> {
    const WIRE: usize = 4 * 1024 * 1024 - 1024;
    const FILE: usize = 1024 * 1024 - 64;
    let laughs = {
        // Aliases that would expand to 10^9 nodes, inside both bounds.
        let mut t = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            t += &format!("a{i}: &a{i} [{refs}]\n");
        }
        t
    };
    let keys: String = (0..)
        .map(|i| format!("k{i}: v\n"))
        .scan(0usize, |n, l| {
            *n += l.len();
            (*n < FILE).then_some(l)
        })
        .collect();
    // The most nodes the loader parses: every one goes through the YAML parser, twice.
    // chaos_experiment::load::MAX_NODES; not linked here: this crate also builds the static
    // VM test binary, which cannot link the experiment crate's TLS (ring needs a musl C compiler).
    const MAX_NODES: usize = 20_000;
    let under = (0..MAX_NODES).map(|i| format!("k{i}: v\n")).collect();
    vec![
        ("keys_under_node_limit", under),
        ("nesting_4mib", "[".repeat(WIRE)),
        ("nesting_1mib", "[".repeat(FILE)),
        (
            "indent",
            (0..1000)
                .map(|i| format!("{}- a\n", " ".repeat(i)))
                .collect(),
        ),
        (
            "title_4mib",
            format!("title: '{}'\n", "A".repeat(WIRE - 16)),
        ),
        (
            "title_1mib",
            format!("title: '{}'\n", "A".repeat(FILE - 16)),
        ),
        ("aliases", laughs),
        ("keys_1mib", keys),
        (
            "binary_4mib",
            String::from_utf8_lossy(&vec![0xff; WIRE / 3]).into_owned(),
        ),
    ]
}

/// Each hostile text sent `ROUNDS` times by 4 clients at once while 1,000 agents hold a fault:
/// the controller's CPU time per request, its ListAgents latency meanwhile beside the same
/// measured before the flood, and whether any agent lost its lease (re-joined, or its fault
/// is gone). The baseline in the same run: a small experiment refused for one bad field.
async fn hostile_experiments(ch: &Channel, pid: u32, sel: &fleet::Selector) -> serde_json::Value {
    use chaos_proto::experiments::v1 as exp;
    use chaos_proto::experiments::v1::experiments_client::ExperimentsClient;
    const ROUNDS: usize = 10;
    const CLIENTS: usize = 4;
    let mut control = ControllerClient::new(ch.clone());
    control
        .apply(fleet::FleetApplyRequest {
            selector: Some(sel.clone()),
            spec: Some(loss_spec()),
        })
        .await
        .expect("apply before the flood");
    let agents = |r: fleet::ListAgentsResponse| {
        let mut v: Vec<(String, i64, u32)> = r
            .agents
            .into_iter()
            .map(|a| (a.node_name, a.connected_unix_ms, a.faults))
            .collect();
        v.sort();
        v
    };
    let before = agents(
        control
            .list_agents(fleet::ListAgentsRequest {})
            .await
            .expect("list")
            .into_inner(),
    );
    // ListAgents round trips, every 20 ms, for as long as `flooding` holds.
    let probe = |flooding: std::sync::Arc<std::sync::atomic::AtomicBool>| {
        let mut c = ControllerClient::new(ch.clone());
        tokio::spawn(async move {
            let mut ms = vec![];
            while flooding.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                c.list_agents(fleet::ListAgentsRequest {})
                    .await
                    .expect("list during the flood");
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            ms
        })
    };
    let flood = |text: String| {
        let ch = ch.clone();
        async move {
            let text = std::sync::Arc::new(text);
            let on = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
            let listing = probe(on.clone());
            let cpu0 = cpu_ms(pid);
            let t = Instant::now();
            let mut tasks = vec![];
            for _ in 0..CLIENTS {
                let (mut c, text) = (
                    ExperimentsClient::new(ch.clone()).max_encoding_message_size(8 << 20),
                    text.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut codes = vec![];
                    for _ in 0..ROUNDS {
                        let r = c
                            .run(exp::RunRequest {
                                source_name: "hostile.yaml".into(),
                                text: (*text).clone(),
                            })
                            .await;
                        codes.push(match r {
                            Ok(_) => "accepted".to_string(),
                            Err(s) => format!("{:?}", s.code()),
                        });
                    }
                    codes
                }));
            }
            let mut codes = std::collections::BTreeMap::<String, usize>::new();
            for t in tasks {
                for c in t.await.expect("client") {
                    *codes.entry(c).or_default() += 1;
                }
            }
            let wall = t.elapsed().as_secs_f64() * 1000.0;
            // Let blocking threads and the probe settle before reading the CPU clock.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let cpu = cpu_ms(pid) - cpu0;
            on.store(false, std::sync::atomic::Ordering::Relaxed);
            let list = listing.await.expect("probe");
            (cpu / (ROUNDS * CLIENTS) as f64, wall, codes, list)
        }
    };
    let quiet = {
        let on = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let listing = probe(on.clone());
        tokio::time::sleep(Duration::from_secs(2)).await;
        on.store(false, std::sync::atomic::Ordering::Relaxed);
        listing.await.expect("probe")
    };
    let (base_cpu, _, _, _) = flood("title: t\nmethod: [{fault: {nonsense: 1}}]\n".into()).await;
    let mut cases = vec![];
    let mut worst_cpu: f64 = 0.0;
    let mut worst_list = vec![];
    for (name, text) in hostile_texts() {
        let bytes = text.len();
        let (cpu, wall, codes, list) = flood(text).await;
        eprintln!(
            "hostile {name} ({bytes} B): controller CPU {cpu:.2} ms/request, {codes:?}, ListAgents p99 {:.1} ms meanwhile",
            percentile(&sorted(&list), 0.99)
        );
        worst_cpu = worst_cpu.max(cpu);
        worst_list.extend(list.iter().copied());
        cases.push(
            json!({"case": name, "bytes": bytes, "requests": ROUNDS * CLIENTS,
            "controller_cpu_ms_per_request": cpu, "wall_ms": wall, "answers": codes,
            "list_agents_ms_meanwhile": stats(list)}),
        );
    }
    let after = agents(
        control
            .list_agents(fleet::ListAgentsRequest {})
            .await
            .expect("list")
            .into_inner(),
    );
    let rejoined = before
        .iter()
        .filter(|b| !after.iter().any(|a| a.0 == b.0 && a.1 == b.1))
        .count();
    let lost_fault = after.iter().filter(|a| a.2 == 0).count();
    control
        .revert(fleet::FleetRevertRequest {
            node_name: String::new(),
            id: String::new(),
            all: true,
        })
        .await
        .expect("revert after the flood");
    json!({
        "what": format!("each text {ROUNDS}x by {CLIENTS} clients at once, {} agents joined holding a fault", before.len()),
        "baseline_small_invalid_cpu_ms_per_request": base_cpu,
        "cases": cases,
        "worst_controller_cpu_ms_per_request": worst_cpu,
        "list_agents_ms_quiet": stats(quiet),
        "list_agents_ms_during_floods": stats(worst_list),
        "agents_rejoined": rejoined,
        "agents_that_lost_their_fault": lost_fault,
    })
}
