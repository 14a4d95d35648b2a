//! The fleet's trust boundary with real processes: a chaos-controller on loopback and
//! chaos-agents (null backend: no kernel faults) joining it as nodes.
use chaos_tests::apps::Proc;
use chaos_tests::{bin, serial};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn null_agent(url: &str, node: &str, dir: &Path, tag: &str) -> Proc {
    let s = |p: PathBuf| p.display().to_string();
    Proc::spawn_host(
        "chaos-agent",
        &bin("chaos-agent"),
        &[
            "--backend".into(),
            "null".into(),
            "--controller".into(),
            url.into(),
            "--insecure-plaintext".into(),
            "--node-name".into(),
            node.into(),
            "--socket".into(),
            s(dir.join(format!("{tag}.sock"))),
            "--journal-dir".into(),
            s(dir.join(format!("{tag}-journal"))),
        ],
        &[],
        &dir.join(format!("{tag}.log")),
    )
}

fn ctl(url: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin("chaosctl"))
        .args(["--controller", url, "--insecure-plaintext"])
        .args(args)
        .output()
        .expect("chaosctl")
}

/// Faults the agent on `socket` holds.
fn held(dir: &Path, tag: &str) -> usize {
    let out = Command::new(bin("chaosctl"))
        .arg("--agent")
        .arg(format!(
            "unix://{}",
            dir.join(format!("{tag}.sock")).display()
        ))
        .args(["list", "--json"])
        .output()
        .expect("chaosctl list");
    assert!(
        out.status.success(),
        "{tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("list json");
    v.as_array().map_or(0, Vec::len)
}

/// A second Join under a connected node's name (easy with the shared `fleet` certificate) is
/// refused with ALREADY_EXISTS, so faults keep going to the real node; the refused agent
/// retries with backoff and gets the node once the first one is gone. Before, the second
/// registration replaced the first: faults went to the impostor.
#[test]
fn a_second_stream_for_a_connected_node_is_refused() {
    let _g = serial();
    let dir = std::env::temp_dir().join(format!("chaos-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let url = format!("http://127.0.0.1:{}", free_port());
    let _controller = Proc::spawn_host(
        "chaos-controller",
        &bin("chaos-controller"),
        &[
            "--listen".into(),
            url.clone(),
            "--insecure-plaintext".into(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
        ],
        &[],
        &dir.join("controller.log"),
    );
    let peers = || -> Vec<String> {
        let out = ctl(&url, &["agents", "--json"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|a| a["node"] == "n1")
            .map(|a| a["peer"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let mut real = null_agent(&url, "n1", &dir, "real");
    wait_for("the real agent joins", Duration::from_secs(20), || {
        peers().len() == 1
    });
    let real_peer = peers();
    let _impostor = null_agent(&url, "n1", &dir, "impostor");
    let log = || std::fs::read_to_string(dir.join("impostor.log")).unwrap_or_default();
    wait_for("the impostor is refused", Duration::from_secs(20), || {
        log().contains("already connected")
    });
    assert_eq!(peers(), real_peer, "the node's stream changed hands");
    let out = ctl(
        &url,
        &[
            "inject",
            "loss",
            "--percent",
            "10",
            "--interface",
            "lo",
            "--on",
            "n1",
            "--duration",
            "5m",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        (held(&dir, "real"), held(&dir, "impostor")),
        (1, 0),
        "the fault went to the impostor"
    );
    // The real node goes away: the waiting agent gets the name within its backoff.
    real.kill9();
    let took = wait_for(
        "the refused agent joins once the node's stream is gone",
        Duration::from_secs(15),
        || peers().len() == 1 && peers() != real_peer,
    );
    println!("the refused agent joined {took:?} after the first one died");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Raises this process's descriptor limit to its hard limit: the flood below holds 1,000
/// sockets.
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// 1,000 TCP connections from one address that never send a ClientHello do not lock anyone
/// out: past 64 handshakes in flight from that address the controller closes new ones at
/// once, and those it took are closed when the 10 s handshake deadline passes; a user from
/// another address is served meanwhile. Before, tonic kept every one open forever.
#[test]
fn silent_connections_are_closed_and_do_not_lock_others_out() {
    let _g = serial();
    raise_nofile();
    let dir = std::env::temp_dir().join(format!("chaos-flood-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let tls = dir.join("tls");
    let out = Command::new(bin("chaosctl"))
        .args(["certs", "init", "--node", "n1", "--user", "ci", "--dir"])
        .arg(&tls)
        .output()
        .expect("certs init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let _controller = Proc::spawn_host(
        "chaos-controller",
        &bin("chaos-controller"),
        &[
            "--listen".into(),
            url.clone(),
            "--tls-dir".into(),
            tls.display().to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
        ],
        &[],
        &dir.join("controller.log"),
    );
    let agents = || {
        Command::new(bin("chaosctl"))
            .args(["--controller", &url, "--tls-dir"])
            .arg(&tls)
            .args(["--as", "ci", "agents"])
            .output()
            .expect("chaosctl")
    };
    wait_for("the controller serves", Duration::from_secs(20), || {
        agents().status.success()
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let mut flood = rt.block_on(async {
        let mut conns = vec![];
        for _ in 0..1000 {
            let s = tokio::net::TcpSocket::new_v4().expect("socket");
            s.bind("127.0.0.2:0".parse().expect("addr")).expect("bind");
            conns.push(s.connect(addr).await.expect("connect"));
        }
        conns
    });
    let started = Instant::now();
    let closed = |conns: &mut Vec<tokio::net::TcpStream>| -> usize {
        rt.block_on(async {
            let mut n = 0;
            for c in conns.iter_mut() {
                use tokio::io::AsyncReadExt;
                let mut b = [0u8; 1];
                match tokio::time::timeout(Duration::from_millis(1), c.read(&mut b)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => n += 1,
                    _ => {}
                }
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let at_once = closed(&mut flood);
    let t = Instant::now();
    let out = agents();
    let served_in = t.elapsed();
    assert!(
        out.status.success(),
        "a user from another address was locked out: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{at_once}/1000 closed at once; another address served in {served_in:?}");
    assert!(at_once >= 900, "only {at_once}/1000 closed at once");
    let took = wait_for(
        "every silent connection is closed",
        Duration::from_secs(15),
        || closed(&mut flood) == 1000,
    );
    let all_closed = started.elapsed();
    println!("all 1000 closed {all_closed:?} after the flood ({took:?} of waiting)");
    assert!(
        all_closed >= Duration::from_secs(5),
        "closed before the 10 s deadline: {all_closed:?}"
    );
    let log = std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default();
    for line in [
        "closing connections at once",
        "did not complete its TLS handshake",
    ] {
        assert_eq!(
            log.matches(line).count(),
            1,
            "'{line}' not logged once:\n{log}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
