//! The simulated fleet's identities: device ids `{prefix}{index:05}` and, for mutual TLS,
//! certificates signed by the manufacturing CA. Minting runs in parallel on the blocking pool;
//! with a cache directory every certificate is kept in `{cache}/{CA fingerprint}/{id}.pem`
//! for P-256 keys and `{cache}/{CA fingerprint}-rsa2048/{id}.pem` for RSA-2048 keys
//! (certificate then key, mode 0600) and reused by the next run. Caching matters most for RSA:
//! a 2048-bit key takes tens to hundreds of milliseconds to generate, a P-256 key microseconds.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_wire::DeviceId;
use rustls::ClientConfig;
use time::OffsetDateTime;

use super::SimError;
use crate::pki::{Ca, DeviceCertOptions, KeyAlgorithm};
use crate::tls::{ClientIdentity, SharedTls};

/// A cached certificate that expires sooner than this is minted again.
const MIN_REMAINING_VALIDITY: time::Duration = time::Duration::days(1);

/// The id of device `index`: the prefix, then the index zero-padded to at least five digits
/// (wider for fleets of 100,000 or more), so ids sort in index order and stay the same for
/// fleets of different sizes.
pub(crate) fn device_id(prefix: &str, index: usize, devices: usize) -> Result<DeviceId, SimError> {
    let width = digits(devices.saturating_sub(1)).max(5);
    let id = format!("{prefix}{index:0width$}");
    DeviceId::parse(&id)
        .map_err(|e| SimError::Invalid(format!("device id {id:?} (from --id-prefix): {e}")))
}

/// The index of a device id made by [`device_id`], if it is one.
pub(crate) fn device_index(prefix: &str, id: &str) -> Option<usize> {
    let digits = id.strip_prefix(prefix)?;
    if digits.len() < 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn digits(mut n: usize) -> usize {
    let mut d = 1;
    while n >= 10 {
        n /= 10;
        d += 1;
    }
    d
}

/// What minting produced and how.
pub(crate) struct Minted {
    /// One TLS configuration per device, in index order.
    pub configs: Vec<Arc<ClientConfig>>,
    pub from_cache: usize,
    pub generated: usize,
    pub elapsed: Duration,
}

/// Loads or issues a certificate for every id and builds its TLS configuration, in parallel
/// chunks on the blocking pool.
pub(crate) async fn mint(
    ca: Arc<Ca>,
    algorithm: KeyAlgorithm,
    ids: &[DeviceId],
    cache: Option<&Path>,
    tls: Arc<SharedTls>,
) -> Result<Minted, SimError> {
    let started = Instant::now();
    let part = each_identity(ca, algorithm, ids, cache, move |identity| {
        Ok(tls.client_config(Some(identity))?)
    })
    .await?;
    let from_cache = part.iter().filter(|(_, cached)| *cached).count();
    Ok(Minted {
        generated: part.len() - from_cache,
        from_cache,
        configs: part.into_iter().map(|(config, _)| config).collect(),
        elapsed: started.elapsed(),
    })
}

/// Certificates and keys for every id, cached like [`mint`]'s, for programs that build their
/// own connections from them (the `update` scenario's agents).
pub(crate) async fn mint_identities(
    ca: Arc<Ca>,
    algorithm: KeyAlgorithm,
    ids: &[DeviceId],
    cache: Option<&Path>,
) -> Result<Vec<ClientIdentity>, SimError> {
    let part = each_identity(ca, algorithm, ids, cache, Ok).await?;
    Ok(part.into_iter().map(|(identity, _)| identity).collect())
}

/// Loads or issues every id's identity (and says whether it came from the cache), and turns it
/// into what the caller wants with `make`, in parallel chunks on the blocking pool, in id order.
async fn each_identity<T, F>(
    ca: Arc<Ca>,
    algorithm: KeyAlgorithm,
    ids: &[DeviceId],
    cache: Option<&Path>,
    make: F,
) -> Result<Vec<(T, bool)>, SimError>
where
    T: Send + 'static,
    F: Fn(ClientIdentity) -> Result<T, SimError> + Clone + Send + 'static,
{
    let dir = match cache {
        Some(cache) => {
            let dir = cache.join(cache_dir_name(&ca.fingerprint(), algorithm));
            std::fs::create_dir_all(&dir).map_err(|error| SimError::Cache {
                path: dir.clone(),
                error,
            })?;
            Some(Arc::new(dir))
        }
        None => None,
    };
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let chunk = ids.len().div_ceil(workers * 4).max(16);
    let mut tasks = Vec::new();
    for part in ids.chunks(chunk) {
        let part = part.to_vec();
        let (ca, dir, make) = (ca.clone(), dir.clone(), make.clone());
        tasks.push(tokio::task::spawn_blocking(move || {
            part.iter()
                .map(|id| {
                    let dir = dir.as_deref().map(PathBuf::as_path);
                    let (identity, cached) = load_or_issue(&ca, algorithm, id, dir)?;
                    Ok((make(identity)?, cached))
                })
                .collect::<Result<Vec<_>, SimError>>()
        }));
    }
    let mut out = Vec::with_capacity(ids.len());
    for task in tasks {
        out.extend(
            task.await
                .map_err(|e| SimError::Invalid(format!("certificate minting failed: {e}")))??,
        );
    }
    Ok(out)
}

/// The device's certificate and key from the cache, or newly issued (and cached), and whether
/// it came from the cache.
fn load_or_issue(
    ca: &Ca,
    algorithm: KeyAlgorithm,
    id: &DeviceId,
    dir: Option<&Path>,
) -> Result<(ClientIdentity, bool), SimError> {
    let path = dir.map(|d| d.join(format!("{id}.pem")));
    if let Some(identity) = path.as_deref().and_then(|p| cached(p, id)) {
        return Ok((identity, true));
    }
    let issued = ca.issue_device(&DeviceCertOptions {
        algorithm,
        ..DeviceCertOptions::new(id.clone())
    })?;
    let pem = format!("{}{}", issued.cert_pem, issued.key_pem);
    if let Some(path) = &path {
        store(path, pem.as_bytes())?;
    }
    Ok((
        ClientIdentity::from_pem(pem.as_bytes(), pem.as_bytes())?,
        false,
    ))
}

/// The cache directory of one CA and key algorithm: P-256 keeps the plain fingerprint, so
/// caches made before RSA keys existed stay valid.
fn cache_dir_name(fingerprint: &str, algorithm: KeyAlgorithm) -> String {
    match algorithm {
        KeyAlgorithm::EcdsaP256 => fingerprint.to_owned(),
        other => format!("{fingerprint}-{}", other.name()),
    }
}

/// A usable cached identity for `id`: parseable, naming `id`, valid for a while longer.
fn cached(path: &Path, id: &DeviceId) -> Option<ClientIdentity> {
    let pem = std::fs::read(path).ok()?;
    let identity = ClientIdentity::from_pem(&pem, &pem).ok()?;
    let fresh = identity.not_after() > OffsetDateTime::now_utc() + MIN_REMAINING_VALIDITY;
    (identity.common_name() == Some(id.as_str()) && fresh).then_some(identity)
}

/// Writes `data` to `path` atomically (a temporary file renamed over it), mode 0600.
fn store(path: &Path, data: &[u8]) -> Result<(), SimError> {
    let err = |error| SimError::Cache {
        path: path.to_owned(),
        error,
    };
    let tmp = path.with_extension(format!("pem.tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut file = opts.open(&tmp).map_err(err)?;
    file.write_all(data).map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::CaOptions;
    use crate::tls::TlsConfig;

    #[test]
    fn ids_are_zero_padded_and_parse_back() {
        let cases = [
            ("sim-", 0, 1, "sim-00000"),
            ("sim-", 42, 1000, "sim-00042"),
            ("sim-", 9999, 10_000, "sim-09999"),
            ("sim-", 99_999, 100_000, "sim-99999"),
            ("x", 7, 100_001, "x000007"),
        ];
        for (prefix, index, devices, want) in cases {
            let id = device_id(prefix, index, devices).unwrap();
            assert_eq!(id.as_str(), want);
            assert_eq!(device_index(prefix, want), Some(index));
        }
        assert_eq!(device_index("sim-", "sim-12"), None);
        assert_eq!(device_index("sim-", "other-00001"), None);
        assert_eq!(device_index("sim-", "sim-0000x"), None);
        assert!(device_id("bad/", 0, 1).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn second_mint_comes_from_the_cache() {
        let ca = Arc::new(Ca::generate(&CaOptions::default()).unwrap());
        let server = Ca::generate(&CaOptions::default()).unwrap();
        let tls = Arc::new(
            SharedTls::new(&TlsConfig::from_ca_pem(server.cert_pem().as_bytes()).unwrap()).unwrap(),
        );
        let ids: Vec<DeviceId> = (0..40).map(|i| device_id("c-", i, 40).unwrap()).collect();
        let dir = std::env::temp_dir().join(format!("dc-sim-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);

        let first = mint(
            ca.clone(),
            KeyAlgorithm::EcdsaP256,
            &ids,
            Some(&dir),
            tls.clone(),
        )
        .await
        .unwrap();
        assert_eq!((first.generated, first.from_cache), (40, 0));
        assert_eq!(first.configs.len(), 40);
        let second = mint(
            ca.clone(),
            KeyAlgorithm::EcdsaP256,
            &ids,
            Some(&dir),
            tls.clone(),
        )
        .await
        .unwrap();
        assert_eq!((second.generated, second.from_cache), (0, 40));

        // A damaged entry is minted again; another CA has its own directory.
        let entry = dir.join(ca.fingerprint()).join("c-00003.pem");
        std::fs::write(&entry, "garbage").unwrap();
        let third = mint(
            ca.clone(),
            KeyAlgorithm::EcdsaP256,
            &ids,
            Some(&dir),
            tls.clone(),
        )
        .await
        .unwrap();
        assert_eq!((third.generated, third.from_cache), (1, 39));
        let pem = std::fs::read_to_string(&entry).unwrap();
        let identity = ClientIdentity::from_pem(pem.as_bytes(), pem.as_bytes()).unwrap();
        assert_eq!(identity.common_name(), Some("c-00003"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&entry).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let other = Arc::new(Ca::generate(&CaOptions::default()).unwrap());
        let fourth = mint(
            other,
            KeyAlgorithm::EcdsaP256,
            &ids[..5],
            Some(&dir),
            tls.clone(),
        )
        .await
        .unwrap();
        assert_eq!((fourth.generated, fourth.from_cache), (5, 0));

        // RSA keys have their own directory: a P-256 certificate is not taken for one.
        let rsa = mint(
            ca.clone(),
            KeyAlgorithm::Rsa2048,
            &ids[..2],
            Some(&dir),
            tls.clone(),
        )
        .await
        .unwrap();
        assert_eq!((rsa.generated, rsa.from_cache), (2, 0));
        let rsa = mint(
            ca.clone(),
            KeyAlgorithm::Rsa2048,
            &ids[..2],
            Some(&dir),
            tls,
        )
        .await
        .unwrap();
        assert_eq!((rsa.generated, rsa.from_cache), (0, 2));
        let entry = dir
            .join(format!("{}-rsa2048", ca.fingerprint()))
            .join("c-00000.pem");
        let pem = std::fs::read_to_string(&entry).unwrap();
        assert!(pem.contains("BEGIN PRIVATE KEY"), "{pem}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
