//! Chaos Toolkit parity: the same files run through the real `chaos run` (chaostoolkit 1.19.0
//! from PyPI, pinned, in a cached venv) and through `chaosctl run --local`, and what each
//! decided (exit code, verdict) and did (the marker files its actions and rollbacks leave) is
//! compared file by file. The files are experiment/tests/fixtures/ctk-parity/; EXPECTED.md
//! there says what each one exercises.
use chaos_tests::{bin, serial};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

const CHAOSTOOLKIT: &str = "chaostoolkit==1.19.0";
const CHAOSTOOLKIT_LIB: &str = "chaostoolkit-lib==1.44.0";
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
    if !dir.join("bin/chaos").exists() {
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

fn fresh_markers() {
    let _ = std::fs::remove_dir_all(MARKERS);
    std::fs::create_dir_all(MARKERS).expect("markers dir");
}

fn chaos_run(venv: &Path, file: &Path, tmp: &Path) -> Outcome {
    fresh_markers();
    let journal = tmp.join("journal.json");
    let _ = std::fs::remove_file(&journal);
    let out = Command::new(venv.join("bin/chaos"))
        .args(["--no-version-check", "--settings", "/dev/null", "run"])
        .arg(file)
        .arg("--journal-path")
        .arg(&journal)
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

fn chaosctl_run(file: &Path, tmp: &Path) -> Outcome {
    fresh_markers();
    let out = Command::new(bin("chaosctl"))
        .args(["run", "--local", "--json", "--journal-dir"])
        .arg(tmp.join("journal"))
        .arg(file)
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
    std::fs::create_dir_all(&tmp).expect("tmp");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 7, "{files:?}");
    let mut seen = BTreeSet::new();
    for file in &files {
        let name = file.file_stem().unwrap_or_default().to_string_lossy();
        let theirs = chaos_run(&venv, file, &tmp);
        let ours = chaosctl_run(file, &tmp);
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
