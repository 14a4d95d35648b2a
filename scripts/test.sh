#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this). Run as root: the kernel tests
# create network namespaces and load BPF programs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# Each phase says when it began, so a slow run shows where its time went.
phase() { echo "== $* (at $((SECONDS / 60))m$((SECONDS % 60))s)"; }

phase "format, lints, eBPF object freshness"
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo xtask check-ebpf
./scripts/clock-stub.sh --check

phase "build"
cargo build --workspace --locked

phase "unit tests"
cargo test --workspace --locked --lib --bins

phase "kernel integration tests (namespaces on this host)"
if [ "$(id -u)" -ne 0 ]; then
  echo "kernel tests need root: re-run as root" >&2
  exit 1
fi
cargo test -p chaos-tests --locked --tests -- --test-threads=1

phase "Kubernetes manifests: every overlay rendered and validated for Kubernetes 1.29+"
./scripts/k8s-check.sh --self-test

phase "OCI images (buildah, linux/amd64 + linux/arm64), unpacked and run"
./scripts/images.sh

phase "real Debian kernels (6.1, no TCX: clsact path) under QEMU, x86_64 and arm64"
cargo xtask vm-test

phase "benchmark (JSON in bench-out/, not a pass/fail gate)"
# On the static build the images ship (built by images.sh; only the benchmarks' own bins are new).
bin=$(./scripts/static.sh "$(uname -m)-unknown-linux-musl" --benches)
"$bin"/chaos-bench --rounds "${CHAOS_BENCH_ROUNDS:-5}" --seconds 2 --runs 200 --out bench-out/bench.json >/dev/null
python3 - <<'PY'
import json
d = json.load(open("bench-out/bench.json"))
for t in d["untargeted_throughput"]:
    print(f"  throughput, {t['entries']:>6} entries: {t['median_gbit_s']:.2f} Gbit/s  ratio {t['ratio_to_baseline']:.3f}")
for c in d["classifier_cost_unmatched"]:
    print(f"  classifier, {c['case']:<25} IPv4 {c['ipv4_ns_per_packet']:.0f} ns  IPv6 {c['ipv6_ns_per_packet']:.0f} ns per packet")
for l in d["apply_revert_latency"]:
    a, r, u = l["apply_ms"], l["revert_ms"], l["revert_until_traffic_unaffected_ms"]
    print(f"  {l['entries']:>6} entries: apply p50 {a['p50']:.1f} p99 {a['p99']:.1f} ms; revert p50 {r['p50']:.1f} p99 {r['p99']:.1f} ms (traffic unaffected after p99 {u['p99']:.3f} ms)")
n = d["dns_failure"]
i, s = n["injected_answer_ms"], n["server_answer_ms"]
print(f"  dns: {n['matching_answered_nxdomain']}/{n['queries_each']} matching answered NXDOMAIN, {n['other_answered_by_server']}/{n['queries_each']} others by the server; injected p50 {i['p50']:.3f} p99 {i['p99']:.3f} ms, server p50 {s['p50']:.3f} p99 {s['p99']:.3f} ms")
PY
"$bin"/chaos-bench-cpu --rounds "${CHAOS_BENCH_CPU_ROUNDS:-1}" --seconds 10 --out bench-out/cpu.json >/dev/null
python3 - <<'PY'
import json
d = json.load(open("bench-out/cpu.json"))
for l in d["loads"]:
    o, s = l["ours"], l["stress_ng"]
    print(f"  cpu {l['requested_percent']:.0f} %: ours {o['median_percent']:.2f} % ({o['error_pp']:+.2f} pp), stress-ng {s['median_percent']:.2f} % ({s['error_pp']:+.2f} pp); agent {l['agent_percent_of_one_cpu']:.2f} % of one CPU")
PY
env -u RUST_BACKTRACE "$bin"/chaos-bench-clock --trials "${CHAOS_BENCH_CLOCK_TRIALS:-5}" --out bench-out/clock.json >/dev/null 2>&1
python3 - <<'PY'
import json
d = json.load(open("bench-out/clock.json"))
c, e = d["cost_ns_per_call"], d["offset_error_ms"]
r, m = c["realtime"], c["monotonic_unmoved"]
print(f"  clock-skew ({d['lockdown']}; direct system calls moved: {d['direct_system_calls_moved']}): clock_gettime {r['before']:.0f} ns before, {r['during']:.0f} ns moved, {m['during']:.0f} ns unmoved clock, {r['after']:.0f} ns after; offset error p99 {e['p99']*1000:.1f} us over {e['readings']} reads; exec'd program's first read moved {sum(d['exec_first_read_moved'])}/{len(d['exec_first_read_moved'])}; kill -9 to true time {max(d['kill9_until_true_time_ms']['trials']):.0f} ms at most")
PY
env -u RUST_BACKTRACE "$bin"/chaos-bench-host --trials "${CHAOS_BENCH_HOST_TRIALS:-5}" --out bench-out/host.json >/dev/null 2>&1
python3 - <<'PY'
import json
d = json.load(open("bench-out/host.json"))
f = d["disk_fill"]
print(f"  disk-fill 1 GiB ext4 to 90 %: ours {f['ours']['ms']:.0f} ms ({f['ours']['percent']:.2f} %), dd {f['dd']['ms']:.0f} ms ({f['dd']['percent']:.2f} %): {f['ours_over_dd']:.4f} of dd's time")
m = d["memory"]
o, s = m["ours"], m["stress_ng_vm_keep"]
print(f"  memory {m['asked_mib']} MiB: ours held {o['held_mib']:.1f} MiB ({o['error_percent']:+.2f} %) at {o['cpu_percent_of_one_while_holding']:.2f} % of one CPU; stress-ng --vm-keep {s['held_mib']:.1f} MiB ({s['error_percent']:+.2f} %) at {s['cpu_percent_of_one_while_holding']:.1f} %")
p = d["process_pause"]
cg = ", ".join(f"{k} {v['apply_to_frozen_ms']['max']:.1f} ms" for k, v in p["cgroup"].items())
print(f"  process-pause: apply to frozen max --pid {p['pid_sigstop']['apply_to_frozen_ms']['max']:.2f} ms (kill -STOP command {p['kill_stop_command']['to_frozen_ms']['max']:.2f} ms), {cg}; kill -9 of the engine to thawed max {p['kill9_of_engine_to_thawed_ms']['max']:.2f} ms")
PY
"$bin"/chaos-bench-fleet --rounds "${CHAOS_BENCH_FLEET_ROUNDS:-30}" --out bench-out/fleet.json >/dev/null
python3 - <<'PY'
import json
d = json.load(open("bench-out/fleet.json"))
for f in d["fanout"]:
    a, r = f["apply_ms"], f["revert_ms"]
    print(f"  fleet {f['agents']:>5} agents: apply p50 {a['p50']:.1f} p99 {a['p99']:.1f} ms; revert p50 {r['p50']:.1f} p99 {r['p99']:.1f} ms; controller {f['controller_rss_kib']/1024:.1f} MiB")
b = d["baseline_direct_unix_socket"]["apply_ms"]
print(f"  fleet baseline (one agent, unix socket): apply p50 {b['p50']:.2f} p99 {b['p99']:.2f} ms; agent RSS {d['agent_rss_kib']/1024:.1f} MiB")
h = d["hostile_experiments"]
worst = max(h["cases"], key=lambda c: c["controller_cpu_ms_per_request"])
q, f = h["list_agents_ms_quiet"], h["list_agents_ms_during_floods"]
print(f"  hostile experiments: worst {worst['case']} {worst['controller_cpu_ms_per_request']:.1f} ms controller CPU per request (small invalid {h['baseline_small_invalid_cpu_ms_per_request']:.2f}); ListAgents p99 {f['p99']:.1f} ms during, {q['p99']:.1f} quiet; {h['agents_rejoined']} agents re-joined, {h['agents_that_lost_their_fault']} lost their fault")
PY
env -u RUST_BACKTRACE "$bin"/chaos-bench-owner --trials "${CHAOS_BENCH_OWNER_TRIALS:-100}" --out bench-out/owner.json >/dev/null
python3 - <<'PY'
import json
d = json.load(open("bench-out/owner.json"))
for o in d["owners"]:
    k, s = o["kill9_until_traffic_whole_ms"], o["sigstop_past_deadline_ms"]
    print(f"  owner {o['attach']:<6} kill -9: whole again p50 {k['p50']:.0f} p99 {k['p99']:.0f} ms, {o['kill9_within_target']}/{o['kill9_trials']} within {d['targets']['kill9_until_traffic_whole_ms_max']:.0f} ms; SIGSTOP: ended p99 {s['p99']:.1f} ms past the deadline, {o['sigstop_within_target']}/{o['sigstop_trials']} within 100 ms")
a = d["agent"]
f, m, r = a["apply_first_on_interface_ms"], a["apply_more_on_interface_ms"], a["rss_kib"]
print(f"  agent apply: first on an interface p50 {f['p50']:.1f} p99 {f['p99']:.1f} ms, one more p50 {m['p50']:.2f} p99 {m['p99']:.2f} ms, cold {a['apply_cold_ms']:.0f} ms; RSS idle {r['idle']['total']/1024:.1f} MiB, 100 faults {r['with_100_faults']['total']/1024:.1f} MiB, after revert {r['after_revert']['total']/1024:.1f} MiB (heap {r['after_revert']['anon']/1024:.1f}, binary {r['after_revert']['file']/1024:.1f})")
w = d["sweep"]
print(f"  sweep of {w['namespaces_swept']} namespaces: removing {w['namespaces_of_ours']} dead roots p50 {w['remove_ms']['p50']:.0f} p99 {w['remove_ms']['p99']:.0f} ms (all removed: {w['every_dead_root_removed']}); idle p50 {w['idle_ms']['p50']:.1f} ms ({w['idle_share_of_one_cpu_every_3s_percent']:.2f} % of a CPU every 3 s)")
PY
phase "all tests passed"
