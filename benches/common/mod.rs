//! The keys and algorithms the auth and stack benches share (the test keys in
//! `tests/support/keys/`).

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use tower_fhir::auth::VerificationKey;

const RSA_PRIVATE: &str = include_str!("../../tests/support/keys/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("../../tests/support/keys/rsa_public.pem");
const EC_PRIVATE: &str = include_str!("../../tests/support/keys/ec_private.pem");
const EC_PUBLIC: &str = include_str!("../../tests/support/keys/ec_public.pem");
const SECRET: &[u8] = b"a-shared-secret-of-at-least-32-bytes!!";

/// One algorithm: keys to sign with, to decode raw, and the layer's verification key.
pub(crate) struct Case {
    pub(crate) alg: Algorithm,
    pub(crate) encoding: EncodingKey,
    pub(crate) decoding: DecodingKey,
    pub(crate) key: fn() -> VerificationKey,
}

/// HS256, RS256 and ES256.
pub(crate) fn cases() -> Vec<Case> {
    vec![
        Case {
            alg: Algorithm::HS256,
            encoding: EncodingKey::from_secret(SECRET),
            decoding: DecodingKey::from_secret(SECRET),
            key: || VerificationKey::hmac(SECRET).unwrap().with_kid("k"),
        },
        Case {
            alg: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
            decoding: DecodingKey::from_rsa_pem(RSA_PUBLIC.as_bytes()).unwrap(),
            key: || VerificationKey::rsa_pem(RSA_PUBLIC).unwrap().with_kid("k"),
        },
        Case {
            alg: Algorithm::ES256,
            encoding: EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
            decoding: DecodingKey::from_ec_pem(EC_PUBLIC.as_bytes()).unwrap(),
            key: || VerificationKey::ec_pem(EC_PUBLIC).unwrap().with_kid("k"),
        },
    ]
}
