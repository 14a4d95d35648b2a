//! The controller's TLS front door: the handshakes before anyone is authenticated.
//!
//! tonic's own acceptor waits for a ClientHello for as long as the client likes, keeps any
//! number of handshakes in flight and says nothing when one fails. Here each handshake has a
//! deadline, the handshakes in flight are capped per source address (so one host cannot lock
//! the others out) and in all, and each refusal is logged once, with its reason and, for a
//! refused certificate, the identity it claimed.
use chaos_agent::tls::{TlsError, TlsFiles};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// How long and how many: the bounds on connections that have not authenticated yet.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub handshake_timeout: Duration,
    /// Handshakes in flight from one source address (an IPv6 /64); more are closed at once.
    pub per_source: usize,
    /// Handshakes in flight in all.
    pub total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            per_source: 64,
            total: 1024,
        }
    }
}

/// The server side of mutual TLS from `files`: our certificate, and a client certificate
/// signed by the CA required of every caller.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki =
        WebPkiClientVerifier::builder_with_provider(Arc::new(files.roots()?), provider.clone())
            .build()
            .map_err(|e| TlsError::Invalid(format!("{}: {e}", files.ca.display())))?;
    let (chain, key) = files.identity()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid(e.to_string()))?
        .with_client_cert_verifier(Arc::new(LoggingVerifier(webpki)))
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Invalid(format!("{}: {e}", files.cert.display())))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The authenticated connections accepted on `listener`, for tonic's
/// `serve_with_incoming_shutdown`. Accepting stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limits: Limits,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let pending = Arc::new(Mutex::new(Pending::default()));
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors, most likely: the connections in flight end
                        // within the timeout and give theirs back.
                        once(format!("accept {e}"), || tracing::warn!("accept: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // Small replies must not wait for delayed ACKs (Nagle): 40 ms per command otherwise.
            let _ = tcp.set_nodelay(true);
            let Some(slot) = Slot::take(&pending, source(peer.ip()), &limits) else {
                once(format!("busy {}", peer.ip()), || {
                    tracing::warn!(
                        peer = %peer.ip(),
                        "closing connections at once: {} TLS handshakes from this address \
                         (or {} in all) are already in flight",
                        limits.per_source,
                        limits.total
                    )
                });
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let done = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
                let result = done.await;
                drop(slot);
                match result {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => refused(peer.ip(), &e),
                    Err(_) => once(format!("timeout {}", peer.ip()), || {
                        tracing::warn!(
                            peer = %peer.ip(),
                            "closed a connection that did not complete its TLS handshake within {:?}",
                            limits.handshake_timeout
                        )
                    }),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Logs a failed handshake, once per source address and reason. A refused certificate was
/// logged with its identity by [`LoggingVerifier`].
fn refused(peer: IpAddr, e: &std::io::Error) {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let why = match tls {
        Some(rustls::Error::InvalidCertificate(_)) => return,
        Some(rustls::Error::NoCertificatesPresented) => "it sent no client certificate".into(),
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("the client refused the controller's certificate ({alert:?})")
        }
        Some(rustls::Error::InvalidMessage(_)) => {
            "it does not speak TLS (a plaintext client? the URL must be https://)".into()
        }
        Some(other) => other.to_string(),
        None => format!("the connection ended during the handshake ({e})"),
    };
    once(
        format!("refused {peer} {why}"),
        || tracing::warn!(peer = %peer, "refused a TLS connection: {why}"),
    );
}

/// The unit a source is counted in: its address, or for IPv6 its /64 (one host's share).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Handshakes in flight, by source (see [`source`]).
#[derive(Default)]
struct Pending {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// One handshake's place in [`Pending`], given back when it is dropped.
struct Slot {
    pending: Arc<Mutex<Pending>>,
    source: IpAddr,
}

impl Slot {
    fn take(pending: &Arc<Mutex<Pending>>, source: IpAddr, limits: &Limits) -> Option<Slot> {
        let mut p = pending.lock().unwrap_or_else(PoisonError::into_inner);
        let from_source = p.by_source.get(&source).copied().unwrap_or(0);
        if p.total >= limits.total || from_source >= limits.per_source {
            return None;
        }
        p.total += 1;
        p.by_source.insert(source, from_source + 1);
        Some(Slot {
            pending: pending.clone(),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut p = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        p.total = p.total.saturating_sub(1);
        if let Some(n) = p.by_source.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                p.by_source.remove(&self.source);
            }
        }
    }
}

/// Runs `log` the first time `key` is seen: an agent retrying with a bad certificate every few
/// seconds is one line, not a flood. The memory of keys is bounded; when full it starts over.
pub fn once(key: String, log: impl FnOnce()) {
    const KEYS: usize = 4096;
    static SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(PoisonError::into_inner);
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.len() >= KEYS {
        seen.clear();
    }
    if seen.insert(key) {
        log();
    }
}

/// The CA's verdict on a client certificate, with each refusal logged under the identity the
/// certificate claims (its role and name), so an operator sees which agent or user is locked
/// out and why.
#[derive(Debug)]
struct LoggingVerifier(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for LoggingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                let who = match crate::certs::peer_identity(end_entity.as_ref()) {
                    Some((role, name)) => format!("{name} (role {role})"),
                    None => "without a role".into(),
                };
                let why = match e {
                    rustls::Error::InvalidCertificate(c) => {
                        chaos_agent::tls::certificate_problem(c)
                    }
                    other => other.to_string(),
                };
                once(format!("cert {who} {why}"), || {
                    tracing::warn!("refused the client certificate {who}: {why}")
                });
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
