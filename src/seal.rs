//! Secrets sealed at rest: the key-encryption key that seals the upstreams' credentials and
//! the token endpoint's private signing keys (AES-256-GCM), in files
//! ([`FileDirectory::open_sealed`](crate::route::FileDirectory::open_sealed),
//! [`SigningKeys::open_sealed`](crate::token::SigningKeys::open_sealed)) as in the database
//! (the `postgres` feature). One format: a credential sealed in a file is sealed as in the
//! database, bound to its tenant and upstream; a private key to its `kid`.
//!
//! A key tried on a file before anything is sealed with it:
//! [`FileDirectory::check_sealed`](crate::route::FileDirectory::check_sealed) and
//! [`SigningKeys::check_sealed`](crate::token::SigningKeys::check_sealed) read alone, and
//! refuse a sealed value the key does not open (the wrong key) as `open_sealed` would. A
//! build without this feature refuses a file holding a sealed value, saying it lacks it.

use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;

/// The environment variable the gateway reads its key-encryption key from.
pub const KEY_ENCRYPTION_KEY_ENV: &str = "TOWER_FHIR_KEY_ENCRYPTION_KEY";

/// Why a key-encryption key could not be had, or a secret could not be sealed.
#[derive(Debug, Clone)]
pub struct SealError {
    message: String,
}

impl SealError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SealError {}

/// The 256-bit AES key that seals secrets at rest (AES-256-GCM, a random nonce per secret,
/// what the secret belongs to bound as associated data so a sealed secret cannot be passed off
/// as another's): the signing keys (bound to their `kid`) and the upstreams' credentials
/// (bound to their tenant and upstream), in the database or in files. Every replica needs the
/// same one; `Debug` does not show it.
///
/// ```
/// use tower_fhir::seal::KeyEncryptionKey;
///
/// // 32 random bytes in base64, as `openssl rand -base64 32` prints them.
/// let key = KeyEncryptionKey::from_base64("q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=").unwrap();
/// assert_eq!(format!("{key:?}"), "KeyEncryptionKey(..)");
/// assert!(KeyEncryptionKey::from_base64("c2hvcnQ=").is_err(), "not 32 bytes");
/// // With the `postgres` feature, the same type is `tower_fhir::postgres::KeyEncryptionKey`.
/// # #[cfg(feature = "postgres")]
/// let _: tower_fhir::postgres::KeyEncryptionKey = key;
/// ```
#[derive(Clone)]
pub struct KeyEncryptionKey(Key<Aes256Gcm>);

impl fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyEncryptionKey(..)")
    }
}

impl KeyEncryptionKey {
    /// The key from 32 bytes in base64 (standard or URL-safe alphabet, padded or not).
    pub fn from_base64(text: &str) -> Result<Self, SealError> {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
        let text = text.trim();
        let bytes = STANDARD
            .decode(text)
            .or_else(|_| URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')))
            .map_err(|_| SealError::new("the key-encryption key is not base64"))?;
        let bytes: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            SealError::new(format!(
                "the key-encryption key is {} bytes; it must be 32 random bytes in base64 (`openssl rand -base64 32`)",
                bytes.len()
            ))
        })?;
        Ok(Self(Key::<Aes256Gcm>::from(bytes)))
    }

    /// The key in [`KEY_ENCRYPTION_KEY_ENV`]; an error naming the variable when it is unset or
    /// not a key.
    pub fn from_env() -> Result<Self, SealError> {
        let value = std::env::var(KEY_ENCRYPTION_KEY_ENV).map_err(|error| {
            SealError::new(match error {
                std::env::VarError::NotUnicode(_) => format!(
                    "{KEY_ENCRYPTION_KEY_ENV} is not text: set it to 32 random bytes in base64 (`openssl rand -base64 32`)"
                ),
                std::env::VarError::NotPresent => format!(
                    "{KEY_ENCRYPTION_KEY_ENV} is not set: with a database the signing keys are kept there, sealed with this key; set it to 32 random bytes in base64 (`openssl rand -base64 32`), the same on every replica"
                ),
            })
        })?;
        Self::from_base64(&value)
            .map_err(|e| SealError::new(format!("{KEY_ENCRYPTION_KEY_ENV}: {e}")))
    }

    /// `plaintext` sealed for `binding` (bound to it as associated data: sealed for one, it
    /// opens for no other): the nonce, then the ciphertext and tag.
    pub(crate) fn seal(&self, binding: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let cipher = Aes256Gcm::new(&self.0);
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: binding.as_bytes(),
                },
            )
            .map_err(|_| SealError::new("a secret cannot be sealed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// What [`seal`](Self::seal) sealed for `binding`, if this key sealed it.
    pub(crate) fn open(&self, binding: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, ciphertext) = sealed.split_at_checked(12)?;
        let nonce: [u8; 12] = nonce.try_into().ok()?;
        Aes256Gcm::new(&self.0)
            .decrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: binding.as_bytes(),
                },
            )
            .ok()
    }

    /// [`seal`](Self::seal), in standard base64 (as a file or a JSON column keeps it).
    pub(crate) fn seal_base64(&self, binding: &str, plaintext: &[u8]) -> Result<String, SealError> {
        Ok(base64::engine::general_purpose::STANDARD.encode(self.seal(binding, plaintext)?))
    }

    /// [`open`](Self::open) of [`seal_base64`](Self::seal_base64)'s text.
    pub(crate) fn open_base64(&self, binding: &str, sealed: &str) -> Option<Vec<u8>> {
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .ok()?;
        self.open(binding, &sealed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kek(byte: u8) -> KeyEncryptionKey {
        KeyEncryptionKey::from_base64(&base64::engine::general_purpose::STANDARD.encode([byte; 32]))
            .unwrap()
    }

    #[test]
    fn sealed_keys_open_only_with_their_kek_and_kid() {
        let (kek, other) = (kek(7), kek(8));
        let sealed = kek.seal("k1", b"private").unwrap();
        assert_eq!(kek.open("k1", &sealed).as_deref(), Some(&b"private"[..]));
        assert_eq!(
            other.open("k1", &sealed),
            None,
            "another key-encryption key"
        );
        assert_eq!(kek.open("k2", &sealed), None, "sealed for another kid");
        assert_eq!(kek.open("k1", &sealed[..8]), None, "truncated");
        assert_ne!(
            kek.seal("k1", b"private").unwrap(),
            sealed,
            "a fresh nonce each time"
        );
        assert!(!sealed.windows(7).any(|w| w == b"private"));
    }

    #[test]
    fn a_key_encryption_key_is_32_bytes_of_base64() {
        let refused = KeyEncryptionKey::from_base64("c2hvcnQ=").unwrap_err();
        assert!(refused.to_string().contains("5 bytes"), "{refused}");
        let refused = KeyEncryptionKey::from_base64("not base64!").unwrap_err();
        assert!(refused.to_string().contains("not base64"), "{refused}");
        assert!(
            KeyEncryptionKey::from_base64(&"A".repeat(43)).is_ok(),
            "unpadded"
        );
    }
}
