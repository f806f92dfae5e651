//! TLS on the gateway's own listener (`tls_certificate_file` and `tls_private_key_file`).
//!
//! Clients then reach the gateway over `https://`, HTTP/1.1 or HTTP/2 (ALPN offers `h2` and
//! `http/1.1`; a client that offers neither gets HTTP/1.1 or HTTP/2 by what it sends, as
//! over plain TCP). TLS 1.2 and 1.3 only, rustls's safe defaults, through aws-lc-rs. The admin
//! API, on the same listener, gets TLS too; `metrics_listen` stays plain HTTP.
//!
//! The certificate and key are read again, without a restart and without dropping a
//! connection, on SIGHUP and when either file changes (its modification time, size or inode,
//! looked at every [`CHECK_EVERY`]: a Kubernetes secret volume or cert-manager's renewals need
//! no signal). A pair that cannot be used (unreadable, not PEM, a key that is not the
//! certificate's) is refused at start, and later logged at `error` with the certificate in
//! use kept. Connections already open keep the certificate they were made with.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often the files are looked at for a change.
pub(crate) const CHECK_EVERY: Duration = Duration::from_secs(30);

/// The most bytes read of either file: a chain of a few certificates is a few KiB.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// The listener's TLS: what accepts connections, and the certificate it serves, which can be
/// read again.
#[derive(Clone)]
pub(crate) struct FrontTls {
    acceptor: tokio_rustls::TlsAcceptor,
    certificate: Arc<Certificate>,
}

impl fmt::Debug for FrontTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrontTls")
            .field("certificate", &self.certificate)
            .finish_non_exhaustive()
    }
}

impl FrontTls {
    /// Reads the certificate chain (PEM, the server's certificate first) and its private key
    /// (PEM: PKCS#8, PKCS#1 or SEC1), or says what is wrong with them.
    pub(crate) fn load(certificate_file: &Path, private_key_file: &Path) -> Result<Self, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (key, stamp) = read_pair(certificate_file, private_key_file, &provider)?;
        let certificate = Arc::new(Certificate {
            certificate_file: certificate_file.to_owned(),
            private_key_file: private_key_file.to_owned(),
            provider: Arc::clone(&provider),
            current: RwLock::new(Current { key, stamp }),
            reading: std::sync::Mutex::new(()),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set TLS up: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&certificate) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            certificate,
        })
    }

    /// What takes a TCP connection through the handshake.
    pub(crate) fn acceptor(&self) -> &tokio_rustls::TlsAcceptor {
        &self.acceptor
    }

    /// Reads both files again and serves them to new connections from now on; the certificate
    /// in use stays when they cannot be used.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let certificate = &self.certificate;
        let _reading = certificate
            .reading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.read_and_store()
    }

    fn read_and_store(&self) -> Result<(), String> {
        let certificate = &self.certificate;
        let (key, stamp) = read_pair(
            &certificate.certificate_file,
            &certificate.private_key_file,
            &certificate.provider,
        )?;
        *certificate
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Current { key, stamp };
        Ok(())
    }

    /// [`reload`](Self::reload) when either file is not as it was when last read. `Ok(true)`
    /// when it read them again.
    pub(crate) fn reload_if_changed(&self) -> Result<bool, String> {
        let certificate = &self.certificate;
        let _reading = certificate
            .reading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = stamp(&certificate.certificate_file, &certificate.private_key_file);
        let before = certificate
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .stamp;
        if now == before {
            return Ok(false);
        }
        match self.read_and_store() {
            Ok(()) => Ok(true),
            Err(error) => {
                // Said once for this state of the files, not every check.
                certificate
                    .current
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .stamp = now;
                Err(error)
            }
        }
    }
}

/// The certificate served, chosen for every handshake.
struct Certificate {
    certificate_file: PathBuf,
    private_key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Current>,
    /// Held across a reading of the files and its store: a SIGHUP's reload and the periodic
    /// check never store an older pair over a newer one.
    reading: std::sync::Mutex<()>,
}

struct Current {
    key: Arc<CertifiedKey>,
    /// The files as they were when last read (or found unusable).
    stamp: Option<Stamp>,
}

impl fmt::Debug for Certificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("certificate_file", &self.certificate_file)
            .field("private_key_file", &self.private_key_file)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .key,
        ))
    }
}

/// What tells that a file changed: modification time, size and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

type Stamp = (FileStamp, FileStamp);

fn file_stamp(path: &Path) -> Option<FileStamp> {
    // Followed through symbolic links: a Kubernetes secret volume swaps the link's target.
    let metadata = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&metadata);
    #[cfg(not(unix))]
    let inode = 0;
    Some(FileStamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
        inode,
    })
}

fn stamp(certificate_file: &Path, private_key_file: &Path) -> Option<Stamp> {
    Some((file_stamp(certificate_file)?, file_stamp(private_key_file)?))
}

/// Both files read and checked against each other, with their stamp taken before reading
/// (a change made while they are read is seen by the next check).
fn read_pair(
    certificate_file: &Path,
    private_key_file: &Path,
    provider: &CryptoProvider,
) -> Result<(Arc<CertifiedKey>, Option<Stamp>), String> {
    let stamp = stamp(certificate_file, private_key_file);
    let chain = CertificateDer::pem_slice_iter(&read("tls_certificate_file", certificate_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "tls_certificate_file {}: not a PEM certificate chain: {e}",
                certificate_file.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "tls_certificate_file {}: no certificate in it (PEM, \"-----BEGIN CERTIFICATE-----\")",
            certificate_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&read("tls_private_key_file", private_key_file)?)
        .map_err(|e| {
            format!(
                "tls_private_key_file {}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1): {e}",
                private_key_file.display()
            )
        })?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        format!(
            "tls_private_key_file {} cannot serve tls_certificate_file {}: {e}",
            private_key_file.display(),
            certificate_file.display()
        )
    })?;
    Ok((Arc::new(key), stamp))
}

/// The file `key` (the configuration's name for it) names, at most [`MAX_FILE_BYTES`].
fn read(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "{key} {}: larger than {MAX_FILE_BYTES} bytes, not a certificate or key",
            path.display()
        ));
    }
    Ok(bytes)
}

/// Looks at the files every [`CHECK_EVERY`] and reads them again when they changed.
pub(crate) async fn reload_when_changed(tls: FrontTls) {
    let mut every = tokio::time::interval(CHECK_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        let tls = tls.clone();
        match tokio::task::spawn_blocking(move || tls.reload_if_changed()).await {
            Ok(Ok(true)) => tracing::info!("TLS certificate changed on disk: read again"),
            Ok(Ok(false)) => {}
            Ok(Err(error)) => tracing::error!(
                %error,
                "TLS certificate changed on disk but cannot be used: still serving the one before"
            ),
            Err(error) => tracing::error!(%error, "checking the TLS certificate failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `localhost` and its key, both PEM.
    fn pair() -> (String, String) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        (certified.cert.pem(), certified.signing_key.serialize_pem())
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn served(tls: &FrontTls) -> Vec<u8> {
        tls.certificate.current.read().unwrap().key.cert[0].to_vec()
    }

    #[test]
    fn a_matching_pair_loads_and_a_wrong_one_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair();
        let (_, other_key) = pair();
        let cert_file = write(dir.path(), "cert.pem", &cert);
        let key_file = write(dir.path(), "key.pem", &key);
        FrontTls::load(&cert_file, &key_file).unwrap();

        let other = write(dir.path(), "other.pem", &other_key);
        let error = FrontTls::load(&cert_file, &other).unwrap_err();
        assert!(
            error.contains("cannot serve tls_certificate_file"),
            "{error}"
        );
        // Swapped files, an empty one, a missing one.
        let error = FrontTls::load(&key_file, &cert_file).unwrap_err();
        assert!(error.contains("no certificate"), "{error}");
        let empty = write(dir.path(), "empty.pem", "");
        let error = FrontTls::load(&cert_file, &empty).unwrap_err();
        assert!(error.contains("no PEM private key"), "{error}");
        let error = FrontTls::load(&dir.path().join("missing.pem"), &key_file).unwrap_err();
        assert!(
            error.starts_with("tls_certificate_file: cannot read"),
            "{error}"
        );
        let huge = write(
            dir.path(),
            "huge.pem",
            &"A".repeat(MAX_FILE_BYTES as usize + 1),
        );
        let error = FrontTls::load(&huge, &key_file).unwrap_err();
        assert!(error.contains("larger than"), "{error}");
    }

    #[test]
    fn a_changed_pair_is_read_again_and_an_unusable_one_keeps_the_certificate_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair();
        let cert_file = write(dir.path(), "cert.pem", &cert);
        let key_file = write(dir.path(), "key.pem", &key);
        let tls = FrontTls::load(&cert_file, &key_file).unwrap();
        let first = served(&tls);
        assert!(!tls.reload_if_changed().unwrap(), "nothing changed");

        // Written as a renewal does: new files renamed over the old (new inodes).
        let (cert2, key2) = pair();
        let tmp = write(dir.path(), "cert.tmp", &cert2);
        std::fs::rename(tmp, &cert_file).unwrap();
        let tmp = write(dir.path(), "key.tmp", &key2);
        std::fs::rename(tmp, &key_file).unwrap();
        assert!(tls.reload_if_changed().unwrap());
        let second = served(&tls);
        assert_ne!(first, second);

        // Half a renewal: a certificate whose key has not come yet.
        let (cert3, _) = pair();
        let tmp = write(dir.path(), "cert.tmp", &cert3);
        std::fs::rename(tmp, &cert_file).unwrap();
        let error = tls.reload_if_changed().unwrap_err();
        assert!(error.contains("cannot serve"), "{error}");
        assert_eq!(served(&tls), second, "the certificate in use is kept");
        assert!(
            !tls.reload_if_changed().unwrap(),
            "said once, not every check"
        );
        assert!(tls.reload().is_err());
    }
}
