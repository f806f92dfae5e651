//! Verification keys, each pinned to the algorithms it may verify.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use serde_json::Value;

/// A key that verifies token signatures, parsed once, with the algorithms it may verify.
///
/// A key only ever verifies the algorithms of its own family (an RSA key never verifies an
/// `HS256` token, so the classic "HMAC signed with the public key" confusion cannot happen),
/// and a key that names its own algorithm (`alg` in a JWK, or [`with_algorithm`]) verifies
/// that algorithm alone.
///
/// [`with_algorithm`]: VerificationKey::with_algorithm
pub struct VerificationKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    decoding: DecodingKey,
    // Identifies the key material, to keep a key's identity across JWKS refetches.
    fingerprint: Vec<u8>,
    retired: AtomicBool,
}

/// A key that could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The PEM, JWK or secret could not be parsed as a key of that kind.
    Malformed(String),
    /// The key type, curve or algorithm is not one the crate verifies with.
    Unsupported(String),
    /// The algorithm asked for does not belong to the key's family.
    AlgorithmMismatch(Algorithm),
    /// A key file could not be read or written (no such directory, a full disk, no right to
    /// it): the keys themselves may be fine.
    Io(String),
    /// A private key kept sealed (see `SigningKeys::open_sealed`) could not be opened: no
    /// key-encryption key was given, or the wrong one.
    Sealed(String),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(why) => write!(f, "malformed key: {why}"),
            Self::Unsupported(why) => write!(f, "unsupported key: {why}"),
            Self::AlgorithmMismatch(alg) => {
                write!(f, "algorithm {alg:?} does not belong to the key's family")
            }
            Self::Io(why) => write!(f, "cannot read or write the key file: {why}"),
            Self::Sealed(why) => write!(f, "cannot open a sealed private key: {why}"),
        }
    }
}

impl std::error::Error for KeyError {}

fn malformed(err: jsonwebtoken::errors::Error) -> KeyError {
    KeyError::Malformed(err.to_string())
}

impl VerificationKey {
    /// An HMAC secret of at least 32 bytes, verifying `HS256`, with 48 bytes or more `HS384`
    /// too, with 64 or more `HS512` too: RFC 7518 §3.2 wants a key at least as long as the
    /// hash's output, and a shorter secret is refused (a guessable one would let anyone sign).
    ///
    /// ```
    /// use tower_fhir::auth::VerificationKey;
    /// use jsonwebtoken::Algorithm;
    ///
    /// assert!(VerificationKey::hmac("too-short").is_err());
    /// let key = VerificationKey::hmac("a-shared-secret-of-32-bytes-or-more").unwrap();
    /// assert_eq!(key.algorithms(), &[Algorithm::HS256]);
    /// assert_eq!(VerificationKey::hmac([7u8; 64]).unwrap().algorithms().len(), 3);
    /// ```
    pub fn hmac(secret: impl AsRef<[u8]>) -> Result<Self, KeyError> {
        Self::new(DecodingKey::from_secret(secret.as_ref()), None)
    }

    /// An RSA public key in PEM (`PUBLIC KEY` or `RSA PUBLIC KEY`), verifying `RS*` and `PS*`.
    pub fn rsa_pem(pem: impl AsRef<[u8]>) -> Result<Self, KeyError> {
        let key = DecodingKey::from_rsa_pem(pem.as_ref()).map_err(malformed)?;
        Self::new(key, None)
    }

    /// An EC public key in PEM, verifying `ES256` (P-256) or `ES384` (P-384).
    pub fn ec_pem(pem: impl AsRef<[u8]>) -> Result<Self, KeyError> {
        let key = DecodingKey::from_ec_pem(pem.as_ref()).map_err(malformed)?;
        let alg = match key.kind() {
            DecodingKeyKind::SecretOrDer(point) if point.len() == 65 => Algorithm::ES256,
            DecodingKeyKind::SecretOrDer(point) if point.len() == 97 => Algorithm::ES384,
            _ => {
                return Err(KeyError::Unsupported(
                    "EC curve other than P-256 or P-384".into(),
                ))
            }
        };
        Self::new(key, Some(alg))
    }

    /// An Ed25519 public key in PEM, verifying `EdDSA`.
    pub fn ed_pem(pem: impl AsRef<[u8]>) -> Result<Self, KeyError> {
        let key = DecodingKey::from_ed_pem(pem.as_ref()).map_err(malformed)?;
        Self::new(key, None)
    }

    /// A key from one JSON Web Key (RFC 7517), taking its `kid` and, when present, its `alg`.
    ///
    /// Keys meant for encryption (`use: enc`, `RSA-OAEP`, ...) and key types or curves the
    /// crate cannot verify with are refused with an error.
    pub fn from_jwk(jwk: &Value) -> Result<Self, KeyError> {
        if let Some(key_use) = jwk.get("use").and_then(Value::as_str) {
            if key_use != "sig" {
                return Err(KeyError::Unsupported(format!("key use {key_use:?}")));
            }
        }
        let jwk: Jwk = serde_json::from_value(jwk.clone())
            .map_err(|e| KeyError::Malformed(format!("not a JWK: {e}")))?;
        if let Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_)) = &jwk.common.public_key_use
        {
            return Err(KeyError::Unsupported("key not meant for signatures".into()));
        }
        if let Some(ops) = &jwk.common.key_operations {
            if !ops.iter().any(|op| matches!(op, KeyOperations::Verify)) {
                return Err(KeyError::Unsupported("key_ops without verify".into()));
            }
        }
        let own_alg = match jwk.common.key_algorithm {
            None => None,
            Some(alg) => Some(
                Algorithm::try_from(alg)
                    .map_err(|_| KeyError::Unsupported(format!("JWK alg {alg}")))?,
            ),
        };
        let curve_alg = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(params) => match params.curve {
                EllipticCurve::P256 => Some(Algorithm::ES256),
                EllipticCurve::P384 => Some(Algorithm::ES384),
                ref other => return Err(KeyError::Unsupported(format!("EC curve {other:?}"))),
            },
            AlgorithmParameters::OctetKeyPair(params) => match params.curve {
                EllipticCurve::Ed25519 => Some(Algorithm::EdDSA),
                ref other => return Err(KeyError::Unsupported(format!("OKP curve {other:?}"))),
            },
            AlgorithmParameters::RSA(_) | AlgorithmParameters::OctetKey(_) => None,
            _ => return Err(KeyError::Unsupported("key type".into())),
        };
        let decoding = DecodingKey::from_jwk(&jwk).map_err(malformed)?;
        let mut key = Self::new(decoding, curve_alg)?;
        if let Some(alg) = own_alg {
            key = key.with_algorithm(alg)?;
        }
        if let Some(kid) = jwk.common.key_id {
            key = key.with_kid(kid);
        }
        Ok(key)
    }

    fn new(decoding: DecodingKey, only: Option<Algorithm>) -> Result<Self, KeyError> {
        let family = decoding.family();
        let mut algorithms = match only {
            Some(alg) => vec![alg],
            None => family.algorithms().to_vec(),
        };
        if let (AlgorithmFamily::Hmac, DecodingKeyKind::SecretOrDer(secret)) =
            (family, decoding.kind())
        {
            if secret.len() < hmac_min_len(Algorithm::HS256) {
                return Err(KeyError::Malformed(format!(
                    "{HMAC_TOO_SHORT} of {} bytes: at least {} are needed (RFC 7518 §3.2)",
                    secret.len(),
                    hmac_min_len(Algorithm::HS256)
                )));
            }
            algorithms.retain(|&alg| secret.len() >= hmac_min_len(alg));
        }
        if let DecodingKeyKind::RsaModulusExponent { n, .. } = decoding.kind() {
            // What the verifier takes (its RSA parameters are 2048 to 8192 bits): a key outside
            // could never verify a signature, and would only be refused at each use.
            let bits = rsa_bits(n);
            if !(2048..=8192).contains(&bits) {
                return Err(KeyError::Unsupported(format!(
                    "an RSA key of {bits} bits: 2048 to 8192 are verified"
                )));
            }
        }
        let mut fingerprint = vec![family_tag(family)];
        match decoding.kind() {
            DecodingKeyKind::SecretOrDer(bytes) => fingerprint.extend_from_slice(bytes),
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                fingerprint.extend_from_slice(&(n.len() as u32).to_be_bytes());
                fingerprint.extend_from_slice(n);
                fingerprint.extend_from_slice(e);
            }
        }
        Ok(Self {
            kid: None,
            algorithms,
            decoding,
            fingerprint,
            retired: AtomicBool::new(false),
        })
    }

    /// Gives the key an id, matched against the token header's `kid`.
    #[must_use]
    pub fn with_kid(mut self, kid: impl Into<String>) -> Self {
        self.kid = Some(kid.into());
        self
    }

    /// Pins the key to one algorithm of its family: tokens with any other `alg` are refused.
    ///
    /// An HMAC secret too short for the algorithm (`HS384` needs 48 bytes, `HS512` 64) is
    /// refused as [`KeyError::Unsupported`].
    pub fn with_algorithm(mut self, alg: Algorithm) -> Result<Self, KeyError> {
        if !self.algorithms.contains(&alg) {
            if self.decoding.family() == AlgorithmFamily::Hmac
                && AlgorithmFamily::Hmac.algorithms().contains(&alg)
            {
                return Err(KeyError::Unsupported(format!(
                    "{alg:?} needs an HMAC secret of at least {} bytes",
                    hmac_min_len(alg)
                )));
            }
            return Err(KeyError::AlgorithmMismatch(alg));
        }
        self.algorithms = vec![alg];
        Ok(self)
    }

    /// The key id, if it has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The algorithms this key may verify.
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }

    pub(crate) fn decoding_key(&self) -> &DecodingKey {
        &self.decoding
    }

    pub(crate) fn allows(&self, alg: Algorithm) -> bool {
        self.algorithms.contains(&alg)
    }

    /// Whether this key has left its key set (tokens it verified must be verified again).
    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub(crate) fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    fn same_key_as(&self, other: &Self) -> bool {
        self.kid == other.kid
            && self.algorithms == other.algorithms
            && self.fingerprint == other.fingerprint
    }
}

/// How the error for a too short HMAC secret begins.
const HMAC_TOO_SHORT: &str = "an HMAC secret";

/// The shortest HMAC secret an algorithm may be used with: its hash's output (RFC 7518 §3.2).
fn hmac_min_len(alg: Algorithm) -> usize {
    match alg {
        Algorithm::HS384 => 48,
        Algorithm::HS512 => 64,
        _ => 32,
    }
}

/// The length in bits of an RSA modulus written big-endian (its leading zero bytes aside).
fn rsa_bits(n: &[u8]) -> usize {
    let n = &n[n.iter().take_while(|&&b| b == 0).count()..];
    match n.first() {
        None => 0,
        Some(&top) => n.len() * 8 - top.leading_zeros() as usize,
    }
}

fn family_tag(family: AlgorithmFamily) -> u8 {
    match family {
        AlgorithmFamily::Hmac => 0,
        AlgorithmFamily::Rsa => 1,
        AlgorithmFamily::Ec => 2,
        AlgorithmFamily::Ed => 3,
    }
}

impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material: an HMAC secret is a credential.
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// A set of verification keys, such as the keys of one JWKS document.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<Arc<VerificationKey>>,
}

impl KeySet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key.
    #[must_use]
    pub fn with_key(mut self, key: VerificationKey) -> Self {
        self.keys.push(Arc::new(key));
        self
    }

    /// Parses a JWKS document (`{"keys": [...]}`), or a single JWK.
    ///
    /// Entries the crate cannot verify with (encryption keys such as `RSA-OAEP`, unknown key
    /// types or curves) are skipped, not fatal; only a document that is not a JWKS at all is an
    /// error.
    pub fn from_jwks(json: impl AsRef<[u8]>) -> Result<Self, KeyError> {
        Self::parse_jwks(json.as_ref(), false)
    }

    /// A JWKS document fetched from a URL: public, so its HMAC (`oct`) entries are never
    /// taken (whoever can read one could sign tokens), skipped quietly whatever their length.
    #[cfg(feature = "remote-jwks")]
    pub(crate) fn from_public_jwks(json: &[u8]) -> Result<Self, KeyError> {
        Ok(Self::parse_jwks(json, true)?.without_hmac())
    }

    fn parse_jwks(json: &[u8], public: bool) -> Result<Self, KeyError> {
        let document: Value = serde_json::from_slice(json)
            .map_err(|e| KeyError::Malformed(format!("JWKS is not JSON: {e}")))?;
        let entries = match document.get("keys") {
            Some(Value::Array(entries)) => entries.as_slice(),
            Some(_) => return Err(KeyError::Malformed("JWKS `keys` is not an array".into())),
            None if document.get("kty").is_some() => std::slice::from_ref(&document),
            None => return Err(KeyError::Malformed("JWKS has no `keys`".into())),
        };
        let mut set = Self::new();
        for entry in entries {
            if public && entry.get("kty").and_then(Value::as_str) == Some("oct") {
                tracing::debug!(
                    kid = entry.get("kid").and_then(|kid| kid.as_str()),
                    "skipping a symmetric key in a public JWKS"
                );
                continue;
            }
            match VerificationKey::from_jwk(entry) {
                Ok(key) => set = set.with_key(key),
                // A secret too short to verify with is a configuration to fix, not a key
                // meant for something else (as encryption keys in a JWKS are): said aloud.
                Err(KeyError::Malformed(err) | KeyError::Unsupported(err))
                    if err.contains(HMAC_TOO_SHORT) =>
                {
                    tracing::warn!(
                        kid = entry.get("kid").and_then(|kid| kid.as_str()),
                        error = %err,
                        "skipping a JWKS entry: its HMAC secret is too short"
                    );
                }
                Err(err) => tracing::debug!(
                    kid = entry.get("kid").and_then(|kid| kid.as_str()),
                    error = %err,
                    "skipping JWKS entry"
                ),
            }
        }
        Ok(set)
    }

    pub(crate) fn with_shared_key(mut self, key: Arc<VerificationKey>) -> Self {
        self.keys.push(key);
        self
    }

    /// This set without its HMAC keys.
    #[cfg(feature = "remote-jwks")]
    pub(crate) fn without_hmac(mut self) -> Self {
        self.keys
            .retain(|key| key.decoding.family() != AlgorithmFamily::Hmac);
        self
    }

    pub(crate) fn keys(&self) -> &[Arc<VerificationKey>] {
        &self.keys
    }

    pub(crate) fn into_keys(self) -> Vec<Arc<VerificationKey>> {
        self.keys
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The keys.
    pub fn iter(&self) -> impl Iterator<Item = &VerificationKey> {
        self.keys.iter().map(|k| &**k)
    }

    /// The keys that may verify a token with this `kid`: those with that `kid`, or, when none
    /// has it, those without one (a token without a `kid` may be verified by any key).
    pub(crate) fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Arc<VerificationKey>> + 'a {
        Self::candidates_of(&self.keys, kid)
    }

    /// [`candidates`](Self::candidates) among `keys`.
    pub(crate) fn candidates_of<'a>(
        keys: &'a [Arc<VerificationKey>],
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Arc<VerificationKey>> + 'a {
        let named = kid.is_some() && keys.iter().any(|key| key.kid.as_deref() == kid);
        keys.iter().filter(move |key| {
            kid.is_none() || key.kid.as_deref() == kid || (!named && key.kid.is_none())
        })
    }

    /// This set, but keeping the identity of keys that `previous` already held, and retiring
    /// the keys of `previous` that are gone.
    pub(crate) fn succeed(mut self, previous: &KeySet) -> Self {
        for key in &mut self.keys {
            if let Some(old) = previous.keys.iter().find(|old| old.same_key_as(key)) {
                *key = Arc::clone(old);
            }
        }
        for old in &previous.keys {
            if !self.keys.iter().any(|key| Arc::ptr_eq(key, old)) {
                old.retire();
            }
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const RSA_PUBLIC: &str = include_str!("../../tests/support/keys/rsa_public.pem");
    const EC_PUBLIC: &str = include_str!("../../tests/support/keys/ec_public.pem");
    const ED_PUBLIC: &str = include_str!("../../tests/support/keys/ed_public.pem");

    #[test]
    fn families_pin_their_algorithms() {
        let rsa = VerificationKey::rsa_pem(RSA_PUBLIC).unwrap();
        assert!(rsa.allows(Algorithm::RS256) && rsa.allows(Algorithm::PS512));
        assert!(
            !rsa.allows(Algorithm::HS256),
            "RSA key must never verify HMAC"
        );
        let ec = VerificationKey::ec_pem(EC_PUBLIC).unwrap();
        assert_eq!(ec.algorithms(), &[Algorithm::ES256]);
        let ed = VerificationKey::ed_pem(ED_PUBLIC).unwrap();
        assert_eq!(ed.algorithms(), &[Algorithm::EdDSA]);
        let hmac = VerificationKey::hmac([7u8; 64]).unwrap();
        assert_eq!(hmac.algorithms().len(), 3);
    }

    #[test]
    fn with_algorithm_refuses_other_family() {
        let rsa = VerificationKey::rsa_pem(RSA_PUBLIC).unwrap();
        assert_eq!(
            rsa.with_algorithm(Algorithm::HS256).unwrap_err(),
            KeyError::AlgorithmMismatch(Algorithm::HS256)
        );
        let pinned = VerificationKey::rsa_pem(RSA_PUBLIC)
            .unwrap()
            .with_algorithm(Algorithm::PS256)
            .unwrap();
        assert_eq!(pinned.algorithms(), &[Algorithm::PS256]);
    }

    #[test]
    fn hmac_secrets_shorter_than_the_hash_are_refused() {
        for short in [&b""[..], b"secret", &[1u8; 31]] {
            assert!(
                matches!(VerificationKey::hmac(short), Err(KeyError::Malformed(_))),
                "{} bytes",
                short.len()
            );
        }
        let algorithms = |len: usize| {
            VerificationKey::hmac(vec![1u8; len])
                .unwrap()
                .algorithms()
                .to_vec()
        };
        assert_eq!(algorithms(32), [Algorithm::HS256]);
        assert_eq!(algorithms(48), [Algorithm::HS256, Algorithm::HS384]);
        assert_eq!(algorithms(64).len(), 3);
        assert!(matches!(
            VerificationKey::hmac([1u8; 40])
                .unwrap()
                .with_algorithm(Algorithm::HS512),
            Err(KeyError::Unsupported(_))
        ));
        // The same from a JWK, and a JWKS skips the short one.
        let jwk = |k: &str| json!({"kty": "oct", "kid": "h", "k": k});
        assert!(VerificationKey::from_jwk(&jwk("c2VjcmV0")).is_err());
        let pinned = json!({"kty": "oct", "alg": "HS512", "k": "YS1qd2stc2VjcmV0LW9mLXRoaXJ0eS10d28tYnl0ZXMh"});
        assert!(VerificationKey::from_jwk(&pinned).is_err());
        // Skipped aloud (at warn, the default level), where a key for something else is not.
        let buffer = crate::testing::LogBuffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(buffer.writer())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for entry in [jwk("c2VjcmV0"), pinned.clone()] {
                let set = KeySet::from_jwks(json!({"keys": [entry]}).to_string()).unwrap();
                assert!(set.is_empty());
                let logged = buffer.take();
                assert!(logged.contains("HMAC secret is too short"), "{logged}");
            }
            let encryption = json!({"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"});
            KeySet::from_jwks(json!({"keys": [encryption]}).to_string()).unwrap();
            assert_eq!(buffer.take(), "");
            // A fetched (public) JWKS never takes a symmetric key, short or long: no warning.
            #[cfg(feature = "remote-jwks")]
            {
                let public = json!({"keys": [jwk("c2VjcmV0"), jwk("YS1qd2stc2VjcmV0LW9mLXRoaXJ0eS10d28tYnl0ZXMh")]}).to_string();
                assert!(KeySet::from_public_jwks(public.as_bytes())
                    .unwrap()
                    .is_empty());
                assert_eq!(buffer.take(), "");
            }
        });
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        assert!(VerificationKey::hmac("").is_err());
        assert!(VerificationKey::rsa_pem("not a pem").is_err());
        assert!(VerificationKey::ec_pem(RSA_PUBLIC).is_err());
        assert!(VerificationKey::from_jwk(&json!({"kty": "RSA"})).is_err());
        assert!(KeySet::from_jwks("[]").is_err());
        assert!(KeySet::from_jwks("{\"keys\": 3}").is_err());
        assert!(KeySet::from_jwks("not json").is_err());
    }

    #[test]
    fn rsa_keys_the_verifier_cannot_use_are_refused() {
        use base64::Engine;
        let jwk = |bits: usize| {
            // A modulus of `bits` bits: its top bit set, odd.
            let mut n = vec![0xABu8; bits.div_ceil(8)];
            n[0] = 0x80 >> ((8 - bits % 8) % 8);
            *n.last_mut().unwrap() |= 1;
            let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(n);
            json!({"kty": "RSA", "kid": "k", "n": n, "e": "AQAB"})
        };
        for bits in [17, 512, 1024, 2047, 8193] {
            let refused = VerificationKey::from_jwk(&jwk(bits)).unwrap_err();
            assert!(
                refused
                    .to_string()
                    .contains(&format!("an RSA key of {bits} bits")),
                "{bits}: {refused}"
            );
        }
        for bits in [2048, 3072, 4096, 8192] {
            assert!(VerificationKey::from_jwk(&jwk(bits)).is_ok(), "{bits}");
        }
        assert_eq!(rsa_bits(&[0, 0, 1]), 1);
        assert_eq!(rsa_bits(&[]), 0);
    }

    #[test]
    fn jwks_skips_keys_it_cannot_use() {
        let jwks = json!({"keys": [
            {"kty": "oct", "kid": "h", "alg": "HS256", "k": "YS1qd2stc2VjcmV0LW9mLXRoaXJ0eS10d28tYnl0ZXMh"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "kid": "oaep", "alg": "RSA-OAEP-256", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AQAB", "y": "AQAB"},
            {"kty": "OKP", "kid": "x", "crv": "X25519", "x": "AQAB"},
            {"kty": "weird", "kid": "w"},
            {"kty": "RSA", "kid": "confused", "alg": "HS256", "n": "AQAB", "e": "AQAB"},
            {"kty": "oct", "kid": "ops", "k": "YS1qd2stc2VjcmV0LW9mLXRoaXJ0eS10d28tYnl0ZXMh", "key_ops": ["encrypt"]}
        ]});
        let set = KeySet::from_jwks(jwks.to_string()).unwrap();
        let kids: Vec<_> = set.iter().map(|k| k.kid().unwrap()).collect();
        assert_eq!(kids, ["h"]);
        assert_eq!(set.iter().next().unwrap().algorithms(), &[Algorithm::HS256]);
    }

    #[test]
    fn single_jwk_document_is_a_set_of_one() {
        let set = KeySet::from_jwks(
            json!({"kty": "oct", "k": "YS1qd2stc2VjcmV0LW9mLXRoaXJ0eS10d28tYnl0ZXMh"}).to_string(),
        )
        .unwrap();
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn succession_keeps_identity_and_retires_the_gone() {
        let jwk = |kid: &str, k: &str| json!({"kty": "oct", "kid": kid, "k": k});
        let first =
            KeySet::from_jwks(json!({"keys": [jwk("a", "YWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWFhYWE"), jwk("b", "YmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmI")]}).to_string())
                .unwrap();
        let second =
            KeySet::from_jwks(json!({"keys": [jwk("b", "YmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmJiYmI"), jwk("c", "Y2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2M")]}).to_string())
                .unwrap()
                .succeed(&first);
        let a = first.candidates(Some("a")).next().unwrap();
        let b_old = first.candidates(Some("b")).next().unwrap();
        let b_new = second.candidates(Some("b")).next().unwrap();
        assert!(a.is_retired());
        assert!(Arc::ptr_eq(b_old, b_new) && !b_new.is_retired());
        // Same kid, new material: a different key, and the old one is retired.
        let third = KeySet::from_jwks(
            json!({"keys": [jwk("b", "ZGRkZGRkZGRkZGRkZGRkZGRkZGRkZGRkZGRkZGRkZGQ")]}).to_string(),
        )
        .unwrap()
        .succeed(&second);
        assert!(b_new.is_retired());
        assert!(!third.candidates(Some("b")).next().unwrap().is_retired());
    }

    #[test]
    fn debug_never_shows_secrets() {
        let key = || {
            VerificationKey::hmac("hunter2-secret-hunter2-secret-hunter2")
                .unwrap()
                .with_kid("k")
        };
        let shown = format!("{:?} {:?}", key(), KeySet::new().with_key(key()));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("\"k\""));
    }
}
