//! The admin endpoint: `/metrics` for Prometheus, `/live` and `/ready` for a kubelet's probes.
//!
//! On hyper's HTTP/1.1 server, which tonic already links, so a daemon on every node carries no
//! web framework and no hand-written HTTP parser. It is a side door, so it is bounded: 64
//! connections at a time (more are closed at once), 5 s to send a request head, 5 s for a check
//! to answer, 60 s per connection.
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Renders the current metrics text (async: it may ask the engine or the fleet).
pub type Render = Arc<dyn Fn() -> BoxFuture<String> + Send + Sync>;

/// A probe's check: `Ok(what is fine)` answers 200, `Err(what is wrong)` 503; either text is
/// the body, so `curl` on a node says why.
pub type Check = Arc<dyn Fn() -> BoxFuture<Result<String, String>> + Send + Sync>;

/// What the endpoint serves.
pub struct Admin {
    pub metrics: Render,
    /// The process can do its job: a kubelet restarts it when this fails.
    pub live: Check,
    /// The process has started and serves: a rollout waits for this.
    pub ready: Check,
}

const MAX_CONNECTIONS: usize = 64;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Binds `addr` now (so a bad address fails at start) and serves in the background.
pub async fn serve(addr: SocketAddr, admin: Admin) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let admin = Arc::new(admin);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let sock = match listener.accept().await {
                Ok((sock, _)) => sock,
                // Out of descriptors, say: do not spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let admin = admin.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, Infallible>(answer(&admin, req).await) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .serve_connection(TokioIo::new(sock), service);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
                drop(slot);
            });
        }
    });
    Ok(local)
}

async fn answer(admin: &Admin, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = reply(StatusCode::OK, (admin.metrics)().await);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            r
        }
        "/live" => check(&admin.live).await,
        "/ready" => check(&admin.ready).await,
        _ => reply(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /live or /ready\n".into(),
        ),
    }
}

async fn check(c: &Check) -> Response<Full<Bytes>> {
    match tokio::time::timeout(CHECK_TIMEOUT, c()).await {
        Ok(Ok(fine)) => reply(StatusCode::OK, format!("{fine}\n")),
        Ok(Err(wrong)) => reply(StatusCode::SERVICE_UNAVAILABLE, format!("{wrong}\n")),
        Err(_) => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("no answer within {}s\n", CHECK_TIMEOUT.as_secs()),
        ),
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// A check that always passes with `text` (a process with nothing more to check).
pub fn always(text: &'static str) -> Check {
    Arc::new(move || Box::pin(async move { Ok(text.to_string()) }))
}

/// Builds the text format: HELP/TYPE once per metric family, then its samples.
#[derive(Default)]
pub struct Text(String);

impl Text {
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.0, "{k}=\"{v}\"");
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
        self
    }

    pub fn finish(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_and_the_probes_with_their_reasons() {
        let render: Render = Arc::new(|| {
            Box::pin(async {
                let mut t = Text::default();
                t.family("x_total", "counter", "things")
                    .sample("x_total", &[("k", "a\"b")], 3.0);
                t.finish()
            })
        });
        let started = Arc::new(AtomicBool::new(false));
        let flag = started.clone();
        let ready: Check = Arc::new(move || {
            let up = flag.load(Ordering::SeqCst);
            Box::pin(async move {
                match up {
                    true => Ok("serving".to_string()),
                    false => Err("starting".to_string()),
                }
            })
        });
        let stuck: Check = Arc::new(|| Box::pin(std::future::pending()));
        let admin = Admin {
            metrics: render,
            live: stuck,
            ready,
        };
        let addr = serve("127.0.0.1:0".parse().unwrap(), admin).await.unwrap();
        let ok = get(addr, "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(
            ok.ends_with(
                "# HELP x_total things\n# TYPE x_total counter\nx_total{k=\"a\\\"b\"} 3\n"
            ),
            "{ok}"
        );
        let r = get(addr, "/ready").await;
        assert!(
            r.starts_with("HTTP/1.1 503") && r.ends_with("starting\n"),
            "{r}"
        );
        started.store(true, Ordering::SeqCst);
        let r = get(addr, "/ready").await;
        assert!(
            r.starts_with("HTTP/1.1 200") && r.ends_with("serving\n"),
            "{r}"
        );
        // A check that never answers is a failed probe, not a hung one.
        let t = std::time::Instant::now();
        let l = get(addr, "/live").await;
        assert!(
            l.starts_with("HTTP/1.1 503") && l.ends_with("no answer within 5s\n"),
            "{l}"
        );
        assert!(t.elapsed() < Duration::from_secs(7));
        assert!(get(addr, "/").await.starts_with("HTTP/1.1 404"));
    }
}
