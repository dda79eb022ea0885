//! Full mutual-TLS 1.3 handshakes, in memory, one thread, per crypto provider.
//!
//! Usage: cargo run --release --manifest-path bench/tls-providers/Cargo.toml [-- HANDSHAKES]
//!
//! Server: P-256 certificate; client: P-256 device certificate verified against a CA with
//! rustls' WebPkiClientVerifier, as the broker does. No session resumption (the broker has it
//! off), so each handshake is a full one: ECDHE, server signature, client signature, two
//! chain verifications.

use std::sync::Arc;
use std::time::Instant;

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

struct Pki {
    ca: CertificateDer<'static>,
    server: (CertificateDer<'static>, Vec<u8>),
    client: (CertificateDer<'static>, Vec<u8>),
}

fn pki() -> Pki {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issue = |sans: Vec<String>, cn: &str, eku| {
        let mut p = CertificateParams::new(sans).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![eku];
        let k = KeyPair::generate().unwrap();
        let c = p.signed_by(&k, &ca_cert, &ca_key).unwrap();
        (c.der().clone(), k.serialize_der())
    };
    Pki {
        ca: ca_cert.der().clone(),
        server: issue(vec!["localhost".into()], "server", ExtendedKeyUsagePurpose::ServerAuth),
        client: issue(vec![], "device-1", ExtendedKeyUsagePurpose::ClientAuth),
    }
}

fn configs(provider: Arc<CryptoProvider>, pki: &Pki) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.clone()).unwrap();
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .unwrap();
    let key = |der: &Vec<u8>| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(der.clone()));
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![pki.server.0.clone()], key(&pki.server.1))
        .unwrap();
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![pki.client.0.clone()], key(&pki.client.1))
        .unwrap();
    (Arc::new(server), Arc::new(client))
}

fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) {
    let name = ServerName::try_from("localhost").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut buf = Vec::with_capacity(8192);
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets().unwrap();
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets().unwrap();
        }
    }
}

fn main() {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let pki = pki();
    println!("{:<10} {:>10} {:>14} {:>12}", "provider", "handshakes", "handshakes/s", "us/handshake");
    for (name, provider) in [
        ("ring", rustls::crypto::ring::default_provider()),
        ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider()),
    ] {
        let (server, client) = configs(Arc::new(provider), &pki);
        for _ in 0..50 {
            handshake(&server, &client);
        }
        let start = Instant::now();
        for _ in 0..n {
            handshake(&server, &client);
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{:<10} {:>10} {:>14.0} {:>12.0}",
            name,
            n,
            n as f64 / secs,
            secs * 1e6 / n as f64
        );
    }
    println!("(both sides of each handshake run on this one thread: server + client work)");
}
