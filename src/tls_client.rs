//! The rustls configuration of the library's TLS clients: HTTPS upstreams and JWKS URLs (the
//! `tls` feature) and the database (`postgres`). Servers' certificates are checked against
//! the webpki roots (Mozilla's) and any root certificates the user gives; the provider is
//! aws-lc-rs, named explicitly (rustls panics when several are compiled in and none is chosen).

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// A client configuration trusting the webpki roots and `extra_roots`, each a PEM document of
/// one or more certificates. A document holding no certificate is an error (a file named by
/// mistake would otherwise trust nothing more, silently).
pub(crate) fn client_config(extra_roots: &[Vec<u8>]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for pem in extra_roots {
        let mut any = false;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("root certificate PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("root certificate: {e}"))?;
            any = true;
        }
        if !any {
            return Err("root certificate PEM: no certificate in it".to_owned());
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_certificates_must_hold_a_certificate() {
        assert!(client_config(&[]).is_ok());
        for pem in [&b"not a certificate"[..], b""] {
            let refused = client_config(&[pem.to_vec()]).unwrap_err();
            assert!(refused.contains("no certificate"), "{refused}");
        }
        let broken = b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
        assert!(client_config(&[broken.to_vec()]).is_err());
    }
}
