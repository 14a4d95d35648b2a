//! The cluster path end to end: `chaosctl inject ... --namespace` (through a kubeconfig)
//! creates a ChaosExperiment; `chaos-controller --kubernetes` takes the Lease, reconciles it,
//! picks the pod by its labels and sends the fault to the chaos-agent named after the pod's
//! node; the agent finds the pod's network namespace from its UID and faults it. The pod is
//! synthetic (kubepods cgroups holding real processes in a real network namespace, see
//! `chaos_tests::pods`), the controller and agent are the real binaries over real gRPC on
//! loopback, and the faults are real and measured with traffic inside the pod.
//!
//! No Kubernetes API server can run on these machines, so `chaos_tests::kube_api` stands in for
//! it (over real HTTP, generic API semantics only).
use chaos_tests::apps::Proc;
use chaos_tests::kube_api::{Coll, KubeApi};
use chaos_tests::pods::{CID, SID, fake_pod, hierarchies, uid};
use chaos_tests::{bin, require_root, serial, sh_ok};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NODE: &str = "node-a";

fn experiments() -> Coll {
    Coll::new("/apis/chaos.dev/v1alpha1", "chaosexperiments")
}

fn pods() -> Coll {
    Coll::new("/api/v1", "pods")
}

fn pod(name: &str, app: &str, uid: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "labels": {"app": app}},
        "spec": {"nodeName": NODE, "containers": [{"name": app}]},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": app, "ready": true, "restartCount": 0,
                "image": "x", "imageID": "x", "containerID": format!("containerd://{CID}")}],
        },
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `chaosctl inject partition` of the cart pod's loopback, through the cluster.
fn partition(kubeconfig: &Path, duration: &str) -> Child {
    chaosctl_bg(
        kubeconfig,
        &[
            "inject",
            "partition",
            "--namespace",
            "shop",
            "--selector",
            "app=cart",
            "--interface",
            "lo",
            "--duration",
            duration,
            "--json",
        ],
    )
}

/// chaosctl against the cluster, started in the background with its stdout piped.
fn chaosctl_bg(kubeconfig: &Path, args: &[&str]) -> Child {
    Command::new(bin("chaosctl"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chaosctl")
}

/// Its exit code, stdout lines (JSON events) and stderr, within `limit`.
fn finish(mut c: Child, limit: Duration) -> (i32, Vec<String>, String) {
    let out = c.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        BufReader::new(out)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let start = Instant::now();
    let code = loop {
        if let Some(s) = c.try_wait().expect("wait") {
            break s.code().unwrap_or(-1);
        }
        if start.elapsed() > limit {
            let _ = c.kill();
            let _ = c.wait();
            panic!("chaosctl did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = c.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let lines = reader.join().expect("reader");
    eprintln!("chaosctl exit {code}\n{}\n{err}", lines.join("\n"));
    (code, lines, err)
}

/// The JSON events of `--json` output.
fn json_events(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn event<'a>(events: &'a [Value], name: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["event"] == name)
        .unwrap_or_else(|| panic!("no `{name}` event in {events:?}"))
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process killed on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn chaosctl_faults_a_pod_through_the_clusters_controller_and_its_nodes_agent() {
    let _g = serial();
    require_root();
    let pid = std::process::id();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let api = rt.block_on(KubeApi::start());
    let tmp = Dir(std::env::temp_dir().join(format!("chaos-cluster-{pid}")));
    std::fs::create_dir_all(&tmp.0).unwrap();
    let t = &tmp.0;
    // The controller as its service account, chaosctl as a user given chaos-experimenter in
    // the pods' namespace (deploy/'s RBAC, enforced by the stand-in).
    let controller_kubeconfig = t.join("kubeconfig-controller");
    api.write_kubeconfig_as(&controller_kubeconfig, chaos_tests::kube_rbac::CONTROLLER);
    let kubeconfig = t.join("kubeconfig");
    api.write_kubeconfig_as(&kubeconfig, "alice");
    api.bind_cluster_role("alice", "chaos-experimenter", "shop");

    // The pod, on this host, and its object; a second object with other labels whose pod does
    // not exist on the node: choosing it would fail the run.
    let root = format!("chaos-test-cluster-{pid}");
    let u = uid(70);
    let pod_dir = format!("/{root}/kubepods/burstable/pod{u}");
    let fake = fake_pod(70, &pod_dir, CID, SID, true);
    sh_ok(&format!("ip -n {} link set lo up", fake.netns));
    api.put(&pods(), "shop", pod("cart-1", "cart", &u.to_string()));
    api.put(&pods(), "shop", pod("web-1", "web", &uid(71).to_string()));

    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let s = |p: PathBuf| p.display().to_string();
    let controller = Proc::spawn_host(
        "chaos-controller",
        &bin("chaos-controller"),
        &[
            "--kubernetes".into(),
            "--listen".into(),
            url.clone(),
            "--insecure-plaintext".into(),
            "--state-dir".into(),
            s(t.join("state")),
        ],
        &[
            ("KUBECONFIG", s(controller_kubeconfig.clone())),
            ("POD_NAME", "ctl-0".into()),
            ("POD_NAMESPACE", "chaos-system".into()),
        ],
        &t.join("controller.log"),
    );
    let agent_sock = t.join("agent.sock");
    let agent = Proc::spawn_host(
        "chaos-agent",
        &bin("chaos-agent"),
        &[
            "--controller".into(),
            url.clone(),
            "--insecure-plaintext".into(),
            "--node-name".into(),
            NODE.into(),
            "--socket".into(),
            s(agent_sock.clone()),
            "--journal-dir".into(),
            s(t.join("journal")),
        ],
        &[],
        &t.join("agent.log"),
    );
    let logs = || {
        format!(
            "controller: {}\nagent: {}",
            std::fs::read_to_string(t.join("controller.log")).unwrap_or_default(),
            std::fs::read_to_string(t.join("agent.log")).unwrap_or_default()
        )
    };
    wait_for(
        "the agent joins the elected controller",
        Duration::from_secs(20),
        || {
            let out = Command::new(bin("chaosctl"))
                .args([
                    "--controller",
                    &url,
                    "--insecure-plaintext",
                    "agents",
                    "--json",
                ])
                .output()
                .expect("chaosctl agents");
            String::from_utf8_lossy(&out.stdout).contains(NODE)
        },
    );
    let lease = api
        .get(
            &Coll::new("/apis/coordination.k8s.io/v1", "leases"),
            "chaos-system",
            "chaos-controller",
        )
        .expect("the controller took a Lease");
    assert_eq!(lease["spec"]["holderIdentity"], "ctl-0");

    let to = chaos_tests::addr("127.0.0.1", 5302);
    let probe = || chaos_tests::udp_probe(&fake.netns, &fake.netns, to, 50).1;
    assert_eq!(probe(), 50, "the pod's loopback works before the fault");

    // 1. A fault that runs its course: the verdict, the counters, the status.
    let c = partition(&kubeconfig, "6s");
    wait_for("the fault is applied", Duration::from_secs(20), || {
        api.list(&experiments())
            .iter()
            .any(|o| o["status"]["faults"][0]["id"].is_string())
    });
    let during = probe();
    let (code, lines, err) = finish(c, Duration::from_secs(40));
    let events = json_events(&lines);
    assert_eq!(code, 0, "{err}\n{}", logs());
    assert_eq!(during, 0, "the partition did not reach the pod");
    assert_eq!(probe(), 50, "traffic still blocked after the run");
    let applied = event(&events, "applied");
    assert_eq!(applied["pod"], "shop/cart-1");
    assert_eq!(applied["node"], NODE);
    // Live counters while it ran (the controller writes them every 2 s).
    let live = event(&events, "counters");
    assert!(live["affected"].as_u64().unwrap_or(0) >= 50, "{live}");
    let reverted = event(&events, "reverted");
    assert!(
        reverted["counters"]["affected"].as_u64().unwrap_or(0) >= 50,
        "{reverted}"
    );
    assert_eq!(event(&events, "verdict")["verdict"], "completed");
    let name = event(&events, "created")["id"]
        .as_str()
        .and_then(|s| s.strip_prefix("shop/"))
        .expect("created shop/NAME")
        .to_string();
    let obj = api
        .get(&experiments(), "shop", &name)
        .expect("kept as a record");
    assert_eq!(obj["status"]["phase"], "Completed");
    assert_eq!(obj["status"]["faults"][0]["pod"], "shop/cart-1");
    assert_eq!(obj["metadata"]["finalizers"][0], "chaos.dev/revert-faults");
    assert_eq!(
        obj["metadata"]["labels"]["app.kubernetes.io/created-by"],
        "chaosctl"
    );
    let events_api = api.list(&Coll::new("/apis/events.k8s.io/v1", "events"));
    for reason in ["Started", "Completed"] {
        assert!(
            events_api.iter().any(|e| e["reason"] == reason),
            "no {reason} Event: {events_api:?}"
        );
    }

    // The API server compacts its history, as etcd does every few minutes: every watch ends
    // and one from before the compaction is 410 Gone, so the controller sees the next
    // experiment only if it re-lists.
    let expired = api.expired_watches();
    api.compact();

    // 2. Ctrl-C while the fault is on: the object is deleted, the controller reverts the
    // fault before letting the finalizer go, and chaosctl returns once it is gone.
    let c = partition(&kubeconfig, "5m");
    wait_for(
        "the second fault is applied",
        Duration::from_secs(20),
        || {
            api.list(&experiments()).iter().any(|o| {
                o["status"]["phase"] == "Running" && o["status"]["faults"][0]["id"].is_string()
            })
        },
    );
    assert!(
        api.expired_watches() > expired,
        "no watch resumed from before the compaction"
    );
    assert_eq!(probe(), 0, "the second partition did not reach the pod");
    let t0 = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
    let (code, lines, err) = finish(c, Duration::from_secs(60));
    let events = json_events(&lines);
    let took = t0.elapsed();
    eprintln!("interrupt to gone: {took:?}");
    assert_eq!(code, 0, "{err}\n{}", logs());
    assert_eq!(event(&events, "reverted")["reason"], "sigint");
    assert_eq!(probe(), 50, "traffic blocked after the interrupted run");
    assert_eq!(
        api.list(&experiments()).len(),
        1,
        "the interrupted experiment is gone, the finished one stays"
    );
    let list = Command::new(bin("chaosctl"))
        .args([
            "--agent",
            &format!("unix://{}", agent_sock.display()),
            "list",
            "--json",
        ])
        .output()
        .expect("chaosctl list");
    assert_eq!(
        String::from_utf8_lossy(&list.stdout).trim(),
        "[]",
        "the agent still holds a fault"
    );

    // 3. An experiment file with a hypothesis, run by the cluster's controller: a TCP
    // service on the pod's loopback must answer; the partition breaks it (violated, exit 1),
    // and the status records how long after the revert it answered again.
    let service = Command::new("ip")
        .args(["netns", "exec", &fake.netns, "python3", "-c"])
        .arg(
            "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('127.0.0.1', 5303))\ns.listen(64)\nwhile True:\n    s.accept()[0].close()\n",
        )
        .spawn()
        .expect("a TCP service in the pod");
    let service = ChildGuard(service);
    let file = t.join("cart-answers.yaml");
    std::fs::write(
        &file,
        format!(
            r#"title: the cart pod keeps answering on its loopback
steady-state-hypothesis:
  title: cart answers
  probes:
    - name: cart
      command:
        run: [ip, netns, exec, {ns}, python3, -c, "import socket; socket.create_connection(('127.0.0.1', 5303), timeout=0.5)"]
        timeout: 3s
      tolerance: {{exit-code: "== 0"}}
during: {{interval: 300ms}}
recovery: {{timeout: 20s, interval: 200ms}}
method:
  - fault:
      name: cut
      partition: {{}}
      target: {{pods: {{namespaces: [shop], labels: {{app: cart}}}}, interface: lo}}
      duration: 5s
"#,
            ns = fake.netns
        ),
    )
    .unwrap();
    wait_for(
        "the service in the pod listens",
        Duration::from_secs(10),
        || {
            chaos_tests::sh(&format!(
            "ip netns exec {} python3 -c \"import socket; socket.create_connection(('127.0.0.1', 5303), timeout=0.5)\"",
            fake.netns
        ))
        .status
        .success()
        },
    );
    let c = chaosctl_bg(
        &kubeconfig,
        &[
            "run",
            &file.display().to_string(),
            "--namespace",
            "shop",
            "--json",
        ],
    );
    let (code, lines, err) = finish(c, Duration::from_secs(60));
    let events = json_events(&lines);
    assert_eq!(code, 1, "{err}\n{}", logs());
    let verdict = event(&events, "verdict");
    assert_eq!(verdict["verdict"], "violated", "{verdict}");
    let name = verdict["id"]
        .as_str()
        .and_then(|s| s.strip_prefix("shop/"))
        .unwrap_or_default();
    assert!(name.starts_with("chaosctl-run-"), "{name}");
    let obj = api
        .get(&experiments(), "shop", name)
        .expect("the run's object");
    let recovery = obj["status"]["recoveryMs"].as_u64();
    eprintln!("run --namespace: violated, recovered {recovery:?} ms after the revert");
    assert!(recovery.is_some(), "{}", obj["status"]);
    assert_eq!(probe(), 50, "traffic blocked after the violated run");
    drop(service);

    // 4. Nothing matches: nothing is applied, and the verdict says why (exit 3, as `run`).
    let c = chaosctl_bg(
        &kubeconfig,
        &[
            "inject",
            "loss",
            "--percent",
            "5",
            "--namespace",
            "shop",
            "--selector",
            "app=nothing",
            "--duration",
            "5s",
        ],
    );
    let (code, lines, err) = finish(c, Duration::from_secs(30));
    // Without --json: lines for people.
    assert_eq!(code, 3, "{err}");
    assert!(
        lines[0].starts_with("created ChaosExperiment shop/chaosctl-loss-"),
        "{lines:?}"
    );
    let verdict = lines.last().map(String::as_str).unwrap_or_default();
    assert!(
        verdict.starts_with("verdict: inconclusive: ")
            && verdict.contains("no running pod in shop matches app=nothing"),
        "{verdict}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("fault ")),
        "nothing was applied: {lines:?}"
    );

    // 5. pod-kill: the controller deletes the pod through the API; a stand-in ReplicaSet
    // replaces it 300 ms later, and the time until the selected pods are Ready again is the
    // fault's ready_ms.
    let replicaset = {
        let api = api.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while api.get(&pods(), "shop", "cart-1").is_some() {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "cart-1 was never deleted"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(300));
            api.put(&pods(), "shop", pod("cart-2", "cart", &uid(72).to_string()));
        })
    };
    let c = chaosctl_bg(
        &kubeconfig,
        &[
            "inject",
            "pod-kill",
            "--namespace",
            "shop",
            "--selector",
            "app=cart",
            "--grace-period",
            "0",
            "--duration",
            "3s",
            "--json",
        ],
    );
    let (code, lines, err) = finish(c, Duration::from_secs(40));
    let events = json_events(&lines);
    replicaset.join().expect("the stand-in ReplicaSet");
    assert_eq!(code, 0, "{err}\n{}", logs());
    assert_eq!(event(&events, "applied")["pod"], "shop/cart-1");
    let ready_ms = event(&events, "reverted")["ready_ms"].as_u64().unwrap_or(0);
    eprintln!("pod-kill: Ready again after {ready_ms} ms");
    assert!((300..3000).contains(&ready_ms), "ready_ms {ready_ms}");
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("DELETE /api/v1/namespaces/shop/pods/cart-1")),
        "no DELETE of the pod"
    );

    drop(agent);
    drop(controller);
    drop(fake);
    for (mount, _) in hierarchies() {
        let _ = std::fs::remove_dir(mount.join(&root));
    }
}
