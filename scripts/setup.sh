#!/usr/bin/env bash
# Installs what building and testing chaos needs on a fresh Debian 12 machine (idempotent).
# Rust itself comes from rustup; rust-toolchain.toml pins the version and components.
set -euo pipefail
need=()
command -v ip >/dev/null       || need+=(iproute2)
command -v tc >/dev/null       || need+=(iproute2)
command -v iperf3 >/dev/null   || need+=(iperf3)
command -v bpftool >/dev/null  || need+=(bpftool)
command -v ping >/dev/null     || need+=(iputils-ping)
command -v setpriv >/dev/null  || need+=(util-linux)
command -v dnsmasq >/dev/null  || need+=(dnsmasq-base)
command -v dig >/dev/null      || need+=(bind9-dnsutils)
command -v stress-ng >/dev/null || need+=(stress-ng)
# Host faults' tests: an ext4 image to fill (disk.rs), a Python process to OOM-kill (memory.rs).
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
command -v python3 >/dev/null  || need+=(python3)
# clock-skew's test of a static Go binary (the Go runtime calls the vDSO itself; no libc).
command -v go >/dev/null       || need+=(golang-go)
# Real applications for the experiment tests: the system under test and the metrics probe.
command -v nginx >/dev/null    || need+=(nginx)
command -v prometheus >/dev/null || need+=(prometheus)
# The OCI images: buildah, clang (ring's C for the musl targets), qemu-user (runs arm64 binaries).
command -v buildah >/dev/null  || need+=(buildah)
command -v clang >/dev/null    || need+=(clang)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
# clock-skew's vDSO stub: the test suite rebuilds it with clang and compares (llvm-objcopy,
# llvm-nm, llvm-objdump).
command -v llvm-objcopy >/dev/null || need+=(llvm)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install: ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The toolchain pinned in rust-toolchain.toml, with clippy and rustfmt, installed explicitly
# (rustup's auto-install may be off: RUSTUP_AUTO_INSTALL=0). A no-op when already there.
rustup toolchain install 1.95.0 --profile minimal --component clippy,rustfmt >/dev/null 2>&1 ||
  { echo "setup: cannot install Rust 1.95.0 with clippy and rustfmt via rustup" >&2; exit 1; }
