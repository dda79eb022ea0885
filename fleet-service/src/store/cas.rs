//! Manufacturing CA certificates: the rows, and the checks a PEM passes before it becomes one.

use std::collections::BTreeMap;

use broker::registry::{CaRecord, JitpSettings};
use fleet_wire::CohortId;
use x509_parser::extensions::ParsedExtension;

use super::{
    constraint, new_id, now_ms, tags_from_json, tags_to_json, Deletion, Dependent, Store,
    StoreError,
};

/// A CA certificate that passed [`parse_ca_pem`].
#[derive(Debug, Clone)]
pub struct ParsedCa {
    pub der: Vec<u8>,
    /// The certificate re-encoded as one canonical PEM block (no surrounding text).
    pub pem: String,
    /// Lower-case hex SHA-256 of the DER.
    pub fingerprint_sha256: String,
    pub subject: String,
    /// Raw DER of the subject name, compared with a device certificate's issuer.
    pub subject_der: Vec<u8>,
    /// The subject key identifier extension, when present.
    pub key_id: Option<Vec<u8>>,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// Why a PEM document is not an acceptable CA certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaPemError {
    #[error("not a PEM document: {0}")]
    NotPem(String),
    #[error("expected exactly one certificate, found {0} PEM blocks")]
    NotOneBlock(usize),
    #[error("the PEM block is not a certificate")]
    NotACertificate,
    #[error("the certificate does not parse: {0}")]
    Unparsable(String),
    #[error("the certificate is not a CA (basicConstraints CA=true is required)")]
    NotCa,
}

/// Checks that `pem` holds exactly one X.509 certificate, and that it is a CA
/// (basicConstraints with CA=true), and extracts what the broker and the API need from it.
pub fn parse_ca_pem(pem: &str) -> Result<ParsedCa, CaPemError> {
    let items = rustls_pemfile::read_all(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaPemError::NotPem(e.to_string()))?;
    if items.len() != 1 {
        return Err(CaPemError::NotOneBlock(items.len()));
    }
    let der = match items.into_iter().next() {
        Some(rustls_pemfile::Item::X509Certificate(der)) => der.to_vec(),
        _ => return Err(CaPemError::NotACertificate),
    };
    parse_ca_der(der)
}

/// Why a proof-of-possession certificate is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("the verification certificate is not one PEM certificate")]
    NotACertificate,
    #[error(
        "the verification certificate's subject must have exactly one CN: the verification code"
    )]
    NoCommonName,
    #[error("the verification certificate is not signed by the CA's key")]
    BadSignature,
    #[error("the verification certificate is outside its validity period")]
    NotValidNow,
}

/// Checks that `verification_pem` is a currently valid certificate signed by `ca`'s key, and
/// returns its subject CN (the verification code it claims).
pub fn verify_possession(ca: &ParsedCa, verification_pem: &str) -> Result<String, ProofError> {
    let items = rustls_pemfile::read_all(&mut verification_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| ProofError::NotACertificate)?;
    let der = match items.as_slice() {
        [rustls_pemfile::Item::X509Certificate(der)] => der.to_vec(),
        _ => return Err(ProofError::NotACertificate),
    };
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|_| ProofError::NotACertificate)?;
    let (_, ca_cert) =
        x509_parser::parse_x509_certificate(&ca.der).map_err(|_| ProofError::BadSignature)?;
    cert.verify_signature(Some(ca_cert.public_key()))
        .map_err(|_| ProofError::BadSignature)?;
    if !cert.validity().is_valid() {
        return Err(ProofError::NotValidNow);
    }
    let mut names = cert.subject().iter_common_name();
    match (names.next(), names.next()) {
        (Some(cn), None) => cn
            .as_str()
            .map(str::to_owned)
            .map_err(|_| ProofError::NoCommonName),
        _ => Err(ProofError::NoCommonName),
    }
}

fn parse_ca_der(der: Vec<u8>) -> Result<ParsedCa, CaPemError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| CaPemError::Unparsable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaPemError::Unparsable(
            "trailing bytes after the certificate".into(),
        ));
    }
    let is_ca = cert
        .basic_constraints()
        .map_err(|e| CaPemError::Unparsable(e.to_string()))?
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(CaPemError::NotCa);
    }
    let key_id = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        });
    let validity = cert.validity();
    let parsed = ParsedCa {
        pem: der_to_pem(&der),
        fingerprint_sha256: broker::registry::fingerprint(&der),
        subject: cert.subject().to_string(),
        subject_der: cert.subject().as_raw().to_vec(),
        key_id,
        not_before_ms: validity.not_before.timestamp().saturating_mul(1000),
        not_after_ms: validity.not_after.timestamp().saturating_mul(1000),
        der: Vec::new(),
    };
    Ok(ParsedCa { der, ..parsed })
}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    pem.push_str("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        // Base64 output is ASCII, so every chunk is valid UTF-8.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// A registered CA as stored.
#[derive(Debug, Clone)]
pub struct CaCertificate {
    pub id: String,
    pub org_id: String,
    pub fingerprint_sha256: String,
    pub certificate_pem: String,
    pub subject: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    pub description: Option<String>,
    pub enabled: bool,
    pub keep_devices_when_disabled: bool,
    pub jitp: Option<JitpSettings>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl CaCertificate {
    /// What the broker's registry needs to trust this CA.
    pub fn to_record(&self) -> Result<CaRecord, StoreError> {
        let parsed = parse_ca_pem(&self.certificate_pem)
            .map_err(|e| StoreError::Corrupt(format!("CA {}: {e}", self.id)))?;
        Ok(CaRecord {
            id: self.id.clone(),
            org_id: self.org_id.clone(),
            cert_der: parsed.der,
            subject_der: parsed.subject_der,
            key_id: parsed.key_id,
            enabled: self.enabled,
            keep_devices_when_disabled: self.keep_devices_when_disabled,
            jitp: self.jitp.clone(),
            not_after_ms: self.not_after_ms,
        })
    }
}

/// A CA to register.
#[derive(Debug, Clone)]
pub struct NewCa {
    pub org_id: String,
    pub cert: ParsedCa,
    pub description: Option<String>,
    pub enabled: bool,
    pub keep_devices_when_disabled: bool,
    pub jitp: Option<JitpSettings>,
}

/// A partial update; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct CaUpdate {
    pub enabled: Option<bool>,
    pub keep_devices_when_disabled: Option<bool>,
    pub description: Option<Option<String>>,
    pub jitp: Option<Option<JitpSettings>>,
}

#[derive(sqlx::FromRow)]
struct CaRow {
    id: String,
    org_id: String,
    fingerprint_sha256: String,
    certificate_pem: String,
    subject: String,
    not_before: i64,
    not_after: i64,
    description: Option<String>,
    enabled: bool,
    keep_devices_when_disabled: bool,
    jitp_product_id: Option<String>,
    jitp_cohort_id: Option<String>,
    jitp_tags: Option<String>,
    created_at: i64,
    updated_at: i64,
}

const CA_COLUMNS: &str =
    "id, org_id, fingerprint_sha256, certificate_pem, subject, not_before, not_after, \
    description, enabled, keep_devices_when_disabled, jitp_product_id, jitp_cohort_id, jitp_tags, \
    created_at, updated_at";

impl TryFrom<CaRow> for CaCertificate {
    type Error = StoreError;

    fn try_from(r: CaRow) -> Result<Self, StoreError> {
        let jitp = match (r.jitp_product_id, r.jitp_cohort_id) {
            (Some(product_id), Some(cohort_id)) => Some(JitpSettings {
                product_id,
                cohort_id: CohortId::parse(&cohort_id)
                    .map_err(|e| StoreError::Corrupt(format!("CA {} cohort id: {e}", r.id)))?,
                tags: match r.jitp_tags {
                    Some(t) => tags_from_json(&t)?,
                    None => BTreeMap::new(),
                },
            }),
            _ => None,
        };
        Ok(CaCertificate {
            id: r.id,
            org_id: r.org_id,
            fingerprint_sha256: r.fingerprint_sha256,
            certificate_pem: r.certificate_pem,
            subject: r.subject,
            not_before_ms: r.not_before,
            not_after_ms: r.not_after,
            description: r.description,
            enabled: r.enabled,
            keep_devices_when_disabled: r.keep_devices_when_disabled,
            jitp,
            created_at_ms: r.created_at,
            updated_at_ms: r.updated_at,
        })
    }
}

fn jitp_columns(jitp: &Option<JitpSettings>) -> (Option<String>, Option<String>, Option<String>) {
    match jitp {
        Some(j) => (
            Some(j.product_id.clone()),
            Some(j.cohort_id.to_string()),
            Some(tags_to_json(&j.tags)),
        ),
        None => (None, None, None),
    }
}

const JITP_MISSING: &str = "the just-in-time provisioning cohort in that product";

impl Store {
    /// Fails with [`StoreError::Conflict`] when a CA with the same fingerprint exists, and with
    /// [`StoreError::MissingReference`] when the provisioning product or cohort does not exist
    /// or the cohort belongs to another product.
    pub async fn create_ca(&self, new: NewCa) -> Result<CaCertificate, StoreError> {
        let now = now_ms();
        let ca = CaCertificate {
            id: new_id(),
            org_id: new.org_id,
            fingerprint_sha256: new.cert.fingerprint_sha256,
            certificate_pem: new.cert.pem,
            subject: new.cert.subject,
            not_before_ms: new.cert.not_before_ms,
            not_after_ms: new.cert.not_after_ms,
            description: new.description,
            enabled: new.enabled,
            keep_devices_when_disabled: new.keep_devices_when_disabled,
            jitp: new.jitp,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let (jitp_product, jitp_cohort, jitp_tags) = jitp_columns(&ca.jitp);
        with_pool!(self, |pool| {
            sqlx::query(
                "INSERT INTO ca_certificates (id, fingerprint_sha256, certificate_pem, subject, \
                 not_before, not_after, description, enabled, jitp_product_id, jitp_cohort_id, \
                 jitp_tags, created_at, updated_at, org_id, keep_devices_when_disabled) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            )
            .bind(&ca.id)
            .bind(&ca.fingerprint_sha256)
            .bind(&ca.certificate_pem)
            .bind(&ca.subject)
            .bind(ca.not_before_ms)
            .bind(ca.not_after_ms)
            .bind(&ca.description)
            .bind(ca.enabled)
            .bind(&jitp_product)
            .bind(&jitp_cohort)
            .bind(&jitp_tags)
            .bind(ca.created_at_ms)
            .bind(ca.updated_at_ms)
            .bind(&ca.org_id)
            .bind(ca.keep_devices_when_disabled)
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
        })
        .map_err(|e| constraint(e, "a CA certificate with this fingerprint", JITP_MISSING))?;
        Ok(ca)
    }

    pub async fn ca(&self, id: &str) -> Result<Option<CaCertificate>, StoreError> {
        let row: Option<CaRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "SELECT {CA_COLUMNS} FROM ca_certificates WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await
        })?;
        row.map(CaCertificate::try_from).transpose()
    }

    /// One page of the CAs of one organization, or of all (`None`), by id; only those that
    /// expire before `expires_before_ms` when it is given.
    pub async fn cas(
        &self,
        org_id: Option<&str>,
        expires_before_ms: Option<i64>,
        page: &super::PageRequest,
    ) -> Result<Vec<CaCertificate>, StoreError> {
        let rows: Vec<CaRow> = with_pool!(self, |pool| {
            sqlx::query_as(&format!(
                "SELECT {CA_COLUMNS} FROM ca_certificates \
                 WHERE ($1 IS NULL OR org_id = $1) AND ($2 IS NULL OR id > $2) \
                 AND ($4 IS NULL OR not_after < $4) ORDER BY id LIMIT $3"
            ))
            .bind(org_id)
            .bind(page.after.as_deref())
            .bind(page.fetch())
            .bind(expires_before_ms)
            .fetch_all(pool)
            .await
        })?;
        rows.into_iter().map(CaCertificate::try_from).collect()
    }

    /// Applies `update` and returns the CA as stored afterwards; `None` when no such CA exists.
    pub async fn update_ca(
        &self,
        id: &str,
        update: &CaUpdate,
    ) -> Result<Option<CaCertificate>, StoreError> {
        let affected = with_pool!(self, |pool| {
            let mut q = sqlx::QueryBuilder::new("UPDATE ca_certificates SET updated_at = ");
            q.push_bind(now_ms());
            if let Some(enabled) = update.enabled {
                q.push(", enabled = ").push_bind(enabled);
            }
            if let Some(keep) = update.keep_devices_when_disabled {
                q.push(", keep_devices_when_disabled = ").push_bind(keep);
            }
            if let Some(description) = &update.description {
                q.push(", description = ").push_bind(description.clone());
            }
            if let Some(jitp) = &update.jitp {
                let (product, cohort, tags) = jitp_columns(jitp);
                q.push(", jitp_product_id = ").push_bind(product);
                q.push(", jitp_cohort_id = ").push_bind(cohort);
                q.push(", jitp_tags = ").push_bind(tags);
            }
            q.push(" WHERE id = ").push_bind(id.to_owned());
            q.build()
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
        })
        .map_err(|e| constraint(e, "a CA certificate with this fingerprint", JITP_MISSING))?;
        if affected == 0 {
            return Ok(None);
        }
        self.ca(id).await
    }

    /// Deletes a CA of `org_id`, unless devices name it as theirs (it provisioned them, or
    /// they first connected with a certificate it signed): deleting it would leave them
    /// admitted with any certificate of the organization (see `ca_id` in the registry).
    pub async fn delete_ca(&self, org_id: &str, id: &str) -> Result<Deletion, StoreError> {
        with_pool!(self, |pool, begin| {
            let mut tx = pool.begin_with(begin).await?;
            let mut in_use = Vec::new();
            super::note_dependents!(
                tx,
                in_use,
                Dependent::Devices,
                "SELECT COUNT(*) FROM devices WHERE ca_id = $1",
                id
            );
            if !in_use.is_empty() {
                tx.rollback().await?;
                return Ok(Deletion::InUse(in_use));
            }
            let deleted = sqlx::query("DELETE FROM ca_certificates WHERE id = $1 AND org_id = $2")
                .bind(id)
                .bind(org_id)
                .execute(&mut *tx)
                .await
                .map(|d| d.rows_affected());
            super::catalog::finish_delete(tx, deleted).await
        })
    }

    /// Every CA as the broker's registry wants it, for loading at start.
    pub async fn load_ca_records(&self) -> Result<Vec<CaRecord>, StoreError> {
        self.cas(None, None, &super::PageRequest::ALL)
            .await?
            .iter()
            .map(|c| c.to_record())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem(is_ca: bool) -> (String, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test CA");
        if is_ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), cert.der().to_vec())
    }

    #[test]
    fn accepts_a_ca_and_reencodes_it() {
        let (pem, der) = ca_pem(true);
        let with_text = format!("Bag Attributes: something\n{pem}\ntrailing words\n");
        let parsed = parse_ca_pem(&with_text).unwrap();
        assert_eq!(parsed.der, der);
        assert_eq!(
            parsed.fingerprint_sha256,
            broker::registry::fingerprint(&der)
        );
        assert!(parsed.subject.contains("Test CA"));
        assert!(parsed.not_before_ms < parsed.not_after_ms);
        assert_eq!(parse_ca_pem(&parsed.pem).unwrap().der, der);
    }

    #[test]
    fn refuses_what_is_not_one_ca_certificate() {
        let (leaf, _) = ca_pem(false);
        let (ca, _) = ca_pem(true);
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let cases: Vec<(String, CaPemError)> = vec![
            (String::new(), CaPemError::NotOneBlock(0)),
            ("hello".into(), CaPemError::NotOneBlock(0)),
            (leaf, CaPemError::NotCa),
            (format!("{ca}{ca}"), CaPemError::NotOneBlock(2)),
            (key, CaPemError::NotACertificate),
            (
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
                CaPemError::Unparsable(String::new()),
            ),
        ];
        for (pem, want) in cases {
            let got = parse_ca_pem(&pem).unwrap_err();
            assert_eq!(
                std::mem::discriminant(&got),
                std::mem::discriminant(&want),
                "{pem:?}: {got}"
            );
        }
    }
}
