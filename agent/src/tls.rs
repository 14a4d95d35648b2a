//! Transport security shared by the controller, agents and chaosctl: mutual TLS from a
//! certificate directory (`chaosctl certs init` writes one), and the one rule for plaintext.
//!
//! Plaintext exists for development and tests on one machine, so it is accepted only when asked
//! for explicitly *and* the address cannot leave the host (loopback or a unix socket): an agent
//! that takes commands from the network without authentication would be a remote root shell.
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
#[cfg(feature = "tls")]
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// A CA to trust and this side's certificate and key, PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `chaosctl certs init` wrote into `dir` for `stem` ("controller", "agent-pi-1",
    /// "user-alice").
    pub fn in_dir(dir: &Path, stem: &str) -> Self {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        }
    }

    #[cfg(feature = "tls")]
    fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Client side: trust only the CA, present our certificate. `domain` is the name the
    /// server's certificate must carry (the URL's host).
    #[cfg(feature = "tls")]
    pub fn client(&self, domain: &str) -> Result<ClientTlsConfig, TlsError> {
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(Self::read(&self.ca)?))
            .identity(Identity::from_pem(
                Self::read(&self.cert)?,
                Self::read(&self.key)?,
            ))
            .domain_name(domain))
    }
}

#[cfg(feature = "tls")]
impl TlsFiles {
    /// The CA certificates in `ca`, as a root store.
    pub fn roots(&self) -> Result<rustls::RootCertStore, TlsError> {
        pem_roots(&self.ca)
    }

    /// Our certificate chain and its key.
    pub fn identity(
        &self,
    ) -> Result<
        (
            Vec<rustls::pki_types::CertificateDer<'static>>,
            rustls::pki_types::PrivateKeyDer<'static>,
        ),
        TlsError,
    > {
        use rustls::pki_types::pem::PemObject;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| pem_error(&self.key, e))?;
        Ok((pem_certs(&self.cert)?, key))
    }

    /// The client side as plain rustls (what [`refusal`] dials with): the same trust and
    /// identity as [`TlsFiles::client`].
    pub fn rustls_client(&self) -> Result<rustls::ClientConfig, TlsError> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let (chain, key) = self.identity()?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", self.cert.display())))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

#[cfg(feature = "tls")]
fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Invalid(format!("{}: {e}", path.display()))
}

/// The CA certificates in the PEM file `path`, as a root store (ours, or a probe's `ca:`).
#[cfg(feature = "tls")]
pub fn pem_roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = pem_certs(path)?;
    if certs.is_empty() {
        return Err(TlsError::Invalid(format!(
            "{}: holds no PEM certificate",
            path.display()
        )));
    }
    for ca in certs {
        roots
            .add(ca)
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", path.display())))?;
    }
    Ok(roots)
}

#[cfg(feature = "tls")]
fn pem_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))
}

/// Why the server at `url` refuses us, when TLS is why and the failed call could not say.
///
/// With TLS 1.3 the client's handshake is complete before the server has checked the client's
/// certificate; the server's refusal (an alert: expired, unknown CA, bad signature) arrives on
/// the first read, inside hyper, which reports only "transport error" or "operation was
/// canceled". So after such a failure one more handshake is made here, and the first read
/// tells: an alert, or the server's HTTP/2 settings (then TLS was not the reason: `None`).
/// Bounded by a few seconds; nothing is sent after the handshake.
#[cfg(feature = "tls")]
pub async fn refusal(files: &TlsFiles, url: &ServiceUrl) -> Option<String> {
    use tokio::io::AsyncReadExt;
    use tokio::time::timeout;
    let within = std::time::Duration::from_secs(3);
    let config = files.rustls_client().ok()?;
    let name = rustls::pki_types::ServerName::try_from(url.host.clone()).ok()?;
    let port = url.port.unwrap_or(443);
    let mut addrs = timeout(within, tokio::net::lookup_host((url.host.as_str(), port)))
        .await
        .ok()?
        .ok()?;
    let addr = addrs.next()?;
    let tcp = timeout(within, tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let mut tls = match timeout(within, connector.connect(name, tcp)).await.ok()? {
        Ok(tls) => tls,
        Err(e) => return explain(&e),
    };
    let mut first = [0u8; 1];
    match timeout(within, tls.read(&mut first)).await.ok()? {
        Err(e) => explain(&e),
        Ok(_) => None,
    }
}

/// Why a connection failed, in the words an operator acts on, when TLS is why: the first
/// rustls error among `err`'s causes. tonic reports these as "transport error".
#[cfg(feature = "tls")]
pub fn explain(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(err);
    while let Some(e) = cause {
        let tls = e.downcast_ref::<rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let Some(t) = tls {
            return Some(describe(t));
        }
        cause = e.source();
    }
    None
}

#[cfg(feature = "tls")]
fn describe(e: &rustls::Error) -> String {
    use rustls::AlertDescription as Alert;
    match e {
        rustls::Error::AlertReceived(Alert::CertificateExpired) => {
            "the peer refused our certificate: it has expired (issue a new one: `chaosctl certs issue`)".into()
        }
        rustls::Error::AlertReceived(Alert::UnknownCA) => {
            "the peer refused our certificate: it is not signed by the peer's CA".into()
        }
        rustls::Error::AlertReceived(Alert::CertificateRequired) => {
            "the peer requires a client certificate".into()
        }
        // rustls answers a certificate whose signature does not verify with decrypt_error: a
        // certificate from another CA that carries the same CA name, most often.
        rustls::Error::AlertReceived(Alert::DecryptError) => {
            "the peer refused our certificate: it is not signed by the peer's CA (a certificate from another `certs init`?)".into()
        }
        rustls::Error::AlertReceived(Alert::CertificateRevoked) => {
            "the peer refused our certificate: it has been revoked".into()
        }
        rustls::Error::AlertReceived(a) => format!("the peer refused the TLS handshake ({a:?})"),
        rustls::Error::InvalidCertificate(c) => {
            format!("the peer's certificate is refused: {}", certificate_problem(c))
        }
        other => format!("TLS: {other}"),
    }
}

/// What is wrong with a certificate, as an operator would say it.
#[cfg(feature = "tls")]
pub fn certificate_problem(e: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match e {
        C::Expired => "it has expired".into(),
        C::ExpiredContext { time, not_after } => format!(
            "it expired {} s ago",
            time.as_secs().saturating_sub(not_after.as_secs())
        ),
        C::NotValidYet | C::NotValidYetContext { .. } => {
            "it is not valid yet (is this machine's clock right?)".into()
        }
        C::UnknownIssuer => "it is not signed by the CA in ca.pem".into(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "it is not valid for the host name in the URL".into()
        }
        C::BadSignature => {
            "its signature does not verify against the CA in ca.pem (issued by another CA?)".into()
        }
        C::Revoked => "it has been revoked".into(),
        other => format!("{other:?}"),
    }
}

/// A URL as we quote it in an error: enough to recognise, never unbounded input.
fn shown(url: &str) -> String {
    const MAX: usize = 120;
    match url.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}… ({} bytes)", &url[..i], url.len()),
        None => url.to_string(),
    }
}

/// A controller or listen URL, parsed once (the `http` crate's URI parser, the one tonic dials
/// with): the loopback rule, the agent's control-plane exclusion and the dialer all read this
/// host and port, so no two of them can disagree about where a URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUrl {
    /// https (mutual TLS) or http (plaintext).
    pub tls: bool,
    /// Brackets removed from an IPv6 literal.
    pub host: String,
    pub port: Option<u16>,
}

impl ServiceUrl {
    /// Parses `http(s)://host[:port][/path]`. User information (`user@`, `a:b@`) is refused:
    /// nothing we dial takes it, and it makes the host hard to see (`http://127.0.0.1:1@10.0.0.2`
    /// points at 10.0.0.2).
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| format!("`{}` is not a URL ({e})", shown(url)))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(format!(
                    "`{}` must start with https:// (or http:// with --insecure-plaintext)",
                    shown(url)
                ));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("`{}` names no host", shown(url)))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{}` carries user information (before `@`): refused; give only host and port",
                shown(url)
            ));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        if host.is_empty() {
            return Err(format!("`{}` names no host", shown(url)));
        }
        Ok(ServiceUrl {
            tls,
            host,
            port: authority.port_u16(),
        })
    }

    /// Whether nothing sent here leaves this host: a loopback address or `localhost`.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    /// The socket addresses it names, the host resolved; without a port, `default_port`.
    pub fn socket_addrs(&self, default_port: Option<u16>) -> Vec<SocketAddr> {
        match self.port.or(default_port) {
            Some(port) => (self.host.as_str(), port)
                .to_socket_addrs()
                .map(|a| a.collect())
                .unwrap_or_default(),
            None => vec![],
        }
    }
}

/// `url` given to `flag`, parsed, with the transport rule applied: https:// needs TLS files (the
/// caller's), http:// is allowed only with `insecure_plaintext` and only to loopback.
pub fn service_url(
    flag: &str,
    url: &str,
    insecure_plaintext: bool,
) -> Result<ServiceUrl, TlsError> {
    let parsed = ServiceUrl::parse(url).map_err(|e| TlsError::Invalid(format!("{flag}: {e}")))?;
    if !parsed.tls {
        if !insecure_plaintext {
            return Err(TlsError::Invalid(format!(
                "{flag}: `{}` is plaintext; use https:// with --tls-dir, or add --insecure-plaintext (loopback only)",
                shown(url)
            )));
        }
        if !parsed.is_loopback() {
            return Err(TlsError::Invalid(format!(
                "{flag}: plaintext to `{}` is refused: it is allowed only on loopback or a unix socket; use mTLS (--tls-dir, see `chaosctl certs init`)",
                shown(url)
            )));
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_where_nothing_leaves_the_host() {
        for ok in [
            "http://127.0.0.1:7070",
            "http://127.9.9.9:1",
            "http://[::1]:7070",
            "http://localhost:7070",
        ] {
            assert!(service_url("--controller", ok, true).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:7070",
            "http://[fd00::1]:7070",
            "http://ctl.example:7070",
            "http://0.0.0.0:7070",
        ] {
            let e = service_url("--controller", bad, true)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("--controller: plaintext to"), "{e}");
        }
        let e = service_url("--controller", "http://127.0.0.1:1", false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is plaintext"), "{e}");
    }

    /// The host before the first ':' was read as the host: `127.0.0.1:1@10.78.0.2` passed the
    /// loopback rule while everything dialed 10.78.0.2.
    #[test]
    fn user_information_is_refused_in_one_line() {
        for bad in [
            "http://127.0.0.1:1@10.78.0.2:18447",
            "https://user@ctl.example:7070",
            "http://a:b@127.0.0.1:7070",
        ] {
            let e = service_url("--controller", bad, true)
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("--controller: ") && e.contains("user information"),
                "{bad}: {e}"
            );
            assert_eq!(e.lines().count(), 1);
        }
        for bad in ["nonsense", "ftp://x", "unix:///x", "http://"] {
            assert!(ServiceUrl::parse(bad).is_err(), "{bad}");
        }
        let long = format!("http://{}", "a".repeat(100_000));
        let e = ServiceUrl::parse(&format!("{long}@b")).unwrap_err();
        assert!(
            e.len() < 300,
            "an error quotes unbounded input: {} bytes",
            e.len()
        );
    }

    #[test]
    fn host_and_port_are_the_dialers() {
        let p = ServiceUrl::parse("https://ctl.example:7070/x").expect("url");
        assert_eq!(
            (p.host.as_str(), p.port, p.tls),
            ("ctl.example", Some(7070), true)
        );
        let p = ServiceUrl::parse("http://[fd00::1]:1").expect("url");
        assert_eq!((p.host.as_str(), p.port), ("fd00::1", Some(1)));
        let p = ServiceUrl::parse("http://10.0.0.1").expect("url");
        assert_eq!((p.host.as_str(), p.port), ("10.0.0.1", None));
        let one = |u: &str, d| {
            ServiceUrl::parse(u)
                .expect("url")
                .socket_addrs(d)
                .first()
                .map(ToString::to_string)
        };
        assert_eq!(
            one("https://127.0.0.1:7070/x", None).as_deref(),
            Some("127.0.0.1:7070")
        );
        assert_eq!(
            one("https://127.0.0.1", Some(443)).as_deref(),
            Some("127.0.0.1:443")
        );
        assert_eq!(one("https://127.0.0.1", None), None);
    }
}
