//! Helpers for integration tests on the real kernel.
//!
//! Every test builds its own pair of network namespaces joined by a veth (addresses in
//! 10.213.0.0/24 and fd00:213::/64 only), runs traffic only inside them, and deletes them on
//! drop, even when the test fails. Nothing touches the root namespace's interfaces.
//!
//! Tests need root (they create namespaces and load BPF). They panic with a message saying so
//! rather than skip: a skipped kernel test must never look like a pass.
pub mod apps;
pub mod cgroups;
pub mod kube_api;
pub mod kube_rbac;
pub mod mounts;
pub mod pods;

use chaos_agent::datapath::{self, AttachMode, Hook};
use chaos_agent::table::Table;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const A4: &str = "10.213.0.1";
pub const B4: &str = "10.213.0.2";
/// A second address on B, for "only the targeted destination" checks.
pub const B4_OTHER: &str = "10.213.0.3";
pub const A6: &str = "fd00:213::1";
pub const B6: &str = "fd00:213::2";
pub const B6_OTHER: &str = "fd00:213::3";

static SERIAL: Mutex<()> = Mutex::new(());

/// Kernel tests run one at a time: they measure rates and count global BPF objects.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("kernel integration tests need root (network namespaces, BPF); run them as root");
    }
}

/// How long until `pred` holds, polled every millisecond; None after `within`.
pub fn time_until(within: Duration, pred: impl Fn() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < within {
        if pred() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// Watches for `pred` from another thread, every `every` while the caller acts (an apply);
/// the handle gives the instant it first held (None after 5 s). Polling after the act returns
/// would time the whole act, journal write included, not the moment it took effect.
pub fn watch(
    every: Duration,
    pred: impl Fn() -> bool + Send + 'static,
) -> std::thread::JoinHandle<Option<Instant>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let _ = tx.send(());
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if pred() {
                return Some(Instant::now());
            }
            std::thread::sleep(every);
        }
        None
    });
    let _ = rx.recv();
    h
}

/// ms from `t` to what `watch` saw; NaN if it never held.
pub fn ms_after(t: Instant, w: std::thread::JoinHandle<Option<Instant>>) -> f64 {
    match w.join().ok().flatten() {
        Some(at) => at.saturating_duration_since(t).as_secs_f64() * 1e3,
        None => f64::NAN,
    }
}

/// A workspace binary next to the running one (target/<profile>/, or its parent for tests in
/// target/<profile>/deps/).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

pub fn sh(cmd: &str) -> Output {
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

pub fn sh_ok(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Two namespaces, `a` and `b`, joined by veth `va` <-> `vb`.
pub struct TestNet {
    pub a: String,
    pub b: String,
    pub tmp: PathBuf,
}

impl TestNet {
    pub fn new(tag: &str) -> Self {
        require_root();
        let pid = std::process::id();
        let net = TestNet {
            a: format!("cht-{tag}-{pid}-a"),
            b: format!("cht-{tag}-{pid}-b"),
            tmp: std::env::temp_dir().join(format!("chaos-test-{tag}-{pid}")),
        };
        net.cleanup();
        std::fs::create_dir_all(&net.tmp).expect("tmp dir");
        let (a, b) = (&net.a, &net.b);
        sh_ok(&format!(
            "set -e; ip netns add {a}; ip netns add {b};
             ip link add va netns {a} type veth peer name vb netns {b};
             ip -n {a} link set lo up; ip -n {b} link set lo up;
             ip -n {a} addr add {A4}/24 dev va; ip -n {b} addr add {B4}/24 dev vb;
             ip -n {b} addr add {B4_OTHER}/24 dev vb;
             ip -n {a} -6 addr add {A6}/64 dev va nodad; ip -n {b} -6 addr add {B6}/64 dev vb nodad;
             ip -n {b} -6 addr add {B6_OTHER}/64 dev vb nodad;
             ip -n {a} link set va up; ip -n {b} link set vb up"
        ));
        // Neighbour discovery before any fault, so faults see data packets, not ARP/NDP. `-w 5`
        // keeps probing until the first reply: on a loaded machine a veth's first echo can be
        // lost while its carrier comes up (CI failed once on a single `-W 2` probe).
        for dst in [B4, B4_OTHER, B6, B6_OTHER] {
            sh_ok(&format!(
                "ip netns exec {a} ping -c 1 -w 5 -i 0.2 {dst} >/dev/null"
            ));
        }
        net
    }

    pub fn path(&self, ns: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(ns)
    }

    fn cleanup(&self) {
        let _ = sh(&format!(
            "ip netns del {} 2>/dev/null; ip netns del {} 2>/dev/null",
            self.a, self.b
        ));
        let _ = std::fs::remove_dir_all(&self.tmp);
    }

    /// Everything a fault may have left on `va` in namespace `a`: see [`residue_on`].
    pub fn residue(&self) -> Vec<String> {
        residue_on(&self.a, "va")
    }
}

/// Everything a fault may have left attached: tc filters and non-default qdiscs on `dev` in
/// namespace `ns`, and BPF links to our programs. Empty means no residue. (A running engine
/// may hold one loaded, unattached spare program; whether programs outlive their owner is
/// checked with [`chaos_programs_loaded`] once the owner is gone.)
pub fn residue_on(ns: &str, dev: &str) -> Vec<String> {
    let a = ns;
    let mut found = Vec::new();
    for hook in ["ingress", "egress"] {
        // sh_ok: a failed listing (no such device or namespace) must not read as "nothing".
        let text = sh_ok(&format!(
            "ip netns exec {a} tc filter show dev {dev} {hook}"
        ))
        .trim()
        .to_string();
        if !text.is_empty() {
            found.push(format!("tc filter {hook}: {text}"));
        }
    }
    let q = sh_ok(&format!("ip netns exec {a} tc qdisc show dev {dev}"));
    for line in q.lines() {
        if !line.starts_with("qdisc noqueue 0: root") {
            found.push(format!("qdisc: {line}"));
        }
    }
    // IFB devices for ingress shaping (chifb*) and --force rehearsals (chrh*).
    let links = sh_ok(&format!("ip -n {a} -o link show"));
    for line in links.lines() {
        if line.contains(": chifb") || line.contains(": chrh") {
            found.push(format!("link: {line}"));
        }
    }
    // We never pin; anything of ours under bpffs would be a leak.
    let pinned = sh("find /sys/fs/bpf -iname '*chaos*' 2>/dev/null");
    let pinned = String::from_utf8_lossy(&pinned.stdout).trim().to_string();
    if !pinned.is_empty() {
        found.push(format!("pinned: {pinned}"));
    }
    // TCX links: neither `tc filter show` nor Debian's bpftool lists them; BPF_PROG_QUERY
    // on the device does (anyone's program: the test's namespaces have no other).
    for hook in [Hook::Egress, Hook::Ingress] {
        let dev = dev.to_string();
        let programs = in_ns(a, move || datapath::tcx_programs(&dev, hook))
            .unwrap_or_else(|e| panic!("query tcx: {e}"));
        if !programs.is_empty() {
            found.push(format!("tcx {hook:?}: {programs:?}"));
        }
    }
    // And links to our programs anywhere else (kernel tests run one at a time).
    let links = chaos_links();
    if links > 0 {
        found.push(format!("{links} BPF links to chaos_* programs"));
    }
    found
}

/// tests/apps/NAME.c compiled (cc -O2) into `dir`: the real C programs the clock tests read
/// time with.
pub fn c_app(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("apps/{name}.c"));
    let st = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc");
    assert!(st.success(), "cc {name}.c");
    out
}

/// An engine in this process on `journal`, started as the agent and `chaosctl --local` start
/// theirs.
pub fn engine_at(journal: &Path) -> std::sync::Arc<chaos_agent::Engine> {
    chaos_agent::Engine::start(chaos_agent::EngineConfig {
        journal_dir: journal.to_path_buf(),
        ..Default::default()
    })
    .expect("engine")
    .0
}

/// A fault of `kind` on A's `va`, egress, to `dest` (a CIDR), for 10 minutes.
pub fn va_fault(net: &TestNet, kind: chaos_agent::FaultKind, dest: &str) -> chaos_agent::FaultSpec {
    use chaos_agent::spec::{Direction, NetnsRef, Protocol, Target};
    chaos_agent::FaultSpec {
        kind,
        target: Target {
            netns: NetnsRef::Path(net.path(&net.a)),
            interface: "va".into(),
            remote: vec![dest.parse().expect("cidr")],
            local: vec![],
            ports: vec![],
            protocol: Protocol::All,
            direction: Direction::Egress,
            force: false,
        },
        duration: Duration::from_secs(600),
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// BPF programs of ours loaded anywhere on the machine (tests run serially, so any is residue).
/// Listed through the kernel (every `chaos_*` program: the DNS and mirred ones too); a failure
/// to list fails the test rather than reading as "none".
pub fn chaos_programs_loaded() -> usize {
    datapath::loaded_chaos_programs()
        .unwrap_or_else(|e| panic!("list BPF programs: {e}"))
        .len()
}

/// BPF links (TCX and others) whose program is one of ours.
pub fn chaos_links() -> usize {
    datapath::chaos_links().unwrap_or_else(|e| panic!("list BPF links: {e}"))
}

/// Runs `f` on a thread inside namespace `ns`.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix_setns(&file);
        f()
    })
    .join()
    .expect("thread in netns panicked")
}

fn nix_setns(file: &std::fs::File) {
    // SAFETY: setns on a valid fd affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// What a UDP sender saw: how many sends the local stack reported as failed.
pub struct UdpReport {
    pub sent: u64,
    pub send_errors: u64,
    pub errqueue: u64,
}

/// Sends `count` datagrams `seq:u64 + pattern` from namespace `from` to `to`, with IP_RECVERR on
/// so any local drop would surface as an error (as it does for ping and TCP).
pub fn udp_send(from: &str, to: SocketAddr, count: u64, payload: usize) -> UdpReport {
    in_ns(from, move || {
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sock = UdpSocket::bind(bind).expect("bind sender");
        let one: libc::c_int = 1;
        let (level, opt) = if to.is_ipv4() {
            (libc::IPPROTO_IP, libc::IP_RECVERR)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_RECVERR)
        };
        // SAFETY: setsockopt with a valid int option on our socket.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                opt,
                (&one as *const libc::c_int).cast(),
                4,
            )
        };
        let mut report = UdpReport {
            sent: 0,
            send_errors: 0,
            errqueue: 0,
        };
        let mut buf = vec![0u8; payload.max(8)];
        for (i, b) in buf.iter_mut().enumerate().skip(8) {
            *b = (i % 251) as u8;
        }
        for seq in 0..count {
            buf[..8].copy_from_slice(&seq.to_be_bytes());
            match sock.send_to(&buf, to) {
                Ok(_) => report.sent += 1,
                Err(_) => report.send_errors += 1,
            }
            // Pace so the receiver's backlog never overflows: loss must come from the fault.
            if seq % 50 == 49 {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        report.errqueue = drain_errqueue(&sock);
        report
    })
}

fn drain_errqueue(sock: &UdpSocket) -> u64 {
    let mut n = 0;
    loop {
        let mut data = [0u8; 2048];
        let mut control = [0u8; 512];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr points at buffers that outlive the call.
        let rc = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1 as _;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len() as _;
            libc::recvmsg(
                sock.as_raw_fd(),
                &mut msg,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
            )
        };
        if rc < 0 {
            return n;
        }
        n += 1;
    }
}

/// A UDP receiver in namespace `ns`: counts datagrams and damaged payloads until the sender is
/// done ([`UdpReceiver::finish`]) and then `idle` passes with nothing arriving. It never stops
/// on its own while the sender runs, so "0 received" means the fault dropped everything, not
/// that the receiver gave up early. Returns the sequence numbers seen, in order, and the
/// damaged count.
pub struct UdpReceiver {
    handle: std::thread::JoinHandle<(Vec<u64>, u64)>,
    sender_done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl UdpReceiver {
    pub fn start(ns: &str, addr: SocketAddr, idle: Duration) -> Self {
        use std::sync::atomic::Ordering;
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        let sender_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = sender_done.clone();
        let handle = std::thread::spawn(move || {
            let file = std::fs::File::open(PathBuf::from("/run/netns").join(&ns)).expect("netns");
            nix_setns(&file);
            let sock = UdpSocket::bind(addr).expect("bind receiver");
            // Large enough to hold every datagram a test sends even if this thread never ran
            // until the end: a lost datagram must be the fault's doing, not a full buffer.
            let size: libc::c_int = 64 << 20;
            // SAFETY: setsockopt with a valid int option on our socket.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&size as *const libc::c_int).cast(),
                    4,
                )
            };
            sock.set_read_timeout(Some(idle.max(Duration::from_millis(1))))
                .expect("timeout");
            tx.send(()).expect("ready");
            let (mut seqs, mut damaged) = (Vec::new(), 0);
            let mut buf = [0u8; 65536];
            loop {
                // Read before receiving: a timeout that began after the sender finished is
                // a full idle period with nothing in flight.
                let finished = done.load(Ordering::Acquire);
                match sock.recv(&mut buf) {
                    Ok(n) if n >= 8 => {
                        seqs.push(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                        if buf[8..n]
                            .iter()
                            .enumerate()
                            .any(|(i, b)| *b != ((i + 8) % 251) as u8)
                        {
                            damaged += 1;
                        }
                    }
                    Ok(_) => damaged += 1,
                    Err(_) if finished => break,
                    Err(_) => {}
                }
            }
            (seqs, damaged)
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("receiver ready");
        UdpReceiver {
            handle,
            sender_done,
        }
    }

    /// Call once the sender is done: the receiver drains until `idle` passes quietly.
    pub fn finish(self) -> (Vec<u64>, u64) {
        self.sender_done
            .store(true, std::sync::atomic::Ordering::Release);
        self.handle.join().expect("receiver")
    }
}

/// One UDP exchange: `count` datagrams from `from` to `to` in namespace `to_ns`. Returns
/// (sender report, received count).
pub fn udp_probe(from: &str, to_ns: &str, to: SocketAddr, count: u64) -> (UdpReport, usize) {
    let rx = UdpReceiver::start(to_ns, to, Duration::from_millis(300));
    let report = udp_send(from, to, count, 64);
    let (seqs, _) = rx.finish();
    (report, seqs.len())
}

/// A TCP connection attempt from `from` to a listener in `to_ns`; true if a byte made the trip.
pub fn tcp_reachable(from: &str, to_ns: &str, to: SocketAddr) -> bool {
    let listener = in_ns(to_ns, move || TcpListener::bind(to).expect("listen"));
    let server = std::thread::spawn(move || {
        listener.set_nonblocking(false).ok();
        if let Ok((mut s, _)) = listener.accept() {
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
            let _ = s.write_all(&b);
        }
    });
    let ok = in_ns(from, move || {
        let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_millis(700)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_millis(700))).ok();
        let mut b = [7u8; 1];
        s.write_all(&b).is_ok() && s.read_exact(&mut b).is_ok() && b[0] == 7
    });
    if !ok {
        // Unblock the accept by connecting locally inside the listener's namespace.
        let _ = in_ns(to_ns, move || {
            TcpStream::connect_timeout(&to, Duration::from_millis(300))
        });
    }
    let _ = server.join();
    ok
}

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("ip"), port)
}

/// A chaos-agent process with its own socket and journal in the test's temp dir.
pub struct Agent {
    pub child: Child,
    pub socket: PathBuf,
    pub journal: PathBuf,
}

impl Agent {
    pub fn start(net: &TestNet, extra: &[&str]) -> Self {
        let socket = net.tmp.join("agent.sock");
        let journal = net.tmp.join("journal");
        Self::start_at(&socket, &journal, extra)
    }

    pub fn start_at(socket: &Path, journal: &Path, extra: &[&str]) -> Self {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(bin("chaos-agent"))
            .arg("--socket")
            .arg(socket)
            .arg("--journal-dir")
            .arg(journal)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chaos-agent");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "chaos-agent did not create {}",
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Agent {
            child,
            socket: socket.to_path_buf(),
            journal: journal.to_path_buf(),
        }
    }

    pub fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    pub fn chaosctl(&self, args: &[&str]) -> Output {
        Command::new(bin("chaosctl"))
            .arg("--agent")
            .arg(self.url())
            .args(args)
            .output()
            .expect("chaosctl")
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM first: the agent reverts everything on a clean shutdown.
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill9();
    }
}

/// Runs chaosctl directly (for --local and bad-input cases).
pub fn chaosctl(args: &[&str]) -> Output {
    Command::new(bin("chaosctl"))
        .args(args)
        .output()
        .expect("chaosctl")
}

/// A `chaosctl inject ... --local --json` running in the background.
pub struct LocalFault {
    child: Child,
    reader: std::thread::JoinHandle<String>,
    /// The "applied" event line.
    pub applied: String,
}

impl LocalFault {
    /// The chaosctl process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the fault and waits until it is applied.
    pub fn start(args: &[&str], journal: &Path) -> Self {
        Self::start_env(args, journal, &[])
    }

    /// [`LocalFault::start`] with extra environment variables for chaosctl.
    pub fn start_env(args: &[&str], journal: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_wrapped(&[], args, journal, env)
    }

    /// [`LocalFault::start_env`] through a wrapper command (`wrapper... chaosctl args...`)
    /// that ends by exec'ing chaosctl, so the child's pid is chaosctl's.
    pub fn start_wrapped(
        wrapper: &[&str],
        args: &[&str],
        journal: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let chaosctl = bin("chaosctl");
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&chaosctl);
                c
            }
            None => Command::new(&chaosctl),
        };
        let mut child = cmd
            .args(args)
            .arg("--local")
            .arg("--json")
            .envs(env.iter().copied())
            .env("CHAOS_JOURNAL_DIR", journal)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn chaosctl");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok)
            {
                if line.contains("\"applied\"") {
                    let _ = tx.send(line.clone());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let applied = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("chaosctl --local did not apply: {args:?}")
            });
        LocalFault {
            child,
            reader,
            applied,
        }
    }

    /// Sends `signal` to chaosctl (SIGKILL, SIGSTOP, SIGCONT...).
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGINT, as a user pressing Ctrl-C; returns the exit status and everything printed.
    pub fn stop(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().expect("wait chaosctl");
        (status, self.reader.join().expect("reader"))
    }

    /// Waits for the process to end on its own (duration or deadline).
    pub fn wait(mut self, timeout: Duration) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (status, self.reader.join().expect("reader"));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("chaosctl --local did not end within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The id of the fault a `chaosctl inject ... --json` applied; fails the test with chaosctl's
/// stderr if it did not.
pub fn fault_id(o: &Output) -> String {
    assert!(
        o.status.success(),
        "inject failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    json_event(&String::from_utf8_lossy(&o.stdout), "applied")["id"]
        .as_str()
        .expect("id")
        .to_string()
}

/// The JSON event `event` from chaosctl's --json output.
pub fn json_event(out: &str, event: &str) -> serde_json::Value {
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == event)
        .unwrap_or_else(|| panic!("no {event} event in {out}"))
}

/// 99.9 % two-sided binomial bound around n*p (normal approximation, z = 3.29).
pub fn binomial_bounds(n: u64, p: f64) -> (f64, f64) {
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (n as f64 * p - 3.29 * sd, n as f64 * p + 3.29 * sd)
}

/// TCP retransmitted segments in the calling thread's namespace.
pub fn tcp_retrans_segs() -> u64 {
    let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").expect("snmp");
    let mut lines = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(h), Some(v)) = (lines.next(), lines.next()) else {
        panic!("no Tcp: in snmp")
    };
    let idx = h
        .split_whitespace()
        .position(|f| f == "RetransSegs")
        .expect("RetransSegs");
    v.split_whitespace()
        .nth(idx)
        .and_then(|x| x.parse().ok())
        .expect("value")
}

/// Round-trip times (ms) of `count` sequential UDP echoes from namespace `from` to an echo
/// server this function runs at `to` in namespace `to_ns`. A lost probe counts as `f64::NAN`.
pub fn udp_rtts(from: &str, to_ns: &str, to: SocketAddr, count: usize) -> Vec<f64> {
    let server = in_ns(to_ns, move || UdpSocket::bind(to).expect("bind echo"));
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, peer)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], peer);
            }
        }
    });
    let rtts = in_ns(from, move || {
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let sock = UdpSocket::bind(bind).expect("bind client");
        sock.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let mut out = Vec::with_capacity(count);
        let mut buf = [0u8; 64];
        for i in 0..count as u64 {
            let start = Instant::now();
            sock.send_to(&i.to_be_bytes(), to).expect("send");
            let rtt = loop {
                match sock.recv(&mut buf) {
                    Ok(8) if buf[..8] == i.to_be_bytes() => {
                        break start.elapsed().as_secs_f64() * 1e3;
                    }
                    Ok(_) => continue,
                    Err(_) => break f64::NAN,
                }
            };
            out.push(rtt);
        }
        out
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = echo.join();
    rtts
}

/// Median of the non-NaN values.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// A DNS query for `name` (type A, class IN, RD set) with message id `id`; with `edns` an
/// EDNS0 OPT record (as dig and glibc with `options edns0` send).
pub fn dns_query(id: u16, name: &str, edns: bool) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, edns as u8]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    if edns {
        // root name, type OPT (41), UDP size 1232, extended rcode/version/flags 0, no data
        q.extend_from_slice(&[0, 0, 41, 0x04, 0xD0, 0, 0, 0, 0, 0, 0]);
    }
    q
}

/// One UDP DNS exchange from namespace `ns`: the answer's RCODE and how long it took, or
/// `None` if nothing came back within `timeout`. Checks that the answer is a response to this
/// query (same id, QR set).
pub fn dns_ask(
    ns: &str,
    server: SocketAddr,
    name: &str,
    timeout: Duration,
) -> Option<(u8, Duration)> {
    let name = name.to_string();
    in_ns(ns, move || {
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("addr")
        } else {
            "[::]:0".parse().expect("addr")
        };
        let sock = std::net::UdpSocket::bind(bind).expect("bind");
        sock.set_read_timeout(Some(timeout)).expect("timeout");
        let id = (std::process::id() as u16) ^ (name.len() as u16).rotate_left(8);
        let q = dns_query(id, &name, true);
        let started = Instant::now();
        sock.send_to(&q, server).expect("send");
        let mut buf = [0u8; 1500];
        loop {
            let (n, _) = sock.recv_from(&mut buf).ok()?;
            if n >= 12 && buf[..2] == id.to_be_bytes() && buf[2] & 0x80 != 0 {
                return Some((buf[3] & 0x0F, started.elapsed()));
            }
        }
    })
}

/// dnsmasq (Debian) serving a few names in namespace `ns`, on `addrs`; killed on drop.
pub struct Dnsmasq {
    child: Child,
}

impl Dnsmasq {
    /// Answers names from `records` ("name/address", dnsmasq's address=/name/addr, which also
    /// covers names below `name`) and refuses everything else (no upstream). Returns once it
    /// answers a query from `client_ns`.
    pub fn start(ns: &str, client_ns: &str, dir: &Path, addrs: &[&str], records: &[&str]) -> Self {
        if Command::new("dnsmasq").arg("--version").output().is_err() {
            panic!("dnsmasq is missing: apt-get install dnsmasq-base (scripts/setup.sh does)");
        }
        let mut conf = String::from("no-resolv\nno-hosts\nbind-interfaces\nport=53\nuser=root\n");
        for a in addrs {
            conf.push_str(&format!("listen-address={a}\n"));
        }
        for r in records {
            conf.push_str(&format!("address=/{r}\n"));
        }
        let path = dir.join("dnsmasq.conf");
        std::fs::write(&path, conf).expect("write dnsmasq.conf");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "dnsmasq", "--keep-in-foreground"])
            .arg(format!("--conf-file={}", path.display()))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq");
        let d = Dnsmasq { child };
        let server = addr(addrs[0], 53);
        let started = Instant::now();
        while dns_ask(
            client_ns,
            server,
            "ready.invalid",
            Duration::from_millis(100),
        )
        .is_none()
        {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "dnsmasq did not answer within 5 s"
            );
        }
        d
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal DNS server for places without dnsmasq (the VM suite): answers every query with
/// NOERROR and no records (the query echoed with QR and RA set). Stops on drop.
pub struct DnsEcho {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DnsEcho {
    pub fn start(ns: &str, at: SocketAddr) -> Self {
        let sock = in_ns(ns, move || UdpSocket::bind(at).expect("bind dns echo"));
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                if n >= 12 {
                    buf[2] |= 0x80;
                    buf[3] = 0x80;
                    let _ = sock.send_to(&buf[..n], from);
                }
            }
        });
        DnsEcho {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DnsEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `--name VALUE` from the command line of a bench binary, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// The `p` quantile (0..=1) of sorted values, nearest rank.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Ethernet + IPv4 or IPv6 + UDP to port 53 around `payload`.
pub fn udp_frame(payload: &[u8], v6: bool) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    let udp_len = (8 + payload.len()) as u16;
    let mut udp = vec![0xC0, 0x01, 0, 53];
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    if v6 {
        f.extend_from_slice(&[0x86, 0xDD, 0x60, 0, 0, 0]);
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[17, 64]);
        f.extend_from_slice(&[0xFD, 0, 2, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0xFD, 0, 2, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    } else {
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&(20 + udp_len).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 10, 213, 0, 1, 10, 213, 0, 2]);
    }
    f.extend_from_slice(&udp);
    f.extend_from_slice(payload);
    f
}

/// How long after `since` UDP from `from` reaches `to` in `to_ns` again: one datagram every
/// 5 ms until one arrives, or `None` after `timeout`. For "traffic is whole again" timings.
pub fn first_through(
    from: &str,
    to_ns: &str,
    to: SocketAddr,
    since: Instant,
    timeout: Duration,
) -> Option<Duration> {
    let (tx, rx) = std::sync::mpsc::channel();
    let ns = to_ns.to_string();
    let receiver = std::thread::spawn(move || {
        let file = std::fs::File::open(PathBuf::from("/run/netns").join(&ns)).expect("netns");
        nix_setns(&file);
        let sock = UdpSocket::bind(to).expect("bind receiver");
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        tx.send(()).expect("ready");
        let mut buf = [0u8; 64];
        let end = since + timeout;
        while Instant::now() < end {
            if sock.recv(&mut buf).is_ok() {
                return Some(since.elapsed());
            }
        }
        None
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("receiver ready");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sending = done.clone();
    let from = from.to_string();
    let sender = std::thread::spawn(move || {
        in_ns(&from, move || {
            let bind: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().expect("addr")
            } else {
                "[::]:0".parse().expect("addr")
            };
            let sock = UdpSocket::bind(bind).expect("bind sender");
            while !sending.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = sock.send_to(b"whole?", to);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    });
    let got = receiver.join().expect("receiver");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.join().expect("sender");
    got
}

/// A hook table attached nowhere, for driving the classifier with BPF_PROG_TEST_RUN (as if on
/// an Ethernet device). Nothing beats for it: rules go inert 2 s after the last `beat_at`.
pub fn detached_table() -> Table {
    let prepared = datapath::prepare().expect("prepare");
    let attach = datapath::Attach {
        mode: AttachMode::Tcx,
        priority: datapath::clsact_priority(0),
    };
    Table::new(prepared, "lo", 14, attach, &[]).expect("table")
}

/// A small deterministic PRNG (xorshift64*) for the differential tests.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A gRPC channel to an agent's unix socket (the benchmarks' direct path to one agent).
pub async fn agent_channel(socket: PathBuf) -> tonic::transport::Channel {
    tonic::transport::Endpoint::try_from("http://agent.local")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(p).await?,
                ))
            }
        }))
        .await
        .expect("agent socket")
}
