//! Transport security shared by the controller, agents and chaosctl: mutual TLS from a
//! certificate directory (`chaosctl certs init` writes one), and the one rule for plaintext.
//!
//! Plaintext exists for development and tests on one machine, so it is accepted only when asked
//! for explicitly *and* the address cannot leave the host (loopback or a unix socket): an agent
//! that takes commands from the network without authentication would be a remote root shell.
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
#[cfg(feature = "tls")]
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

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

    /// Server side: present our certificate, require a client certificate from the CA.
    #[cfg(feature = "tls")]
    pub fn server(&self) -> Result<ServerTlsConfig, TlsError> {
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(
                Self::read(&self.cert)?,
                Self::read(&self.key)?,
            ))
            .client_ca_root(Certificate::from_pem(Self::read(&self.ca)?)))
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

/// The host part of `http://host:port` / `https://host:port`, brackets removed.
pub fn url_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next();
    }
    authority.split(':').next()
}

/// The socket addresses `scheme://host[:port]/...` names, the host resolved. Without a port,
/// `default_port`; with neither, none.
pub fn url_socket_addrs(url: &str, default_port: Option<u16>) -> Vec<SocketAddr> {
    let Some(host) = url_host(url) else {
        return vec![];
    };
    let authority = url
        .split_once("://")
        .map_or("", |(_, rest)| rest.split('/').next().unwrap_or(""));
    let port = authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .or(default_port);
    match port {
        Some(port) => (host, port)
            .to_socket_addrs()
            .map(|a| a.collect())
            .unwrap_or_default(),
        None => vec![],
    }
}

/// Whether `url` cannot leave this host: a unix socket, or a loopback address or `localhost`.
pub fn is_local(url: &str) -> bool {
    if url.starts_with("unix://") {
        return true;
    }
    match url_host(url) {
        Some("localhost") => true,
        Some(h) => h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// `flag` names the option that carries `url` in the error line.
pub fn check_plaintext(flag: &str, url: &str) -> Result<(), TlsError> {
    if is_local(url) {
        Ok(())
    } else {
        Err(TlsError::Invalid(format!(
            "{flag}: plaintext to `{url}` is refused: it is allowed only on loopback or a unix socket; use mTLS (--tls-dir, see `chaosctl certs init`)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_only_where_nothing_leaves_the_host() {
        for ok in [
            "unix:///run/chaos/controller.sock",
            "http://127.0.0.1:7070",
            "http://127.9.9.9:1",
            "http://[::1]:7070",
            "http://localhost:7070",
        ] {
            assert!(check_plaintext("--controller", ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:7070",
            "http://[fd00::1]:7070",
            "http://ctl.example:7070",
            "http://0.0.0.0:7070",
            "nonsense",
        ] {
            let e = check_plaintext("--controller", bad)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("--controller: plaintext to"), "{e}");
        }
    }

    #[test]
    fn url_host_handles_ports_paths_and_brackets() {
        assert_eq!(url_host("https://ctl.example:7070/x"), Some("ctl.example"));
        assert_eq!(url_host("http://[fd00::1]:1"), Some("fd00::1"));
        assert_eq!(url_host("http://10.0.0.1"), Some("10.0.0.1"));
        assert_eq!(url_host("ftp://x"), None);
    }

    #[test]
    fn url_socket_addrs_take_the_port_or_the_default() {
        let one = |u: &str, d| url_socket_addrs(u, d).first().map(ToString::to_string);
        assert_eq!(
            one("https://127.0.0.1:7070/x", None).as_deref(),
            Some("127.0.0.1:7070")
        );
        assert_eq!(
            one("https://[::1]:7070", None).as_deref(),
            Some("[::1]:7070")
        );
        assert_eq!(
            one("https://[::1]", Some(443)).as_deref(),
            Some("[::1]:443")
        );
        assert_eq!(
            one("https://0.0.0.0:7070", None).as_deref(),
            Some("0.0.0.0:7070")
        );
        assert_eq!(one("https://10.0.0.1", None), None);
    }
}
