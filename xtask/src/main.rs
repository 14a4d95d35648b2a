//! Developer chores, so README and CI call one command instead of a page of shell.
//!
//! - `cargo xtask build-ebpf`: rebuild agent-ebpf/chaos.bpf.o with the pinned nightly and
//!   bpf-linker, and record the hash of its sources next to it.
//! - `cargo xtask check-ebpf`: fail if the eBPF sources changed since the object was built.
//! - `cargo xtask vm-test`: build the VM harness (tests/vm, cached), the static test binary for
//!   x86_64 and aarch64, and run it inside QEMU on real Debian kernels of both architectures.
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The nightly that matches bpf-linker 0.10.4's LLVM 22 (see shared/notes/platform-facts.md).
const NIGHTLY_COMMIT_DATE: &str = "2026-05-19";
const BPF_LINKER_VERSION: &str = "0.10.4";
/// The objects agent-ebpf builds: (binary, committed file, its line in the hash file).
const OBJECTS: [(&str, &str, &str); 2] = [
    ("chaos-ebpf", "agent-ebpf/chaos.bpf.o", "object:"),
    ("chaos-clock", "agent-ebpf/clock.bpf.o", "clock-object:"),
];
const HASH_FILE: &str = "agent-ebpf/chaos.bpf.sha256";

fn main() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has a parent directory")?
        .to_path_buf();
    match std::env::args().nth(1).as_deref() {
        Some("build-ebpf") => build_ebpf(&root),
        Some("check-ebpf") => check_ebpf(&root),
        Some("vm-test") => vm_test(&root),
        _ => bail!("usage: cargo xtask build-ebpf | check-ebpf | vm-test"),
    }
}

/// Every file whose change can change the object, in a stable order.
fn ebpf_sources(root: &Path) -> Result<Vec<PathBuf>> {
    let mut files = vec![
        root.join("agent-ebpf/Cargo.toml"),
        root.join("agent-ebpf/Cargo.lock"),
        root.join("agent-ebpf/.cargo/config.toml"),
        root.join("agent-ebpf/abi/Cargo.toml"),
    ];
    for dir in ["agent-ebpf/src", "agent-ebpf/abi/src"] {
        collect_rs(&root.join(dir), &mut files)?;
    }
    files.sort();
    Ok(files)
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_rs(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

fn sources_hash(root: &Path) -> Result<String> {
    let mut h = Sha256::new();
    for file in ebpf_sources(root)? {
        let rel = file.strip_prefix(root).unwrap_or(&file);
        let data = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
        h.update(rel.to_string_lossy().as_bytes());
        h.update([0]);
        h.update((data.len() as u64).to_le_bytes());
        h.update(&data);
    }
    Ok(hex(&h.finalize()))
}

fn file_hash(path: &Path) -> Result<String> {
    let data = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    Ok(hex(&Sha256::digest(&data)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_ebpf(root: &Path) -> Result<()> {
    let recorded = std::fs::read_to_string(root.join(HASH_FILE))
        .with_context(|| format!("read {HASH_FILE}: run `cargo xtask build-ebpf`"))?;
    let field = |name: &str| {
        recorded
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            .with_context(|| format!("{HASH_FILE} has no `{name}` line"))
    };
    let (want_src, have_src) = (field("sources:")?, sources_hash(root)?);
    if want_src != have_src {
        bail!(
            "agent-ebpf sources changed since its objects were built (sources {have_src}, \
             recorded {want_src}): run `cargo xtask build-ebpf` and commit the objects and \
             {HASH_FILE}"
        );
    }
    for (_, object, line) in OBJECTS {
        if field(line)? != file_hash(&root.join(object))? {
            bail!("{object} does not match the hash recorded in {HASH_FILE}: rebuild it");
        }
    }
    println!("eBPF object up to date (sources {})", &have_src[..16]);
    Ok(())
}

fn build_ebpf(root: &Path) -> Result<()> {
    let toolchain = std::env::var("CHAOS_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".into());
    let vv = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .arg("-vV"),
    )?;
    if !vv.contains(&format!("commit-date: {NIGHTLY_COMMIT_DATE}"))
        || !vv.contains("LLVM version: 22")
    {
        bail!(
            "toolchain `{toolchain}` is not the pinned nightly ({NIGHTLY_COMMIT_DATE}, LLVM 22) \
             that bpf-linker {BPF_LINKER_VERSION} needs; set CHAOS_EBPF_TOOLCHAIN\n{vv}"
        );
    }
    let linker = which("bpf-linker").context(
        "bpf-linker not found: `rustup component add rust-src --toolchain nightly && \
         cargo install bpf-linker@0.10.4 --locked`",
    )?;
    let lv = output(Command::new(&linker).arg("--version"))?;
    if !lv.contains(BPF_LINKER_VERSION) {
        bail!(
            "{} is `{}`, need bpf-linker {BPF_LINKER_VERSION}",
            linker.display(),
            lv.trim()
        );
    }
    let dir = root.join("agent-ebpf");
    let cargo_home = std::env::var("CARGO_HOME")
        .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap_or_default()));
    // Remapped paths make the object the same whichever directory it is built in.
    let rustflags = [
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
        format!("--remap-path-prefix={}=/chaos", root.display()),
        format!("--remap-path-prefix={cargo_home}=/cargo"),
    ]
    .join("\x1f");
    let status = Command::new("cargo")
        .arg(format!("+{toolchain}"))
        .args(["build", "--release", "--locked"])
        .current_dir(&dir)
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", &linker)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .env_remove("RUSTFLAGS")
        .status()
        .context("run cargo for agent-ebpf")?;
    if !status.success() {
        bail!("building agent-ebpf failed");
    }
    let mut record = format!(
        "# written by `cargo xtask build-ebpf`; checked by `cargo xtask check-ebpf`\n\
         sources: {}\n",
        sources_hash(root)?
    );
    for (bin, object, line) in OBJECTS {
        let built = dir.join("target/bpfel-unknown-none/release").join(bin);
        std::fs::copy(&built, root.join(object)).with_context(|| format!("copy {bin}"))?;
        record.push_str(&format!("{line} {}\n", file_hash(&root.join(object))?));
        println!("wrote {object}");
    }
    std::fs::write(root.join(HASH_FILE), record)?;
    println!("wrote {HASH_FILE}");
    Ok(())
}

/// The architectures the VM suite covers: x86_64, and arm64 with a Raspberry Pi 4 class CPU.
const VM_TARGETS: [&str; 2] = ["x86_64-unknown-linux-musl", "aarch64-unknown-linux-musl"];

fn vm_test(root: &Path) -> Result<()> {
    run(Command::new("bash").arg(root.join("tests/vm/build.sh")))?;
    let vm_dir = std::env::var("CHAOS_VM_DIR").unwrap_or_else(|_| {
        let cache = std::env::var("XDG_CACHE_HOME")
            .unwrap_or_else(|_| format!("{}/.cache", std::env::var("HOME").unwrap_or_default()));
        format!("{cache}/chaos-vm")
    });
    let mut failed = Vec::new();
    for target in VM_TARGETS {
        // The static build the images ship (scripts/static.sh): after images.sh, nothing to compile.
        let out = Command::new("bash")
            .arg(root.join("scripts/static.sh"))
            .arg(target)
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("run scripts/static.sh")?;
        if !out.status.success() {
            bail!("scripts/static.sh {target} failed");
        }
        let bin = root
            .join(String::from_utf8_lossy(&out.stdout).trim())
            .join("chaos-vmtest");
        println!("== {target}: chaos-vmtest in a VM");
        let out = Command::new(format!("{vm_dir}/bin/vm-run"))
            .arg(&bin)
            .env("VM_TIMEOUT", "900")
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("run vm-run")?;
        let text = String::from_utf8_lossy(&out.stdout);
        print!("{text}");
        // The benchmark lines the test prints: kept as JSON beside the host's bench.json.
        let bench = |prefix: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .unwrap_or("null")
        };
        let (delay, dest) = (bench("BENCH "), bench("BENCH_DEST "));
        let (clock, pause) = (bench("BENCH_CLOCK "), bench("BENCH_PAUSE "));
        let dir = root.join("bench-out");
        std::fs::create_dir_all(&dir)?;
        let arch = target.split('-').next().unwrap_or(target);
        std::fs::write(
            dir.join(format!("vm-{arch}.json")),
            format!(
                "{{\"added_delay_vs_tc_netem\":{delay},\"per_destination_map_vs_u32\":{dest},\
                 \"clock_skew\":{clock},\"process_pause\":{pause}}}\n"
            ),
        )?;
        if !out.status.success() {
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!("VM tests failed on {}", failed.join(", "));
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn which(name: &str) -> Option<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(PathBuf::from)
        .chain([PathBuf::from(home).join(".cargo/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
