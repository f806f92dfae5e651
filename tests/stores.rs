//! One conformance suite for every store backend: the tenant directories (`TenantStore`) and
//! the client stores (`ClientStore`), in memory, in files and in PostgreSQL (a real server,
//! started for the test). A new backend passes when it runs these same functions.

mod support;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tower_fhir::limit::RateLimit;
use tower_fhir::route::{
    FileDirectory, InMemoryDirectory, InProcessTenant, TenantDirectory, TenantRecord, TenantStore,
    Upstream,
};
use tower_fhir::tenant::TenantId;
use tower_fhir::token::{
    AuthMethod, ClientKeys, ClientRecord, ClientStore, ClientUpdate, FileClientStore,
    InMemoryClientStore, NewClient, SecretHashing,
};
use tower_fhir::version::FhirVersion;

const A: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const B: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";
const C: &str = "1d2d0000-0000-4000-8000-000000000001";
const D: &str = "1d2d0000-0000-4000-8000-000000000002";

fn tenant(id: &str) -> TenantId {
    TenantId::parse(id).unwrap()
}

fn upstreams(base: &str, version: FhirVersion) -> TenantRecord {
    TenantRecord::new([Upstream::parse(base, version).unwrap()]).unwrap()
}

/// Waits until `check` holds, looking every 20 ms; fails the test saying `what` was awaited
/// when it does not within `within`.
async fn until(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn limit() -> RateLimit {
    RateLimit::new(2, 4).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tower-fhir-stores-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Receives from `changes` until each of `expected` is announced (within 5 s). Another tenant
/// may come between only if announced before (in `seen`): a store may announce a tenant again
/// without a change (the PostgreSQL store does once it has read the version of one it heard
/// of), never one that did not change.
async fn announced(
    changes: &mut tokio::sync::broadcast::Receiver<TenantId>,
    expected: &[TenantId],
    seen: &mut std::collections::HashSet<TenantId>,
) {
    let mut waiting: Vec<TenantId> = expected.to_vec();
    while !waiting.is_empty() {
        let tenant = tokio::time::timeout(Duration::from_secs(5), changes.recv())
            .await
            .unwrap_or_else(|_| panic!("{waiting:?} never announced"))
            .unwrap();
        if let Some(at) = waiting.iter().position(|t| *t == tenant) {
            waiting.remove(at);
        } else {
            assert!(seen.contains(&tenant), "{tenant:?} announced unchanged");
        }
        seen.insert(tenant);
    }
}

/// `client` as [`ClientStore::client_for_tenant`] gives it for `asked`: its tenants narrowed
/// to the one asked for, if it has it, or (asked for none) its only one.
fn narrowed(client: &ClientRecord, asked: Option<TenantId>) -> ClientRecord {
    let first = client.tenants.first();
    let tenants = match asked {
        Some(asked) if client.tenants.contains(&asked) => vec![asked],
        None if first.is_some_and(|first| client.tenants.iter().all(|t| t == first)) => {
            vec![client.tenants[0]]
        }
        _ => Vec::new(),
    };
    ClientRecord {
        tenants,
        ..client.clone()
    }
}

/// Every client of `store` as `client_for_tenant` gives it (for A, B, C and none) is the
/// whole record narrowed.
async fn narrowed_reads_agree(store: &dyn ClientStore, clients: &[ClientRecord]) {
    for client in clients {
        for asked in [None, Some(tenant(A)), Some(tenant(B)), Some(tenant(C))] {
            let read = store.client_for_tenant(&client.id, asked).await.unwrap();
            assert_eq!(
                read,
                Some(narrowed(client, asked)),
                "{} for {asked:?}",
                client.id
            );
        }
    }
}

/// What every `TenantStore` does. `reopen` gives the same store anew (a restart), for backends
/// that keep their state; `None` for one that lives in memory only.
async fn tenant_store_conformance<F, Fut>(store: Arc<dyn TenantStore>, reopen: Option<F>)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn TenantStore>>,
{
    let (a, b, c) = (tenant(A), tenant(B), tenant(C));
    assert_eq!(store.list().await.unwrap(), Vec::<TenantId>::new());
    assert!(store.lookup(a).await.unwrap().is_none());
    let mut changes = store.changes();
    let mut seen = std::collections::HashSet::new();

    // A new tenant: not a replacement, visible at once, announced.
    let first = upstreams("http://127.0.0.1:9001/fhir", FhirVersion::Stu3);
    assert!(!store.put(a, first.clone()).await.unwrap());
    announced(&mut changes, &[a], &mut seen).await;
    let found = store.lookup(a).await.unwrap().unwrap();
    assert_eq!(
        found.default_upstream().unwrap().base(),
        first.default_upstream().unwrap().base()
    );

    // Replaced: reported as such, the new upstream answers.
    let second = upstreams("http://127.0.0.1:9002/dstu2", FhirVersion::Dstu2);
    assert!(store.put(a, second.clone()).await.unwrap());
    announced(&mut changes, &[a], &mut seen).await;
    let found = store.lookup(a).await.unwrap().unwrap();
    assert_eq!(
        found.default_upstream().unwrap().fhir_version(),
        FhirVersion::Dstu2
    );
    assert_eq!(found.rate_limit(), None);

    // A tenant's rate limit is kept with its record.
    let limited = second.clone().with_rate_limit(Some(limit()));
    assert!(store.put(a, limited).await.unwrap());
    announced(&mut changes, &[a], &mut seen).await;
    let found = store.lookup(a).await.unwrap().unwrap();
    assert_eq!(found.rate_limit(), Some(limit()));

    // Many at once, listed sorted; each announced. One is served in-process: no URL, an
    // opaque key of the application's and its releases, kept alike.
    let local = TenantRecord::in_process(
        InProcessTenant::new("schema_c", [FhirVersion::R4, FhirVersion::Dstu2]).unwrap(),
    );
    store
        .put_all(vec![
            (c, local.clone()),
            (
                b,
                upstreams("http://127.0.0.1:9004/fhir", FhirVersion::Stu3),
            ),
        ])
        .await
        .unwrap();
    announced(&mut changes, &[c, b], &mut seen).await;
    assert_eq!(store.list().await.unwrap(), vec![c, a, b]);
    // Every record at once, in the listing's order, each as a lookup finds it.
    let records = store.records().await.unwrap();
    assert_eq!(
        records.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        vec![c, a, b]
    );
    for (id, record) in &records {
        assert_eq!(Some(record), store.lookup(*id).await.unwrap().as_ref());
    }
    let found = store.lookup(c).await.unwrap().unwrap();
    assert_eq!(found.in_process_tenant().unwrap().key(), "schema_c");
    assert_eq!(
        found.in_process_tenant().unwrap().releases(),
        [FhirVersion::R4, FhirVersion::Dstu2]
    );

    // Removed: reported, gone, announced; removing again reports nothing was there.
    assert!(store.delete(b).await.unwrap());
    announced(&mut changes, &[b], &mut seen).await;
    assert!(store.lookup(b).await.unwrap().is_none());
    assert!(!store.delete(b).await.unwrap());
    assert_eq!(store.list().await.unwrap(), vec![c, a]);
    // Which of some tenants it holds: those alone, each once, whatever was asked twice.
    assert_eq!(
        store.present(vec![b, a, c, a]).await.unwrap(),
        std::collections::HashSet::from([a, c])
    );
    assert!(store.present(vec![b]).await.unwrap().is_empty());
    assert!(store.present(Vec::new()).await.unwrap().is_empty());

    if let Some(reopen) = reopen {
        drop(store);
        let store = reopen().await;
        assert_eq!(store.list().await.unwrap(), vec![c, a]);
        let found = store.lookup(a).await.unwrap().unwrap();
        assert_eq!(
            found.default_upstream().unwrap().base(),
            second.default_upstream().unwrap().base()
        );
        assert_eq!(found.rate_limit(), Some(limit()));
        assert_eq!(store.lookup(c).await.unwrap().unwrap().rate_limit(), None);
        assert!(store.lookup(b).await.unwrap().is_none());
        let reread = store.lookup(c).await.unwrap().unwrap();
        assert_eq!(reread.in_process_tenant(), local.in_process_tenant());
        assert!(reread.default_upstream().is_none());
    }
}

/// What every `ClientStore` does; `reopen` as above.
async fn client_store_conformance<F, Fut>(store: Arc<dyn ClientStore>, reopen: Option<F>)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn ClientStore>>,
{
    let (a, b) = (tenant(A), tenant(B));
    assert!(store.client("app").await.unwrap().is_none());
    assert!(store.clients().await.unwrap().is_empty());

    // Registered with a generated secret: stored as a hash, never in clear.
    let secret = store
        .register(NewClient::new("app").tenant(a).scope("system/*.read"))
        .await
        .unwrap();
    assert!(secret.expose().len() >= 16);
    let record = store.client("app").await.unwrap().unwrap();
    assert_eq!(record.tenants, [a]);
    assert_eq!(record.scopes, ["system/*.read"]);
    assert!(!record.revoked);
    assert_eq!(record.secrets.len(), 1);
    assert!(record.secrets[0].phc.starts_with("$argon2id$"));
    assert!(!record.secrets[0].phc.contains(secret.expose()));
    assert_eq!(record.rate_limit, None);

    // Refusals are the request's fault, and say so.
    let taken = store.register(NewClient::new("app")).await.unwrap_err();
    assert!(taken.is_refused(), "{taken}");
    let short = store
        .register(NewClient::new("other").secret("short"))
        .await
        .unwrap_err();
    assert!(short.is_refused(), "{short}");
    let long = store
        .register(NewClient::new("other").secret("x".repeat(1025)))
        .await
        .unwrap_err();
    assert!(long.is_refused(), "{long}");
    assert!(store.client("other").await.unwrap().is_none());
    // An id no client can have (a NUL, which a database's text cannot hold) is nobody's, not
    // a store failure.
    assert!(store.client("c\0x").await.unwrap().is_none());
    let nul = store.revoke("c\0x").await.unwrap_err();
    assert!(nul.is_refused(), "{nul}");
    let unknown = store
        .rotate_secret("nobody", Duration::ZERO)
        .await
        .unwrap_err();
    assert!(unknown.is_refused(), "{unknown}");

    // A provisioned secret is kept as given (hashed).
    store
        .register(
            NewClient::new("provisioned")
                .secret("a-provisioned-secret-0123")
                .tenant(b),
        )
        .await
        .unwrap();
    assert_eq!(
        store.client("provisioned").await.unwrap().unwrap().tenants,
        [b]
    );

    // Rotation: a new hash; with a grace period the old one stays live until it ends.
    let old = store.client("app").await.unwrap().unwrap().secrets[0]
        .phc
        .clone();
    let rotated = store
        .rotate_secret("app", Duration::from_secs(60))
        .await
        .unwrap();
    assert_ne!(rotated.expose(), secret.expose());
    let record = store.client("app").await.unwrap().unwrap();
    assert_eq!(record.secrets.len(), 2);
    assert!(record
        .secrets
        .iter()
        .any(|s| s.phc == old && s.expires_at.is_some()));
    store.rotate_secret("app", Duration::ZERO).await.unwrap();
    let record = store.client("app").await.unwrap().unwrap();
    assert_eq!(
        record.secrets.len(),
        1,
        "a rotation without grace keeps one secret"
    );
    assert_ne!(record.secrets[0].phc, old);
    // From a given secret: only while it is still live. One replaced since (a reset made
    // while a client's own rotation was checking its old secret) is a conflict, nothing
    // changed; the live one rotates.
    let conflict = store
        .rotate_secret_from("app", &old, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(conflict.is_conflict(), "{conflict}");
    assert_eq!(store.client("app").await.unwrap().unwrap(), record);
    let live = record.secrets[0].phc.clone();
    store
        .rotate_secret_from("app", &live, Duration::ZERO)
        .await
        .unwrap();
    let record = store.client("app").await.unwrap().unwrap();
    assert_ne!(record.secrets[0].phc, live);

    // Entitlements replaced; a malformed scope refused.
    store
        .set_entitlements("app", vec![a, b], vec!["launch/patient".into()])
        .await
        .unwrap();
    let record = store.client("app").await.unwrap().unwrap();
    assert_eq!(record.tenants, [a, b]);
    assert_eq!(record.scopes, ["launch/patient"]);

    // Read for a token request: the tenant asked for if the client has it, or (asked for
    // none) its only tenant; the rest of the record as a whole read gives it. Entitlements
    // taken away are not granted any more, given back are.
    let for_b = store.client_for_tenant("app", Some(b)).await.unwrap();
    assert_eq!(for_b, Some(narrowed(&record, Some(b))));
    assert_eq!(for_b.unwrap().tenants, [b]);
    let for_c = store
        .client_for_tenant("app", Some(tenant(C)))
        .await
        .unwrap();
    assert!(for_c.unwrap().tenants.is_empty());
    let for_none = store.client_for_tenant("app", None).await.unwrap();
    assert!(for_none.unwrap().tenants.is_empty(), "app has two tenants");
    let only = store.client_for_tenant("provisioned", None).await.unwrap();
    assert_eq!(only.unwrap().tenants, [b]);
    for (id, asked) in [("nobody", Some(a)), ("nobody", None), ("c\0x", Some(a))] {
        assert!(store.client_for_tenant(id, asked).await.unwrap().is_none());
    }
    store
        .set_entitlements("app", vec![b], vec!["launch/patient".into()])
        .await
        .unwrap();
    let app = store.client("app").await.unwrap().unwrap();
    narrowed_reads_agree(&*store, std::slice::from_ref(&app)).await;
    let for_a = store.client_for_tenant("app", Some(a)).await.unwrap();
    assert!(for_a.unwrap().tenants.is_empty(), "a was taken away");
    store
        .set_entitlements("app", vec![a, b], vec!["launch/patient".into()])
        .await
        .unwrap();
    let for_a = store.client_for_tenant("app", Some(a)).await.unwrap();
    assert_eq!(for_a.unwrap().tenants, [a]);

    let bad = store
        .set_entitlements("app", vec![a], vec!["two words".into()])
        .await
        .unwrap_err();
    assert!(bad.is_refused(), "{bad}");

    // A rate limit: given at registration, set, changed, removed; not for unknown clients.
    store
        .register(NewClient::new("metered").tenant(a).rate_limit(limit()))
        .await
        .unwrap();
    let metered = |store: Arc<dyn ClientStore>| async move {
        store.client("metered").await.unwrap().unwrap().rate_limit
    };
    assert_eq!(metered(Arc::clone(&store)).await, Some(limit()));
    store.set_rate_limit("app", Some(limit())).await.unwrap();
    store.set_rate_limit("app", None).await.unwrap();
    assert_eq!(store.client("app").await.unwrap().unwrap().rate_limit, None);
    let faster = RateLimit::new(50, 100).unwrap();
    store.set_rate_limit("metered", Some(faster)).await.unwrap();
    assert_eq!(metered(Arc::clone(&store)).await, Some(faster));
    let unknown = store.set_rate_limit("nobody", None).await.unwrap_err();
    assert!(unknown.is_refused(), "{unknown}");

    // A private_key_jwt client: no secret; its keys replaced (inline, then at a URL); keys
    // refused for a secret client and when unusable.
    let key = |kid: &str| {
        serde_json::json!({"kty": "EC", "crv": "P-256", "kid": kid,
            "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
            "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"})
    };
    let none = store
        .register(
            NewClient::new("backend")
                .tenant(a)
                .jwks(serde_json::json!({"keys": [key("k1")]})),
        )
        .await
        .unwrap();
    assert!(none.is_empty());
    let rotated = serde_json::json!({"keys": [key("k1"), key("k2")]});
    store
        .set_keys("backend", ClientKeys::Jwks(rotated.clone()))
        .await
        .unwrap();
    let backend = store.client("backend").await.unwrap().unwrap();
    assert_eq!(
        backend.token_endpoint_auth_method,
        AuthMethod::PrivateKeyJwt
    );
    assert!(backend.secrets.is_empty());
    assert_eq!(backend.jwks, Some(rotated));
    store
        .set_keys(
            "backend",
            ClientKeys::JwksUri("http://127.0.0.1:9/backend.json".into()),
        )
        .await
        .unwrap();
    let backend = store.client("backend").await.unwrap().unwrap();
    assert_eq!(
        (backend.jwks, backend.jwks_uri.as_deref()),
        (None, Some("http://127.0.0.1:9/backend.json"))
    );
    for (id, keys) in [
        (
            "app",
            ClientKeys::Jwks(serde_json::json!({"keys": [key("k3")]})),
        ),
        ("backend", ClientKeys::Jwks(serde_json::json!({"keys": []}))),
        (
            "backend",
            ClientKeys::JwksUri("ftp://keys.example/x".into()),
        ),
        (
            "nobody",
            ClientKeys::Jwks(serde_json::json!({"keys": [key("k3")]})),
        ),
    ] {
        let refused = store.set_keys(id, keys).await.unwrap_err();
        assert!(refused.is_refused(), "{id}: {refused}");
    }
    assert!(store
        .rotate_secret("backend", Duration::ZERO)
        .await
        .unwrap_err()
        .is_refused());

    // A whole update: entitlements, keys and rate limit in one write. A part refused (keys
    // for a secret client, unusable keys, a malformed scope) leaves the client as it was,
    // the parts before it included; a rate limit not named stays.
    let k4 = serde_json::json!({"keys": [key("k4")]});
    store
        .update(
            "backend",
            ClientUpdate::new(vec![b], vec!["system/*.read".into()])
                .keys(ClientKeys::Jwks(k4.clone()))
                .rate_limit(Some(limit())),
        )
        .await
        .unwrap();
    let backend = store.client("backend").await.unwrap().unwrap();
    assert_eq!(
        (&backend.tenants, &backend.scopes, &backend.jwks),
        (&vec![b], &vec!["system/*.read".to_owned()], &Some(k4))
    );
    assert_eq!(
        (backend.jwks_uri.as_deref(), backend.rate_limit),
        (None, Some(limit()))
    );
    let app = store.client("app").await.unwrap().unwrap();
    for (id, update) in [
        (
            "app",
            ClientUpdate::new(vec![b], vec![])
                .keys(ClientKeys::Jwks(serde_json::json!({"keys": [key("k5")]})))
                .rate_limit(Some(limit())),
        ),
        (
            "backend",
            ClientUpdate::new(vec![a], vec![])
                .keys(ClientKeys::Jwks(serde_json::json!({"keys": []})))
                .rate_limit(None),
        ),
        (
            "backend",
            ClientUpdate::new(vec![a], vec!["two words".into()]).rate_limit(None),
        ),
        ("nobody", ClientUpdate::new(vec![a], vec![])),
    ] {
        let refused = store.update(id, update).await.unwrap_err();
        assert!(refused.is_refused(), "{id}: {refused}");
    }
    assert_eq!(store.client("app").await.unwrap().unwrap(), app);
    assert_eq!(store.client("backend").await.unwrap().unwrap(), backend);
    store
        .update("backend", ClientUpdate::new(vec![a], vec![]))
        .await
        .unwrap();
    let backend = store.client("backend").await.unwrap().unwrap();
    assert_eq!(
        (&backend.tenants, backend.rate_limit),
        (&vec![a], Some(limit()))
    );

    // Made only if unchanged: decided on the client as it was read, a change is not made over
    // one made since (a conflict, not a refusal, and nothing changed); decided on the client
    // as it is now, it is made. Tenants and scopes compare as sets; the rate limit not at all.
    store
        .update(
            "backend",
            ClientUpdate::new(vec![a, b], vec!["system/*.read".into()]),
        )
        .await
        .unwrap();
    let stale = ClientUpdate::new(vec![a], vec![]).if_unchanged(&backend);
    let conflict = store.update("backend", stale).await.unwrap_err();
    assert!(
        conflict.is_conflict() && !conflict.is_refused(),
        "{conflict}"
    );
    let now = store.client("backend").await.unwrap().unwrap();
    assert_eq!(
        (&now.tenants, &now.scopes),
        (&vec![a, b], &vec!["system/*.read".to_owned()])
    );
    let mut reordered = now.clone();
    reordered.tenants.reverse();
    reordered.rate_limit = None;
    store
        .update(
            "backend",
            ClientUpdate::new(vec![a], vec![]).if_unchanged(&reordered),
        )
        .await
        .unwrap();
    let backend = store.client("backend").await.unwrap().unwrap();
    assert_eq!(
        (&backend.tenants, backend.scopes.len(), backend.rate_limit),
        (&vec![a], 0, Some(limit()))
    );
    // Two changes decided on the same read, written at once: one is made, the other finds
    // the client changed (the store compares and writes under one lock).
    let (first, second) = tokio::join!(
        store.update(
            "backend",
            ClientUpdate::new(vec![a, b], vec![]).if_unchanged(&backend)
        ),
        store.update(
            "backend",
            ClientUpdate::new(vec![], vec![]).if_unchanged(&backend)
        ),
    );
    let conflicts = [&first, &second]
        .iter()
        .filter(|result| result.as_ref().is_err_and(|err| err.is_conflict()))
        .count();
    assert_eq!(
        (first.is_ok() || second.is_ok(), conflicts),
        (true, 1),
        "{first:?} {second:?}"
    );
    let made = if first.is_ok() { vec![a, b] } else { vec![] };
    let now = store.client("backend").await.unwrap().unwrap();
    assert_eq!(now.tenants, made);
    store
        .update("backend", ClientUpdate::new(vec![a], vec![]))
        .await
        .unwrap();

    // Revoked: marked, its secrets gone, no rotation or entitlement change, the id stays taken,
    // and listed among the revoked (alone).
    assert!(store.revoked_clients().await.unwrap().is_empty());
    store.revoke("app").await.unwrap();
    let revoked: Vec<String> = store
        .revoked_clients()
        .await
        .unwrap()
        .into_iter()
        .map(|client| client.id)
        .collect();
    assert_eq!(revoked, ["app"]);
    let record = store.client("app").await.unwrap().unwrap();
    assert!(record.revoked);
    assert!(record.secrets.is_empty());
    assert!(store
        .rotate_secret("app", Duration::ZERO)
        .await
        .unwrap_err()
        .is_refused());
    assert!(store
        .set_entitlements("app", vec![a], vec![])
        .await
        .unwrap_err()
        .is_refused());
    assert!(store
        .register(NewClient::new("app"))
        .await
        .unwrap_err()
        .is_refused());

    // Every client listed, the revoked one included, in byte order of its id (an upper-case
    // id first, whatever a database's collation says), each as its own look-up gives it.
    store
        .register(NewClient::new("Zeta").tenant(b))
        .await
        .unwrap();
    let listed = store.clients().await.unwrap();
    let ids: Vec<&str> = listed.iter().map(|client| client.id.as_str()).collect();
    assert_eq!(ids, ["Zeta", "app", "backend", "metered", "provisioned"]);
    for client in &listed {
        assert_eq!(
            Some(client),
            store.client(&client.id).await.unwrap().as_ref()
        );
    }
    assert_eq!(
        listed.iter().filter(|client| client.revoked).count(),
        1,
        "only app is revoked"
    );
    // Narrowed, each is its whole record narrowed (the revoked one marked so).
    narrowed_reads_agree(&*store, &listed).await;

    if let Some(reopen) = reopen {
        let provisioned = store.client("provisioned").await.unwrap().unwrap();
        drop(store);
        let store = reopen().await;
        assert_eq!(store.clients().await.unwrap(), listed);
        narrowed_reads_agree(&*store, &listed).await;
        let record = store.client("app").await.unwrap().unwrap();
        assert!(record.revoked);
        assert_eq!(store.revoked_clients().await.unwrap().len(), 1);
        assert!(record.secrets.is_empty());
        assert_eq!(record.tenants, [a, b]);
        let reopened = store.client("provisioned").await.unwrap().unwrap();
        assert_eq!(reopened.secrets[0].phc, provisioned.secrets[0].phc);
        assert_eq!(reopened.rate_limit, None);
        let metered = store.client("metered").await.unwrap().unwrap();
        assert_eq!(metered.rate_limit, RateLimit::new(50, 100).ok());
        let backend = store.client("backend").await.unwrap().unwrap();
        assert_eq!(
            backend.token_endpoint_auth_method,
            AuthMethod::PrivateKeyJwt
        );
        // As the last whole update left it.
        assert_eq!(
            (backend.jwks_uri, backend.tenants, backend.rate_limit),
            (None, vec![a], Some(limit()))
        );
        assert_eq!(backend.jwks.unwrap()["keys"][0]["kid"], "k4");
        assert_eq!(
            store.client("provisioned").await.unwrap().unwrap().tenants,
            [b]
        );
    }
}

/// A cheap hashing cost: the suite is about behaviour, not Argon2's price.
fn cheap() -> SecretHashing {
    SecretHashing::new(1024, 1).unwrap()
}

#[tokio::test]
async fn in_memory_directory() {
    let none = None::<fn() -> std::future::Ready<Arc<dyn TenantStore>>>;
    tenant_store_conformance(Arc::new(InMemoryDirectory::new()), none).await;
}

#[tokio::test]
async fn file_directory() {
    let path = scratch("directory").join("tenants.json");
    let open = || {
        let path = path.clone();
        async move { Arc::new(FileDirectory::open(&path).unwrap()) as Arc<dyn TenantStore> }
    };
    tenant_store_conformance(open().await, Some(open)).await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[tokio::test]
async fn in_memory_client_store() {
    let none = None::<fn() -> std::future::Ready<Arc<dyn ClientStore>>>;
    client_store_conformance(Arc::new(InMemoryClientStore::with_hashing(cheap())), none).await;
}

#[tokio::test]
async fn file_client_store() {
    let path = scratch("clients").join("clients.json");
    let open = || {
        let path = path.clone();
        async move {
            Arc::new(FileClientStore::open_with_hashing(&path, cheap()).unwrap())
                as Arc<dyn ClientStore>
        }
    };
    client_store_conformance(open().await, Some(open)).await;
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn store_errors_carry_their_source() {
    use std::error::Error;
    let dir = scratch("sources");
    // A directory where a file is expected: the read fails with an I/O error underneath.
    let err = FileDirectory::open(&dir).unwrap_err();
    assert!(err.source().is_some(), "{err}");
    let err = FileClientStore::open(&dir).unwrap_err();
    assert!(err.source().is_some(), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn files_written_before_rate_limits_still_load() {
    let dir = scratch("legacy");
    let clients = dir.join("clients.json");
    std::fs::write(
        &clients,
        format!(r#"{{"version": 1, "clients": [{{"id": "app", "secrets": [], "tenants": ["{A}"], "scopes": []}}]}}"#),
    )
    .unwrap();
    let store = FileClientStore::open_with_hashing(&clients, cheap()).unwrap();
    let record = store.client("app").await.unwrap().unwrap();
    assert_eq!((record.tenants, record.rate_limit), (vec![tenant(A)], None));

    let tenants = dir.join("tenants.json");
    std::fs::write(
        &tenants,
        format!(r#"{{"tenants": [{{"id": "{A}", "upstreams": [{{"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "3.0"}}]}}]}}"#),
    )
    .unwrap();
    let directory = FileDirectory::open(&tenants).unwrap();
    let found = directory.get(tenant(A)).unwrap();
    assert_eq!(found.rate_limit(), None);
    assert_eq!(found.default_upstream().unwrap().max_concurrency(), None);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stores() {
    use tower_fhir::postgres::PgState;
    let Some(server) =
        support::postgres::Postgres::start_or_skip("stores", "the PostgreSQL stores test")
    else {
        return;
    };
    server.create_database("stores");
    let url = server.url("stores");
    // Replicas starting at once against the empty database: one migrates, the others wait
    // for it under the advisory lock, none fails.
    let starting = (0..4).map(|_| PgState::connect(&url));
    for state in futures::future::join_all(starting).await {
        state.unwrap();
    }
    let clients = || {
        let url = url.clone();
        async move {
            let state = PgState::connect(&url).await.unwrap();
            Arc::new(state.client_store(cheap())) as Arc<dyn ClientStore>
        }
    };
    client_store_conformance(clients().await, Some(clients)).await;
    let tenants = || {
        let url = url.clone();
        async move {
            Arc::new(PgState::connect(&url).await.unwrap().tenant_store()) as Arc<dyn TenantStore>
        }
    };
    tenant_store_conformance(tenants().await, Some(tenants)).await;
    // Two replicas' writers checking other tenants take turns: the second waits for the
    // first's lock, and gets it once that is let go (its session closed).
    let (first, second) = (tenants().await, tenants().await);
    let held = first.lock_writes().await.unwrap();
    let mut waiting = tokio::spawn(async move { second.lock_writes().await.map(drop) });
    let early = tokio::time::timeout(Duration::from_millis(500), &mut waiting).await;
    assert!(
        early.is_err(),
        "the second took the lock while the first held it"
    );
    drop(held);
    let taken = tokio::time::timeout(Duration::from_secs(5), waiting).await;
    assert!(matches!(taken, Ok(Ok(Ok(())))), "{taken:?}");
    drop(first.lock_writes().await.unwrap());
    // A URL that is not one, and a server that is not there: clear errors, no hang.
    assert!(PgState::connect("not a url").await.is_err());
    let closed = format!(
        "postgres://gateway@127.0.0.1:{}/stores",
        support::free_port()
    );
    let refused = PgState::connect(&closed).await.unwrap_err();
    assert!(refused.to_string().contains("cannot connect"), "{refused}");
    // A schema a newer version migrated is not used by this one.
    server.query(
        "stores",
        "INSERT INTO tower_fhir_migrations (version) VALUES (999)",
    );
    let refused = PgState::connect(&url).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("at version 999, past this version's"),
        "{refused}"
    );
}

/// The connections the state makes to a database beyond loopback are TLS, its certificate
/// checked: a server whose certificate chains to no trusted root, or that offers no TLS, is
/// not connected to; a loopback URL naming no `sslmode` goes in clear, one saying `require`
/// over TLS. (`host=db.test hostaddr=127.0.0.1`: a host name beyond loopback, on this one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_beyond_loopback_is_reached_over_tls_with_its_certificate_checked() {
    use tower_fhir::postgres::PgState;
    let Some(server) = support::postgres::Postgres::start_or_skip("tls", "the PostgreSQL TLS test")
    else {
        return;
    };
    server.create_database("tls");
    let port = server.port();
    let beyond = format!("host=db.test hostaddr=127.0.0.1 port={port} user=gateway dbname=tls");
    // No TLS on the server yet: refused, not in clear.
    let refused = PgState::connect(&beyond).await.unwrap_err();
    assert!(refused.to_string().contains("cannot connect"), "{refused}");

    let certified =
        rcgen::generate_simple_self_signed(vec!["db.test".to_owned(), "localhost".to_owned()])
            .unwrap();
    server.use_tls(
        &certified.cert.pem(),
        &certified.signing_key.serialize_pem(),
    );
    let root = certified.cert.pem().into_bytes();
    // Over TLS with the server's certificate trusted; the session is TLS on the server's side.
    let state = PgState::connect_with_roots(&beyond, std::slice::from_ref(&root))
        .await
        .unwrap();
    state.ping().await.unwrap();
    let encrypted = |ssl: bool| {
        server
            .query(
                "tls",
                &format!(
                    "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
                     WHERE datname = 'tls' AND application_name <> 'psql' AND ssl = {ssl}"
                ),
            )
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    assert!(encrypted(true) >= 1, "no TLS session on the server");
    assert_eq!(encrypted(false), 0, "a session in clear");
    drop(state);
    // A certificate no trusted root signs: not connected to.
    let untrusted = PgState::connect(&beyond).await.unwrap_err();
    assert!(
        untrusted.to_string().contains("cannot connect"),
        "{untrusted}"
    );
    // Loopback: in clear unless the URL asks for TLS.
    let local = PgState::connect(&server.url("tls")).await.unwrap();
    local.ping().await.unwrap();
    assert!(encrypted(false) >= 1, "a loopback URL went over TLS");
    drop(local);
    // A Unix socket names no host: in clear, as loopback.
    let socket = format!(
        "host={} port={port} user=gateway dbname=tls",
        server.socket_dir().display()
    );
    PgState::connect(&socket)
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
    let required = format!(
        "{}?sslmode=require",
        server.url("tls").replace("127.0.0.1", "localhost")
    );
    let state = PgState::connect_with_roots(&required, &[root])
        .await
        .unwrap();
    state.ping().await.unwrap();
}

/// A pool with every connection in use answers a readiness ping at once: its requests are
/// being served (a ping queued behind them would take a busy replica out of its balancer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_busy_pool_is_ready() {
    use tower_fhir::postgres::PgState;
    let Some(server) =
        support::postgres::Postgres::start_or_skip("busy", "the PostgreSQL busy-pool test")
    else {
        return;
    };
    server.create_database("busy");
    let state = PgState::connect(&server.url("busy")).await.unwrap();
    let store = state.tenant_store();
    let other = PgState::connect(&server.url("busy"))
        .await
        .unwrap()
        .tenant_store();
    let held = other.lock_writes().await.unwrap();
    // Sixteen writers wait for the lock, each on one of the pool's sixteen connections.
    let waiting: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.lock_writes().await.map(drop) })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // (2 s: a round trip on a busy machine may take a while; a ping queued behind the
    // writers would wait for the lock, held until after this.)
    let pinged = tokio::time::timeout(Duration::from_secs(2), state.ping()).await;
    assert!(matches!(pinged, Ok(Ok(()))), "{pinged:?}");
    drop(held);
    for waiter in waiting {
        let _ = waiter.await;
    }
    state.ping().await.unwrap();
}

/// A sealed tenant store keeps no upstream credential in clear in the database: it reads its
/// own sealed credentials and those written in clear before; a store without the key, or a
/// sealed credential copied to another tenant, reads none (an error, not a tenant without it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_upstream_credentials_are_sealed_at_rest() {
    use tower_fhir::postgres::{CredentialsSealed, KeyEncryptionKey, PgState};
    let Some(server) =
        support::postgres::Postgres::start_or_skip("sealed", "the PostgreSQL sealing test")
    else {
        return;
    };
    server.create_database("sealed");
    let state = PgState::connect(&server.url("sealed")).await.unwrap();
    let kek =
        || KeyEncryptionKey::from_base64("c2VhbGVkLWNyZWRlbnRpYWxzLTMyLWJ5dGUta2V5ISE=").unwrap();
    let sealed = state.sealed_tenant_store(kek());
    let plain = state.tenant_store();
    let with_credential = |base: &str| {
        TenantRecord::new([Upstream::parse(base, FhirVersion::R4)
            .unwrap()
            .with_authorization("Bearer upstream-secret-1234")
            .unwrap()])
        .unwrap()
    };
    sealed
        .put(tenant(A), with_credential("http://ehr-a/fhir"))
        .await
        .unwrap();
    let stored = server.query(
        "sealed",
        &format!("SELECT record::text FROM tower_fhir_tenants WHERE id = '{A}'"),
    );
    assert!(!stored.contains("upstream-secret"), "{stored}");
    assert!(stored.contains("authorization_sealed"), "{stored}");
    let read = sealed.lookup(tenant(A)).await.unwrap().unwrap();
    assert_eq!(
        read.default_upstream().unwrap().authorization().unwrap(),
        "Bearer upstream-secret-1234"
    );
    // Without the key: an error, not the tenant without its credential.
    assert!(plain.lookup(tenant(A)).await.is_err());
    // Written in clear before: read, and sealed when written again.
    plain
        .put(tenant(B), with_credential("http://ehr-b/fhir"))
        .await
        .unwrap();
    let read = sealed.lookup(tenant(B)).await.unwrap().unwrap();
    assert_eq!(
        read.default_upstream().unwrap().authorization().unwrap(),
        "Bearer upstream-secret-1234"
    );
    // Sealed in place at start (as the gateway does), unchanged in what it says.
    assert_eq!(
        plain.seal_stored_credentials().await.unwrap(),
        CredentialsSealed::default(),
        "no key"
    );
    assert_eq!(sealed.seal_stored_credentials().await.unwrap().in_clear, 1);
    let stored = server.query(
        "sealed",
        &format!("SELECT record::text FROM tower_fhir_tenants WHERE id = '{B}'"),
    );
    assert!(!stored.contains("upstream-secret"), "{stored}");
    let read = sealed.lookup(tenant(B)).await.unwrap().unwrap();
    assert_eq!(
        read.default_upstream().unwrap().authorization().unwrap(),
        "Bearer upstream-secret-1234"
    );
    assert_eq!(
        sealed.seal_stored_credentials().await.unwrap(),
        CredentialsSealed::default()
    );
    // A sealed credential copied to another tenant's row opens for none.
    server.query(
        "sealed",
        &format!(
            "UPDATE tower_fhir_tenants SET record = (SELECT record FROM tower_fhir_tenants WHERE id = '{A}') WHERE id = '{B}'"
        ),
    );
    assert!(sealed.lookup(tenant(B)).await.is_err());
    // A record holding one upstream's credential sealed and another's in clear (written by
    // hand): the one in clear is sealed at start, the other kept; one holding a credential
    // both ways is refused, saying so.
    let two = TenantRecord::new([
        Upstream::parse("http://ehr-c/r4", FhirVersion::R4)
            .unwrap()
            .with_authorization("Bearer upstream-secret-1234")
            .unwrap(),
        Upstream::parse("http://ehr-c/r3", FhirVersion::Stu3)
            .unwrap()
            .with_authorization("Bearer other-secret-5678")
            .unwrap(),
    ])
    .unwrap();
    sealed.put(tenant(C), two).await.unwrap();
    server.query(
        "sealed",
        &format!(
            "UPDATE tower_fhir_tenants SET record = jsonb_set(record #- '{{upstreams,1,authorization_sealed}}', '{{upstreams,1,authorization}}', '\"Bearer typed-in-9012\"') WHERE id = '{C}'"
        ),
    );
    assert_eq!(
        sealed.seal_stored_credentials().await.unwrap(),
        CredentialsSealed {
            in_clear: 1,
            previous: 0
        }
    );
    let stored = server.query(
        "sealed",
        &format!("SELECT record::text FROM tower_fhir_tenants WHERE id = '{C}'"),
    );
    assert!(!stored.contains("typed-in"), "{stored}");
    let read = sealed.lookup(tenant(C)).await.unwrap().unwrap();
    let credentials: Vec<_> = read
        .upstreams()
        .iter()
        .map(|upstream| upstream.authorization().unwrap().to_owned())
        .collect();
    assert_eq!(
        credentials,
        ["Bearer upstream-secret-1234", "Bearer typed-in-9012"]
    );
    server.query(
        "sealed",
        &format!(
            "UPDATE tower_fhir_tenants SET record = jsonb_set(record, '{{upstreams,0,authorization}}', '\"Bearer both-3456\"') WHERE id = '{C}'"
        ),
    );
    let refused = sealed.seal_stored_credentials().await.unwrap_err();
    assert!(refused.to_string().contains("both in clear"), "{refused}");
}

/// The credential of `tenant`'s first upstream as `store` reads it (an error as text).
async fn credential_in(
    store: &tower_fhir::postgres::PgTenantStore,
    tenant_id: &str,
) -> Result<String, String> {
    let record = store
        .lookup(tenant(tenant_id))
        .await
        .map_err(|e| e.to_string())?;
    let upstream = record.unwrap().default_upstream().unwrap().clone();
    Ok(upstream
        .authorization()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned())
}

/// The key-encryption key changes across replicas without a stop: replicas given the old key
/// with the new one as their next key seal nothing anew, started before or after the change;
/// one given the new key with the old one as its previous key seals the signing keys and the
/// credentials again with the new key at start, and both kinds of replica still open
/// everything; then the new key alone opens it all, and the old key alone opens nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_key_encryption_key_changes_replica_by_replica() {
    use tower_fhir::postgres::{
        CredentialsSealed, KeyEncryptionKey, PgSigningKeys, PgState, PgTenantStore,
    };
    let Some(server) =
        support::postgres::Postgres::start_or_skip("rekey", "the PostgreSQL key change test")
    else {
        return;
    };
    server.create_database("rekey");
    let url = server.url("rekey");
    let old =
        || KeyEncryptionKey::from_base64("b2xkLWtleS1lbmNyeXB0aW9uLWtleS0zMi1ieXRlcyE=").unwrap();
    let new =
        || KeyEncryptionKey::from_base64("bmV3LWtleS1lbmNyeXB0aW9uLWtleS0zMi1ieXRlcyE=").unwrap();
    let credential = "Bearer rekeyed-upstream-secret";
    let record = |base: &str| {
        TenantRecord::new([Upstream::parse(base, FhirVersion::R4)
            .unwrap()
            .with_authorization(credential)
            .unwrap()])
        .unwrap()
    };
    // The sealed tenant A and signing keys, as the database holds them.
    let stored = || {
        [
            format!("SELECT record::text FROM tower_fhir_tenants WHERE id = '{A}'"),
            "SELECT kid, encode(sealed, 'base64') FROM tower_fhir_signing_keys ORDER BY kid".into(),
        ]
        .map(|query| server.query("rekey", &query))
    };
    // A replica started with `kek`: its tenant store once it has sealed what it seals at
    // start, what that was, and its signing keys (or why it cannot start).
    let replica = |kek: KeyEncryptionKey| async {
        let state = PgState::connect(&url).await.unwrap();
        let keys = state
            .signing_keys(kek.clone())
            .await
            .map_err(|e| e.to_string());
        let store: PgTenantStore = state.sealed_tenant_store(kek);
        store.listening().await;
        let sealed = store
            .seal_stored_credentials()
            .await
            .map_err(|e| e.to_string());
        (store, sealed, keys)
    };
    let kid_of = |keys: &Result<PgSigningKeys, String>| {
        keys.as_ref()
            .map(|keys| keys.signing_keys().current_kid())
            .map_err(Clone::clone)
    };
    let nothing = Ok(CredentialsSealed::default());
    let tenants_again = |previous| {
        Ok(CredentialsSealed {
            in_clear: 0,
            previous,
        })
    };

    // Before: sealed with the old key.
    let (store, _, keys) = replica(old()).await;
    let kid = kid_of(&keys).unwrap();
    store
        .put(tenant(A), record("http://ehr-a/fhir"))
        .await
        .unwrap();
    let by_old = stored();

    // Step 1, every replica: the old key, the new one next. Nothing sealed anew.
    let step_one = || old().with_next(new());
    let (first, sealed, first_keys) = replica(step_one()).await;
    assert_eq!(
        (sealed, kid_of(&first_keys)),
        (nothing.clone(), Ok(kid.clone()))
    );
    assert_eq!(stored(), by_old, "step 1 writes nothing");

    // Step 2, a replica: the new key, the old one previous. Sealed again at start.
    let (second, sealed, second_keys) = replica(new().with_previous(old())).await;
    assert_eq!(
        (sealed, kid_of(&second_keys)),
        (tenants_again(1), Ok(kid.clone()))
    );
    let by_new = stored();
    assert!(
        by_new.iter().zip(&by_old).all(|(new, old)| new != old),
        "{by_new:?}"
    );
    assert!(
        !by_new[0].contains("rekeyed-upstream-secret"),
        "{}",
        by_new[0]
    );
    assert_eq!(
        second
            .seal_stored_credentials()
            .await
            .map_err(|e| e.to_string()),
        nothing,
        "nothing left"
    );
    // The step-1 replica opens what the step-2 one sealed, and a step-1 replica started now
    // opens it all and seals nothing back with the old key.
    assert_eq!(credential_in(&first, A).await.unwrap(), credential);
    let (late, sealed, late_keys) = replica(step_one()).await;
    assert_eq!(
        (sealed, kid_of(&late_keys)),
        (nothing.clone(), Ok(kid.clone()))
    );
    assert_eq!(credential_in(&late, A).await.unwrap(), credential);
    assert_eq!(stored(), by_new, "a step-1 start wrote");
    // A tenant written and a signing key added through a step-1 replica meanwhile (sealed
    // with the old key): the step-2 replica opens them, and seals them again with the new
    // key as it hears of them, with no restart.
    first
        .put(tenant(B), record("http://ehr-b/fhir"))
        .await
        .unwrap();
    let rotated = first_keys
        .as_ref()
        .unwrap()
        .rotate(Duration::ZERO, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(credential_in(&second, B).await.unwrap(), credential);
    let new_alone = PgState::connect(&url).await.unwrap();
    let opens_rotated = async || {
        // (A key it cannot open is left out of what it publishes.)
        let keys = new_alone.signing_keys(new()).await.unwrap();
        keys.signing_keys().jwks().to_string().contains(&rotated)
    };
    let new_alone_store = new_alone.sealed_tenant_store(new());
    let started = std::time::Instant::now();
    while credential_in(&new_alone_store, B).await.is_err() || !opens_rotated().await {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the step-2 replica did not seal again what the step-1 replica wrote"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A step-2 replica restarted now finds nothing left to seal again.
    let (_, sealed, _) = replica(new().with_previous(old())).await;
    assert_eq!(sealed, nothing);
    drop((second_keys, first_keys, late_keys));

    // Step 3: the new key alone opens everything, the old key alone nothing.
    let (last, sealed, last_keys) = replica(new()).await;
    assert_eq!((sealed, kid_of(&last_keys)), (nothing, Ok(rotated.clone())));
    let published = last_keys.unwrap().signing_keys().jwks().to_string();
    assert!(
        published.contains(&kid) && published.contains(&rotated),
        "{published}"
    );
    for tenant in [A, B] {
        assert_eq!(credential_in(&last, tenant).await.unwrap(), credential);
    }
    let (stale, _, refused) = replica(old()).await;
    assert!(credential_in(&stale, A).await.is_err());
    let refused = kid_of(&refused).unwrap_err();
    assert!(
        refused.contains("cannot be opened with this key-encryption key"),
        "{refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_changes_reach_every_replica_within_a_second() {
    use tokio::time::timeout;
    use tower_fhir::postgres::PgState;
    let Some(server) =
        support::postgres::Postgres::start_or_skip("changes", "the PostgreSQL changes test")
    else {
        return;
    };
    server.create_database("changes");
    let url = server.url("changes");
    let (one, two) = (
        PgState::connect(&url).await.unwrap().tenant_store(),
        PgState::connect(&url).await.unwrap().tenant_store(),
    );
    let mut heard = two.changes();
    let admin = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(admin.1);
    let admin = admin.0;
    let listening = async || {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // Both replicas' listeners connected (a busy machine may take a while to connect): the
    // stores say so, and so does the server.
    for store in [&one, &two] {
        timeout(Duration::from_secs(10), store.listening())
            .await
            .expect("the listeners never connected");
        assert!(store.is_listening());
    }
    assert_eq!(listening().await, 2);
    let next = |heard: &mut tokio::sync::broadcast::Receiver<TenantId>| {
        let heard = heard.resubscribe();
        async move {
            let mut heard = heard;
            timeout(Duration::from_secs(1), heard.recv()).await
        }
    };
    let waiting = next(&mut heard);
    one.put(
        tenant(A),
        upstreams("http://127.0.0.1:9001/fhir", FhirVersion::R4),
    )
    .await
    .unwrap();
    assert_eq!(
        waiting.await.expect("not heard within 1 s").unwrap(),
        tenant(A)
    );
    assert!(two.lookup(tenant(A)).await.unwrap().is_some());
    let waiting = next(&mut heard);
    assert!(one.delete(tenant(A)).await.unwrap());
    assert_eq!(
        waiting.await.expect("not heard within 1 s").unwrap(),
        tenant(A)
    );

    // The listeners' connections are cut: each connects again and announces the tenants
    // changed meanwhile (and those it heard of whose versions it had not read yet), not the
    // others.
    one.put(
        tenant(B),
        upstreams("http://127.0.0.1:9002/fhir", FhirVersion::R4),
    )
    .await
    .unwrap();
    one.put(
        tenant(D),
        upstreams("http://127.0.0.1:9004/fhir", FhirVersion::R4),
    )
    .await
    .unwrap();
    // A third replica lists B and D at its start; B is then written again (the same record)
    // without a notification, as a write it does not hear would be.
    let three = PgState::connect(&url).await.unwrap().tenant_store();
    timeout(Duration::from_secs(10), three.listening())
        .await
        .expect("the third listener never connected");
    let mut third_heard = three.changes();
    admin
        .execute(
            "UPDATE tower_fhir_tenants SET record = record WHERE id = $1",
            &[&uuid::Uuid::parse_str(B).unwrap()],
        )
        .await
        .unwrap();
    let mut resync = two.changes();
    // No new connection is let in for a while: the stores say they are not listening. (A
    // database's connections are allowed and disallowed from another database.)
    let root = tokio_postgres::connect(&server.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(root.1);
    let root = root.0;
    root.batch_execute("ALTER DATABASE changes ALLOW_CONNECTIONS false")
        .await
        .unwrap();
    let cut = admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(cut, 3, "each replica listens on one connection");
    until(Duration::from_secs(10), "not said to be listening", || {
        !(one.is_listening() || two.is_listening() || three.is_listening())
    })
    .await;
    root.batch_execute("ALTER DATABASE changes ALLOW_CONNECTIONS true")
        .await
        .unwrap();
    timeout(Duration::from_secs(10), two.listening())
        .await
        .expect("the listener never connected again");
    // The third announces the tenant written meanwhile and not the one unchanged, whose cached
    // route stays (announced once the listener is up again: all of it is in the channel now).
    timeout(Duration::from_secs(10), three.listening())
        .await
        .expect("the third listener never connected again");
    let mut resynchronised = Vec::new();
    while let Ok(tenant) = third_heard.try_recv() {
        resynchronised.push(tenant);
    }
    assert_eq!(resynchronised, vec![tenant(B)]);
    one.put(
        tenant(C),
        upstreams("http://127.0.0.1:9003/fhir", FhirVersion::R4),
    )
    .await
    .unwrap();
    let mut announced = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    // (B written unheard; C changed once listening again.)
    while !(announced.contains(&tenant(B)) && announced.contains(&tenant(C))) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match timeout(left, resync.recv()).await {
            Ok(Ok(tenant)) => {
                announced.insert(tenant);
            }
            other => panic!("not resynchronised: {other:?}, heard {announced:?}"),
        }
    }
}

/// A database that stops answering without closing anything (a hung server, a firewall that
/// forgot the flows): requests fail within the operation timeout instead of hanging, the
/// change listener finds its connection dead and, once the database answers again, connects
/// again and catches up with what changed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_that_stops_answering_fails_fast_and_its_listener_catches_up() {
    use tokio::time::timeout;
    use tower_fhir::postgres::PgState;
    use tower_fhir::route::TenantDirectory;
    let Some(server) =
        support::postgres::Postgres::start_or_skip("frozen", "the PostgreSQL hung-server test")
    else {
        return;
    };
    server.create_database("frozen");
    let proxy = support::postgres::FreezingProxy::start(server.port()).await;
    let direct = PgState::connect(&server.url("frozen"))
        .await
        .unwrap()
        .tenant_store();
    let through_state = PgState::connect(&proxy.url("frozen")).await.unwrap();
    let through = through_state.tenant_store();
    // Its revocation listener too (the list must be held for it to listen on).
    let revoked = tower_fhir::auth::RevokedTokens::new();
    let revocations = through_state.follow_revocations(&revoked).await.unwrap();
    timeout(Duration::from_secs(10), through.listening())
        .await
        .expect("the listener never connected");
    timeout(Duration::from_secs(10), revocations.listening())
        .await
        .expect("the revocation listener never connected");
    assert!(
        revocations.is_listening(),
        "the revocation listener stopped"
    );
    let before = upstreams("http://127.0.0.1:9001/fhir", FhirVersion::R4);
    direct.put(tenant(A), before.clone()).await.unwrap();
    assert_eq!(through.lookup(tenant(A)).await.unwrap(), Some(before));

    proxy.freeze(true);
    let started = std::time::Instant::now();
    let looked = timeout(Duration::from_secs(30), through.lookup(tenant(A)))
        .await
        .expect("a lookup hung on a database that stopped answering");
    let error = looked.unwrap_err().to_string();
    assert!(error.contains("did not answer"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "{:?}",
        started.elapsed()
    );
    // The listener hears nothing, checks its connection (after 10 s of quiet) and gives up on
    // it (5 s later).
    until(
        Duration::from_secs(30),
        "not said to be listening on a connection that stopped answering",
        || !(through.is_listening() || revocations.is_listening()),
    )
    .await;
    // A change made meanwhile reaches it once the database answers again.
    let after = upstreams("http://127.0.0.1:9002/fhir", FhirVersion::R4);
    direct.put(tenant(B), after.clone()).await.unwrap();
    let mut resync = through.changes();
    proxy.freeze(false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match timeout(left, resync.recv()).await {
            Ok(Ok(heard)) if heard == tenant(B) => break,
            Ok(Ok(_)) => {}
            other => panic!("not caught up: {other:?}"),
        }
    }
    timeout(Duration::from_secs(10), through.listening())
        .await
        .expect("caught up, but not said to be listening");
    timeout(Duration::from_secs(30), revocations.listening())
        .await
        .expect("the revocation listener did not connect again");
    assert!(
        revocations.is_listening(),
        "the revocation listener stopped"
    );
    assert_eq!(through.lookup(tenant(B)).await.unwrap(), Some(after));
    drop(revoked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_seeding_adds_only_tenants_never_held() {
    use tower_fhir::postgres::PgState;
    let Some(server) =
        support::postgres::Postgres::start_or_skip("seeding", "the PostgreSQL seeding test")
    else {
        return;
    };
    server.create_database("seeding");
    let store = PgState::connect(&server.url("seeding"))
        .await
        .unwrap()
        .tenant_store();
    let a = TenantId::parse(A).unwrap();
    let seeded = upstreams("http://seeded.example/fhir", FhirVersion::R4);
    let changed = upstreams("http://changed.example/fhir", FhirVersion::R4);
    assert!(store.insert_if_absent(a, &seeded).await.unwrap());
    // A change made since is kept.
    store.put(a, changed.clone()).await.unwrap();
    assert!(!store.insert_if_absent(a, &seeded).await.unwrap());
    assert_eq!(store.lookup(a).await.unwrap(), Some(changed.clone()));
    // A tenant removed since stays removed.
    assert!(store.delete(a).await.unwrap());
    assert!(!store.insert_if_absent(a, &seeded).await.unwrap());
    assert_eq!(store.lookup(a).await.unwrap(), None);
    // Onboarded again on purpose, it is there; removed again, seeding still leaves it out.
    store.put(a, changed.clone()).await.unwrap();
    assert_eq!(store.lookup(a).await.unwrap(), Some(changed));
    assert!(store.delete(a).await.unwrap());
    assert!(!store.insert_if_absent(a, &seeded).await.unwrap());
}

/// A PostgreSQL server with a database `name`, its URL, and a client store over it holding
/// one client, `app`; `None` (said loudly) where no server can be started outside CI.
async fn postgres_with_a_client(
    name: &str,
    test: &str,
) -> Option<(
    support::postgres::Postgres,
    String,
    tower_fhir::postgres::PgClientStore,
)> {
    let server = support::postgres::Postgres::start_or_skip(name, test)?;
    server.create_database(name);
    let url = server.url(name);
    let store = tower_fhir::postgres::PgState::connect(&url)
        .await
        .unwrap()
        .client_store(SecretHashing::new(64, 1).unwrap());
    store
        .register(NewClient::new("app").secret("a-secret-long-enough-1234"))
        .await
        .unwrap();
    Some((server, url, store))
}

/// A table lock held longer than an operation may wait: the operation fails within its 5 s,
/// and its backend stops waiting too (the server's `lock_timeout`), so requests that keep
/// coming do not pile backends up until the server has no connection slot left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_given_up_on_leaves_no_backend_waiting_for_a_lock() {
    use tokio::time::{timeout, Instant};
    let Some((_server, url, store)) =
        postgres_with_a_client("locks", "the PostgreSQL lock-wait test").await
    else {
        return;
    };
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    admin
        .batch_execute("BEGIN; LOCK TABLE tower_fhir_clients IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let waiting = async || {
        admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    // Four reads at once, each given up on.
    let started = Instant::now();
    let reads: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.client("app").await })
        })
        .collect();
    for read in reads {
        let read = timeout(Duration::from_secs(15), read)
            .await
            .expect("a read waited on the lock past its bound")
            .unwrap();
        assert!(read.is_err(), "a read through an exclusive lock succeeded");
    }
    assert!(started.elapsed() < Duration::from_secs(12));
    // The lock is still held: no backend of the store is left waiting on it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while waiting().await > 0 {
        assert!(
            Instant::now() < deadline,
            "backends still wait for the lock after their operations were given up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    admin.batch_execute("ROLLBACK").await.unwrap();
    // And the store serves again once it is let go.
    assert!(store.client("app").await.unwrap().is_some());
}

/// A client row the store cannot read (written by hand, or by a later version): the listing
/// leaves it out (the administrator still sees the others), a read of it fails naming it, and
/// the revoked clients' listing, which must not lose one, fails naming it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_client_row_is_named_and_hides_no_other_client() {
    let Some((server, _url, store)) =
        postgres_with_a_client("unreadable", "the PostgreSQL unreadable-row test").await
    else {
        return;
    };
    server.query(
        "unreadable",
        "INSERT INTO tower_fhir_clients (id, record) VALUES ('evil', '{\"foo\": 1}'), \
         ('maybe', '{\"revoked\": \"maybe\"}')",
    );
    let listed = store.clients().await.unwrap();
    assert_eq!(
        listed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        ["app"],
        "the readable client listed, the others left out"
    );
    let failed = store.client("evil").await.unwrap_err().to_string();
    assert!(failed.contains("\"evil\""), "{failed}");
    // `revoked` that is no boolean fails no cast: not a revoked client.
    assert!(store.revoked_clients().await.unwrap().is_empty());
    server.query(
        "unreadable",
        "INSERT INTO tower_fhir_clients (id, record) VALUES ('gone', '{\"revoked\": true}')",
    );
    let failed = store.revoked_clients().await.unwrap_err().to_string();
    assert!(failed.contains("\"gone\""), "{failed}");
}

/// What [`ClientStore::client_for_tenant`] asks PostgreSQL for a tenant, and for none: copied
/// from `PgClientStore::read_for_tenant` (src/postgres/mod.rs), which must run these and
/// nothing else: the test that explains them fails when the store runs another statement
/// (`pg_stat_statements`' query identifiers, which ignore the spacing and the constants).
const NARROWED_FOR_A_TENANT: &str =
    "SELECT c.head, ARRAY(SELECT t.tenant FROM tower_fhir_client_tenants t
                                               WHERE t.client = c.id AND t.tenant = $2)
                         FROM tower_fhir_clients c WHERE c.id = $1";
const NARROWED_FOR_NO_TENANT: &str =
    "SELECT c.head, ARRAY(SELECT t.tenant FROM tower_fhir_client_tenants t
                                               WHERE t.client = c.id ORDER BY t.tenant LIMIT 2)
                         FROM tower_fhir_clients c WHERE c.id = $1";

/// Every node of a plan as `EXPLAIN (FORMAT JSON)` gives it, the plan's own first.
fn plan_nodes(plan: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut nodes = vec![plan];
    for child in plan["Plans"].as_array().into_iter().flatten() {
        nodes.extend(plan_nodes(child));
    }
    nodes
}

/// The plans PostgreSQL makes for `sql` prepared (as the store prepares it) and run with
/// `arguments`, custom and generic (a prepared statement may get either): the client's tenant
/// rows are looked up by their primary key, for the client (and, `by_tenant`, the tenant), never
/// scanned nor sorted; what comes out is `head` and the tenants found, never the `record` (its
/// list of tenants). Gives the statement's query identifier, as `pg_stat_statements` counts it.
async fn narrowed_plans(
    admin: &tokio_postgres::Client,
    sql: &str,
    arguments: &str,
    by_tenant: bool,
) -> i64 {
    admin
        .batch_execute(&format!("DEALLOCATE ALL; PREPARE narrowed AS {sql}"))
        .await
        .unwrap();
    let mut identifiers = Vec::new();
    for mode in ["force_custom_plan", "force_generic_plan"] {
        admin
            .batch_execute(&format!("SET plan_cache_mode = {mode}"))
            .await
            .unwrap();
        let explained: serde_json::Value = admin
            .query_one(
                &format!("EXPLAIN (VERBOSE, FORMAT JSON) EXECUTE narrowed({arguments})"),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let shown = format!("{mode} for ({arguments}): {explained:#}");
        let plan = &explained[0]["Plan"];
        assert_eq!(plan["Output"][0], "c.head", "{shown}");
        let nodes = plan_nodes(plan);
        for node in &nodes {
            let mut output = node["Output"].as_array().into_iter().flatten();
            assert!(
                output.all(|column| !column.as_str().unwrap().contains("record")),
                "the record read: {shown}"
            );
            assert_ne!(node["Node Type"], "Sort", "{shown}");
        }
        let rows: Vec<_> = nodes
            .iter()
            .filter(|node| node["Relation Name"] == "tower_fhir_client_tenants")
            .collect();
        assert!(!rows.is_empty(), "{shown}");
        for node in rows {
            assert!(
                node["Node Type"] == "Index Only Scan" || node["Node Type"] == "Index Scan",
                "not by the key: {shown}"
            );
            assert_eq!(
                node["Index Name"], "tower_fhir_client_tenants_pkey",
                "{shown}"
            );
            let condition = node["Index Cond"].as_str().unwrap_or_default();
            assert!(condition.contains("t.client = "), "{shown}");
            assert_eq!(condition.contains("t.tenant = "), by_tenant, "{shown}");
        }
        identifiers.push(explained[0]["Query Identifier"].as_i64().expect(&shown));
    }
    admin.batch_execute("RESET plan_cache_mode").await.unwrap();
    assert_eq!(identifiers[0], identifiers[1]);
    identifiers[0]
}

/// What `pg_stat_statements` counted of the statements on the clients' tables since it was
/// reset, once the `calls` made have all ended: each statement's query identifier, its text,
/// how many times it ran and the shared blocks it touched (found in the cache or read).
async fn statements_run(
    admin: &tokio_postgres::Client,
    calls: i64,
) -> Vec<(i64, String, i64, i64)> {
    // A statement is counted when its transaction ends, which may come after the client has
    // its rows (and its caller goes on).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let counted: Vec<(i64, String, i64, i64)> = admin
            .query(
                "SELECT queryid, query, calls, shared_blks_hit + shared_blks_read \
                 FROM pg_stat_statements \
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                   AND query LIKE '%tower_fhir_client%'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
            .collect();
        if counted.iter().map(|c| c.2).sum::<i64>() >= calls
            || tokio::time::Instant::now() > deadline
        {
            return counted;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The shared blocks a narrowed read of `id` for `asked` touches, by the store, on average over
/// 20 reads; each of them must have run the one statement identified `query_id`, and nothing
/// else on the clients' tables.
async fn blocks_of_narrowed_reads(
    admin: &tokio_postgres::Client,
    store: &dyn ClientStore,
    (id, asked): (&str, Option<TenantId>),
    query_id: i64,
) -> f64 {
    const READS: i64 = 20;
    admin
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await
        .unwrap();
    for _ in 0..READS {
        assert!(store.client_for_tenant(id, asked).await.unwrap().is_some());
    }
    let run = statements_run(admin, READS).await;
    match run.as_slice() {
        [(run_id, _, calls, blocks)] if *run_id == query_id && *calls == READS => {
            *blocks as f64 / READS as f64
        }
        _ => panic!(
            "{id} for {asked:?}: the store ran {run:?}, not {READS} times the statement \
             explained ({query_id})"
        ),
    }
}

/// A token request reads the client narrowed to the tenant it asks for: for an
/// interoperability partner's application entitled to 50,000 tenants it reads what it reads
/// for a clinic's of one (not the record and its list: a hundred blocks of it), and grants
/// what the whole record does. Asking for none, the clinic's only tenant is found by the index
/// too, not by a scan of every client's rows (the database's statistics made, as they are once
/// it has seen the rows: 100,000 of them). Checked by what PostgreSQL plans and counts, not by
/// how long it takes (which a busy machine changes): the statements the store runs
/// (`pg_stat_statements`), their plans (`EXPLAIN`) and the blocks they touch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_client_of_thousands_of_tenants_is_read_for_one() {
    let Some((server, url, store)) =
        postgres_with_a_client("many", "the PostgreSQL many-tenants test").await
    else {
        return;
    };
    assert_eq!(
        server.query(
            "many",
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'pg_stat_statements'"
        ),
        "1\n",
        "this test needs PostgreSQL's pg_stat_statements (in its contrib package)"
    );
    // Loaded at start only: the server restarted with it, and the store connected again.
    server.query(
        "many",
        "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'",
    );
    drop(store);
    server.pause();
    server.resume();
    server.query("many", "CREATE EXTENSION pg_stat_statements");
    let store = tower_fhir::postgres::PgState::connect(&url)
        .await
        .unwrap()
        .client_store(SecretHashing::new(64, 1).unwrap());
    let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);

    let many: Vec<TenantId> = (0..50_000u64)
        // Scattered, as ids drawn at random are (a sequence's record compresses several times
        // more): `i` times an odd number, modulo 2^48, is a different number for each.
        .map(|i| (i * 0x9e37_79b9_7f4b) & 0xffff_ffff_ffff)
        .map(|i| tenant(&format!("4d1f6c2e-8a3b-4c5d-9e7f-{i:012x}")))
        .collect();
    let last = many[many.len() - 1];
    // Two such partners: most of the tenant rows are theirs.
    for id in ["partner", "partner-2"] {
        let partner = many.iter().fold(
            NewClient::new(id).secret("a-secret-long-enough-1234"),
            |client, tenant| client.tenant(*tenant),
        );
        store.register(partner).await.unwrap();
    }
    store
        .register(
            NewClient::new("clinic")
                .secret("a-secret-long-enough-1234")
                .tenant(last),
        )
        .await
        .unwrap();
    server.query("many", "ANALYZE tower_fhir_client_tenants");

    let for_a_tenant = narrowed_plans(
        &admin,
        NARROWED_FOR_A_TENANT,
        &format!("'partner', '{last}'"),
        true,
    )
    .await;
    let for_no_tenant = narrowed_plans(&admin, NARROWED_FOR_NO_TENANT, "'partner'", false).await;
    assert_eq!(
        narrowed_plans(&admin, NARROWED_FOR_NO_TENANT, "'clinic'", false).await,
        for_no_tenant
    );
    // Every pooled connection has its statements prepared, and the server's caches filled.
    for _ in 0..20 {
        for (id, asked) in [("clinic", Some(last)), ("partner", None)] {
            store.client_for_tenant(id, asked).await.unwrap();
        }
    }
    // The partner's reads touch what the clinic's touch, give or take a block or two of the
    // tenant rows (two of them for none; a page the visibility map does not yet mark).
    let mut measured = Vec::new();
    for (asked, query_id) in [(Some(last), for_a_tenant), (None, for_no_tenant)] {
        let clinic = blocks_of_narrowed_reads(&admin, &store, ("clinic", asked), query_id).await;
        let partner = blocks_of_narrowed_reads(&admin, &store, ("partner", asked), query_id).await;
        measured.push((asked, clinic, partner));
        assert!(
            partner <= clinic + 3.0,
            "blocks a read, (for, the clinic's, the partner's): {measured:?}"
        );
    }
    // And none of them a tenth of what a read of the partner's whole record touches (its
    // list's blocks in the TOAST table): not a scan of the tenant rows either, which touches
    // as many for the clinic as for the partner.
    admin
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await
        .unwrap();
    let whole = store.client("partner").await.unwrap().unwrap();
    let whole_blocks = match statements_run(&admin, 1).await.as_slice() {
        [(_, query, 1, blocks)] if query.contains("record") => *blocks,
        run => panic!("a whole read ran {run:?}"),
    };
    let most = measured.iter().flat_map(|m| [m.1, m.2]).fold(0.0, f64::max);
    assert!(
        whole_blocks as f64 > 10.0 * most,
        "a narrowed read touched a tenth of a whole record's {whole_blocks} blocks or more: \
         (for, the clinic's, the partner's) {measured:?}"
    );

    assert_eq!(whole.tenants.len(), 50_000);
    for asked in [Some(many[0]), Some(last), Some(tenant(C)), None] {
        let read = store.client_for_tenant("partner", asked).await.unwrap();
        assert_eq!(read, Some(narrowed(&whole, asked)), "{asked:?}");
    }
}

/// The rows a narrowed read looks tenants up in follow the client's record however it is
/// written: by hand or by a replica of a version before them, its row deleted or the table
/// emptied; and a database migrated from before them has them for the clients it held. A
/// tenant written by hand in another form than the stores write (upper case, braces) is not
/// found: refused, never granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_clients_tenant_rows_follow_its_record_however_written() {
    use tower_fhir::postgres::PgState;
    let Some((server, url, store)) =
        postgres_with_a_client("follow", "the PostgreSQL tenant-rows test").await
    else {
        return;
    };
    let (a, b, c) = (tenant(A), tenant(B), tenant(C));
    let agree = |store: tower_fhir::postgres::PgClientStore, id: &'static str| async move {
        let whole = store.client(id).await.unwrap().unwrap();
        narrowed_reads_agree(&store, std::slice::from_ref(&whole)).await;
        whole.tenants
    };
    let written = |tenants: String| {
        server.query(
            "follow",
            &format!(
                "UPDATE tower_fhir_clients SET record = jsonb_set(record, '{{tenants}}', \
                 '[{tenants}]') WHERE id = 'app'"
            ),
        );
    };
    written(format!("\"{A}\", \"{B}\", \"{A}\""));
    assert_eq!(agree(store.clone(), "app").await, [a, b, a]);
    written(format!("\"{}\", \"{{{B}}}\", null, 7", A.to_uppercase()));
    let whole = store.client("app").await.unwrap_err();
    assert!(whole.to_string().contains("\"app\""), "{whole}");
    written(format!("\"{}\", \"{{{B}}}\"", A.to_uppercase()));
    assert_eq!(store.client("app").await.unwrap().unwrap().tenants, [a, b]);
    for asked in [Some(a), Some(b), None] {
        let read = store.client_for_tenant("app", asked).await.unwrap();
        assert!(read.unwrap().tenants.is_empty(), "{asked:?}");
    }
    server.query(
        "follow",
        &format!(
            "UPDATE tower_fhir_clients SET record = jsonb_set(record, '{{tenants}}', '[\"{C}\"]') \
             WHERE id = 'app'"
        ),
    );
    assert_eq!(agree(store.clone(), "app").await, [c]);
    server.query("follow", "DELETE FROM tower_fhir_clients WHERE id = 'app'");
    assert!(store
        .client_for_tenant("app", Some(c))
        .await
        .unwrap()
        .is_none());
    // Emptied without a trigger (TRUNCATE): a client registered again under the id has its
    // own tenants only.
    store
        .register(NewClient::new("app").tenant(c))
        .await
        .unwrap();
    server.query("follow", "TRUNCATE tower_fhir_clients");
    store
        .register(NewClient::new("app").tenant(a))
        .await
        .unwrap();
    assert_eq!(agree(store.clone(), "app").await, [a]);

    // A database as the version before the rows left it (migration 8, and those after it
    // undone), holding a client of two tenants: migrated, the client's rows are there.
    server.query(
        "follow",
        "DROP INDEX tower_fhir_clients_id_bytewise; \
         DROP TRIGGER tower_fhir_client_tenants_follow ON tower_fhir_clients; \
         DROP FUNCTION tower_fhir_client_tenants_follow(); \
         DROP FUNCTION tower_fhir_record_tenants(jsonb); \
         DROP TABLE tower_fhir_client_tenants; \
         ALTER TABLE tower_fhir_clients DROP COLUMN head; \
         DELETE FROM tower_fhir_migrations WHERE version >= 8",
    );
    server.query(
        "follow",
        &format!(
            "INSERT INTO tower_fhir_clients (id, record) VALUES ('earlier', \
             '{{\"id\": \"earlier\", \"secrets\": [], \"tenants\": [\"{A}\", \"{B}\"]}}')"
        ),
    );
    let store = PgState::connect(&url).await.unwrap().client_store(cheap());
    assert_eq!(agree(store.clone(), "earlier").await, [a, b]);
    assert_eq!(agree(store.clone(), "app").await, [a]);
}

/// Each session the state opens names itself in `pg_stat_activity`: the pool's and each
/// change listener's apart; an `application_name` in the URL names them all instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_sessions_say_what_they_are_unless_the_url_names_them() {
    use tower_fhir::auth::RevokedTokens;
    use tower_fhir::postgres::{KeyEncryptionKey, PgState};
    let Some(server) = support::postgres::Postgres::start_or_skip(
        "application_name",
        "the PostgreSQL application_name test",
    ) else {
        return;
    };
    let names = |database: &str| -> Vec<String> {
        server
            .query(
                "postgres",
                &format!(
                    "SELECT DISTINCT application_name FROM pg_stat_activity \
                     WHERE datname = '{database}' ORDER BY 1"
                ),
            )
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let open = |url: String| async move {
        let state = PgState::connect(&url).await.unwrap();
        let tenants = state.tenant_store();
        let revoked = RevokedTokens::new();
        let followed = state.follow_revocations(&revoked).await.unwrap();
        let kek = KeyEncryptionKey::from_base64(&"A".repeat(43)).unwrap();
        let keys = state.signing_keys(kek).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), tenants.listening())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), followed.listening())
            .await
            .unwrap();
        (state, tenants, followed, keys)
    };

    server.create_database("unnamed");
    let _kept = open(server.url("unnamed")).await;
    let ours = [
        "tower-fhir",
        "tower-fhir listener keys",
        "tower-fhir listener revocations",
        "tower-fhir listener tenants",
    ];
    until(Duration::from_secs(10), "every session named", || {
        names("unnamed") == ours
    })
    .await;

    server.create_database("named");
    let _kept = open(format!(
        "{}?application_name=gateway-eu-1",
        server.url("named")
    ))
    .await;
    until(
        Duration::from_secs(10),
        "the keys' listener connected",
        || {
            server
                .query(
                    "postgres",
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = 'named'",
                )
                .trim()
                .parse::<u32>()
                .unwrap()
                >= 4
        },
    )
    .await;
    assert_eq!(names("named"), ["gateway-eu-1"]);
}

/// A tenant row the store cannot read fails its lookup naming it (the start, and the admin
/// API's checks that read every tenant, say which row to correct or delete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_tenant_row_is_named() {
    use tower_fhir::postgres::PgState;
    let Some(server) = support::postgres::Postgres::start_or_skip(
        "unreadable_tenant",
        "the PostgreSQL unreadable-tenant test",
    ) else {
        return;
    };
    server.create_database("unreadable_tenant");
    let url = server.url("unreadable_tenant");
    let store = PgState::connect(&url).await.unwrap().tenant_store();
    server.query(
        "unreadable_tenant",
        &format!(
            "INSERT INTO tower_fhir_tenants (id, record) VALUES ('{}', '{{\"upstreams\": \"nope\"}}')",
            tenant(A)
        ),
    );
    let failed = store.lookup(tenant(A)).await.unwrap_err().to_string();
    assert!(failed.contains(&tenant(A).to_string()), "{failed}");
}

/// What a `tracing` subscriber writes, kept for a test to read.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A start that finds the migration lock held (a replica stuck in its migrations, or a session
/// holding the lock by hand) waits for it as long as it is held, says so once at `warn` after
/// 5 s (the lock's key as `pg_locks` shows it, and its holder's process id), and migrates once
/// it is let go, saying that at `info`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_start_waiting_for_the_migration_lock_says_so_and_migrates_once_let_go() {
    use tokio::time::{timeout, Instant};
    use tower_fhir::postgres::{PgState, MIGRATION_LOCK};
    use tracing::instrument::WithSubscriber;
    let Some(server) = support::postgres::Postgres::start_or_skip(
        "migration_lock",
        "the PostgreSQL migration-lock test",
    ) else {
        return;
    };
    server.create_database("migration_lock");
    let url = server.url("migration_lock");
    let (holder, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .unwrap();
    let pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);

    // The start's log, wherever its future is polled.
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let started = Instant::now();
    let mut connecting = std::pin::pin!(PgState::connect(&url).with_subscriber(subscriber));
    let said = "waiting for the database migration lock";
    while !captured.text().contains(said) {
        assert!(
            timeout(Duration::from_millis(100), &mut connecting)
                .await
                .is_err(),
            "the start went on while another session held the migration lock"
        );
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "nothing said after {:?} of waiting: {}",
            started.elapsed(),
            captured.text()
        );
    }
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "said after {:?}, before its 5 s",
        started.elapsed()
    );
    // Still waiting, and said once.
    assert!(timeout(Duration::from_secs(1), &mut connecting)
        .await
        .is_err());
    let logged = captured.text();
    assert_eq!(logged.matches(said).count(), 1, "{logged}");
    let warning = logged.lines().find(|line| line.contains(said)).unwrap();
    assert!(warning.contains(" WARN "), "{warning}");
    assert!(
        warning.contains(&format!("advisory lock {MIGRATION_LOCK}")),
        "{warning}"
    );
    assert!(
        warning.contains("locktype 'advisory', classid 1953462117, objid 1919314025, objsubid 1"),
        "{warning}"
    );
    assert!(warning.contains(&format!("pid {pid}")), "{warning}");
    assert!(!logged.contains("migration lock taken"), "{logged}");

    // Let go: the start migrates at once, and says so.
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .unwrap();
    let state = timeout(Duration::from_secs(10), connecting)
        .await
        .expect("the start did not go on once the lock was let go")
        .unwrap();
    let logged = captured.text();
    let taken = logged
        .lines()
        .find(|line| line.contains("database migration lock taken"))
        .unwrap_or_else(|| panic!("{logged}"));
    assert!(taken.contains(" INFO "), "{taken}");
    // Migrated: its tables are there. (Not read from the log: run beside the other tests in
    // one process, a callsite another test reached first may stay hidden from this
    // subscriber, as `tests/gateway_warnings.rs` says.)
    assert!(state.tenant_store().list().await.unwrap().is_empty());

    // A start that finds the lock free says nothing of it.
    let quiet = Captured::default();
    let writer = quiet.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    PgState::connect(&url)
        .with_subscriber(subscriber)
        .await
        .unwrap();
    assert!(!quiet.text().contains("migration lock"), "{}", quiet.text());
}

/// A replica's route cache keeps the routes of tenants unchanged while its change listener
/// was away: once the database comes back and the listener has caught up, an outage right
/// after still finds them cached and served (the catch-up once announced every tenant, which
/// emptied the cache). Tenants heard of are settled (their versions read) as they are heard,
/// so a change made well before the outage does not count as one missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_routes_cached_before_a_reconnection_serve_the_next_outage() {
    use tokio::sync::broadcast::Receiver;
    use tokio::time::timeout;
    use tower_fhir::postgres::PgState;
    use tower_fhir::route::TenantRoutingLayer;
    let Some(server) = support::postgres::Postgres::start_or_skip(
        "fallback",
        "the PostgreSQL route fallback test",
    ) else {
        return;
    };
    server.create_database("fallback");
    let url = server.url("fallback");
    let (store, other) = (
        PgState::connect(&url).await.unwrap().tenant_store(),
        PgState::connect(&url).await.unwrap().tenant_store(),
    );
    for replica in [&store, &other] {
        timeout(Duration::from_secs(10), replica.listening())
            .await
            .expect("the listeners never connected");
    }
    let mut heard = store.changes();
    // Every announcement: each of A, B and C once as it is written here or heard of, again
    // once the listener has read its version (settled).
    let mut settling = store.changes();
    async fn announced(heard: &mut Receiver<TenantId>, tenant: TenantId) {
        timeout(Duration::from_secs(5), async {
            while heard.recv().await.unwrap() != tenant {}
        })
        .await
        .unwrap_or_else(|_| panic!("{tenant:?} never announced"));
    }
    // A through this replica, B through the other; C last: once C is announced, what the
    // listener heard before it (A, B) is settled.
    store
        .put(
            tenant(A),
            upstreams("http://127.0.0.1:9001/fhir", FhirVersion::R4),
        )
        .await
        .unwrap();
    other
        .put(
            tenant(B),
            upstreams("http://127.0.0.1:9002/fhir", FhirVersion::R4),
        )
        .await
        .unwrap();
    announced(&mut heard, tenant(B)).await;
    other
        .put(
            tenant(C),
            upstreams("http://127.0.0.1:9003/fhir", FhirVersion::R4),
        )
        .await
        .unwrap();
    announced(&mut heard, tenant(C)).await;
    // All three settled: each announced a second time, after which a cache keeps what it
    // reads of them (a settling announcement after the cache read one would drop it, and one
    // of another tenant of its stripe, read at that moment).
    let mut times = std::collections::HashMap::new();
    timeout(Duration::from_secs(10), async {
        while [A, B, C]
            .iter()
            .any(|id| times.get(&tenant(id)).copied().unwrap_or(0) < 2)
        {
            *times.entry(settling.recv().await.unwrap()).or_insert(0) += 1;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not all settled: {times:?}"));

    let routing = TenantRoutingLayer::builder(store.clone()).build().unwrap();
    let cache = routing.cache().clone();
    let _following = cache.follow(store.changes());
    for id in [A, B, C] {
        assert!(cache.resolve(tenant(id)).await.unwrap().is_some());
    }
    // B written without a word (a change this replica cannot hear): its version moves.
    server.query(
        "fallback",
        &format!("UPDATE tower_fhir_tenants SET record = record WHERE id = '{B}'"),
    );

    // The database goes and comes back: the listener connects again and catches up.
    let mut caught_up = store.changes();
    server.pause();
    until(Duration::from_secs(10), "not said to be listening", || {
        !store.is_listening()
    })
    .await;
    server.resume();
    timeout(Duration::from_secs(20), store.listening())
        .await
        .expect("the listener never connected again");
    // (All it announced is in the channel once it listens.)
    let mut resynchronised = std::collections::BTreeSet::new();
    while let Ok(tenant) = caught_up.try_recv() {
        resynchronised.insert(tenant);
    }
    assert!(resynchronised.contains(&tenant(B)), "{resynchronised:?}");
    assert!(!resynchronised.contains(&tenant(A)), "{resynchronised:?}");
    assert!(!resynchronised.contains(&tenant(C)), "{resynchronised:?}");
    // The cache has taken the catch-up once it takes a change announced after it: D, unknown
    // to the cache until then.
    assert!(cache.resolve(tenant(D)).await.unwrap().is_none());
    other
        .put(
            tenant(D),
            upstreams("http://127.0.0.1:9004/fhir", FhirVersion::R4),
        )
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cache.resolve(tenant(D)).await.unwrap().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "D never announced");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // It goes again: A's route is still there; B's, changed meanwhile, was dropped.
    server.pause();
    let served = cache.resolve(tenant(A)).await;
    assert!(
        matches!(served, Ok(Some(_))),
        "the cached route was dropped at the catch-up: {served:?}"
    );
    assert!(cache.resolve(tenant(B)).await.is_err());
    server.resume();
}

/// Pages of the PostgreSQL stores (`list_after`, `clients_after`) come in the order of the
/// whole lists and of the other stores: client ids in byte order (Rust's `str` order), even in
/// a database whose collation sorts them otherwise (ICU's `en-US`, where `"a-app" < "B-app"`
/// and `"app_1" < "app-1"`); tenants in `TenantId`'s. A page is read by an index, not by
/// sorting the table; a stored client record that cannot be read is left out of its page, as
/// from the whole list, and the page filled from the rows after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_pages_are_in_byte_order_whatever_the_databases_collation() {
    use tower_fhir::postgres::PgState;
    let Some(server) =
        support::postgres::Postgres::start_or_skip("pages", "the PostgreSQL pages test")
    else {
        return;
    };
    // A database sorting text by a dictionary's rules, where the server can (ICU, from 15).
    let icu = server.query(
        "postgres",
        "SELECT current_setting('server_version_num')::int >= 150000 \
         AND EXISTS (SELECT 1 FROM pg_collation WHERE collprovider = 'i' \
                     AND collname = 'en-US-x-icu')",
    );
    if icu.trim() == "t" {
        server.query(
            "postgres",
            "CREATE DATABASE pages TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' \
             LOCALE 'C'",
        );
    } else {
        eprintln!("*** the PostgreSQL pages test runs in a database of the default collation: this server has no ICU collations ***");
        server.create_database("pages");
    }
    let url = server.url("pages");
    let state = PgState::connect(&url).await.unwrap();
    let clients = state.client_store(cheap());
    let ids = [
        "app_1", "a-app", "app-1", "B-app", "app 2", "app+x", "Zed", "app", "app-10", "~tilde",
        "!bang",
    ];
    for id in ids {
        clients.register(NewClient::new(id)).await.unwrap();
    }
    clients.revoke("app").await.unwrap();
    let mut expected: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
    expected.sort_unstable();
    assert_eq!(expected[1..4], ["B-app", "Zed", "a-app"]);
    if icu.trim() == "t" {
        let database_order = server.query(
            "pages",
            "SELECT string_agg(id, '|' ORDER BY id) FROM tower_fhir_clients",
        );
        assert_ne!(
            database_order.trim(),
            expected.join("|"),
            "the database's own order is not bytes'"
        );
    }
    let listed = |page: Vec<ClientRecord>| -> Vec<String> {
        page.into_iter().map(|client| client.id).collect()
    };
    assert_eq!(listed(clients.clients().await.unwrap()), expected);
    assert_eq!(
        listed(clients.clients_after(None, None).await.unwrap()),
        expected
    );
    for (n, after) in std::iter::once(None)
        .chain(expected.iter().map(|id| Some(id.as_str())))
        .enumerate()
    {
        for limit in [None, Some(0), Some(1), Some(2), Some(3), Some(100)] {
            let page = listed(clients.clients_after(after, limit).await.unwrap());
            let wanted: Vec<String> = expected[n..]
                .iter()
                .take(limit.unwrap_or(usize::MAX))
                .cloned()
                .collect();
            assert_eq!(page, wanted, "after {after:?}, limit {limit:?}");
        }
    }
    // After an id that is none: from the next one on. (One holding a NUL, which no id can:
    // as its part before the NUL.)
    for (after, first) in [
        ("app-0", "app-1"),
        ("app-", "app-1"),
        ("A", "B-app"),
        ("app_", "app_1"),
        ("", "!bang"),
        ("app\0zzz", "app 2"),
        ("\u{7f}", ""),
    ] {
        let page = listed(clients.clients_after(Some(after), Some(1)).await.unwrap());
        assert_eq!(
            page.first().map_or("", String::as_str),
            first,
            "after {after:?}"
        );
    }
    // A record that cannot be read (written by hand), between "app 2" and "app+x": left out,
    // the page filled on from the rows after it.
    server.query(
        "pages",
        "INSERT INTO tower_fhir_clients (id, record) VALUES ('app+a', '\"not a record\"')",
    );
    assert_eq!(listed(clients.clients().await.unwrap()), expected);
    let page = listed(clients.clients_after(Some("app 2"), Some(2)).await.unwrap());
    assert_eq!(page, ["app+x", "app-1"]);
    let (mut walked, mut after) = (Vec::new(), None::<String>);
    loop {
        let page = listed(
            clients
                .clients_after(after.as_deref(), Some(1))
                .await
                .unwrap(),
        );
        let Some(last) = page.last().cloned() else {
            break;
        };
        walked.extend(page);
        after = Some(last);
    }
    assert_eq!(walked, expected, "pages of one");
    // Read by the index in byte order, not by sorting the table.
    let plan = server.query(
        "pages",
        "SET enable_seqscan = off; SET enable_sort = off; \
         EXPLAIN SELECT id, record FROM tower_fhir_clients \
         WHERE id COLLATE \"C\" > 'app' ORDER BY id COLLATE \"C\" LIMIT 2",
    );
    assert!(plan.contains("tower_fhir_clients_id_bytewise"), "{plan}");

    // Tenants: in TenantId's order (a uuid's bytes), by the primary key.
    let tenants = state.tenant_store();
    let spread = [
        "ffffffff-0000-4000-8000-000000000000",
        "0a000000-0000-4000-8000-000000000000",
        "a0000000-0000-4000-8000-000000000000",
        "00000000-0000-4000-8000-00000000000a",
        "00000000-0000-4000-8000-0000000000a0",
        A,
        B,
    ];
    for (n, id) in spread.into_iter().enumerate() {
        let base = format!("http://127.0.0.1:9/tenant-{n}/fhir");
        tenants
            .put(tenant(id), upstreams(&base, FhirVersion::R4))
            .await
            .unwrap();
    }
    let mut expected: Vec<TenantId> = spread.into_iter().map(tenant).collect();
    expected.sort_unstable();
    let mut by_text: Vec<String> = spread.iter().map(|id| (*id).to_owned()).collect();
    by_text.sort_unstable();
    let expected_text: Vec<String> = expected.iter().map(TenantId::to_string).collect();
    assert_eq!(expected_text, by_text, "TenantId's order is its text's");
    assert_eq!(tenants.list().await.unwrap(), expected);
    for (n, after) in std::iter::once(None)
        .chain(expected.iter().copied().map(Some))
        .enumerate()
    {
        for limit in [None, Some(0), Some(1), Some(2), Some(100)] {
            let page = tenants.list_after(after, limit).await.unwrap();
            let wanted: Vec<TenantId> = expected[n..]
                .iter()
                .take(limit.unwrap_or(usize::MAX))
                .copied()
                .collect();
            assert_eq!(page, wanted, "after {after:?}, limit {limit:?}");
        }
    }
    let between = tenant("0b000000-0000-4000-8000-000000000000");
    assert_eq!(
        tenants.list_after(Some(between), Some(2)).await.unwrap(),
        expected[3..5]
    );
    let plan = server.query(
        "pages",
        "SET enable_seqscan = off; SET enable_sort = off; \
         EXPLAIN SELECT id FROM tower_fhir_tenants \
         WHERE id > '0b000000-0000-4000-8000-000000000000' ORDER BY id LIMIT 2",
    );
    assert!(plan.contains("tower_fhir_tenants_pkey"), "{plan}");
}
