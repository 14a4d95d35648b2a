//! Chaos Toolkit parity: the same files run through the real `chaos run` (chaostoolkit 1.19.0
//! from PyPI, pinned, in a cached venv) and through `chaosctl run --local`, and what each
//! decided (exit code, verdict) and did (the marker files its actions and rollbacks leave) is
//! compared file by file. The files are experiment/tests/fixtures/ctk-parity/; EXPECTED.md
//! there says what each one exercises. The http ones probe a real server (CPython's
//! http.server on loopback) whose document a method action changes.
use chaos_tests::{bin, serial};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const CHAOSTOOLKIT: &str = "chaostoolkit==1.19.0";
/// With jsonpath2, which its jsonpath tolerances need.
const CHAOSTOOLKIT_LIB: &str = "chaostoolkit-lib[jsonpath]==1.44.0";
/// The document the http fixtures probe, restored before every run.
const DOCUMENT: &str = r#"{"ready": true, "items": [1, 2, 3], "banner": "shop-42"}"#;
const MARKERS: &str = "/tmp/chaos-ctk-parity";

/// The one place we disagree on purpose: a steady state out of tolerance before the method is
/// "completed", exit 0, in `chaos run` (the method skipped, the rollbacks run), which lets a CI
/// gate pass a run that tested nothing; chaosctl calls it "failed", exit 1.
const DIVERGES: &str = "before-fails";

fn venv() -> PathBuf {
    let dir = std::env::var_os("CHAOS_CTK_VENV").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/chaos-ctk/venv-1.19.0")
        },
        PathBuf::from,
    );
    if !dir.join("bin/chaos").exists() || !dir.join("bin/jsonpath").exists() {
        let ok = |c: &mut Command| {
            let out = c.output().expect("spawn");
            assert!(
                out.status.success(),
                "{c:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ok(Command::new("python3").arg("-m").arg("venv").arg(&dir));
        ok(Command::new(dir.join("bin/pip")).args([
            "install",
            "-q",
            CHAOSTOOLKIT,
            CHAOSTOOLKIT_LIB,
        ]));
    }
    dir
}

/// What one run decided and left behind.
#[derive(Debug, PartialEq)]
struct Outcome {
    exit: Option<i32>,
    /// held, violated or failed (ours); chaos run's journal status and deviation mapped onto
    /// the same words.
    verdict: String,
    markers: BTreeSet<String>,
}

fn markers() -> BTreeSet<String> {
    std::fs::read_dir(MARKERS)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Before each run: no markers, and the served document as it was.
fn fresh(www: &Path) {
    let _ = std::fs::remove_dir_all(MARKERS);
    std::fs::create_dir_all(MARKERS).expect("markers dir");
    std::fs::write(www.join("data.json"), DOCUMENT).expect("data.json");
}

/// A real HTTP server on loopback serving `www`; killed when dropped.
struct Server(std::process::Child);

impl Server {
    fn start(www: &Path) -> (Server, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .current_dir(www)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 -m http.server");
        let server = Server(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "http.server never listened"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        (server, format!("http://127.0.0.1:{port}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

type Env = [(&'static str, String)];

fn chaos_run(venv: &Path, file: &Path, tmp: &Path, env: &Env) -> Outcome {
    fresh(&tmp.join("www"));
    let journal = tmp.join("journal.json");
    let _ = std::fs::remove_file(&journal);
    let out = Command::new(venv.join("bin/chaos"))
        .args(["--no-version-check", "--settings", "/dev/null", "run"])
        .arg(file)
        .arg("--journal-path")
        .arg(&journal)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(tmp)
        .output()
        .expect("run chaos");
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&journal).unwrap_or_else(|e| {
        panic!(
            "chaos run wrote no journal ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    }))
    .expect("journal is JSON");
    let verdict = match (j["status"].as_str(), j["deviated"].as_bool()) {
        (Some("completed"), Some(true)) => "violated",
        (Some("completed"), _) => "held",
        (Some(other), _) => other,
        (None, _) => "none",
    };
    Outcome {
        exit: out.status.code(),
        verdict: verdict.into(),
        markers: markers(),
    }
}

fn chaosctl_run(file: &Path, tmp: &Path, env: &Env) -> Outcome {
    fresh(&tmp.join("www"));
    let out = Command::new(bin("chaosctl"))
        .args(["run", "--local", "--json", "--journal-dir"])
        .arg(tmp.join("journal"))
        .arg(file)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run chaosctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let verdict = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "verdict")
        .and_then(|v| v["verdict"].as_str().map(str::to_string))
        .unwrap_or_else(|| {
            panic!(
                "no verdict from chaosctl: {stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    Outcome {
        exit: out.status.code(),
        verdict,
        markers: markers(),
    }
}

#[test]
fn chaos_toolkit_files_decide_and_act_as_chaos_run_does() {
    let _g = serial();
    let venv = venv();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../experiment/tests/fixtures/ctk-parity");
    let tmp = std::env::temp_dir().join(format!("chaos-ctk-parity-{}", std::process::id()));
    let www = tmp.join("www");
    std::fs::create_dir_all(&www).expect("tmp");
    std::fs::write(www.join("banner.txt"), "welcome to shop-42\n").expect("banner.txt");
    let (_server, url) = Server::start(&www);
    // The files read these through `configuration` and `secrets` env lookups, as both tools
    // do.
    let env = [
        ("CHAOS_CTK_PARITY_URL", url),
        ("CHAOS_CTK_PARITY_WWW", www.display().to_string()),
        ("CHAOS_CTK_PARITY_TOKEN", "tok".to_string()),
    ];
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 9, "{files:?}");
    let mut seen = BTreeSet::new();
    for file in &files {
        let name = file.file_stem().unwrap_or_default().to_string_lossy();
        let theirs = chaos_run(&venv, file, &tmp, &env);
        let ours = chaosctl_run(file, &tmp, &env);
        eprintln!("{name}: chaos run {theirs:?}\n{name}: chaosctl  {ours:?}");
        seen.insert(theirs.verdict.clone());
        if name == DIVERGES {
            assert_eq!(
                (theirs.exit, theirs.verdict.as_str()),
                (Some(0), "held"),
                "{name}: chaos run changed its mind"
            );
            assert_eq!((ours.exit, ours.verdict.as_str()), (Some(1), "failed"));
            assert_eq!(ours.markers, theirs.markers, "{name}");
        } else {
            assert_eq!(ours, theirs, "{name}");
        }
    }
    // The set covers every outcome chaos run has for these files, so a comparison that
    // always agreed (say, both refusing every file) cannot pass.
    assert_eq!(
        seen,
        ["failed", "held", "violated"]
            .map(String::from)
            .into_iter()
            .collect(),
    );
    let _ = std::fs::remove_dir_all(&tmp);
    let _ = std::fs::remove_dir_all(MARKERS);
}
