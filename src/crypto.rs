//! Chooses jsonwebtoken's crypto backend.
//!
//! jsonwebtoken panics at the first signature when both of its backends are compiled in (cargo
//! unifies features, so a dependency enabling `rust-crypto` beside our default `aws-lc-rs` is
//! enough) unless a provider is installed for the process. Every layer that verifies or signs
//! calls [`install_crypto_provider`] when it is built.

#[cfg(not(any(feature = "aws-lc-rs", feature = "rust-crypto")))]
compile_error!(
    "tower-fhir needs a JWT crypto backend: enable `aws-lc-rs` (default) or `rust-crypto`"
);

/// Makes jsonwebtoken usable in this process, whichever backend features are compiled in.
///
/// With both `aws-lc-rs` and `rust-crypto` enabled, installs aws-lc-rs (the faster) as the
/// process-wide provider, unless the application installed one first; with one backend,
/// jsonwebtoken picks it by itself and this does nothing. The layers call it when they are
/// built; call it yourself before using jsonwebtoken directly (to mint tokens in tests, say).
pub fn install_crypto_provider() {
    #[cfg(all(feature = "aws-lc-rs", feature = "rust-crypto"))]
    {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        // An error means a provider is installed already (by us or by the application): keep it.
        INSTALL.call_once(|| {
            let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
                &jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER,
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};

    // With both backends compiled in, jsonwebtoken alone would panic here; the install makes
    // it work. With one backend this checks that nothing gets in the way.
    #[test]
    fn signing_and_verifying_work_whatever_the_backends() {
        super::install_crypto_provider();
        let claims = serde_json::json!({"sub": "x", "exp": 4_000_000_000u64});
        let token = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        let decoded = decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_secret(b"k"),
            &Validation::new(Algorithm::HS256),
        );
        assert_eq!(decoded.unwrap().claims["sub"], "x");
    }
}
