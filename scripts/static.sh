#!/usr/bin/env bash
# The one static (musl) release build: the binaries the images ship, the VM test binary, and with
# --benches the benchmarks. images.sh, `cargo xtask vm-test` and the suite's benchmark all come
# here, so they share one set of artifacts (one package set, one profile, one feature
# resolution) instead of compiling the workspace again each; what the benchmark times is what
# the images ship. Prints the directory that holds the binaries.
#
# Usage: scripts/static.sh TARGET [--benches]     (TARGET: x86_64- or aarch64-unknown-linux-musl)
#
# ring (rustls) is C: clang cross-compiles it for both musl targets, so no musl gcc is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:?usage: scripts/static.sh TARGET [--benches]}
bins=(--bin chaos-vmtest)
[ "${2:-}" = --benches ] && bins=(--bins)
export CC_x86_64_unknown_linux_musl=clang CC_aarch64_unknown_linux_musl=clang
# Stripped, without debug info: apart from the debug-info release build of target/release.
export CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols
# Under `cargo xtask` (cargo run), cargo has set CARGO_PKG_*, CARGO_MANIFEST_* and the like for
# xtask. ring's build script declares rerun-if-env-changed on several of them, so they would
# rebuild ring and everything above it (4.5 min per target here): not ours to pass on.
while read -r v; do unset "$v"; done < <(compgen -e | grep -E '^CARGO_(PKG_|MANIFEST_|CRATE_|BIN_|PRIMARY_)')
rustup target add "$target" >/dev/null 2>&1
# The same packages on every call (features resolve over the packages named): only the bins differ.
cargo build --release --locked --target "$target" --target-dir target/oci \
  -p chaos-agent --bin chaos-agent -p chaos-controller --bin chaos-controller \
  -p chaosctl --bin chaosctl -p chaos-tests "${bins[@]}" >&2
echo "target/oci/$target/release"
