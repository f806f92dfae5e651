//! Signing keys, JWT signing, the JWKS document, and key rotation.

use std::convert::Infallible;
use std::fmt;
use std::future::{ready, Ready};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tower_service::Service;

use super::error::{json_response, TokenResponseBody};
use crate::at_rest::{Kek, OpenedBy};
use crate::auth::{
    FetchedKeys, KeyChanges, KeyError, KeySet, KeySource, KeySourceFuture, VerificationKey,
};

/// The `typ` of the access tokens [`SigningKeys::sign_access_token`] signs (RFC 9068).
pub(crate) const ACCESS_TOKEN_TYPE: &str = "at+jwt";

/// A private key the token endpoint signs with, with its `kid` and algorithm.
///
/// `ES256` (P-256) keys can be generated at run time with [`generate_es256`], in every build
/// (pure-Rust generation with `p256`, whichever JWT backend is on); `ES256` and `RS256` keys can
/// also be loaded from PKCS#8 PEM. `Debug` shows the `kid` and algorithm only.
///
/// [`generate_es256`]: SigningKey::generate_es256
pub struct SigningKey {
    kid: String,
    algorithm: Algorithm,
    encoding: EncodingKey,
    public_jwk: Value,
    /// The private key as given, so [`SigningKeys::open`] can keep it in its file.
    pem: String,
}

fn malformed(err: impl fmt::Display) -> KeyError {
    KeyError::Malformed(err.to_string())
}

fn random_kid() -> String {
    let mut bytes = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

impl SigningKey {
    /// A fresh P-256 key for `ES256`, with a random `kid`.
    pub fn generate_es256() -> Result<Self, KeyError> {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let pem = secret.to_pkcs8_pem(LineEnding::LF).map_err(malformed)?;
        Self::ec_pem(pem.as_bytes(), random_kid())
    }

    /// An `ES256` key from a P-256 private key in PKCS#8 PEM.
    pub fn ec_pem(pem: impl AsRef<[u8]>, kid: impl Into<String>) -> Result<Self, KeyError> {
        let encoding = EncodingKey::from_ec_pem(pem.as_ref()).map_err(malformed)?;
        Self::new(encoding, Algorithm::ES256, kid.into(), pem.as_ref())
    }

    /// An `RS256` key from an RSA private key in PEM (PKCS#1 or PKCS#8).
    pub fn rsa_pem(pem: impl AsRef<[u8]>, kid: impl Into<String>) -> Result<Self, KeyError> {
        let encoding = EncodingKey::from_rsa_pem(pem.as_ref()).map_err(malformed)?;
        Self::new(encoding, Algorithm::RS256, kid.into(), pem.as_ref())
    }

    fn new(
        encoding: EncodingKey,
        algorithm: Algorithm,
        kid: String,
        pem: &[u8],
    ) -> Result<Self, KeyError> {
        crate::install_crypto_provider();
        if kid.is_empty() {
            return Err(KeyError::Malformed("empty kid".into()));
        }
        let mut jwk = Jwk::from_encoding_key(&encoding, algorithm).map_err(malformed)?;
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
        let public_jwk = serde_json::to_value(jwk).map_err(malformed)?;
        // The key must sign and its public half verify before it is used for real.
        let key = Self {
            kid,
            algorithm,
            encoding,
            public_jwk,
            pem: String::from_utf8(pem.to_vec()).map_err(malformed)?,
        };
        let probe = key.sign(&json!({"probe": true}), "JWT")?;
        let verification = key.verification_key()?;
        let mut validation = jsonwebtoken::Validation::new(algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        jsonwebtoken::decode::<Value>(&probe, verification.decoding_key(), &validation).map_err(
            |e| KeyError::Malformed(format!("key does not verify its own signature: {e}")),
        )?;
        Ok(key)
    }

    /// The key's `kid`.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The algorithm it signs with.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The public half as a JWK (with `kid`, `alg`, `use: sig`).
    pub fn public_jwk(&self) -> &Value {
        &self.public_jwk
    }

    /// A key of algorithm `alg` from its private key in PEM (the two kinds kept: `ES256`,
    /// `RS256`).
    pub(crate) fn from_pem(
        alg: Algorithm,
        pem: impl AsRef<[u8]>,
        kid: impl Into<String>,
    ) -> Result<Self, KeyError> {
        match alg {
            Algorithm::ES256 => Self::ec_pem(pem, kid),
            Algorithm::RS256 => Self::rsa_pem(pem, kid),
            other => Err(KeyError::Malformed(format!("{other:?} keys are not kept"))),
        }
    }

    /// The private key in PEM, for a store that keeps it.
    #[cfg(feature = "postgres")]
    pub(crate) fn pem(&self) -> &str {
        &self.pem
    }

    fn verification_key(&self) -> Result<VerificationKey, KeyError> {
        VerificationKey::from_jwk(&self.public_jwk)
    }

    fn sign(&self, claims: &Value, typ: &str) -> Result<String, KeyError> {
        let mut header = Header::new(self.algorithm);
        header.typ = Some(typ.to_owned());
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(malformed)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
struct Ring {
    current: Arc<SigningKey>,
    // Every published key, the current one included, in the order they were added.
    published: Vec<Arc<SigningKey>>,
}

/// The endpoint's signing keys: one current key that signs, and every key still published in
/// the JWKS (so tokens signed by an older key stay valid until it is retired).
///
/// A cheap, shared handle: clones see the same keys. It is a [`KeySource`], so a
/// [`BearerAuthLayer`](crate::auth::BearerAuthLayer) in the same process can verify the
/// endpoint's tokens without HTTP: `BearerAuthLayer::builder().key_source(keys.clone())`.
///
/// Rotation: [`rotate`](Self::rotate) publishes a new key and signs with it from then on;
/// [`retire`](Self::retire) the old key once the tokens it signed have expired (or at once, for
/// a compromised key). A bearer layer in this process learns of every change before it accepts
/// the next token; one that fetches the JWKS over HTTP picks up a new key at once (an unknown
/// `kid` triggers a refetch) and drops a retired one at its next refresh.
///
/// Keys [`open`](Self::open)ed from a file are kept there, every change included, so tokens
/// issued before a restart stay valid after it.
#[derive(Debug, Clone)]
pub struct SigningKeys {
    ring: Arc<RwLock<Ring>>,
    file: Option<Arc<PathBuf>>,
    /// Moved on every change, so bearer layers in this process learn of it at once.
    changes: KeyChanges,
    /// Kept by a store elsewhere that makes every change (its name, for the refusal): the
    /// changing methods here are refused.
    managed_by: Option<&'static str>,
    /// Held by a change while it is made and written: one change at a time, without holding
    /// the ring (and every token signed meanwhile) while the file is written and synced.
    changing: Arc<Mutex<()>>,
    /// Seals the private keys in the file (see [`open_sealed`](Self::open_sealed)).
    sealing: Option<Arc<Kek>>,
}

/// The key file: private keys in PEM (or sealed), the current one named.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    current: String,
    keys: Vec<KeyFileEntry>,
}

#[derive(Serialize, Deserialize)]
struct KeyFileEntry {
    kid: String,
    alg: Algorithm,
    /// The private key in clear (PKCS#8 PEM), in a file opened without a key-encryption key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pem: Option<String>,
    /// The PEM sealed with the key-encryption key, bound to the `kid` (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pem_sealed: Option<String>,
}

impl SigningKeys {
    /// Keys with this one current.
    pub fn new(key: SigningKey) -> Self {
        let key = Arc::new(key);
        Self {
            ring: Arc::new(RwLock::new(Ring {
                current: Arc::clone(&key),
                published: vec![key],
            })),
            file: None,
            changes: KeyChanges::new(),
            managed_by: None,
            changing: Arc::default(),
            sealing: None,
        }
    }

    /// Keys that the store named `by` changes through [`replace`](Self::replace); `add`,
    /// `rotate`, `retire` and `make_current` are refused.
    #[cfg(feature = "postgres")]
    pub(crate) fn managed(
        published: Vec<Arc<SigningKey>>,
        current: Arc<SigningKey>,
        by: &'static str,
    ) -> Self {
        Self {
            ring: Arc::new(RwLock::new(Ring { current, published })),
            file: None,
            changes: KeyChanges::new(),
            managed_by: Some(by),
            changing: Arc::default(),
            sealing: None,
        }
    }

    /// Makes these the published keys, `current` the one that signs (a managing store's
    /// change); bearer layers in this process learn of it at once.
    #[cfg(feature = "postgres")]
    pub(crate) fn replace(&self, published: Vec<Arc<SigningKey>>, current: Arc<SigningKey>) {
        let mut ring = self.ring.write().unwrap_or_else(PoisonError::into_inner);
        *ring = Ring { current, published };
        drop(ring);
        self.changes.changed();
    }

    /// The `kid`s published, in order, and the current one's.
    #[cfg(feature = "postgres")]
    pub(crate) fn kids(&self) -> (Vec<String>, String) {
        let ring = self.read();
        (
            ring.published.iter().map(|k| k.kid.clone()).collect(),
            ring.current.kid.clone(),
        )
    }

    /// How many handles share these keys.
    #[cfg(feature = "postgres")]
    pub(crate) fn holders(&self) -> usize {
        Arc::strong_count(&self.ring)
    }

    /// Keys with a freshly generated `ES256` key current.
    pub fn generate() -> Result<Self, KeyError> {
        Ok(Self::new(SigningKey::generate_es256()?))
    }

    /// The keys kept in the JSON file `path`; when it does not exist, a freshly generated
    /// `ES256` key, written there (its directory made if need be). Every later change (add, rotate, retire) is written to the
    /// file before it takes effect. The file holds private keys: it is created readable by
    /// its owner only (on Unix); keep it that way.
    ///
    /// ```
    /// use tower_fhir::token::SigningKeys;
    ///
    /// // Its directory is made if need be.
    /// let dir = std::env::temp_dir().join(format!("tower-fhir-keys-{}", std::process::id()));
    /// # let _ = std::fs::remove_dir_all(&dir);
    /// let path = dir.join("signing-keys.json");
    /// let keys = SigningKeys::open(&path).unwrap();
    /// let again = SigningKeys::open(&path).unwrap();
    /// assert_eq!(keys.current_kid(), again.current_kid());
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// ```
    ///
    /// A file holding a sealed key (written by `open_sealed`) is refused: it opens only with
    /// the key-encryption key it was sealed with (and a build without the `seal` feature opens
    /// none).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, KeyError> {
        Self::open_with(path.as_ref(), None)
    }

    /// What [`open`](Self::open) would refuse of the key file in `path`, found by reading it
    /// alone: nothing is written nor created (a file that does not exist is fine: `open` would
    /// make a key). A file holding a sealed key is refused, as `open` refuses it.
    ///
    /// ```
    /// use tower_fhir::token::SigningKeys;
    ///
    /// let dir = std::env::temp_dir().join(format!("tower-fhir-check-keys-{}", std::process::id()));
    /// # let _ = std::fs::remove_dir_all(&dir);
    /// let path = dir.join("signing-keys.json");
    /// assert!(SigningKeys::check(&path).is_ok(), "no file: nothing to refuse");
    /// assert!(!dir.exists(), "nothing made");
    /// SigningKeys::open(&path).unwrap();
    /// assert!(SigningKeys::check(&path).is_ok());
    /// std::fs::write(&path, "{}").unwrap();
    /// assert!(SigningKeys::check(&path).is_err());
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// ```
    pub fn check(path: impl AsRef<Path>) -> Result<(), KeyError> {
        read_key_file(path.as_ref(), None).map(drop)
    }

    /// [`open`](Self::open), the private keys sealed in the file with `kek` (AES-256-GCM, each
    /// bound to its `kid`, as the PostgreSQL store seals them). Keys found in clear (a file
    /// written without the key) are sealed at once: the file is written again, atomically and
    /// owner-readable only. A key sealed with another key-encryption key is an error
    /// ([`KeyError::Sealed`]), and nothing is written.
    ///
    /// ```
    /// use tower_fhir::seal::KeyEncryptionKey;
    /// use tower_fhir::token::SigningKeys;
    ///
    /// let dir = std::env::temp_dir().join(format!("tower-fhir-sealed-keys-{}", std::process::id()));
    /// # let _ = std::fs::remove_dir_all(&dir);
    /// let path = dir.join("signing-keys.json");
    /// let kek = KeyEncryptionKey::from_base64("q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=").unwrap();
    /// let keys = SigningKeys::open_sealed(&path, kek.clone()).unwrap();
    /// assert!(!std::fs::read_to_string(&path).unwrap().contains("PRIVATE KEY"));
    /// let again = SigningKeys::open_sealed(&path, kek).unwrap();
    /// assert_eq!(keys.current_kid(), again.current_kid());
    /// // Without the key, the file does not open.
    /// assert!(SigningKeys::open(&path).is_err());
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// ```
    #[cfg(feature = "seal")]
    #[cfg_attr(docsrs, doc(cfg(feature = "seal")))]
    pub fn open_sealed(
        path: impl AsRef<Path>,
        kek: crate::seal::KeyEncryptionKey,
    ) -> Result<Self, KeyError> {
        Self::open_with(path.as_ref(), Some(Arc::new(kek)))
    }

    /// What [`open_sealed`](Self::open_sealed) would refuse of the key file in `path` with
    /// `kek` (a sealed key it does not open, above all), found by reading it alone: nothing is
    /// written nor created, and keys in clear are left so. To try a key on a state before
    /// anything is sealed with it.
    ///
    /// ```
    /// use tower_fhir::auth::KeyError;
    /// use tower_fhir::seal::KeyEncryptionKey;
    /// use tower_fhir::token::SigningKeys;
    ///
    /// let dir = std::env::temp_dir().join(format!("tower-fhir-check-sealed-keys-{}", std::process::id()));
    /// # let _ = std::fs::remove_dir_all(&dir);
    /// let path = dir.join("signing-keys.json");
    /// let kek = KeyEncryptionKey::from_base64("q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=").unwrap();
    /// let other = KeyEncryptionKey::from_base64("YW5vdGhlci1rZXktZW5jcnlwdGlvbi1rZXktMzJieXQ=").unwrap();
    /// SigningKeys::open_sealed(&path, kek.clone()).unwrap();
    /// let written = std::fs::read(&path).unwrap();
    ///
    /// assert!(SigningKeys::check_sealed(&path, &kek).is_ok());
    /// let refused = SigningKeys::check_sealed(&path, &other).unwrap_err();
    /// assert!(matches!(refused, KeyError::Sealed(_)));
    /// assert!(refused.to_string().contains("the wrong key"), "{refused}");
    /// assert_eq!(std::fs::read(&path).unwrap(), written);
    /// # std::fs::remove_dir_all(&dir).unwrap();
    /// ```
    #[cfg(feature = "seal")]
    #[cfg_attr(docsrs, doc(cfg(feature = "seal")))]
    pub fn check_sealed(
        path: impl AsRef<Path>,
        kek: &crate::seal::KeyEncryptionKey,
    ) -> Result<(), KeyError> {
        read_key_file(path.as_ref(), Some(kek)).map(drop)
    }

    fn open_with(path: &Path, sealing: Option<Arc<Kek>>) -> Result<Self, KeyError> {
        crate::persist::make_parent(path)
            .map_err(|e| KeyError::Io(format!("{}: {e}", path.display())))?;
        let keys = match read_key_file(path, sealing.as_deref())? {
            Some((ring, reseal)) => {
                let keys = Self {
                    ring: Arc::new(RwLock::new(ring)),
                    file: Some(Arc::new(path.to_path_buf())),
                    changes: KeyChanges::new(),
                    managed_by: None,
                    changing: Arc::default(),
                    sealing,
                };
                if keys.sealing.is_some() && (reseal.in_clear || reseal.previous) {
                    keys.save(&keys.read())?;
                    if reseal.in_clear {
                        tracing::info!(
                            file = %path.display(),
                            "private signing keys found in clear sealed with the key-encryption key"
                        );
                    }
                    if reseal.previous {
                        tracing::info!(
                            file = %path.display(),
                            "private signing keys sealed with the previous key-encryption key sealed again with the key"
                        );
                    }
                }
                keys
            }
            None => {
                let mut keys = Self::generate()?;
                keys.file = Some(Arc::new(path.to_path_buf()));
                keys.sealing = sealing;
                keys.save(&keys.read())?;
                keys
            }
        };
        Ok(keys)
    }

    /// Publishes a key without signing with it yet (to pre-publish the next key).
    pub fn add(&self, key: SigningKey) -> Result<(), KeyError> {
        self.change(|ring| {
            if ring.published.iter().any(|k| k.kid == key.kid) {
                return Err(KeyError::Malformed(format!(
                    "kid {:?} already in use",
                    key.kid
                )));
            }
            ring.published.push(Arc::new(key));
            Ok(())
        })
    }

    /// Signs with the published key `kid` from now on.
    pub fn make_current(&self, kid: &str) -> Result<(), KeyError> {
        self.change(|ring| {
            ring.current = ring
                .published
                .iter()
                .find(|k| k.kid == kid)
                .cloned()
                .ok_or_else(|| KeyError::Malformed(format!("no published key {kid:?}")))?;
            Ok(())
        })
    }

    /// Publishes `key` and signs with it from now on; the old key stays published.
    pub fn rotate(&self, key: SigningKey) -> Result<(), KeyError> {
        self.change(|ring| {
            if ring.published.iter().any(|k| k.kid == key.kid) {
                return Err(KeyError::Malformed(format!(
                    "kid {:?} already in use",
                    key.kid
                )));
            }
            let key = Arc::new(key);
            ring.published.push(Arc::clone(&key));
            ring.current = key;
            Ok(())
        })
    }

    /// Stops publishing the key `kid`: tokens it signed no longer verify, at once in every
    /// bearer layer of this process that reads these keys (its cached tokens included; a
    /// layer elsewhere fetching the JWKS learns it at its next refresh). For a compromised
    /// key. The current key cannot be retired.
    ///
    /// The gentle rotation is [`rotate`](Self::rotate), then `retire` of the old key once the
    /// last token it signed has expired.
    pub fn retire(&self, kid: &str) -> Result<(), KeyError> {
        self.change(|ring| {
            if ring.current.kid == kid {
                return Err(KeyError::Malformed(
                    "the current key cannot be retired".into(),
                ));
            }
            let before = ring.published.len();
            ring.published.retain(|k| k.kid != kid);
            if ring.published.len() == before {
                return Err(KeyError::Malformed(format!("no published key {kid:?}")));
            }
            Ok(())
        })
    }

    /// Applies a change to a copy, keeps it in the file (if any), then makes it visible.
    fn change(
        &self,
        change: impl FnOnce(&mut Ring) -> Result<(), KeyError>,
    ) -> Result<(), KeyError> {
        if let Some(store) = self.managed_by {
            return Err(KeyError::Malformed(format!(
                "these keys are kept in {store}: change them there"
            )));
        }
        let _changing = self.changing.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = self.read().clone();
        change(&mut next)?;
        // Written while the keys as they were go on signing.
        self.save(&next)?;
        *self.ring.write().unwrap_or_else(PoisonError::into_inner) = next;
        self.changes.changed();
        Ok(())
    }

    fn save(&self, ring: &Ring) -> Result<(), KeyError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let file = KeyFile {
            version: 1,
            current: ring.current.kid.clone(),
            keys: ring
                .published
                .iter()
                .map(|k| match &self.sealing {
                    Some(kek) => Ok(KeyFileEntry {
                        kid: k.kid.clone(),
                        alg: k.algorithm,
                        pem: None,
                        pem_sealed: Some(
                            kek.seal_base64(&k.kid, k.pem.as_bytes())
                                .map_err(|e| KeyError::Io(format!("{}: {e}", path.display())))?,
                        ),
                    }),
                    None => Ok(KeyFileEntry {
                        kid: k.kid.clone(),
                        alg: k.algorithm,
                        pem: Some(k.pem.clone()),
                        pem_sealed: None,
                    }),
                })
                .collect::<Result<_, KeyError>>()?,
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(malformed)?;
        crate::persist::write_atomically(path, &bytes)
            .map_err(|e| KeyError::Io(format!("{}: {e}", path.display())))
    }

    /// The `kid` of the key that signs.
    pub fn current_kid(&self) -> String {
        self.read().current.kid.clone()
    }

    /// The JWKS document (`{"keys": [...]}`) of every published key.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .read()
            .published
            .iter()
            .map(|k| k.public_jwk.clone())
            .collect();
        json!({ "keys": keys })
    }

    /// The published keys as verification keys.
    pub fn key_set(&self) -> Result<KeySet, KeyError> {
        let published: Vec<Arc<SigningKey>> = self.read().published.clone();
        published.iter().try_fold(KeySet::new(), |set, key| {
            Ok(set.with_key(key.verification_key()?))
        })
    }

    /// Signs claims with the current key; returns the compact JWT, typed `JWT`.
    pub fn sign(&self, claims: &Value) -> Result<String, KeyError> {
        let key = Arc::clone(&self.read().current);
        key.sign(claims, "JWT")
    }

    /// Signs an access token's claims with the current key; returns the compact JWT, typed
    /// `at+jwt` as RFC 9068 has it, so that a resource server checking explicit types
    /// ([`BearerAuthBuilder::token_type`](crate::auth::BearerAuthBuilder::token_type)) tells
    /// it from any other JWT signed with these keys. The token endpoint signs its tokens so.
    ///
    /// ```
    /// use tower_fhir::token::SigningKeys;
    ///
    /// let keys = SigningKeys::generate().unwrap();
    /// let token = keys.sign_access_token(&serde_json::json!({"sub": "app"})).unwrap();
    /// let header = jsonwebtoken::decode_header(&token).unwrap();
    /// assert_eq!(header.typ.as_deref(), Some("at+jwt"));
    /// ```
    pub fn sign_access_token(&self, claims: &Value) -> Result<String, KeyError> {
        let key = Arc::clone(&self.read().current);
        key.sign(claims, ACCESS_TOKEN_TYPE)
    }

    /// A Tower service answering `GET` with the JWKS document (mount it at your JWKS URL).
    pub fn jwks_service(&self) -> JwksService {
        JwksService { keys: self.clone() }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.ring.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a key file read holds that is to be sealed (again) with the key given.
struct Reseal {
    /// A private key in clear.
    in_clear: bool,
    /// A private key only the key's previous key opens.
    previous: bool,
}

/// Reads the key file in `path` (`None` when there is none), each sealed private key opened
/// with `kek`: the keys, and what is to be sealed with it. Writes and creates nothing.
fn read_key_file(path: &Path, kek: Option<&Kek>) -> Result<Option<(Ring, Reseal)>, KeyError> {
    let bad = |e: &dyn fmt::Display| KeyError::Malformed(format!("{}: {e}", path.display()));
    let unreadable = |e: std::io::Error| KeyError::Io(format!("{}: {e}", path.display()));
    let Some(bytes) = crate::persist::read_if_exists(path).map_err(unreadable)? else {
        return Ok(None);
    };
    let file: KeyFile = serde_json::from_slice(&bytes).map_err(|e| bad(&e))?;
    if file.version != 1 {
        return Err(bad(&format!("unknown key file version {}", file.version)));
    }
    let mut reseal = Reseal {
        in_clear: file.keys.iter().any(|k| k.pem.is_some()),
        previous: false,
    };
    let published = file
        .keys
        .into_iter()
        .map(|entry| {
            let (pem, by) = entry_pem(&entry, kek).map_err(|e| e.at(path))?;
            reseal.previous |= by == OpenedBy::Previous;
            SigningKey::from_pem(entry.alg, &pem, entry.kid)
                .map(Arc::new)
                .map_err(|e| bad(&e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let current = published
        .iter()
        .find(|k| k.kid == file.current)
        .cloned()
        .ok_or_else(|| bad(&"the current key is not in the file"))?;
    Ok(Some((Ring { current, published }, reseal)))
}

/// Why a key file's entry gives no private key.
enum EntryError {
    Malformed(String),
    Sealed(String),
}

impl EntryError {
    fn at(self, path: &Path) -> KeyError {
        match self {
            Self::Malformed(why) => KeyError::Malformed(format!("{}: {why}", path.display())),
            Self::Sealed(why) => KeyError::Sealed(format!("{}: {why}", path.display())),
        }
    }
}

/// The private key of a key file's entry: in clear, or opened with `kek` (saying which key
/// opened it; in clear, [`OpenedBy::Key`]). Sealed without a key, or with the wrong one, is an
/// error naming the variable the gateway reads the key from.
fn entry_pem(entry: &KeyFileEntry, kek: Option<&Kek>) -> Result<(String, OpenedBy), EntryError> {
    let kid = &entry.kid;
    match (&entry.pem, &entry.pem_sealed) {
        (Some(_), Some(_)) => Err(EntryError::Malformed(format!(
            "the signing key {kid:?} is both in clear (`pem`) and sealed (`pem_sealed`): keep one"
        ))),
        (Some(pem), None) => Ok((pem.clone(), OpenedBy::Key)),
        (None, None) => Err(EntryError::Malformed(format!(
            "the signing key {kid:?} has no private key"
        ))),
        (None, Some(sealed)) => {
            let what = format!("the signing key {kid:?}");
            let Some(kek) = kek else {
                return Err(EntryError::Sealed(crate::at_rest::no_key(&what)));
            };
            kek.open_base64(kid, sealed)
                .and_then(|(pem, by)| Some((String::from_utf8(pem).ok()?, by)))
                .ok_or_else(|| {
                    EntryError::Sealed(crate::at_rest::wrong_key(
                        &what,
                        ", or a key sealed for another kid",
                    ))
                })
        }
    }
}

impl KeySource for SigningKeys {
    fn fetch(&self) -> KeySourceFuture {
        let keys = self.key_set().map(FetchedKeys::from).map_err(Into::into);
        Box::pin(ready(keys))
    }

    fn changes(&self) -> Option<KeyChanges> {
        Some(self.changes.clone())
    }
}

/// Serves the JWKS document of [`SigningKeys`]: `GET`/`HEAD` only, cacheable for 5 minutes.
#[derive(Debug, Clone)]
pub struct JwksService {
    keys: SigningKeys,
}

impl<B> Service<Request<B>> for JwksService {
    type Response = Response<TokenResponseBody>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let response = if request.method() == Method::GET || request.method() == Method::HEAD {
            let mut response = json_response(StatusCode::OK, &self.keys.jwks());
            let headers = response.headers_mut();
            headers.remove(header::PRAGMA);
            headers.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            );
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/jwk-set+json"),
            );
            response
        } else {
            let mut response = Response::new(TokenResponseBody::default());
            *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            response
        };
        ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "seal")]
    mod sealed {
        use super::*;
        use crate::seal::KeyEncryptionKey;

        fn key_file(name: &str) -> (PathBuf, PathBuf) {
            let dir = std::env::temp_dir().join(format!(
                "tower-fhir-sealed-keys-{name}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            let path = dir.join("signing-keys.json");
            (dir, path)
        }

        fn kek(byte: u8) -> KeyEncryptionKey {
            KeyEncryptionKey::from_base64(
                &base64::engine::general_purpose::STANDARD.encode([byte; 32]),
            )
            .unwrap()
        }

        fn claims() -> Value {
            json!({"sub": "client", "exp": 4_000_000_000u64})
        }

        #[test]
        fn sealed_keys_keep_no_private_key_in_clear_and_survive_a_restart() {
            let (dir, path) = key_file("round-trip");
            let keys = SigningKeys::open_sealed(&path, kek(1)).unwrap();
            keys.rotate(SigningKey::generate_es256().unwrap()).unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(!text.contains("PRIVATE KEY"), "{text}");
            assert!(text.contains("pem_sealed"), "{text}");
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
            }

            let again = SigningKeys::open_sealed(&path, kek(1)).unwrap();
            assert_eq!(again.current_kid(), keys.current_kid());
            assert_eq!(again.jwks(), keys.jwks());
            assert_eq!(
                again.read().current.pem,
                keys.read().current.pem,
                "the same private key"
            );
            assert!(again.sign(&claims()).is_ok());
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn keys_in_clear_are_sealed_at_open() {
            let (dir, path) = key_file("clear");
            let clear = SigningKeys::open(&path).unwrap();
            assert!(std::fs::read_to_string(&path)
                .unwrap()
                .contains("PRIVATE KEY"));
            // A check finds nothing to refuse, and seals nothing.
            let before = std::fs::read(&path).unwrap();
            SigningKeys::check_sealed(&path, &kek(1)).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), before);

            let sealed = SigningKeys::open_sealed(&path, kek(1)).unwrap();
            assert_eq!(sealed.current_kid(), clear.current_kid());
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(!text.contains("PRIVATE KEY"), "sealed at open: {text}");
            let again = SigningKeys::open_sealed(&path, kek(1)).unwrap();
            assert_eq!(again.jwks(), clear.jwks());
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn a_changed_key_seals_again_what_only_its_previous_key_opens() {
            let (dir, path) = key_file("change-key");
            let keys = SigningKeys::open_sealed(&path, kek(1)).unwrap();
            keys.rotate(SigningKey::generate_es256().unwrap()).unwrap();
            let by_old = std::fs::read(&path).unwrap();

            let changing = kek(2).with_previous(kek(1));
            SigningKeys::check_sealed(&path, &changing).unwrap();
            assert_eq!(
                std::fs::read(&path).unwrap(),
                by_old,
                "a check writes nothing"
            );
            let changed = SigningKeys::open_sealed(&path, changing.clone()).unwrap();
            assert_ne!(std::fs::read(&path).unwrap(), by_old, "sealed again");
            assert_eq!(changed.jwks(), keys.jwks(), "the same keys");
            assert_eq!(changed.current_kid(), keys.current_kid());

            // The new key alone opens the file; the old one no longer does.
            let again = SigningKeys::open_sealed(&path, kek(2)).unwrap();
            assert_eq!(again.read().current.pem, keys.read().current.pem);
            assert!(matches!(
                SigningKeys::check_sealed(&path, &kek(1)),
                Err(KeyError::Sealed(_))
            ));
            // Opened with the pair again: nothing to seal again, nothing written.
            let unchanged = std::fs::read(&path).unwrap();
            SigningKeys::open_sealed(&path, changing).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), unchanged);
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn sealed_keys_do_not_open_without_their_key_nor_for_another_kid() {
            let (dir, path) = key_file("refused");
            SigningKeys::open_sealed(&path, kek(1)).unwrap();
            let sealed_text = std::fs::read_to_string(&path).unwrap();

            for refused in [
                SigningKeys::open(&path).unwrap_err(),
                SigningKeys::check(&path).unwrap_err(),
            ] {
                assert!(matches!(refused, KeyError::Sealed(_)), "{refused:?}");
                let refused = refused.to_string();
                assert!(
                    refused.contains("no key-encryption key"),
                    "no key: {refused}"
                );
                assert!(
                    refused.contains(crate::at_rest::KEY_ENV),
                    "no key: {refused}"
                );
            }
            for refused in [
                SigningKeys::open_sealed(&path, kek(2)).unwrap_err(),
                SigningKeys::check_sealed(&path, &kek(2)).unwrap_err(),
            ] {
                assert!(matches!(refused, KeyError::Sealed(_)), "{refused:?}");
                let refused = refused.to_string();
                assert!(refused.contains("the wrong key"), "wrong key: {refused}");
                assert!(!refused.contains("malformed"), "wrong key: {refused}");
                assert!(refused.contains(&path.display().to_string()), "{refused}");
                assert!(
                    refused.contains(crate::at_rest::KEY_ENV),
                    "wrong key: {refused}"
                );
            }
            assert_eq!(std::fs::read_to_string(&path).unwrap(), sealed_text);

            // The sealed key given another kid.
            let mut file: Value = serde_json::from_str(&sealed_text).unwrap();
            file["keys"][0]["kid"] = "another".into();
            file["current"] = "another".into();
            std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
            let refused = SigningKeys::open_sealed(&path, kek(1))
                .unwrap_err()
                .to_string();
            assert!(refused.contains("the wrong key"), "another kid: {refused}");

            // A key both in clear and sealed.
            let mut file: Value = serde_json::from_str(&sealed_text).unwrap();
            file["keys"][0]["pem"] = "-----BEGIN PRIVATE KEY-----".into();
            std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
            let refused = SigningKeys::check_sealed(&path, &kek(1))
                .unwrap_err()
                .to_string();
            assert!(refused.contains("both in clear"), "{refused}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn a_key_file_that_cannot_be_read_is_said_so_not_called_malformed() {
        let dir = std::env::temp_dir().join(format!("tower-fhir-keys-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A path under a file: no such directory can be made.
        let blocker = dir.join("a-file");
        std::fs::write(&blocker, b"x").unwrap();
        let Err(error) = SigningKeys::open(blocker.join("signing-keys.json")) else {
            panic!("opened keys under a file");
        };
        assert!(matches!(error, KeyError::Io(_)), "{error:?}");
        assert!(
            error
                .to_string()
                .starts_with("cannot read or write the key file: "),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn opened_keys_survive_a_restart_with_their_rotations() {
        let path =
            std::env::temp_dir().join(format!("tower-fhir-keyfile-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let keys = SigningKeys::open(&path).unwrap();
        let first = keys.current_kid();
        let old_token = keys.sign(&json!({"sub": "a"})).unwrap();
        keys.rotate(SigningKey::generate_es256().unwrap()).unwrap();
        let second = keys.current_kid();
        assert_ne!(first, second);

        let reopened = SigningKeys::open(&path).unwrap();
        assert_eq!(reopened.current_kid(), second);
        assert_eq!(reopened.jwks(), keys.jwks());
        // A token signed before the restart verifies with the reopened keys.
        let set = reopened.key_set().unwrap();
        let key = set.candidates(Some(first.as_str())).next().unwrap();
        let mut validation = jsonwebtoken::Validation::new(Algorithm::ES256);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        jsonwebtoken::decode::<Value>(&old_token, key.decoding_key(), &validation).unwrap();

        reopened.retire(&first).unwrap();
        assert_eq!(
            SigningKeys::open(&path).unwrap().jwks()["keys"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        std::fs::write(&path, b"{}").unwrap();
        assert!(SigningKeys::open(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn changes_made_at_once_are_all_kept_and_signing_goes_on_while_they_are_written() {
        let path = std::env::temp_dir().join(format!(
            "tower-fhir-keyfile-together-{}.json",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let keys = SigningKeys::open(&path).unwrap();
        let changes: Vec<_> = (0..8)
            .map(|_| {
                let keys = keys.clone();
                std::thread::spawn(move || keys.add(SigningKey::generate_es256().unwrap()))
            })
            .collect();
        // Tokens are signed while the file is written and synced, eight times over.
        for _ in 0..50 {
            keys.sign(&json!({"sub": "a"})).unwrap();
        }
        for change in changes {
            change.join().unwrap().unwrap();
        }
        // One change at a time: none written over by another made from the same keys.
        assert_eq!(keys.jwks()["keys"].as_array().unwrap().len(), 9);
        assert_eq!(SigningKeys::open(&path).unwrap().jwks(), keys.jwks());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn generated_keys_publish_and_rotate() {
        let keys = SigningKeys::generate().unwrap();
        let first = keys.current_kid();
        let jwks = keys.jwks();
        assert_eq!(jwks["keys"][0]["kty"], "EC");
        assert_eq!(jwks["keys"][0]["alg"], "ES256");
        assert_eq!(jwks["keys"][0]["kid"], first.as_str());
        assert!(jwks["keys"][0].get("d").is_none(), "private part published");

        let next = SigningKey::generate_es256().unwrap();
        let second = next.kid().to_owned();
        keys.rotate(next).unwrap();
        assert_eq!(keys.current_kid(), second);
        assert_eq!(keys.jwks()["keys"].as_array().unwrap().len(), 2);
        assert_eq!(keys.key_set().unwrap().len(), 2);
        assert!(keys.retire(&second).is_err());
        keys.retire(&first).unwrap();
        assert_eq!(keys.jwks()["keys"].as_array().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_jwks_service_serves_get_only() {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let keys = SigningKeys::generate().unwrap();
        let get = Request::get("/jwks").body(()).unwrap();
        let response = keys.jwks_service().oneshot(get).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[header::CACHE_CONTROL],
            "public, max-age=300"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let set = KeySet::from_jwks(&body).unwrap();
        assert_eq!(set.len(), 1);
        let post = Request::post("/jwks").body(()).unwrap();
        let response = keys.jwks_service().oneshot(post).await.unwrap();
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn the_key_source_yields_every_published_key() {
        let keys = SigningKeys::generate().unwrap();
        keys.add(SigningKey::generate_es256().unwrap()).unwrap();
        let fetched = keys.fetch().await.unwrap();
        assert_eq!(fetched.keys.len(), 2);
    }

    #[test]
    fn debug_shows_no_key_material() {
        let key = SigningKey::generate_es256().unwrap();
        let debug = format!("{key:?}");
        assert!(debug.contains(key.kid()) && !debug.contains("encoding"));
    }
}
