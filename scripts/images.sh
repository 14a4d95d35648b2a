#!/usr/bin/env bash
# Builds the chaos-agent and chaos-controller OCI images for linux/amd64 and linux/arm64 with
# buildah (FROM scratch plus static musl binaries: no base image is pulled), as one manifest
# list each, pushed into OCI archives in target/images/. Then proves them: every archive is
# unpacked by hand (index -> manifest list -> per-arch manifest -> config + layers), the
# platforms are checked, and each binary runs `--version` from the unpacked root file system
# (arm64 under qemu-user). Running the containers themselves is not possible on these machines.
#
# The binaries come from scripts/static.sh, the one static build (shared with the VM test and the
# benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/images
mkdir -p "$out"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
declare -A arch_of=([x86_64-unknown-linux-musl]=amd64 [aarch64-unknown-linux-musl]=arm64)
for target in "${!arch_of[@]}"; do
  ./scripts/static.sh "$target" >/dev/null
done

# A buildah store of our own (vfs: no overlay mounts needed), removed afterwards.
store=$(mktemp -d)
trap 'buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs rm --all >/dev/null 2>&1 || true; rm -rf "$store"' EXIT
b() { buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs "$@"; }

# image name, entrypoint binary, other binaries
build_image() {
  local name=$1 entry=$2; shift 2
  local list="localhost/$name:$version"
  b manifest create "$list" >/dev/null
  for target in "${!arch_of[@]}"; do
    local arch=${arch_of[$target]} ctr
    ctr=$(b from --arch "$arch" --os linux scratch)
    for bin in "$entry" "$@"; do
      b copy --chmod 0755 "$ctr" "target/oci/$target/release/$bin" "/$bin" >/dev/null
    done
    b config --arch "$arch" --os linux --entrypoint "[\"/$entry\"]" --user 0:0 \
      --label "org.opencontainers.image.title=$name" \
      --label "org.opencontainers.image.version=$version" \
      --label "org.opencontainers.image.source=https://github.com/chaos/chaos" "$ctr"
    b commit --quiet --format oci --manifest "$list" "$ctr" >/dev/null
    b rm "$ctr" >/dev/null
  done
  rm -f "$out/$name-$version.oci.tar"
  b manifest push --quiet --all --format oci "$list" "oci-archive:$out/$name-$version.oci.tar" >/dev/null
  echo "images: $out/$name-$version.oci.tar ($(du -h "$out/$name-$version.oci.tar" | cut -f1))"
}
build_image chaos-agent chaos-agent chaosctl
build_image chaos-controller chaos-controller chaosctl

python3 - "$out" "$version" <<'PY'
import gzip, io, json, os, subprocess, sys, tarfile, tempfile
out, version = sys.argv[1], sys.argv[2]
want = {"chaos-agent": ["chaos-agent", "chaosctl"], "chaos-controller": ["chaos-controller", "chaosctl"]}
run_on = {"amd64": [], "arm64": ["qemu-aarch64-static"]}
for name, bins in want.items():
    work = tempfile.mkdtemp()
    tarfile.open(f"{out}/{name}-{version}.oci.tar").extractall(work)
    blob = lambda d: open(os.path.join(work, "blobs", *d["digest"].split(":")), "rb").read()
    index = json.load(open(os.path.join(work, "index.json")))
    manifests, listed = [], set()
    def walk(descs):
        for d in descs:
            m = json.loads(blob(d))
            if "manifests" in m:
                # A manifest list: its entries name their platforms.
                listed.update(e["platform"]["architecture"] for e in m["manifests"] if "platform" in e)
                walk(m["manifests"])
            else:
                manifests.append((d, m))
    walk(index["manifests"])
    assert listed == {"amd64", "arm64"}, f"{name}: the manifest list names {listed}"
    platforms = {}
    for d, m in manifests:
        config = json.loads(blob(m["config"]))
        arch = config["architecture"]
        assert config["os"] == "linux", config["os"]
        if d.get("platform"):
            assert d["platform"]["architecture"] == arch, (d["platform"], arch)
        assert config["config"]["Entrypoint"] == [f"/{bins[0]}"], config["config"]
        root = os.path.join(work, "root-" + arch)
        os.makedirs(root)
        for layer in m["layers"]:
            data = blob(layer)
            if data[:2] == b"\x1f\x8b":
                data = gzip.decompress(data)
            tarfile.open(fileobj=io.BytesIO(data)).extractall(root)
        for b in bins:
            path = os.path.join(root, b)
            head = open(path, "rb").read(20)
            machine = int.from_bytes(head[18:20], "little")
            assert machine == {"amd64": 62, "arm64": 183}[arch], (b, arch, machine)
            got = subprocess.run(run_on[arch] + [path, "--version"], capture_output=True, text=True, check=True).stdout.strip()
            assert got == f"{b} {version}", (b, arch, got)
        platforms[arch] = sorted(os.listdir(root))
    assert sorted(platforms) == ["amd64", "arm64"], platforms
    print(f"images: {name}: " + "; ".join(f"linux/{a} {' '.join(f)} run --version ok" for a, f in sorted(platforms.items())))
PY
