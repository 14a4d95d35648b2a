//! A small PKI for a standalone fleet: one CA, a server certificate for the controller, client
//! certificates for agents and for people (chaosctl). `chaosctl certs init` writes them; the
//! controller's TLS setup reads them.
//!
//! The role travels in the certificate (organizational unit `chaos-agent` or `chaos-user`) and
//! the name in its common name, so the controller can refuse an agent certificate on the
//! chaosctl API, refuse a user certificate on the agent stream, check that an agent announces
//! the node name its certificate was issued to, and write who did what to the audit log.
use rcgen::{
    BasicConstraints, CertificateParams, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// Organizational unit of agent certificates.
pub const ROLE_AGENT: &str = "chaos-agent";
/// Organizational unit of people's (chaosctl) certificates.
pub const ROLE_USER: &str = "chaos-user";

const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 825;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Rcgen { what: String, source: rcgen::Error },
    #[error("{0}")]
    Invalid(String),
}

fn rc(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertError {
    let what = what.into();
    move |source| CertError::Rcgen { what, source }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `certs init` writes, by path.
#[derive(Debug, Default)]
pub struct Written {
    pub files: Vec<PathBuf>,
}

/// File names inside a certificate directory, so the controller, agents and chaosctl agree.
pub fn ca_cert(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}
pub fn cert_path(dir: &Path, role: &str, name: &str) -> PathBuf {
    dir.join(format!("{}-{name}.pem", role_prefix(role)))
}
pub fn key_path(dir: &Path, role: &str, name: &str) -> PathBuf {
    dir.join(format!("{}-{name}-key.pem", role_prefix(role)))
}
/// The controller's server certificate and key.
pub fn controller_cert(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("controller.pem"), dir.join("controller-key.pem"))
}

fn role_prefix(role: &str) -> &str {
    if role == ROLE_AGENT { "agent" } else { "user" }
}

/// Names in certificates become file names and node names: keep them to what DNS and file
/// systems both accept.
pub fn check_name(field: &str, name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(CertError::Invalid(format!(
            "{field}: `{name}` must be 1-63 characters of letters, digits, '-', '_' or '.'"
        )))
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for clocks that disagree a little (Raspberry Pis without an RTC).
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

/// Creates a CA and, signed by it, the controller's server certificate (valid for
/// `controller_names`: host names and IP addresses) and one client certificate per agent and
/// per user. Refuses to overwrite an existing CA: re-keying a fleet is a decision, not a side
/// effect.
pub fn init(
    dir: &Path,
    controller_names: &[String],
    agents: &[String],
    users: &[String],
) -> Result<Written, CertError> {
    for n in agents {
        check_name("--node", n)?;
    }
    for n in users {
        check_name("--user", n)?;
    }
    if ca_cert(dir).exists() {
        return Err(CertError::Invalid(format!(
            "--dir: {} already holds a CA (ca.pem); use another directory or `certs issue`",
            dir.display()
        )));
    }
    fs::create_dir_all(dir).map_err(io(dir))?;
    let mut written = Written::default();

    let ca_key = KeyPair::generate().map_err(rc("generate the CA key"))?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "chaos fleet CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca, CA_DAYS);
    let ca_cert_der = ca.self_signed(&ca_key).map_err(rc("sign the CA"))?;
    write(dir, "ca.pem", &ca_cert_der.pem(), false, &mut written)?;
    write(
        dir,
        "ca-key.pem",
        &ca_key.serialize_pem(),
        true,
        &mut written,
    )?;
    let issuer = Issuer::new(ca, ca_key);

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    for n in controller_names {
        if !names.contains(n) {
            names.push(n.clone());
        }
    }
    let (pem, key) = leaf(&issuer, "chaos-controller", None, names, true)?;
    write(dir, "controller.pem", &pem, false, &mut written)?;
    write(dir, "controller-key.pem", &key, true, &mut written)?;

    for (role, list) in [(ROLE_AGENT, agents), (ROLE_USER, users)] {
        for name in list {
            issue_into(dir, &issuer, role, name, &mut written)?;
        }
    }
    Ok(written)
}

/// Issues one more client certificate with the CA in `dir` (its key must be there).
pub fn issue(dir: &Path, role: &str, name: &str) -> Result<Written, CertError> {
    check_name(
        if role == ROLE_AGENT {
            "--node"
        } else {
            "--user"
        },
        name,
    )?;
    let ca_pem = fs::read_to_string(ca_cert(dir)).map_err(io(&ca_cert(dir)))?;
    let key_file = dir.join("ca-key.pem");
    let key_pem = fs::read_to_string(&key_file).map_err(io(&key_file))?;
    let key = KeyPair::from_pem(&key_pem).map_err(rc("read ca-key.pem"))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(rc("read ca.pem"))?;
    let mut written = Written::default();
    issue_into(dir, &issuer, role, name, &mut written)?;
    Ok(written)
}

fn issue_into(
    dir: &Path,
    issuer: &Issuer<'_, KeyPair>,
    role: &str,
    name: &str,
    written: &mut Written,
) -> Result<(), CertError> {
    let (pem, key) = leaf(issuer, name, Some(role), vec![], false)?;
    let prefix = role_prefix(role);
    write(dir, &format!("{prefix}-{name}.pem"), &pem, false, written)?;
    write(
        dir,
        &format!("{prefix}-{name}-key.pem"),
        &key,
        true,
        written,
    )?;
    Ok(())
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    role: Option<&str>,
    sans: Vec<String>,
    server: bool,
) -> Result<(String, String), CertError> {
    let mut params = CertificateParams::new(sans).map_err(rc("certificate names"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, DnValue::Utf8String(common_name.into()));
    if let Some(role) = role {
        params
            .distinguished_name
            .push(DnType::OrganizationalUnitName, role);
    }
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, LEAF_DAYS);
    let key = KeyPair::generate().map_err(rc("generate a key"))?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(rc(format!("sign the certificate for {common_name}")))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write(
    dir: &Path,
    name: &str,
    contents: &str,
    secret: bool,
    written: &mut Written,
) -> Result<(), CertError> {
    let path = dir.join(name);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&path)
        .map_err(io(&path))?;
    f.write_all(contents.as_bytes()).map_err(io(&path))?;
    written.files.push(path);
    Ok(())
}

/// The (role, name) of a peer's leaf certificate: its organizational unit and common name.
pub fn peer_identity(der: &[u8]) -> Option<(String, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or_default()
        .to_string();
    Some((ou, cn))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        std::env::temp_dir().join(format!(
            "chaos-certs-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ))
    }

    #[test]
    fn init_writes_a_ca_a_server_and_clients_with_roles() {
        let dir = tmp();
        let w = init(
            &dir,
            &["ctl.example".into()],
            &["pi-1".into()],
            &["alice".into()],
        )
        .unwrap();
        assert_eq!(w.files.len(), 8);
        let agent = fs::read_to_string(cert_path(&dir, ROLE_AGENT, "pi-1")).unwrap();
        let der = pem_der(&agent);
        assert_eq!(
            peer_identity(&der),
            Some((ROLE_AGENT.to_string(), "pi-1".to_string()))
        );
        let user = fs::read_to_string(cert_path(&dir, ROLE_USER, "alice")).unwrap();
        assert_eq!(
            peer_identity(&pem_der(&user)),
            Some((ROLE_USER.to_string(), "alice".to_string()))
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(key_path(&dir, ROLE_AGENT, "pi-1"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second init must not replace the CA.
        let again = init(&dir, &[], &[], &[]).unwrap_err().to_string();
        assert!(again.contains("already holds a CA"), "{again}");
        // More agents later, with the same CA.
        issue(&dir, ROLE_AGENT, "pi-2").unwrap();
        assert!(cert_path(&dir, ROLE_AGENT, "pi-2").exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_that_are_not_file_or_dns_safe_are_refused() {
        let e = init(&tmp(), &[], &["../x".into()], &[])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--node: `../x` must be 1-63 characters of letters, digits, '-', '_' or '.'"
        );
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64_decode(&body)
    }

    fn base64_decode(s: &str) -> Vec<u8> {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u32, 0);
        for c in s.bytes().filter(|&c| c != b'=') {
            let v = T.iter().position(|&t| t == c).unwrap() as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        out
    }
}
