//! Experiments end to end with real components: a controller in a hub namespace, two real
//! chaos-agent processes (each in its own application namespace, joined over mutual TLS),
//! nginx (Debian) in each application namespace as the system under test, Prometheus (Debian)
//! scraping the controller, and `chaosctl run` as a CI job would call it.
use chaos_tests::apps::{self, Proc, Site};
use chaos_tests::{bin, residue_on, serial};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

struct Bed {
    site: Site,
    tls: PathBuf,
    controller: Option<Proc>,
    agents: Vec<Proc>,
    _nginx: Vec<Proc>,
    _prometheus: Option<Proc>,
}

const CONTROLLER: &str = "https://10.214.1.1:7070";

impl Bed {
    fn new(tag: &str, lease: &str, prometheus: bool) -> Bed {
        let site = Site::new(tag, 2);
        let tls = site.tmp.join("tls");
        let out = Command::new(bin("chaosctl"))
            .args(["certs", "init", "--dir"])
            .arg(&tls)
            .args([
                "--controller-name",
                "10.214.1.1",
                "--controller-name",
                "10.214.2.1",
            ])
            .args(["--node", "app-1", "--node", "app-2", "--user", "ci"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let nginx = (1..=2)
            .map(|i| {
                apps::nginx(
                    &site.apps[i - 1],
                    &Site::app_ip(i),
                    &site.tmp.join(format!("nginx{i}")),
                )
            })
            .collect();
        let mut bed = Bed {
            site,
            tls,
            controller: None,
            agents: vec![],
            _nginx: nginx,
            _prometheus: None,
        };
        bed.start_controller(lease);
        for i in 1..=2 {
            let t = &bed.site.tmp;
            let args: Vec<String> = [
                "--controller",
                &format!("https://10.214.{i}.1:7070"),
                "--tls-dir",
                &bed.tls.display().to_string(),
                "--node-name",
                &format!("app-{i}"),
                "--label",
                "app=shop",
                "--label",
                &format!("zone=z{i}"),
                "--socket",
                &t.join(format!("agent{i}.sock")).display().to_string(),
                "--journal-dir",
                &t.join(format!("journal{i}")).display().to_string(),
                "--metrics",
                &format!("{}:9464", Site::app_ip(i)),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let p = Proc::spawn_in(
                &bed.site.apps[i - 1],
                "chaos-agent",
                &bin("chaos-agent"),
                &args,
                &t.join(format!("agent{i}.log")),
            );
            bed.agents.push(p);
        }
        bed.wait_agents(2);
        // The probes a kubelet would run, with their reasons.
        for i in 1..=2 {
            let addr = format!("{}:9464", Site::app_ip(i));
            let ns = &bed.site.apps[i - 1];
            // The controller lists an agent a moment before the agent reads the Join's answer.
            let started = Instant::now();
            let want = Some((200, "ready; controller connected\n".to_string()));
            let mut ready = apps::http_get(ns, &addr, "/ready");
            while ready != want && started.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(100));
                ready = apps::http_get(ns, &addr, "/ready");
            }
            assert_eq!(ready, want, "agent {i} /ready");
            let live = apps::http_get(ns, &addr, "/live");
            assert!(
                live.as_ref()
                    .is_some_and(|(s, b)| *s == 200 && b.starts_with("live: ")),
                "agent {i} /live: {live:?}"
            );
        }
        assert_eq!(
            apps::http_get(&bed.site.hub, "127.0.0.1:9470", "/ready"),
            Some((200, "ready: listening\n".to_string())),
            "controller /ready"
        );
        if prometheus {
            let targets = vec![
                "127.0.0.1:9470".to_string(),
                format!("{}:9464", Site::app_ip(1)),
                format!("{}:9464", Site::app_ip(2)),
            ];
            bed._prometheus = Some(apps::prometheus(
                &bed.site.hub,
                "127.0.0.1:9090",
                &targets,
                &bed.site.tmp.join("prometheus"),
            ));
            // Until the controller has been scraped, a query has nothing to say.
            let started = Instant::now();
            while !apps::http_get(
                &bed.site.hub,
                "127.0.0.1:9090",
                "/api/v1/query?query=chaos_controller_agents_connected",
            )
            .is_some_and(|(_, body)| body.contains("\"2\""))
            {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "Prometheus never scraped the controller"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        bed
    }

    fn start_controller(&mut self, lease: &str) {
        let t = &self.site.tmp;
        let args: Vec<String> = [
            "--listen",
            "https://0.0.0.0:7070",
            "--tls-dir",
            &self.tls.display().to_string(),
            "--lease",
            lease,
            "--audit-log",
            &t.join("audit.jsonl").display().to_string(),
            "--metrics",
            "127.0.0.1:9470",
            "--state-dir",
            &t.join("state").display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        self.controller = Some(Proc::spawn_in(
            &self.site.hub,
            "chaos-controller",
            &bin("chaos-controller"),
            &args,
            &t.join("controller.log"),
        ));
    }

    fn chaosctl(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.site.hub])
            .arg(bin("chaosctl"))
            .args(["--controller", CONTROLLER, "--tls-dir"])
            .arg(&self.tls)
            .args(["--as", "ci"])
            .args(args)
            .env("SHOP_URL", format!("http://{}/", Site::app_ip(1)))
            .output()
            .unwrap()
    }

    fn wait_agents(&self, n: usize) {
        let started = Instant::now();
        loop {
            let out = self.chaosctl(&["agents", "--json"]);
            let text = String::from_utf8_lossy(&out.stdout);
            if text.lines().count() == n {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "{n} agents never joined: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs an experiment file through the controller; (exit code, record, stdout).
    fn run(&self, name: &str, yaml: &str) -> (i32, Value, String) {
        let file = self.site.tmp.join(name);
        std::fs::write(&file, yaml).unwrap();
        let reports = self.site.tmp.join(format!("{name}.reports"));
        let out = self.chaosctl(&[
            "run",
            &file.display().to_string(),
            "--report-dir",
            &reports.display().to_string(),
        ]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let record = std::fs::read_to_string(reports.join("run.json"))
            .map(|t| serde_json::from_str(&t).unwrap())
            .unwrap_or(Value::Null);
        (out.status.code().unwrap_or(-1), record, stdout)
    }

    /// Faults the agent in application namespace `i` holds (through its own unix socket).
    fn agent_faults(&self, i: usize) -> usize {
        let sock = self.site.tmp.join(format!("agent{i}.sock"));
        let out = Command::new(bin("chaosctl"))
            .args([
                "--agent",
                &format!("unix://{}", sock.display()),
                "list",
                "--json",
            ])
            .output()
            .unwrap();
        // A crashed or unreachable agent is a failure, never "holds nothing".
        assert!(
            out.status.success(),
            "chaosctl list on agent {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("agent {i}'s list is not JSON ({e})"));
        v.as_array()
            .unwrap_or_else(|| panic!("agent {i}'s list is not an array: {v}"))
            .len()
    }
}

/// A server certificate for `ip`, signed by the CA `certs init` made in `tls`.
fn server_cert(tls: &Path, ip: &str) -> (PathBuf, PathBuf) {
    let read = |f: &str| std::fs::read_to_string(tls.join(f)).expect(f);
    let ca_key = rcgen::KeyPair::from_pem(&read("ca-key.pem")).expect("ca key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&read("ca.pem"), ca_key).expect("ca");
    let mut params = rcgen::CertificateParams::new(vec![ip.to_string()]).expect("params");
    params.use_authority_key_identifier_extension = true;
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &issuer).expect("sign");
    let (cp, kp) = (tls.join("nginx.pem"), tls.join("nginx-key.pem"));
    std::fs::write(&cp, cert.pem()).expect("write");
    std::fs::write(&kp, key.serialize_pem()).expect("write");
    (cp, kp)
}

fn app(i: usize) -> String {
    format!("http://{}/", Site::app_ip(i))
}

fn hypothesis(url: &str, tolerance: &str) -> String {
    hypothesis_with(url, tolerance, "")
}

fn hypothesis_with(url: &str, tolerance: &str, more_probes: &str) -> String {
    format!(
        "steady-state-hypothesis:
  title: the shop answers
  probes:
    - name: shop
      http: {{url: \"{url}\", rate: 20, window: 1s, timeout: 2s}}
      tolerance: {tolerance}
{more_probes}during: {{interval: 500ms}}
recovery: {{timeout: 15s, interval: 300ms}}
"
    )
}

fn fault(name: &str, kind: &str, agent: usize, dest: &str, duration: &str) -> String {
    format!(
        "  - fault:
      name: {name}
      {kind}
      target: {{agents: [app-{agent}], interface: eth0, dest: [{dest}]}}
      duration: {duration}
"
    )
}

#[test]
fn a_latency_tolerant_hypothesis_holds_and_prometheus_sees_the_fleet() {
    let _g = serial();
    let bed = Bed::new("held", "15s", true);
    // The shop also over https (a second nginx on app-1, certificate from the test's CA),
    // probed with that CA as `ca:`: the handshake and the certificate check are rustls's.
    let (cert, key) = server_cert(&bed.tls, &Site::app_ip(1));
    let _https = apps::nginx_https(
        &bed.site.apps[0],
        &Site::app_ip(1),
        &bed.site.tmp.join("nginx-https"),
        &cert,
        &key,
    );
    // A range query of 6,001 samples: Prometheus sends it chunked (checked here, so the probe
    // below really reads a chunked body from the real server).
    let range = "/api/v1/query_range?query=vector(1)&start=1700000000&end=1700000600&step=0.1";
    let raw = apps::http_get_raw(&bed.site.hub, "127.0.0.1:9090", range).expect("range query");
    let head = raw
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    assert!(
        head.contains("transfer-encoding: chunked") && raw.len() > 50_000,
        "Prometheus did not chunk a {} byte answer: {head}",
        raw.len()
    );
    let yaml = format!(
        "title: the shop tolerates 20% loss on one node\n{}method:\n{}",
        hypothesis_with(
            &app(1),
            // 20 % loss on the app's replies fails about 5 % of 2 s requests (a SYN-ACK lost
            // twice); 0.05 here failed in CI at 0.10. Half is far from both (p < 1e-8 per window).
            "{p99-ms: \"< 5000\", error-rate: \"<= 0.5\"}",
            &format!(
                "    - name: fleet-connected
      prometheus: {{url: \"http://127.0.0.1:9090\", query: \"chaos_controller_agents_connected\"}}
      tolerance: {{value: \"== 2\"}}
    - name: range-chunked
      prometheus: {{url: \"http://127.0.0.1:9090\", query: \"vector(1)\", range: 10m, step: 100ms}}
      tolerance: {{min: \"== 1\", max: \"== 1\"}}
    - name: shop-https
      http: {{url: \"https://{}/\", rate: 5, window: 1s, timeout: 2s, ca: \"{}\"}}
      tolerance: {{error-rate: \"<= 0.5\"}}
",
                Site::app_ip(1),
                bed.tls.join("ca.pem").display()
            )
        ),
        fault("lossy", "loss: {percent: 20}", 1, "10.214.1.1/32", "4s")
    );
    let (code, r, _) = bed.run("held.yaml", &yaml);
    assert_eq!(code, 0, "{}", r["reason"]);
    assert_eq!(r["verdict"], "held");
    let f = &r["faults"][0];
    assert_eq!(f["agent"], "app-1");
    let (seen, affected) = (f["seen"].as_u64().unwrap(), f["affected"].as_u64().unwrap());
    eprintln!("loss 20%: seen {seen}, affected {affected}");
    assert!(
        affected > 0 && affected < seen,
        "seen {seen} affected {affected}"
    );
    // The prometheus probes and the https probe ran in every phase, against the real servers.
    for name in ["fleet-connected", "range-chunked", "shop-https"] {
        let runs: Vec<&Value> = r["probes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["probe"] == name)
            .collect();
        assert!(
            runs.len() >= 3 && runs.iter().all(|p| p["ok"] == true),
            "{name}: {runs:?}"
        );
    }
    // The agent's control link survived its own fault (the controller endpoint is excluded).
    assert_eq!(bed.agent_faults(1), 0);
    let audit = std::fs::read_to_string(bed.site.tmp.join("audit.jsonl")).unwrap();
    let lines: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["action"] == "apply" && l["who"] == "ci" && l["agent"] == "app-1")
    );
    assert!(
        lines
            .iter()
            .any(|l| l["action"] == "revert" && l["who"] == "ci" && l["result"] == "ok")
    );
    let html = std::fs::read_to_string(bed.site.tmp.join("held.yaml.reports/report.html")).unwrap();
    assert!(html.contains("class=\"fault-window\""));
    // History on the controller.
    let list = String::from_utf8_lossy(&bed.chaosctl(&["experiments", "list"]).stdout).into_owned();
    assert!(
        list.contains(r["id"].as_str().unwrap()) && list.contains("held"),
        "{list}"
    );
    // A run id that names nothing is the caller's mistake: one line, exit 2.
    let o = bed.chaosctl(&["experiments", "show", "r-does-not-exist"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no run r-does-not-exist") && err.trim().lines().count() == 1,
        "{err}"
    );
}

#[test]
fn loss_violates_the_hypothesis_and_the_fault_is_reverted_at_once() {
    let _g = serial();
    let bed = Bed::new("violated", "15s", false);
    let yaml = format!(
        "title: the shop does not survive a partition\n{}method:\n{}",
        hypothesis(&app(1), "{error-rate: \"<= 0.01\"}"),
        fault("cut", "partition: {}", 1, "10.214.1.1/32", "20s")
    );
    let (code, r, _) = bed.run("violated.yaml", &yaml);
    assert_eq!(code, 1, "{}", r["reason"]);
    assert_eq!(r["verdict"], "violated");
    let first_bad = r["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["ok"] == false && p["phase"] == "during")
        .unwrap();
    let reverted = r["faults"][0]["reverted_ms"].as_u64().unwrap();
    let seen_at = first_bad["end_ms"].as_u64().unwrap();
    eprintln!("violation seen at {seen_at} ms, fault reverted at {reverted} ms");
    assert!(
        reverted >= seen_at && reverted - seen_at < 500,
        "reverted {reverted} ms, violation {seen_at} ms"
    );
    assert!(r["recovery_ms"].as_u64().is_some(), "{}", r["events"]);
    assert_eq!(bed.agent_faults(1), 0);
}

#[test]
fn a_stop_condition_rolls_back_within_one_probe_interval() {
    let _g = serial();
    let bed = Bed::new("stop", "15s", false);
    let yaml = format!(
        "title: the error budget stops a partition of app-2\n{}method:\n{}stop-conditions:
  - name: app2-budget
    http: {{url: \"{}\", rate: 20, window: 500ms, timeout: 1s}}
    tolerance: {{error-rate: \"< 0.5\"}}
",
        hypothesis(&app(1), "{error-rate: \"<= 0.01\"}"),
        fault("cut-app2", "partition: {}", 2, "10.214.2.1/32", "20s"),
        app(2)
    );
    let (code, r, _) = bed.run("stop.yaml", &yaml);
    assert_eq!(code, 2, "{}", r["reason"]);
    assert_eq!(r["verdict"], "aborted");
    assert!(
        r["reason"]
            .as_str()
            .unwrap()
            .starts_with("stop condition app2-budget")
    );
    let stop = r["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["ok"] == false && p["phase"] == "stop_condition")
        .unwrap();
    let reverted = r["faults"][0]["reverted_ms"].as_u64().unwrap();
    let seen_at = stop["end_ms"].as_u64().unwrap();
    eprintln!("stop condition at {seen_at} ms, rolled back at {reverted} ms");
    assert!(
        reverted - seen_at < 500,
        "interval is 500 ms; rolled back {} ms after",
        reverted - seen_at
    );
    assert_eq!(bed.agent_faults(2), 0);
}

#[test]
fn a_mistargeted_fault_is_inconclusive() {
    let _g = serial();
    let bed = Bed::new("mistarget", "15s", false);
    let yaml = format!(
        "title: a fault aimed at nothing proves nothing\n{}method:\n{}",
        hypothesis(&app(1), "{error-rate: \"<= 0.01\"}"),
        fault("nowhere", "loss: {percent: 50}", 1, "10.99.0.0/16", "2s")
    );
    let (code, r, _) = bed.run("mistarget.yaml", &yaml);
    assert_eq!(code, 3, "{}", r["reason"]);
    assert_eq!(r["verdict"], "inconclusive");
    assert!(
        r["reason"].as_str().unwrap().contains("affected nothing"),
        "{}",
        r["reason"]
    );
}

#[test]
fn an_invalid_experiment_is_refused_with_its_line_and_nothing_applied() {
    let _g = serial();
    let bed = Bed::new("invalid", "15s", false);
    let yaml = format!(
        "title: bad\n{}method:\n{}",
        hypothesis(&app(1), "{error-rate: \"<= 0.01\"}"),
        fault("bad", "loss: {percent: 120}", 1, "10.214.1.1/32", "2s")
    );
    let (code, _, _) = bed.run("invalid.yaml", &yaml);
    assert_eq!(code, 3);
    let file = bed.site.tmp.join("invalid.yaml");
    let out = bed.chaosctl(&["run", &file.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "invalid.yaml:11:5: method[0]: fault.loss.percent: must be between 0 and 100 (got 120)"
        ),
        "{err}"
    );
    assert_eq!(bed.agent_faults(1), 0);
    // A label that selects more agents than the blast radius allows: refused before applying.
    let yaml = format!(
        "title: too wide\n{}method:
  - fault:
      name: wide
      loss: {{percent: 10}}
      target: {{labels: {{app: shop}}, interface: eth0}}
      duration: 2s
blast-radius: {{max-agents: 1}}
",
        hypothesis(&app(1), "{error-rate: \"<= 0.01\"}")
    );
    let (code, r, _) = bed.run("wide.yaml", &yaml);
    assert_eq!(code, 3, "{}", r["reason"]);
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("blast-radius.max-agents: the target matches 2 agents, more than 1"),
        "{reason}"
    );
    assert_eq!((bed.agent_faults(1), bed.agent_faults(2)), (0, 0));
    let audit = std::fs::read_to_string(bed.site.tmp.join("audit.jsonl")).unwrap_or_default();
    assert!(!audit.contains("\"result\":\"ok\""), "{audit}");
}

#[test]
fn a_chaos_toolkit_experiment_runs() {
    let _g = serial();
    let bed = Bed::new("ctk", "15s", false);
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiment/tests/fixtures/ctk-http.json");
    let marker = Path::new("/tmp/chaos-ctk-marker");
    let _ = std::fs::remove_file(marker);
    let reports = bed.site.tmp.join("ctk.reports");
    let out = bed.chaosctl(&[
        "run",
        &fixture.display().to_string(),
        "--json",
        "--report-dir",
        &reports.display().to_string(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdict: Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "verdict")
        .unwrap();
    assert_eq!(verdict["verdict"], "held");
    // Its process action ran (touch) and its rollback undid it (rm): both are recorded as
    // steps that succeeded, and the marker is gone (neither alone would prove anything).
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(reports.join("run.json")).expect("run.json"))
            .expect("run.json is JSON");
    let step = |name: &str| {
        record["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no step {name}: {record}"))
            .clone()
    };
    let (action, rollback) = (step("flush-the-cache"), step("remove-the-marker"));
    assert_eq!(
        (&action["kind"], &action["ok"]),
        (&Value::from("command"), &Value::from(true))
    );
    assert_eq!(
        (&rollback["kind"], &rollback["ok"]),
        (&Value::from("rollback"), &Value::from(true))
    );
    assert!(action["end_ms"].as_u64() <= rollback["start_ms"].as_u64());
    assert!(!marker.exists());
    assert!(stdout.contains("front-page-must-answer"));
}

#[test]
fn agents_revert_within_the_lease_when_the_controller_dies() {
    let _g = serial();
    let mut bed = Bed::new("lease", "2s", false);
    let out = bed.chaosctl(&[
        "inject",
        "loss",
        "--percent",
        "10",
        "--interface",
        "eth0",
        "--selector",
        "app=shop",
        "--duration",
        "5m",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!((bed.agent_faults(1), bed.agent_faults(2)), (1, 1));
    let killed = Instant::now();
    bed.controller.as_mut().unwrap().kill9();
    let mut reverted = [None, None];
    while killed.elapsed() < Duration::from_secs(6) && reverted.iter().any(Option::is_none) {
        for (i, r) in reverted.iter_mut().enumerate() {
            if r.is_none() && bed.agent_faults(i + 1) == 0 {
                *r = Some(killed.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "lease 2 s: agents reverted {:?} after the controller died",
        reverted
    );
    for (i, r) in reverted.iter().enumerate() {
        let r = r.unwrap_or_else(|| panic!("agent app-{} still holds its fault", i + 1));
        assert!(
            r <= Duration::from_secs(3),
            "app-{} reverted after {r:?} (lease 2 s + 1 s)",
            i + 1
        );
    }
    // Nothing left in the kernel of either application namespace.
    // TCX hooks (BPF_PROG_QUERY), clsact filters, qdiscs, IFBs and links alike.
    for ns in &bed.site.apps {
        let residue = residue_on(ns, "eth0");
        assert!(residue.is_empty(), "{ns}: {residue:?}");
    }
    // A restarted controller gets its agents back.
    bed.start_controller("2s");
    bed.wait_agents(2);
}

/// A fault that ends by its deadline on the agent is known to the controller at once (the
/// agent reports FaultEnded on the live stream): `agents` shows it gone within a second of the
/// deadline and the audit log says "ended: deadline". Before, the report waited for the next
/// stream: `agents` showed the fault a minute after it ended.
#[test]
fn a_fault_ended_by_its_deadline_reaches_the_controller_at_once() {
    let _g = serial();
    let bed = Bed::new("ended", "10s", false);
    let out = bed.chaosctl(&[
        "inject",
        "loss",
        "--percent",
        "10",
        "--interface",
        "eth0",
        "--selector",
        "zone=z1",
        "--duration",
        // Long enough that `agents` (a chaosctl start on a loaded machine) sees it running:
        // with 1 s it once came after the end.
        "3s",
        "--json",
    ]);
    let applied = Instant::now();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let faults_on_app1 = || -> u64 {
        let out = bed.chaosctl(&["agents", "--json"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|a| a["node"] == "app-1")
            .and_then(|a| a["faults"].as_u64())
            .unwrap_or_else(|| panic!("app-1 not listed"))
    };
    assert_eq!(faults_on_app1(), 1, "the fault is listed while it runs");
    while faults_on_app1() != 0 && applied.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let known = applied.elapsed();
    eprintln!("a 3 s fault: the controller knew it ended {known:?} after the apply");
    assert_eq!(
        faults_on_app1(),
        0,
        "still listed {known:?} after the apply"
    );
    assert!(
        known <= Duration::from_secs(4),
        "the controller learned of the end {known:?} after the apply (deadline 3 s)"
    );
    let audit = std::fs::read_to_string(bed.site.tmp.join("audit.jsonl")).expect("audit log");
    let ended = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["action"] == "end")
        .unwrap_or_else(|| panic!("no end in the audit log:\n{audit}"));
    assert_eq!(ended["result"], "ended: deadline", "{ended}");
    assert_eq!(ended["agent"], "app-1", "{ended}");
}

/// Through the controller, `list` shows every agent's faults with the node holding each, and
/// `revert ID` finds that node itself (it needed --on).
#[test]
fn list_and_revert_by_id_go_through_the_controller() {
    let _g = serial();
    let bed = Bed::new("listing", "10s", false);
    let out = bed.chaosctl(&[
        "inject",
        "loss",
        "--percent",
        "10",
        "--interface",
        "eth0",
        "--selector",
        "zone=z2",
        "--duration",
        "1m",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let id = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v["id"].as_str().map(str::to_string))
        .expect("an applied fault id");
    let out = bed.chaosctl(&["list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Value = serde_json::from_slice(&out.stdout).expect("list --json");
    let listed = listed.as_array().expect("an array");
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["node"], "app-2");
    assert_eq!(listed[0]["kind"], "loss");
    let human = bed.chaosctl(&["list"]);
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains(&format!("{id} [app-2] loss 10%")), "{human}");

    // watch through the controller follows it until it ends.
    let watcher = Command::new("ip")
        .args(["netns", "exec", &bed.site.hub])
        .arg(bin("chaosctl"))
        .args(["--controller", CONTROLLER, "--tls-dir"])
        .arg(&bed.tls)
        .args(["--as", "ci", "watch", &id, "--interval", "0.2", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    std::thread::sleep(Duration::from_millis(1500));

    let out = bed.chaosctl(&["revert", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&id) && text.contains("reverted"), "{text}");
    assert_eq!(bed.agent_faults(2), 0, "app-2 still holds the fault");
    let out = bed.chaosctl(&["list"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "no active faults"
    );
    let watched = watcher.wait_with_output().expect("watch ends");
    let lines: Vec<Value> = String::from_utf8_lossy(&watched.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        watched.status.success(),
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    let updates = lines.iter().filter(|l| l["event"] == "counters").count();
    assert!(
        updates >= 3,
        "{updates} updates in 1.5 s at 0.2 s: {lines:?}"
    );
    assert!(lines.iter().all(|l| l["agent"] == "app-2"), "{lines:?}");
    assert_eq!(
        lines.last().map(|l| l["event"].clone()),
        Some(Value::from("ended")),
        "{lines:?}"
    );

    let out = bed.chaosctl(&["revert", "f-00000000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("no fault f-00000000 on any connected agent"),
        "{err}"
    );
}
