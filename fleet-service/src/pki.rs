//! The development PKI: on first run, a server CA and a server certificate for `localhost`,
//! `127.0.0.1` and any further names given (`--server-name`) are generated into
//! `<data-dir>/pki/`. Later runs load them; a missing or soon-expiring server certificate, or
//! one for other names, is re-issued from the stored CA, so clients that trust
//! `server-ca.pem` keep working.

use std::path::{Path, PathBuf};

use anyhow::Context;
use broker::ServerIdentity;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Paths of the dev PKI files.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl DevPki {
    pub fn in_dir(data_dir: &Path) -> Self {
        let dir = data_dir.join("pki");
        Self {
            ca_cert: dir.join("server-ca.pem"),
            ca_key: dir.join("server-ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            dir,
        }
    }

    /// Creates whatever is missing and returns the server identity, whose certificate names
    /// localhost, 127.0.0.1 and `extra_names` (host names or IP addresses).
    pub fn ensure(&self, extra_names: &[String]) -> anyhow::Result<ServerIdentity> {
        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        names.extend(extra_names.iter().cloned());
        let names = canonical(names);
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        if !self.ca_cert.exists() || !self.ca_key.exists() {
            let (cert, key) = new_ca("Fleet Dev Server CA")?;
            write(&self.ca_cert, &cert, false)?;
            write(&self.ca_key, &key, true)?;
            let _ = std::fs::remove_file(&self.server_cert);
            tracing::info!(path = %self.ca_cert.display(), "generated the dev server CA");
        }
        if !self.server_cert.exists() || !self.server_key.exists() || self.server_stale(&names)? {
            let ca_pem = read(&self.ca_cert)?;
            let ca_key = KeyPair::from_pem(&read(&self.ca_key)?).context("server CA key")?;
            let (cert, key) = new_server_cert(&ca_pem, &ca_key, &names)?;
            write(&self.server_cert, &cert, false)?;
            write(&self.server_key, &key, true)?;
            tracing::info!(path = %self.server_cert.display(), names = ?names,
                "issued the dev server certificate");
        }
        load_identity(&self.server_cert, &self.server_key)
    }

    /// The server certificate expires within 30 days, or names other hosts than `names`.
    fn server_stale(&self, names: &[String]) -> anyhow::Result<bool> {
        let pem = read(&self.server_cert)?;
        let der = first_cert(&pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.server_cert.display()))?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if cert.validity().not_after.timestamp() - now < 30 * 24 * 3600 {
            return Ok(true);
        }
        Ok(canonical(subject_alt_names(&cert)) != names)
    }
}

/// The DNS names and IP addresses a certificate names, as text.
fn subject_alt_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some(dns.to_string()),
            GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => Some(std::net::IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?).to_string()),
                16 => Some(std::net::IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Names lowercased, IP addresses in their canonical form, sorted, without repeats.
fn canonical(names: Vec<String>) -> Vec<String> {
    let mut names: Vec<String> = names
        .into_iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => ip.to_string(),
            Err(_) => n.to_ascii_lowercase(),
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

fn new_ca(cn: &str) -> anyhow::Result<(String, String)> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(3650);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn new_server_cert(
    ca_pem: &str,
    ca_key: &KeyPair,
    names: &[String],
) -> anyhow::Result<(String, String)> {
    let ca_params = CertificateParams::from_ca_cert_pem(ca_pem).context("server CA certificate")?;
    let ca = ca_params.self_signed(ca_key)?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "fleet-service");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(397);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca, ca_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Loads a PEM certificate chain and private key.
pub fn load_identity(cert: &Path, key: &Path) -> anyhow::Result<ServerIdentity> {
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut read(cert)?.as_bytes())
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut read(key)?.as_bytes())
        .with_context(|| format!("parsing {}", key.display()))?
        .with_context(|| format!("{} holds no private key", key.display()))?;
    Ok(ServerIdentity {
        cert_chain: chain,
        key,
    })
}

fn first_cert(pem: &str) -> anyhow::Result<Vec<u8>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .context("no certificate in PEM")?
        .map(|c| c.as_ref().to_vec())
        .context("bad PEM")
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn write(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::in_dir(dir.path());
        let first = pki.ensure(&[]).unwrap();
        let ca_before = std::fs::read(&pki.ca_cert).unwrap();
        let second = pki.ensure(&[]).unwrap();
        assert_eq!(
            first.cert_chain, second.cert_chain,
            "server cert re-issued needlessly"
        );
        assert_eq!(ca_before, std::fs::read(&pki.ca_cert).unwrap());

        // The server certificate chains to the CA and names localhost and 127.0.0.1.
        let ca_der = first_cert(&read(&pki.ca_cert).unwrap()).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let (_, server) = x509_parser::parse_x509_certificate(&first.cert_chain[0]).unwrap();
        server.verify_signature(Some(ca.public_key())).unwrap();
        use x509_parser::extensions::GeneralName;
        let san = server.subject_alternative_name().unwrap().unwrap();
        let names = &san.value.general_names;
        assert!(
            names.contains(&GeneralName::DNSName("localhost")),
            "{names:?}"
        );
        assert!(
            names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])),
            "{names:?}"
        );
    }

    #[test]
    fn missing_server_cert_is_reissued_from_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::in_dir(dir.path());
        pki.ensure(&[]).unwrap();
        let ca_before = std::fs::read(&pki.ca_cert).unwrap();
        std::fs::remove_file(&pki.server_cert).unwrap();
        pki.ensure(&[]).unwrap();
        assert_eq!(ca_before, std::fs::read(&pki.ca_cert).unwrap());
    }

    #[test]
    fn further_names_reissue_the_server_cert_from_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::in_dir(dir.path());
        let plain = pki.ensure(&[]).unwrap();
        let ca_before = std::fs::read(&pki.ca_cert).unwrap();
        let wanted = ["fleet.example.com".to_string(), "192.168.1.20".to_string()];
        let named = pki.ensure(&wanted).unwrap();
        assert_ne!(plain.cert_chain, named.cert_chain, "not re-issued");
        assert_eq!(ca_before, std::fs::read(&pki.ca_cert).unwrap());
        let (_, server) = x509_parser::parse_x509_certificate(&named.cert_chain[0]).unwrap();
        assert_eq!(
            canonical(subject_alt_names(&server)),
            [
                "127.0.0.1",
                "192.168.1.20",
                "fleet.example.com",
                "localhost"
            ]
        );
        // The same names in another order and case: kept.
        let again = pki
            .ensure(&["192.168.1.20".to_string(), "Fleet.Example.COM".to_string()])
            .unwrap();
        assert_eq!(named.cert_chain, again.cert_chain, "re-issued needlessly");
        // Without them again: back to localhost and 127.0.0.1 only.
        let back = pki.ensure(&[]).unwrap();
        let (_, server) = x509_parser::parse_x509_certificate(&back.cert_chain[0]).unwrap();
        assert_eq!(
            canonical(subject_alt_names(&server)),
            ["127.0.0.1", "localhost"]
        );
    }
}
