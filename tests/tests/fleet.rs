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

/// A CA with agent n1 and user ci in `tls`.
fn certs_init(tls: &Path) {
    let out = Command::new(bin("chaosctl"))
        .args(["certs", "init", "--node", "n1", "--user", "ci", "--tls-dir"])
        .arg(tls)
        .output()
        .expect("certs init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A chaos-controller serving mTLS on `url` with the certificates in `tls`; its log is
/// `dir/controller.log`.
fn tls_controller(url: &str, tls: &Path, dir: &Path) -> Proc {
    Proc::spawn_host(
        "chaos-controller",
        &bin("chaos-controller"),
        &[
            "--listen".into(),
            url.into(),
            "--tls-dir".into(),
            tls.display().to_string(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
        ],
        &[],
        &dir.join("controller.log"),
    )
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
    certs_init(&tls);
    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let _controller = tls_controller(&url, &tls, &dir);
    let agents = || {
        Command::new(bin("chaosctl"))
            .args(["--controller", &url, "--tls-dir"])
            .arg(&tls)
            // No --as: the only user certificate there (ci).
            .arg("agents")
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

#[cfg(feature = "tls")]
/// A client certificate the CA in `tls` signed with the user role but whose validity ended a
/// day ago: what a user with a year-old certificate holds.
fn expired_user_cert(tls: &Path, user: &str) {
    let read = |f: &str| std::fs::read_to_string(tls.join(f)).expect(f);
    let ca_key = rcgen::KeyPair::from_pem(&read("ca-key.pem")).expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&read("ca.pem"), ca_key).expect("ca");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, user);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, "chaos-user");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2025, 1, 1);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    std::fs::write(tls.join(format!("user-{user}.pem")), cert.pem()).expect("write");
    std::fs::write(
        tls.join(format!("user-{user}-key.pem")),
        key.serialize_pem(),
    )
    .expect("write");
}

/// Expired, foreign-CA and wrong-role certificates are refused with the reason on both sides:
/// chaosctl and the agent say which (with TLS 1.3 the refusal arrives after the client's
/// handshake, where tonic says only "transport error"), and the controller logs each refused
/// identity once however often it retries.
#[cfg(feature = "tls")]
#[test]
fn refused_certificates_say_why_on_both_sides() {
    let _g = serial();
    let dir = std::env::temp_dir().join(format!("chaos-refused-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (tls, foreign) = (dir.join("tls"), dir.join("foreign"));
    certs_init(&tls);
    certs_init(&foreign);
    // The user's files: our CA (so the controller is trusted), someone else's certificates.
    let mixed = dir.join("mixed");
    std::fs::create_dir_all(&mixed).expect("dir");
    std::fs::copy(tls.join("ca.pem"), mixed.join("ca.pem")).expect("copy");
    for f in [
        "user-ci.pem",
        "user-ci-key.pem",
        "agent-n1.pem",
        "agent-n1-key.pem",
    ] {
        std::fs::copy(foreign.join(f), mixed.join(f)).expect("copy");
    }
    expired_user_cert(&tls, "old");
    std::fs::copy(tls.join("agent-n1.pem"), tls.join("user-n1.pem")).expect("copy");
    std::fs::copy(tls.join("agent-n1-key.pem"), tls.join("user-n1-key.pem")).expect("copy");

    let port = free_port();
    let url = format!("https://127.0.0.1:{port}");
    let _controller = tls_controller(&url, &tls, &dir);
    let agents = |tls_dir: &Path, user: &str| {
        Command::new(bin("chaosctl"))
            .args(["--controller", &url, "--tls-dir"])
            .arg(tls_dir)
            .args(["--as", user, "agents"])
            .output()
            .expect("chaosctl")
    };
    wait_for("the controller serves", Duration::from_secs(20), || {
        agents(&tls, "ci").status.success()
    });
    // Several user certificates and no --as: one line naming them.
    let o = Command::new(bin("chaosctl"))
        .args(["--controller", &url, "--tls-dir"])
        .arg(&tls)
        .arg("agents")
        .output()
        .expect("chaosctl");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("--as: 3 user certificates in")
            && err.contains("(ci, n1, old): name one")
            && err.trim().lines().count() == 1,
        "{err}"
    );
    let cases: [(&Path, &str, i32, &str, &str); 3] = [
        (
            &mixed,
            "ci",
            1,
            "the peer refused our certificate: it is not signed by the peer's CA",
            "refused the client certificate ci (role chaos-user): its signature does not verify",
        ),
        (
            &tls,
            "old",
            1,
            "the peer refused our certificate: it has expired",
            "refused the client certificate old (role chaos-user): it expired",
        ),
        (
            &tls,
            "n1",
            2,
            "certificate n1 has role \"chaos-agent\"; this API needs \"chaos-user\"",
            "refused a caller: certificate n1 has role \"chaos-agent\"",
        ),
    ];
    for (tls_dir, user, code, says, logged) in cases {
        for attempt in 0..2 {
            let out = agents(tls_dir, user);
            let err = String::from_utf8_lossy(&out.stderr);
            println!("--as {user} (try {attempt}): {}", err.trim());
            assert_eq!(out.status.code(), Some(code), "--as {user}: {err}");
            assert!(err.contains(says), "--as {user}: `{says}` not in: {err}");
            assert_eq!(err.lines().count(), 1, "--as {user}: not one line: {err}");
        }
        let log = std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default();
        assert_eq!(
            log.matches(logged).count(),
            1,
            "--as {user}: `{logged}` not logged exactly once over two tries:\n{log}"
        );
    }

    // An agent with a foreign certificate says why in its log, and the controller once.
    let agent_log = dir.join("agent.log");
    let _agent = Proc::spawn_host(
        "chaos-agent",
        &bin("chaos-agent"),
        &[
            "--backend".into(),
            "null".into(),
            "--controller".into(),
            url.clone(),
            "--tls-dir".into(),
            mixed.display().to_string(),
            "--node-name".into(),
            "n1".into(),
            "--socket".into(),
            dir.join("agent.sock").display().to_string(),
            "--journal-dir".into(),
            dir.join("agent-journal").display().to_string(),
        ],
        &[],
        &agent_log,
    );
    let says = "controller unreachable: the peer refused our certificate: it is not signed by the peer's CA";
    wait_for("the agent says why twice", Duration::from_secs(20), || {
        std::fs::read_to_string(&agent_log)
            .unwrap_or_default()
            .matches(says)
            .count()
            >= 2
    });
    let log = std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default();
    assert_eq!(
        log.matches("refused the client certificate n1 (role chaos-agent)")
            .count(),
        1,
        "the agent's refusal not logged once:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// RevertRequest with its `id` (tag 1) as raw bytes: what a hostile client sends instead of a
/// UTF-8 string.
#[derive(Clone, PartialEq, prost::Message)]
struct RawRevert {
    #[prost(bytes = "vec", tag = "1")]
    id: Vec<u8>,
}

/// A request that does not decode (a string that is not UTF-8) is INVALID_ARGUMENT naming the
/// message and field: tonic's codec said INTERNAL, so chaosctl's exit was 1, not 2.
#[test]
fn undecodable_requests_are_invalid_argument() {
    let _g = serial();
    let dir = std::env::temp_dir().join(format!("chaos-undecodable-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let socket = dir.join("a.sock");
    let _agent = Proc::spawn_host(
        "chaos-agent",
        &bin("chaos-agent"),
        &[
            "--backend".into(),
            "null".into(),
            "--socket".into(),
            socket.display().to_string(),
            "--journal-dir".into(),
            dir.join("journal").display().to_string(),
        ],
        &[],
        &dir.join("agent.log"),
    );
    wait_for("the agent listens", Duration::from_secs(20), || {
        socket.exists()
    });
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let status = rt.block_on(async {
        let mut grpc = tonic::client::Grpc::new(chaos_tests::agent_channel(socket.clone()).await);
        grpc.ready().await.expect("ready");
        let path =
            tonic::codegen::http::uri::PathAndQuery::from_static("/chaos.agent.v1.Agent/Revert");
        grpc.unary::<RawRevert, chaos_proto::agent::v1::RevertResponse, _>(
            tonic::Request::new(RawRevert {
                id: vec![b'a', 0xff, 0xfe],
            }),
            path,
            chaos_proto::codec::StrictCodec::default(),
        )
        .await
        .expect_err("not UTF-8")
    });
    println!("{:?}: {}", status.code(), status.message());
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("RevertRequest.id") && status.message().contains("UTF-8"),
        "the field is not named: {}",
        status.message()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
