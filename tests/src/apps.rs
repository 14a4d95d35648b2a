//! Real applications for experiment tests: a site of namespaces (a hub plus application
//! namespaces), nginx and Prometheus from Debian. Everything lives inside namespaces the test
//! created; processes are killed and namespaces deleted on drop, also when the test fails.
use crate::{sh, sh_ok};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A hub namespace (controller, Prometheus, the probes) joined to `n` application namespaces
/// by one veth pair each: hub side `h<i>` = 10.214.<i>.1/24, application side `eth0` =
/// 10.214.<i>.2/24 (i from 1). All traffic of a test stays on these links.
pub struct Site {
    pub hub: String,
    pub apps: Vec<String>,
    pub tmp: PathBuf,
}

impl Site {
    pub fn new(tag: &str, n: usize) -> Self {
        crate::require_root();
        let pid = std::process::id();
        let site = Site {
            hub: format!("chs-{tag}-{pid}-hub"),
            apps: (1..=n).map(|i| format!("chs-{tag}-{pid}-app{i}")).collect(),
            tmp: std::env::temp_dir().join(format!("chaos-site-{tag}-{pid}")),
        };
        site.cleanup();
        std::fs::create_dir_all(&site.tmp).expect("tmp dir");
        let hub = &site.hub;
        sh_ok(&format!("ip netns add {hub}; ip -n {hub} link set lo up"));
        for (i, app) in site.apps.iter().enumerate() {
            let i = i + 1;
            sh_ok(&format!(
                "set -e; ip netns add {app}; ip -n {app} link set lo up;
                 ip link add h{i} netns {hub} type veth peer name eth0 netns {app};
                 ip -n {hub} addr add 10.214.{i}.1/24 dev h{i}; ip -n {app} addr add 10.214.{i}.2/24 dev eth0;
                 ip -n {hub} link set h{i} up; ip -n {app} link set eth0 up;
                 ip -n {app} route add default via 10.214.{i}.1;
                 ip netns exec {hub} ping -c 1 -w 5 -i 0.2 10.214.{i}.2 >/dev/null"
            ));
        }
        site
    }

    /// The hub's address on the link to application `i` (from 1).
    pub fn hub_ip(i: usize) -> String {
        format!("10.214.{i}.1")
    }

    /// Application `i`'s address (from 1).
    pub fn app_ip(i: usize) -> String {
        format!("10.214.{i}.2")
    }

    fn cleanup(&self) {
        for ns in self.apps.iter().chain(std::iter::once(&self.hub)) {
            let _ = sh(&format!("ip netns del {ns} 2>/dev/null"));
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn_in(ns: &str, name: &str, program: &Path, args: &[String], log: &Path) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program).args(args);
        Self::spawn(cmd, name, log)
    }

    /// On the host (the root namespaces), with extra environment; for processes that talk
    /// only over loopback and unix sockets.
    pub fn spawn_host(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        log: &Path,
    ) -> Self {
        let mut cmd = Command::new(program);
        cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
        Self::spawn(cmd, name, log)
    }

    fn spawn(mut cmd: Command, name: &str, log: &Path) -> Self {
        let log_file = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        Proc {
            child,
            name: name.to_string(),
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM first so agents revert and remove their sockets, then make sure.
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }
}

fn need(program: &str, package: &str) {
    if Command::new(program).arg("-v").output().is_err()
        && Command::new(program).arg("--version").output().is_err()
    {
        panic!("{program} is missing: apt-get install {package} (scripts/setup.sh does)");
    }
}

/// nginx (Debian) in namespace `ns` on `addr`:80, single process. `/` answers 200 "ok".
pub fn nginx(ns: &str, addr: &str, dir: &Path) -> Proc {
    let p = nginx_serving(ns, &format!("listen {addr}:80;"), dir);
    wait_http(ns, &format!("{addr}:80"), "/", Duration::from_secs(5));
    p
}

/// nginx in namespace `ns` on `addr`:443 with TLS only (`cert` and `key`, PEM files): what an
/// https probe meets. `/` answers 200 "ok".
pub fn nginx_https(ns: &str, addr: &str, dir: &Path, cert: &Path, key: &Path) -> Proc {
    let listen = format!(
        "listen {addr}:443 ssl;\n    ssl_certificate {};\n    ssl_certificate_key {};",
        cert.display(),
        key.display()
    );
    let p = nginx_serving(ns, &listen, dir);
    let to: SocketAddr = format!("{addr}:443").parse().expect("nginx address");
    let started = Instant::now();
    while !crate::in_ns(ns, move || {
        TcpStream::connect_timeout(&to, Duration::from_millis(200)).is_ok()
    }) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "nginx on {to} in {ns} did not listen within 5 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

/// One nginx process whose one server has the directives `listen` and answers `/` with "ok".
fn nginx_serving(ns: &str, listen: &str, dir: &Path) -> Proc {
    need("nginx", "nginx");
    std::fs::create_dir_all(dir).expect("nginx dir");
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           server {{\n    {listen}\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    Proc::spawn_in(
        ns,
        "nginx",
        Path::new("nginx"),
        &[
            "-p".into(),
            format!("{d}/"),
            "-e".into(),
            format!("{d}/error.log"),
            "-c".into(),
            path.display().to_string(),
        ],
        &dir.join("stderr.log"),
    )
}

/// Prometheus (Debian) in namespace `ns`, listening on `listen` (ip:port), scraping `targets`
/// (ip:port, path /metrics) every second.
pub fn prometheus(ns: &str, listen: &str, targets: &[String], dir: &Path) -> Proc {
    need("prometheus", "prometheus");
    std::fs::create_dir_all(dir).expect("prometheus dir");
    let list = targets
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let conf = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: chaos\n    static_configs:\n      - targets: [{list}]\n"
    );
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, conf).expect("write prometheus.yml");
    let p = Proc::spawn_in(
        ns,
        "prometheus",
        Path::new("prometheus"),
        &[
            format!("--config.file={}", path.display()),
            format!("--storage.tsdb.path={}/data", dir.display()),
            format!("--web.listen-address={listen}"),
            "--log.level=warn".into(),
        ],
        &dir.join("stderr.log"),
    );
    wait_http(ns, listen, "/-/ready", Duration::from_secs(30));
    p
}

/// A plain HTTP/1.1 GET from inside `ns`: (status, body).
pub fn http_get(ns: &str, addr: &str, path: &str) -> Option<(u16, String)> {
    let text = http_get_raw(ns, addr, path)?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The whole answer to a plain HTTP/1.1 GET from inside `ns`, headers and framing as sent.
pub fn http_get_raw(ns: &str, addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    let path = path.to_string();
    crate::in_ns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        Some(text)
    })
}

/// Waits until `GET path` on `addr` from inside `ns` answers 200.
pub fn wait_http(ns: &str, addr: &str, path: &str, timeout: Duration) {
    let started = Instant::now();
    loop {
        if let Some((200, _)) = http_get(ns, addr, path) {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "http://{addr}{path} in {ns} did not answer 200 within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
