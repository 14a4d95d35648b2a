//! One HTTP/1.1 exchange on a fresh connection, plain or over TLS, through hyper's client.
//!
//! Fresh on purpose: a probe measures what a new client sees (connect, handshake, request and
//! the whole body), and the open-loop schedule stays honest, since a pooled connection would
//! queue one request behind another's slow answer. hyper reads the body as the server framed it
//! (Content-Length, chunked, or until close); the size is bounded so a hostile or runaway server
//! costs at most [`BODY_LIMIT`].
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use tokio::net::TcpStream;

/// The most of a body a probe reads (a Prometheus range answer of 11,000 points is ~300 KB).
pub const BODY_LIMIT: usize = 16 << 20;

/// Where a probe sends its requests: parsed once, dialled per request.
#[derive(Clone)]
pub struct Target {
    host: String,
    port: u16,
    /// The Host header: the URL's authority as written.
    authority: String,
    path_and_query: String,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

/// What came back: the status and the whole body.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Checks `url` (scheme, host, no user information) without reading any file: what the
/// experiment loader refuses, in the words of `field`.
pub fn check_url(field: &str, url: &str) -> Result<(), String> {
    parse(url).map(|_| ()).map_err(|e| format!("{field}: {e}"))
}

fn parse(url: &str) -> Result<(bool, http::Uri), String> {
    let shown = shown(url);
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{shown}` is not a URL ({e})"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("`{shown}` must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{shown}` names no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "`{shown}` carries user information (before `@`): refused; give credentials as a header"
        ));
    }
    if authority.host().is_empty() {
        return Err(format!("`{shown}` names no host"));
    }
    Ok((tls, uri))
}

/// A URL as an error quotes it: enough to recognise, never unbounded input.
fn shown(url: &str) -> String {
    const MAX: usize = 120;
    match url.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}… ({} bytes)", &url[..i], url.len()),
        None => url.to_string(),
    }
}

impl Target {
    /// `url` is http:// or https://; for https the server's certificate must chain to a CA in
    /// the PEM file `ca`, or to the system's roots when there is none.
    pub fn new(url: &str, ca: Option<&Path>) -> Result<Self, String> {
        let (tls, uri) = parse(url)?;
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tls = if tls {
            let name = ServerName::try_from(host.clone())
                .map_err(|e| format!("`{host}` is not a TLS server name ({e})"))?;
            Some((client_config(ca)?, name))
        } else {
            None
        };
        Ok(Target {
            authority: authority.to_string(),
            host,
            port,
            path_and_query: uri
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            tls,
        })
    }

    /// The URL's path, for a caller that appends its own (Prometheus's `/api/v1/query`).
    pub fn path(&self) -> &str {
        self.path_and_query
            .split_once('?')
            .map_or(self.path_and_query.as_str(), |(p, _)| p)
    }

    /// The same server, another path and query.
    pub fn at(&self, path_and_query: String) -> Self {
        Target {
            path_and_query,
            ..self.clone()
        }
    }

    /// One request, the whole answer. The caller bounds it in time.
    pub async fn exchange(
        &self,
        method: &str,
        headers: &BTreeMap<String, String>,
        body: &str,
    ) -> Result<Answer, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("connect {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => self.over(tcp, method, headers, body).await,
            Some((config, name)) => {
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with {}: {}", self.host, tls_reason(&e)))?;
                self.over(stream, method, headers, body).await
            }
        }
    }

    async fn over<S>(
        &self,
        stream: S,
        method: &str,
        headers: &BTreeMap<String, String>,
        body: &str,
    ) -> Result<Answer, String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let mut req = http::Request::builder()
            .method(method)
            .uri(self.path_and_query.as_str())
            .header(http::header::HOST, self.authority.as_str())
            .header(http::header::USER_AGENT, "chaos-probe")
            .header(http::header::CONNECTION, "close");
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(Full::new(hyper::body::Bytes::copy_from_slice(
                body.as_bytes(),
            )))
            .map_err(|e| format!("request: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        // The connection is driven beside the request, not spawned: when the caller's timeout
        // drops this future, the socket closes with it.
        let exchange = async move {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("HTTP: {}", chain(&e)))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), BODY_LIMIT)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        format!(
                            "HTTP {status}: the body is over {} MiB (a probe's limit)",
                            BODY_LIMIT >> 20
                        )
                    } else {
                        format!("HTTP {status}: reading the body: {}", chain(&*e))
                    }
                })?
                .to_bytes()
                .to_vec();
            Ok(Answer { status, body })
        };
        let (answer, _) = tokio::join!(exchange, conn);
        answer
    }
}

/// An error and its causes on one line (hyper's own text is often just "connection error").
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

fn tls_reason(e: &std::io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(c)) => format!(
            "the server's certificate is refused: {}",
            match c {
                rustls::CertificateError::UnknownIssuer =>
                    "it is not signed by a trusted CA (give the probe `ca:`, a PEM file)".into(),
                other => chaos_agent::tls::certificate_problem(other),
            }
        ),
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

/// The client configuration for `ca`, or for the system's roots (read once per process).
fn client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    match ca {
        Some(path) => {
            let roots = chaos_agent::tls::pem_roots(path).map_err(|e| e.to_string())?;
            Ok(Arc::new(build(roots)?))
        }
        None => {
            static SYSTEM: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
            SYSTEM
                .get_or_init(|| {
                    let found = rustls_native_certs::load_native_certs();
                    let mut roots = rustls::RootCertStore::empty();
                    let (added, _) = roots.add_parsable_certificates(found.certs);
                    if added == 0 {
                        return Err(
                            "no system CA certificates found (install ca-certificates, or give the probe `ca:`)"
                                .to_string(),
                        );
                    }
                    Ok(Arc::new(build(roots)?))
                })
                .clone()
        }
    }
}

fn build(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
