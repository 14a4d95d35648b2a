#!/usr/bin/env bash
# The demo: two network namespaces, a 30 % loss fault applied by `chaosctl --local`, the loss
# measured at the receiver. Run as root on Linux >= 5.x (TCX on >= 6.6, clsact before).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo build --release --workspace --locked
exec ./target/release/chaos-demo
