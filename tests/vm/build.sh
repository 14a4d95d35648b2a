#!/bin/bash
# Build a QEMU/TCG test harness: real Debian 6.1 kernels (x86_64 + aarch64) with veth, sch_netem and sch_fq,
# a busybox + iproute2 initramfs that makes netns a/b joined by veth va(10.0.0.1)<->vb(10.0.0.2), and a
# cargo runner (vm-run) that boots the VM and runs a static test binary inside it.
# Debian 12 host, root. Artifacts are cached in $CHAOS_VM_DIR (default ~/.cache/chaos-vm): a second run
# with the same KVER does nothing. Adapted from shared/recipes/vm-harness.sh.
set -euo pipefail
H=${CHAOS_VM_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/chaos-vm}
KVER=${KVER:-6.1.0-56}          # Debian kernel ABI; must still be on the mirror (or cache $H)
# Kernel modules loaded in the VM (none of these has module dependencies in Debian 6.1). Beyond veth,
# netem and fq: clsact (sch_ingress) and cls_bpf for tc-BPF on a kernel without TCX, htb/prio/tbf for
# shaping classes, ifb + mirred for ingress shaping, u32/matchall/gact for comparisons with tc filters.
MODULES=${MODULES:-"drivers/net/veth drivers/net/ifb net/sched/sch_netem net/sched/sch_fq net/sched/sch_ingress net/sched/cls_bpf net/sched/act_bpf net/sched/sch_htb net/sched/sch_prio net/sched/sch_tbf net/sched/act_mirred net/sched/cls_u32 net/sched/cls_matchall net/sched/act_gact"}
# Bump HARNESS when the initramfs contents change, so cached artifacts are rebuilt.
HARNESS=2
STAMP="$H/built-$KVER-h$HARNESS"
if [ -f "$STAMP" ] && [ -f "$H/x86_64/kernel" ] && [ -f "$H/aarch64/kernel" ]; then
  echo "vm harness cached in $H ($KVER)"; exit 0
fi
mkdir -p "$H"/{apt/lists/partial,apt/cache/archives/partial,debs,bin}
cd "$H"

# 1. host packages (exact names; no recommends). qemu-user: optional, only for quick qemu-user runs.
# (a fresh machine may have empty package lists: update once if the first attempt fails)
HOSTPKGS="qemu-system-x86 qemu-system-arm qemu-user cpio binutils python3"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $HOSTPKGS >/dev/null 2>&1 || {
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $HOSTPKGS >/dev/null
}

# 2. private apt state that sees amd64+arm64 (does not touch dpkg's architecture list)
touch apt/status
cat > apt/apt.conf <<EOF
APT::Architecture "amd64";
APT::Architectures { "amd64"; "arm64"; };
Dir::State::Lists "$H/apt/lists";
Dir::State::status "$H/apt/status";
Dir::Cache "$H/apt/cache";
EOF
export APT_CONFIG=$H/apt/apt.conf
apt-get update -q >/dev/null
USERLAND="busybox-static iproute2 libbpf1 libelf1 libmnl0 libbsd0 libcap2 libxtables12 libc6 zlib1g libmd0"

# helper: copy binaries from an extracted sysroot + their DT_NEEDED closure (readelf only, no execution)
copy_with_libs() { # SYSROOT DEST TRIPLET /abs/bin...
  local sys=$1 dest=$2 tri=$3; shift 3; local -A seen=()
  _res() { local n p; for n in $(readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      [ -n "${seen[$n]:-}" ] && continue; seen[$n]=1
      for p in "$sys/lib/$tri/$n" "$sys/usr/lib/$tri/$n"; do
        [ -e "$p" ] && { mkdir -p "$dest/lib/$tri"; cp -L "$p" "$dest/lib/$tri/$n"; _res "$p"; break; }; done
      [ -e "$dest/lib/$tri/$n" ] || { echo "missing $n" >&2; return 1; }; done; }
  for b in "$@"; do mkdir -p "$dest$(dirname "$b")"; cp -L "$sys$b" "$dest$b"; _res "$sys$b"; done
  local interp; interp=$(readelf -l "$sys$1" | sed -n 's/.*interpreter: \(.*\)\]/\1/p')
  mkdir -p "$dest$(dirname "$interp")"; cp -L "$sys$interp" "$dest$interp"
}

cat > init <<'EOF'
#!/bin/busybox sh
# Debian's busybox sh prefers applets: bare "ip"/"tc" would run busybox's (no netns, no netem). Use full paths.
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev; mount -t tmpfs tmp /run
echo; echo "BOOTED kernel $(uname -r) arch $(uname -m) uptime $(cut -d' ' -f1 /proc/uptime)"
for m in /lib/modules/*.ko; do insmod $m || echo "insmod $m FAILED"; done
IP=/bin/ip TC=/sbin/tc
$IP link set lo up
for kv in $(cat /proc/cmdline); do case $kv in pings=*) N=${kv#pings=};; esac; done
$IP netns add a; $IP netns add b; $IP link add va type veth peer name vb
$IP link set va netns a; $IP link set vb netns b
$IP -n a addr add 10.0.0.1/24 dev va; $IP -n b addr add 10.0.0.2/24 dev vb
for n in a b; do $IP -n $n link set lo up; done; $IP -n a link set va up; $IP -n b link set vb up
P(){ $IP netns exec a ping -c $N -i 0.05 10.0.0.2 | sed -n 's/.*time=\([0-9.]*\) ms/\1/p' | tr '\n' ' '; echo; }
if [ "${N:-0}" != 0 ]; then   # pings=N on the kernel cmdline: measure RTT with netem 0/1/10/100 ms
  echo "RTT none: $(P)"
  for d in 1ms 10ms 100ms; do $TC -n a qdisc replace dev va root netem delay $d; echo "RTT $d: $(P)"; done
  $TC -n a qdisc del dev va root
fi
if [ -x /test/run ]; then echo "TEST START"; /test/run; echo "TEST EXIT=$?"; fi
echo "DONE uptime $(cut -d' ' -f1 /proc/uptime)"
poweroff -f
EOF
chmod +x init

for arch in x86_64 aarch64; do
  case $arch in x86_64) darch=amd64 tri=x86_64-linux-gnu;; aarch64) darch=arm64 tri=aarch64-linux-gnu;; esac
  mkdir -p "debs/$darch" "$arch" && rm -rf "$arch/sysroot" "$arch/initrd" && mkdir -p "$arch/sysroot" "$arch/initrd"/{bin,sbin,dev,proc,sys,run,lib/modules}
  (cd "debs/$darch" && apt-get download -q "linux-image-$KVER-$darch:$darch" $(for p in $USERLAND; do echo "$p:$darch"; done) >/dev/null 2>&1)
  # only the kernel image and the three modules (none of them has module dependencies)
  dpkg-deb --fsys-tarfile "debs/$darch"/linux-image-$KVER-${darch}_*.deb | tar -x -C "$arch/sysroot" --wildcards \
    './boot/vmlinuz-*' $(for m in $MODULES; do echo "*/$m.ko"; done)
  for d in "debs/$darch"/*.deb; do case $d in *linux-image*) ;; *) dpkg-deb -x "$d" "$arch/sysroot";; esac; done
  find "$arch/sysroot/lib/modules" -name '*.ko' -exec cp {} "$arch/initrd/lib/modules/" \;
  cp "$arch/sysroot/bin/busybox" "$arch/initrd/bin/"
  copy_with_libs "$arch/sysroot" "$arch/initrd" "$tri" /bin/ip /sbin/tc   # /sbin/ip is an absolute symlink to /bin/ip
  # netem distribution tables, so tests can compare `tc ... distribution normal` with ours
  mkdir -p "$arch/initrd/usr/lib/$tri/tc" && cp "$arch/sysroot/usr/lib/$tri/tc/"*.dist "$arch/initrd/usr/lib/$tri/tc/"
  cp init "$arch/initrd/init"
  (cd "$arch/initrd" && find . | cpio -o -H newc 2>/dev/null | gzip -1) > "$arch/initramfs.cpio.gz"
  if [ $arch = x86_64 ]; then   # bzImage is XZ: decompressing it under TCG costs ~4 s per boot; boot the ELF via PVH instead
    python3 -c "import lzma,sys;d=open(sys.argv[1],'rb').read();i=d.find(b'\xfd7zXZ\x00');open(sys.argv[2],'wb').write(lzma.LZMADecompressor().decompress(d[i:]))" \
      "$arch"/sysroot/boot/vmlinuz-* "$arch/kernel"
  else
    cp "$arch"/sysroot/boot/vmlinuz-* "$arch/kernel"   # arm64 Debian "vmlinuz" is an uncompressed Image
  fi
  rm -rf "$arch/sysroot"
done

cat > bin/vm-run <<EOF
#!/bin/bash
# vm-run BINARY [ARGS...]: run a static binary (musl) as root in a TCG VM (real Debian $KVER kernel, netns a/b + veth,
# sch_netem/sch_fq loaded). Works as CARGO_TARGET_<TRIPLE>_RUNNER. Exit status is the binary's.
# Env: VM_NETNS=a|b (run inside that netns), VM_SMP, VM_MEM, VM_TIMEOUT, VM_PINGS=N, VM_CPU, VM_CONSOLE=file
H=$H
EOF
cat >> bin/vm-run <<'EOF'
set -euo pipefail
bin=$(readlink -f "$1"); shift
case "$(od -An -j18 -N2 -tu2 "$bin" | tr -d ' ')" in
  62)  arch=x86_64;  qemu=(qemu-system-x86_64 -M pc); con=ttyS0 ;;
  183) arch=aarch64; qemu=(qemu-system-aarch64 -M virt -cpu "${VM_CPU:-cortex-a72}"); con=ttyAMA0 ;;
  *) echo "vm-run: unsupported ELF machine: $bin" >&2; exit 2 ;;
esac
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/test"; cp "$bin" "$work/root/test/bin"
q() { printf "'%s' " "$(printf %s "$1" | sed "s/'/'\\\\''/g")"; }
{ echo '#!/bin/sh'; echo 'cd /test'; printf 'exec %s/test/bin ' "${VM_NETNS:+/bin/ip netns exec $VM_NETNS }"
  for a in "$@"; do q "$a"; done; echo; } > "$work/root/test/run"; chmod +x "$work/root/test/run"
# the kernel unpacks concatenated cpio archives: base initramfs + a small one holding /test
(cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip -1) | cat "$H/$arch/initramfs.cpio.gz" - > "$work/initrd.gz"
timeout "${VM_TIMEOUT:-300}" "${qemu[@]}" -kernel "$H/$arch/kernel" -initrd "$work/initrd.gz" \
  -m "${VM_MEM:-512}" -smp "${VM_SMP:-1}" -nodefaults -display none -no-reboot -serial file:"$work/console" \
  -append "console=$con panic=-1 quiet pings=${VM_PINGS:-0}" || { echo "vm-run: qemu failed or timed out" >&2; tail -n 30 "$work/console" >&2; exit 3; }
[ -n "${VM_CONSOLE:-}" ] && cp "$work/console" "$VM_CONSOLE"
tr -d '\r' < "$work/console" | sed -n '/^TEST START$/,/^TEST EXIT=/p' | sed '1d;$d'
code=$(tr -d '\r' < "$work/console" | sed -n 's/^TEST EXIT=\([0-9]*\)$/\1/p')
[ -n "$code" ] || { echo "vm-run: no TEST EXIT marker; console tail:" >&2; tail -n 30 "$work/console" >&2; exit 4; }
exit "$code"
EOF
chmod +x bin/vm-run
du -sh "$H"/x86_64/kernel "$H"/x86_64/initramfs.cpio.gz "$H"/aarch64/kernel "$H"/aarch64/initramfs.cpio.gz
touch "$STAMP"
echo "OK: $H/bin/vm-run"
