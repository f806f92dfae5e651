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
//!
//! Changing the key: the new key given the old one as its previous key
//! ([`KeyEncryptionKey::with_previous`], in the gateway
//! [`PREVIOUS_KEY_ENCRYPTION_KEY_ENV`]) opens what either sealed and seals with itself alone;
//! the stores seal again, with the new key, what only the previous one opens when they are
//! opened (the files' `open_sealed`, the database's signing keys and
//! `seal_stored_credentials`). Once they have, the previous key can go. Replicas sharing a
//! database that cannot all restart at once first take the new key as their next key
//! ([`KeyEncryptionKey::with_next`], [`NEXT_KEY_ENCRYPTION_KEY_ENV`]: opened, never sealed
//! with, nothing sealed again), so that each opens what the first to take the new key
//! seals.

use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;

use crate::at_rest::OpenedBy;

/// The environment variable the gateway reads its key-encryption key from.
pub const KEY_ENCRYPTION_KEY_ENV: &str = "TOWER_FHIR_KEY_ENCRYPTION_KEY";

/// The environment variable the gateway reads a previous key-encryption key from, beside
/// [`KEY_ENCRYPTION_KEY_ENV`]'s: what it sealed opens and is sealed again with the key (see
/// [`KeyEncryptionKey::with_previous`]).
pub const PREVIOUS_KEY_ENCRYPTION_KEY_ENV: &str = "TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY";

/// The environment variable the gateway reads a next key-encryption key from, beside
/// [`KEY_ENCRYPTION_KEY_ENV`]'s: what it sealed opens, and stays as it is (see
/// [`KeyEncryptionKey::with_next`]).
pub const NEXT_KEY_ENCRYPTION_KEY_ENV: &str = "TOWER_FHIR_NEXT_KEY_ENCRYPTION_KEY";

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
/// same one; `Debug` does not show it. To change it, give the new key the old one as its
/// previous key ([`with_previous`](Self::with_previous)), after giving replicas that keep
/// the old key for a while the new one as their next key ([`with_next`](Self::with_next)).
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
pub struct KeyEncryptionKey {
    key: Key<Aes256Gcm>,
    /// A key that opens what it sealed and seals nothing: the key being changed from, or to.
    other: Option<(Key<Aes256Gcm>, OpenedBy)>,
}

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
        Ok(Self {
            key: Key::<Aes256Gcm>::from(bytes),
            other: None,
        })
    }

    /// This key, also opening what `previous` sealed, and sealing with itself alone: how the
    /// key changes. A store opened with it seals again with this key what only `previous`
    /// opens (the files' `open_sealed`, the database's signing keys and stored credentials), so
    /// that the previous key can then go. It replaces a next key given before; `previous`'s
    /// own previous or next key is not taken.
    ///
    /// ```
    /// use tower_fhir::seal::KeyEncryptionKey;
    ///
    /// let old = KeyEncryptionKey::from_base64("q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA=").unwrap();
    /// let new = KeyEncryptionKey::from_base64("YW5vdGhlci1rZXktZW5jcnlwdGlvbi1rZXktMzJieXQ=").unwrap();
    /// let changing = new.clone().with_previous(old.clone());
    /// assert!(changing.has_previous() && !new.has_previous());
    /// assert!(changing.same_key(&new), "it seals with the new key");
    /// assert!(!changing.same_key(&old));
    /// // Replicas still on the old key, opening what the new one seals:
    /// let waiting = old.clone().with_next(new.clone());
    /// assert!(!waiting.has_previous() && waiting.has_next() && waiting.same_key(&old));
    /// ```
    pub fn with_previous(self, previous: KeyEncryptionKey) -> Self {
        Self {
            key: self.key,
            other: Some((previous.key, OpenedBy::Previous)),
        }
    }

    /// This key, also opening what `next` sealed, sealing with itself alone and sealing
    /// nothing again: for replicas sharing a database while the key changes, before the first
    /// of them takes `next` as its key (with this one as its previous key, which seals
    /// everything again with `next`). It replaces a previous key given before; `next`'s own
    /// previous or next key is not taken.
    pub fn with_next(self, next: KeyEncryptionKey) -> Self {
        Self {
            key: self.key,
            other: Some((next.key, OpenedBy::Next)),
        }
    }

    /// Whether this key has a previous key beside it ([`with_previous`](Self::with_previous)):
    /// what that key sealed is to be sealed again with this one.
    pub fn has_previous(&self) -> bool {
        matches!(self.other, Some((_, OpenedBy::Previous)))
    }

    /// Whether this key has a next key beside it ([`with_next`](Self::with_next)).
    pub fn has_next(&self) -> bool {
        matches!(self.other, Some((_, OpenedBy::Next)))
    }

    /// Whether `other` seals with the same key as this one (their previous or next keys
    /// aside).
    pub fn same_key(&self, other: &KeyEncryptionKey) -> bool {
        // Compared whole, not stopping at the first byte that differs.
        self.key
            .iter()
            .zip(other.key.iter())
            .fold(0u8, |differ, (a, b)| differ | (a ^ b))
            == 0
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
        let key = Self::from_base64(&value)
            .map_err(|e| SealError::new(format!("{KEY_ENCRYPTION_KEY_ENV}: {e}")))?;
        let previous = Self::other_from_env(PREVIOUS_KEY_ENCRYPTION_KEY_ENV, "changed from")?;
        let next = Self::other_from_env(NEXT_KEY_ENCRYPTION_KEY_ENV, "changed to")?;
        let (other, name, with): (_, _, fn(Self, Self) -> Self) = match (previous, next) {
            (None, None) => return Ok(key),
            (Some(_), Some(_)) => {
                return Err(SealError::new(format!(
                    "{PREVIOUS_KEY_ENCRYPTION_KEY_ENV} and {NEXT_KEY_ENCRYPTION_KEY_ENV} are both set: give one, the key being changed from (previous) or to (next)"
                )))
            }
            (Some(previous), None) => (previous, PREVIOUS_KEY_ENCRYPTION_KEY_ENV, Self::with_previous),
            (None, Some(next)) => (next, NEXT_KEY_ENCRYPTION_KEY_ENV, Self::with_next),
        };
        if key.same_key(&other) {
            return Err(SealError::new(format!(
                "{name} is the key {KEY_ENCRYPTION_KEY_ENV} holds: to change the key, set {KEY_ENCRYPTION_KEY_ENV} to the new key and {PREVIOUS_KEY_ENCRYPTION_KEY_ENV} to the old one; otherwise unset {name}"
            )));
        }
        Ok(with(key, other))
    }

    /// The key in the variable `name`, `None` when it is unset; an error naming the variable
    /// when it is not a key (`role`: whether the key is being changed from or to).
    fn other_from_env(name: &str, role: &str) -> Result<Option<Self>, SealError> {
        let value = match std::env::var(name) {
            Ok(value) => value,
            Err(std::env::VarError::NotPresent) => return Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(SealError::new(format!(
                    "{name} is not text: set it to the key being {role}, 32 bytes in base64"
                )))
            }
        };
        Self::from_base64(&value)
            .map(Some)
            .map_err(|e| SealError::new(format!("{name}: {e}")))
    }

    /// `plaintext` sealed for `binding` (bound to it as associated data: sealed for one, it
    /// opens for no other): the nonce, then the ciphertext and tag.
    pub(crate) fn seal(&self, binding: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let cipher = Aes256Gcm::new(&self.key);
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

    /// What [`seal`](Self::seal) sealed for `binding`, if this key or its previous or next
    /// key sealed it.
    #[cfg(test)]
    pub(crate) fn open(&self, binding: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        self.open_by(binding, sealed)
            .map(|(plaintext, _)| plaintext)
    }

    /// [`open`](Self::open), saying which key opened it.
    pub(crate) fn open_by(&self, binding: &str, sealed: &[u8]) -> Option<(Vec<u8>, OpenedBy)> {
        let (nonce, ciphertext) = sealed.split_at_checked(12)?;
        let nonce = Nonce::from(<[u8; 12]>::try_from(nonce).ok()?);
        let open = |key: &Key<Aes256Gcm>| {
            Aes256Gcm::new(key)
                .decrypt(
                    &nonce,
                    Payload {
                        msg: ciphertext,
                        aad: binding.as_bytes(),
                    },
                )
                .ok()
        };
        if let Some(plaintext) = open(&self.key) {
            return Some((plaintext, OpenedBy::Key));
        }
        let (other, by) = self.other.as_ref()?;
        open(other).map(|plaintext| (plaintext, *by))
    }

    /// [`seal`](Self::seal), in standard base64 (as a file or a JSON column keeps it).
    pub(crate) fn seal_base64(&self, binding: &str, plaintext: &[u8]) -> Result<String, SealError> {
        Ok(base64::engine::general_purpose::STANDARD.encode(self.seal(binding, plaintext)?))
    }

    /// [`open_by`](Self::open_by) of [`seal_base64`](Self::seal_base64)'s text.
    pub(crate) fn open_base64(&self, binding: &str, sealed: &str) -> Option<(Vec<u8>, OpenedBy)> {
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(sealed)
            .ok()?;
        self.open_by(binding, &sealed)
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
    fn a_previous_or_next_key_opens_what_it_sealed_and_seals_nothing() {
        let (old, new) = (kek(7), kek(8));
        let by_old = old.seal("k1", b"private").unwrap();
        let changing = new.clone().with_previous(old.clone());
        assert_eq!(
            changing.open_by("k1", &by_old),
            Some((b"private".to_vec(), OpenedBy::Previous))
        );
        let by_changing = changing.seal("k1", b"private").unwrap();
        assert_eq!(
            changing.open_by("k1", &by_changing),
            Some((b"private".to_vec(), OpenedBy::Key))
        );
        assert_eq!(
            new.open("k1", &by_changing).as_deref(),
            Some(&b"private"[..]),
            "sealed with the new key alone"
        );
        assert_eq!(old.open("k1", &by_changing), None);
        assert_eq!(changing.open_by("k2", &by_old), None, "another kid");
        assert_eq!(
            kek(9).with_previous(kek(10)).open("k1", &by_old),
            None,
            "neither key"
        );
        // A previous key's own previous key is not taken.
        let chained = kek(9).with_previous(kek(10).with_previous(old.clone()));
        assert_eq!(chained.open("k1", &by_old), None);
        assert_eq!(format!("{changing:?}"), "KeyEncryptionKey(..)");

        // Replicas still on the old key open what the new one seals: as a next key, which
        // asks for nothing to be sealed again.
        let waiting = old.clone().with_next(new.clone());
        assert!(!waiting.has_previous());
        assert_eq!(
            waiting.open_by("k1", &by_changing),
            Some((b"private".to_vec(), OpenedBy::Next))
        );
        assert_eq!(
            waiting.open_by("k1", &by_old),
            Some((b"private".to_vec(), OpenedBy::Key))
        );
        assert_eq!(
            new.open("k1", &waiting.seal("k1", b"private").unwrap()),
            None,
            "it seals with the old key"
        );
        // One replaces the other.
        let replaced = old.clone().with_next(new.clone()).with_previous(kek(9));
        assert!(replaced.has_previous());
        assert_eq!(replaced.open("k1", &by_changing), None);
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
