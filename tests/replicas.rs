//! Gateways sharing one PostgreSQL database, over real HTTP: one set of signing keys, kept
//! sealed in the database, rotated everywhere (published before any replica signs with the new
//! key, the old one kept until its tokens expire); a token revoked through one replica is
//! refused by another within a second, cached there or not, and by a replica started
//! afterwards at once; a flood of announcements does not make a replica's revoked list stale;
//! failed secret checks spread over the replicas are throttled as if on one.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::json;
use support::*;
use tower_fhir::gateway::Gateway;
use tower_fhir::postgres::{KeyEncryptionKey, PgSigningKeys, PgState};
use tower_fhir::route::{TenantRecord, TenantStore, Upstream};
use tower_fhir::token::{ClientStore, NewClient, SecretHashing, TokenEndpoint};
use tower_fhir::version::FhirVersion;

const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");
const SECRET: &str = "replicated-client-secret-0123";
const ISSUER: &str = "https://gateway.example";

/// The key-encryption key every replica here shares.
fn kek() -> KeyEncryptionKey {
    KeyEncryptionKey::from_base64("cmVwbGljYXMtc2hhcmUtdGhpcy0zMi1ieXRlLWtleSE=").unwrap()
}

/// One replica: a gateway over the shared database, on its own port, with a connection pool
/// of its own; and its handle on the shared signing keys.
async fn replica(url: &str) -> TestClient {
    replica_with_keys(url).await.0
}

async fn replica_with_keys(url: &str) -> (TestClient, PgSigningKeys) {
    let state = PgState::connect(url).await.unwrap();
    let keys = state.signing_keys(kek()).await.unwrap();
    let endpoint = TokenEndpoint::builder()
        .issuer(ISSUER)
        .audience("tower-fhir")
        .store(state.client_store(SecretHashing::new(64, 1).unwrap()))
        .signing_keys(keys.signing_keys())
        .revocation_log(state.revocation_log())
        .assertion_replay_guard(state.assertion_replay_guard())
        .shared_failure_counts(state.failure_counts())
        .build()
        .unwrap();
    state
        .follow_revocations(endpoint.revoked_tokens())
        .await
        .unwrap();
    let gateway = Gateway::builder(ISSUER)
        .directory(state.tenant_store())
        .token_endpoint(endpoint)
        .build()
        .unwrap();
    (TestClient::new(serve_tower(gateway).await), keys)
}

/// A PostgreSQL server with an empty database `name`, its URL, and the state over it.
async fn database(name: &str) -> Option<(support::postgres::Postgres, String, PgState)> {
    let server =
        support::postgres::Postgres::start_or_skip(name, &format!("tests/replicas.rs ({name})"))?;
    server.create_database(name);
    let url = server.url(name);
    let state = PgState::connect(&url).await.unwrap();
    Some((server, url, state))
}

/// A revocation announced on the changes channel but not in the database (any role that may
/// connect may `NOTIFY`) is read again and ignored: a forged announcement revokes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_revocations_the_database_does_not_hold_are_ignored() {
    let Some((server, url, state)) = database("forged").await else {
        return;
    };
    let _upstream = register_app(&state).await;
    let one = replica(&url).await;
    let (token, _) = token_from(&one).await;
    assert_eq!(
        one.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );
    let claims: serde_json::Value = {
        use base64::Engine;
        let body = token.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(body)
                .unwrap(),
        )
        .unwrap()
    };
    let jti = claims["jti"].as_str().unwrap();
    for forged in [
        format!(
            r#"revoked-client:{{"iss":"{ISSUER}","client":"app","revoked_at":4000000000,"until":4000000000}}"#
        ),
        format!(r#"revoked:{{"iss":"{ISSUER}","jti":"{jti}","exp":4000000000}}"#),
    ] {
        server.query("forged", &format!("NOTIFY tower_fhir_changes, '{forged}'"));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        one.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK,
        "a forged announcement revoked the token"
    );
    let (fresh, _) = token_from(&one).await;
    assert_eq!(
        one.get_bearer("/Patient/1", &fresh).await.status,
        StatusCode::OK
    );
    // A flood of announcements (more than are read again at once) does not lose a real one
    // among them: what cannot be read one by one is read all again.
    server.query(
        "forged",
        &format!(
            r#"SELECT pg_notify('tower_fhir_changes', 'revoked:{{"iss":"{ISSUER}","jti":"flood-' || n || '","exp":4000000000}}') FROM generate_series(1, 300) AS n"#
        ),
    );
    // The listener was listening: a revocation the database holds, announced the same way,
    // is heard.
    let reply = replica(&url).await.revoke(&token, "app", SECRET).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    refused_within_a_second(&one, &token, Instant::now(), "the revoked token").await;
}

/// With a staleness limit, a flood of announcements (forged by any role that may connect, or
/// a burst of real ones) lasting longer than the limit does not make the list stale: each
/// vouch of the listener waits for what was heard before it, not for the flood to end; and a
/// revocation announced amid the flood is still heard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_announcements_longer_than_the_staleness_limit_keeps_the_list_current() {
    let Some((server, url, state)) = database("flooded").await else {
        return;
    };
    let revoked = tower_fhir::auth::RevokedTokens::new();
    revoked.set_max_staleness(Some(Duration::from_secs(5)));
    let followed = state.follow_revocations(&revoked).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), followed.listening())
        .await
        .expect("the revocation listener never connected");
    assert!(!revoked.is_stale(), "read at the start");

    // 12 s of announcements (more than are read again at once: catch-ups, one after another)
    // from another connection.
    let flooding = Duration::from_secs(12);
    let flood = std::thread::spawn(move || {
        let started = Instant::now();
        let mut batches = 0;
        while started.elapsed() < flooding {
            server.query(
                "flooded",
                &format!(
                    r#"SELECT count(pg_notify('tower_fhir_changes', 'revoked:{{"iss":"{ISSUER}","jti":"flood-' || n || '","exp":4000000000}}')) FROM generate_series(1, 2000) AS n"#
                ),
            );
            batches += 1;
        }
        (server, batches)
    });
    let started = Instant::now();
    while started.elapsed() < flooding + Duration::from_secs(2) {
        assert!(
            !revoked.is_stale(),
            "the list turned stale {:?} into a flood of announcements",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (server, batches) = flood.join().unwrap();
    assert!(batches > 3, "the flood was {batches} batches");
    assert!(followed.is_listening());

    // A revocation the database holds, announced as the flood's were, is heard (the flood's
    // are not: the database holds none of them).
    assert!(revoked.is_empty(), "a forged announcement revoked a token");
    let _upstream = register_app(&state).await;
    let replica = replica(&url).await;
    let (token, _) = token_from(&replica).await;
    let reply = replica.revoke(&token, "app", SECRET).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    eventually(Duration::from_secs(5), "the revocation heard", || {
        let heard = revoked.len() == 1;
        async move { heard }
    })
    .await;
    assert!(!revoked.is_stale());
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_replica_reaches_the_others() {
    let Some((_server, url, state)) = database("replicas").await else {
        return;
    };
    let _upstream = register_app(&state).await;
    let (one, two) = (replica(&url).await, replica(&url).await);

    // A token from replica one works on replica two (and is cached there).
    let (token, _) = token_from(&one).await;
    assert_eq!(
        two.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );

    // Revoked through replica one: replica two refuses it within a second.
    let reply = one.revoke(&token, "app", SECRET).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let revoked_at = Instant::now();
    refused_within_a_second(&two, &token, revoked_at, "the revoked token").await;

    // A replica started afterwards refuses it from its first request.
    let three = replica(&url).await;
    assert_eq!(
        three.get_bearer("/Patient/1", &token).await.status,
        StatusCode::UNAUTHORIZED
    );
    // The client's other tokens are untouched everywhere.
    let (fresh, _) = token_from(&two).await;
    for replica in [&one, &two, &three] {
        assert_eq!(
            replica.get_bearer("/Patient/1", &fresh).await.status,
            StatusCode::OK
        );
    }

    // The client itself revoked (as the admin API does, through any replica's endpoint): the
    // tokens it holds are refused by every replica within a second, and by one started after.
    let admin = TokenEndpoint::builder()
        .issuer(ISSUER)
        .audience("tower-fhir")
        .store(state.client_store(SecretHashing::new(64, 1).unwrap()))
        .revocation_log(state.revocation_log())
        .build()
        .unwrap();
    admin.revoke_client("app").await.unwrap();
    let revoked_at = Instant::now();
    for replica in [&one, &two, &three] {
        refused_within_a_second(replica, &fresh, revoked_at, "a revoked client's token").await;
    }
    let four = replica(&url).await;
    assert_eq!(
        four.get_bearer("/Patient/1", &fresh).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_cannot_catch_up_after_a_gap_tries_again() {
    let Some((server, url, state)) = database("catchingup").await else {
        return;
    };
    let _upstream = register_app(&state).await;
    let two = replica(&url).await;
    let (token, _) = token_from(&two).await;
    assert_eq!(
        two.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );
    // The listeners lose their connection while the revoked clients cannot be read, so their
    // first catching up fails; meanwhile the client is revoked without a notification (as in
    // a gap the listener did not hear).
    server.query(
        "catchingup",
        "ALTER TABLE tower_fhir_revoked_clients RENAME TO hidden_revoked_clients",
    );
    server.query(
        "catchingup",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = 'catchingup' AND query LIKE 'LISTEN%'",
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.query(
        "catchingup",
        &format!(
            "INSERT INTO hidden_revoked_clients (issuer, client, revoked_at, expires_at)
             VALUES ('{ISSUER}', 'app', extract(epoch from now())::bigint + 5,
                     extract(epoch from now())::bigint + 3600);
             ALTER TABLE hidden_revoked_clients RENAME TO tower_fhir_revoked_clients"
        ),
    );
    // Listening again, the replica reads what it missed: the client's token is refused.
    eventually(Duration::from_secs(15), "the missed revocation", || async {
        two.get_bearer("/Patient/1", &token).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_assertion_accepted_by_one_replica_is_a_replay_at_the_others() {
    let Some((server, url, state)) = database("assertions").await else {
        return;
    };
    let mut key = rsa_jwk(RSA_PRIVATE, "backend-1");
    key.as_object_mut().unwrap().remove("alg");
    state
        .client_store(SecretHashing::new(64, 1).unwrap())
        .register(
            NewClient::new("backend")
                .tenant(TENANT.parse().unwrap())
                .jwks(json!({"keys": [key]})),
        )
        .await
        .unwrap();
    let (one, two) = (replica(&url).await, replica(&url).await);
    let assertion = |jti: &str| {
        let claims = json!({"iss": "backend", "sub": "backend", "aud": format!("{ISSUER}/oauth/token"),
            "exp": now() + 240, "jti": jti});
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        format!(
            "grant_type=client_credentials&client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer&client_assertion={}",
            mint_with(&key, jsonwebtoken::Algorithm::RS384, Some("backend-1"), &claims)
        )
    };
    let once = assertion("once");
    let reply = one.send("POST", "/oauth/token", &[FORM], &once).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    // The same assertion at the other replica, which never saw it: a replay.
    let reply = two.send("POST", "/oauth/token", &[FORM], &once).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert_eq!(reply.json()["error"], "invalid_client");
    // A fresh one works there.
    let reply = two
        .send("POST", "/oauth/token", &[FORM], &assertion("twice"))
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // The database gone: the client cannot be read nor its assertion checked, so none is
    // accepted: 503 with Retry-After (not 401: nothing is wrong with the client's).
    drop(server);
    let reply = one
        .send("POST", "/oauth/token", &[FORM], &assertion("thrice"))
        .await;
    assert_eq!(
        reply.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        reply.text()
    );
    assert!(reply.headers.contains_key("retry-after"));
}

/// A client with `SECRET`, registered for `TENANT`, whose upstream (returned) answers
/// every read.
async fn register_app(state: &PgState) -> RecordingUpstream {
    let upstream = RecordingUpstream::start().await;
    upstream.answer(
        "/fhir",
        Answer::json(json!({"resourceType": "Patient", "id": "1"})),
    );
    state
        .tenant_store()
        .put(
            TENANT.parse().unwrap(),
            TenantRecord::new([Upstream::parse(&upstream.base("/fhir"), FhirVersion::R4).unwrap()])
                .unwrap(),
        )
        .await
        .unwrap();
    state
        .client_store(SecretHashing::new(64, 1).unwrap())
        .register(
            NewClient::new("app")
                .secret(SECRET)
                .tenant(TENANT.parse().unwrap()),
        )
        .await
        .unwrap();
    upstream
}

/// A token for "app" from `replica`, and the `kid` that signed it.
async fn token_from(replica: &TestClient) -> (String, String) {
    let reply = replica
        .send(
            "POST",
            "/oauth/token",
            &[FORM],
            &format!("grant_type=client_credentials&client_id=app&client_secret={SECRET}"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let token = reply.json()["access_token"].as_str().unwrap().to_owned();
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    (token, kid)
}

/// The `kid`s a replica publishes, sorted.
async fn published(replica: &TestClient) -> Vec<String> {
    let reply = replica.get("/.well-known/jwks.json", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    let mut kids: Vec<String> = reply.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| key["kid"].as_str().unwrap().to_owned())
        .collect();
    kids.sort();
    kids
}

/// Waits until `replica` refuses `token` (`401`), accepted (`200`) until then, at most a
/// second after `since`.
async fn refused_within_a_second(replica: &TestClient, token: &str, since: Instant, what: &str) {
    loop {
        let status = replica.get_bearer("/Patient/1", token).await.status;
        if status == StatusCode::UNAUTHORIZED {
            return;
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            since.elapsed() < Duration::from_secs(1),
            "a replica still accepts {what} after a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most `within`) until `check` holds.
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_signing_keys_and_rotate_them_together() {
    let Some((server, url, state)) = database("keys").await else {
        return;
    };
    let _upstream = register_app(&state).await;
    // Three replicas starting at once against a database without keys make one key.
    let ((one, keys), two, three) =
        tokio::join!(replica_with_keys(&url), replica(&url), replica(&url));
    let first = published(&one).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(published(&two).await, first);
    assert_eq!(published(&three).await, first);
    // A token from any replica is good at every other.
    let (token, kid) = token_from(&three).await;
    assert_eq!(vec![kid.clone()], first);
    for replica in [&one, &two] {
        assert_eq!(
            replica.get_bearer("/Patient/1", &token).await.status,
            StatusCode::OK
        );
    }

    // The private key is sealed in the database: no PEM there.
    let sealed = server.query(
        "keys",
        "SELECT encode(sealed, 'escape') FROM tower_fhir_signing_keys",
    );
    assert!(sealed.len() > 100, "{sealed}");
    assert!(!sealed.contains("PRIVATE KEY"), "{sealed}");
    // A replica with another key-encryption key cannot start.
    let other = KeyEncryptionKey::from_base64(&"A".repeat(43)).unwrap();
    let refused = PgState::connect(&url)
        .await
        .unwrap()
        .signing_keys(other)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("TOWER_FHIR_KEY_ENCRYPTION_KEY"),
        "{refused}"
    );

    // Rotated through replica one: every replica publishes the new key within a second, and
    // none signs with it before its time.
    let publish_for = Duration::from_secs(3);
    let retire_after = Duration::from_secs(2);
    let rotated_at = Instant::now();
    let new = keys.rotate(publish_for, retire_after).await.unwrap();
    let both = {
        let mut both = vec![kid.clone(), new.clone()];
        both.sort();
        both
    };
    for replica in [&one, &two, &three] {
        eventually(Duration::from_secs(1), "the new key published", || async {
            published(replica).await == both
        })
        .await;
    }
    for replica in [&one, &two, &three] {
        let (_, signer) = token_from(replica).await;
        if rotated_at.elapsed() < publish_for {
            assert_eq!(signer, kid, "signed with the new key before its time");
        }
    }
    // From its time on, every replica signs with it; the old key's token still verifies.
    tokio::time::sleep(publish_for.saturating_sub(rotated_at.elapsed())).await;
    for replica in [&one, &two, &three] {
        eventually(
            Duration::from_secs(1),
            "signing with the new key",
            || async { token_from(replica).await.1 == new },
        )
        .await;
        assert_eq!(
            replica.get_bearer("/Patient/1", &token).await.status,
            StatusCode::OK
        );
    }
    // Once the old key's last token has expired, it is no longer published anywhere.
    tokio::time::sleep((publish_for + retire_after).saturating_sub(rotated_at.elapsed())).await;
    for replica in [&one, &two, &three] {
        eventually(Duration::from_secs(1), "the old key retired", || async {
            published(replica).await == vec![new.clone()]
        })
        .await;
        assert_eq!(
            replica.get_bearer("/Patient/1", &token).await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    // The key that signs cannot be retired; a compromised older one can, at once.
    assert!(keys.retire(&new).await.is_err());
    let (fresh, _) = token_from(&two).await;
    let newer = keys
        .rotate(Duration::ZERO, Duration::from_secs(3600))
        .await
        .unwrap();
    // The replica it was rotated through signs with it as soon as the rotation is answered.
    assert_eq!(token_from(&one).await.1, newer, "read your writes");
    for replica in [&one, &two, &three] {
        eventually(Duration::from_secs(1), "the newest key signing", || async {
            token_from(replica).await.1 == newer
        })
        .await;
    }
    keys.retire(&new).await.unwrap();
    // The replica it was retired through refuses its tokens as soon as that is answered.
    assert_eq!(
        one.get_bearer("/Patient/1", &fresh).await.status,
        StatusCode::UNAUTHORIZED,
        "read your writes"
    );
    for replica in [&one, &two, &three] {
        eventually(
            Duration::from_secs(1),
            "the compromised key gone",
            || async {
                replica.get_bearer("/Patient/1", &fresh).await.status == StatusCode::UNAUTHORIZED
            },
        )
        .await;
    }

    // A new key retired before its time to sign cancels its rotation: the key that signs keeps
    // signing, and is no longer scheduled to go.
    let pending = keys
        .rotate(Duration::from_secs(60), Duration::from_secs(1))
        .await
        .unwrap();
    let scheduled = format!(
        "SELECT count(*) FROM tower_fhir_signing_keys WHERE kid = '{newer}' AND retire_at IS NOT NULL"
    );
    assert_eq!(server.query("keys", &scheduled).trim(), "1");
    keys.retire(&pending).await.unwrap();
    assert_eq!(server.query("keys", &scheduled).trim(), "0");
    for replica in [&one, &two, &three] {
        eventually(Duration::from_secs(1), "the cancelled key gone", || async {
            !published(replica).await.contains(&pending)
        })
        .await;
        assert_eq!(token_from(replica).await.1, newer);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_secret_checks_spread_over_replicas_are_throttled_as_on_one() {
    let Some((_server, url, state)) = database("throttle").await else {
        return;
    };
    let _upstream = register_app(&state).await;
    let replicas = [
        replica(&url).await,
        replica(&url).await,
        replica(&url).await,
    ];
    let guess = "grant_type=client_credentials&client_id=app&client_secret=wrong-guess";
    // Five wrong secrets (the default allowance), one replica after another.
    for n in 0..5 {
        let reply = replicas[n % 3]
            .send("POST", "/oauth/token", &[FORM], guess)
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    }
    // Now every replica refuses the id from this address, the right secret included.
    for replica in &replicas {
        let reply = replica
            .send(
                "POST",
                "/oauth/token",
                &[FORM],
                &format!("grant_type=client_credentials&client_id=app&client_secret={SECRET}"),
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{}",
            reply.text()
        );
        assert!(reply.headers.contains_key("retry-after"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remembered_jti_is_refused_until_it_expires_then_free_again() {
    use tower_fhir::token::ReplayGuard;
    let Some((_server, _url, state)) = database("jtis").await else {
        return;
    };
    let guard = state.assertion_replay_guard();
    let soon = now() + 60;
    assert!(guard.first_use("backend", "j-1", soon).await.unwrap());
    assert!(
        !guard.first_use("backend", "j-1", soon).await.unwrap(),
        "a replay"
    );
    assert!(
        guard.first_use("other", "j-1", soon).await.unwrap(),
        "another client's"
    );
    // An entry whose time is over does not hold its jti, though not swept yet.
    assert!(guard.first_use("backend", "j-2", now() - 1).await.unwrap());
    assert!(guard.first_use("backend", "j-2", soon).await.unwrap());
    assert!(!guard.first_use("backend", "j-2", soon).await.unwrap());
}

/// A signing-key row no replica can use (written by hand, or damaged) is left out with an
/// error: a rotation still reaches every replica, and a replica still starts. (Where no row
/// opens, the key-encryption key is another: that start is refused.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_signing_key_row_stops_no_rotation_and_no_start() {
    let Some((server, url, state)) = database("unusable_key").await else {
        return;
    };
    let keys = state.signing_keys(kek()).await.unwrap();
    let first = keys.signing_keys().current_kid();
    server.query(
        "unusable_key",
        "INSERT INTO tower_fhir_signing_keys (kid, alg, sealed, published_at, signs_from) \
         VALUES ('unusable', 'ES256', '\\x0011', 0, 0); \
         SELECT pg_notify('tower_fhir_changes', 'keys')",
    );
    // A rotation to sign at once: this replica, and one started now, sign with the new key.
    let rotated = keys
        .rotate(Duration::ZERO, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_ne!(rotated, first);
    eventually(Duration::from_secs(5), "the rotation applied", async || {
        keys.signing_keys().current_kid() == rotated
    })
    .await;
    let started = PgState::connect(&url)
        .await
        .unwrap()
        .signing_keys(kek())
        .await
        .expect("a start refused for one unusable row");
    assert_eq!(started.signing_keys().current_kid(), rotated);
    // Another key-encryption key opens none: refused.
    let other =
        KeyEncryptionKey::from_base64("AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA=").unwrap();
    let refused = PgState::connect(&url)
        .await
        .unwrap()
        .signing_keys(other)
        .await;
    assert!(refused.is_err());
}
