//! What building a `Gateway` warns about. A test binary of its own, as `tests/logs.rs` is:
//! `tracing` caches each callsite's interest per process, and a sibling test reaching the
//! callsite first on a thread without a subscriber would hide it from this one.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use support::*;
use tower_fhir::auth::{BearerAuthLayer, VerificationKey};
use tower_fhir::gateway::Gateway;
use tower_fhir::route::InMemoryDirectory;
use tower_fhir::tenant::{TenantScopeBuilder, TenantScopeLayer};
use tower_fhir::token::{InMemoryClientStore, TokenEndpoint};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Builds a gateway with a token endpoint and this bearer layer; what it logged.
fn warnings_building(
    auth: tower_fhir::auth::BearerAuthBuilder,
    tenant: TenantScopeBuilder,
) -> String {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let endpoint = TokenEndpoint::builder()
            .issuer("https://gateway.test")
            .audience("tower-fhir")
            .store(InMemoryClientStore::new())
            .build()
            .unwrap();
        Gateway::builder("https://gateway.test")
            .directory(InMemoryDirectory::new())
            .token_endpoint(endpoint)
            .auth(auth)
            .tenant(tenant)
            .build()
            .unwrap();
    });
    let logged = captured.0.lock().unwrap().clone();
    String::from_utf8(logged).unwrap()
}

#[test]
fn unbound_keys_that_can_verify_nothing_beside_a_token_endpoint_are_warned_of() {
    let key = || VerificationKey::hmac(HMAC_SECRET).unwrap();
    // Only the endpoint's issuer is accepted, and only its own keys vouch for it.
    let useless = warnings_building(
        BearerAuthLayer::builder().key(key()),
        TenantScopeLayer::builder(),
    );
    assert!(useless.contains("those keys verify no token"), "{useless}");
    // With an issuer of their own accepted (and bound to tenants), they are of use.
    let of_use = warnings_building(
        BearerAuthLayer::builder()
            .key(key())
            .issuer("https://idp.test"),
        TenantScopeLayer::builder().issuer_any_tenant("https://idp.test"),
    );
    assert!(!of_use.contains("verify no token"), "{of_use}");
}
