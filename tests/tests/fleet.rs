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
