//! Bearer validation over real HTTP: a protected axum app on loopback, tokens signed with real
//! keys, and a JWKS endpoint that counts its hits.

mod support;

use std::time::{Duration, Instant};

use axum::routing::get;
use axum::{Extension, Json, Router};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use support::*;
use tower_fhir::auth::{BearerAuthBuilder, BearerAuthLayer, VerificationKey, VerifiedClaims};

async fn whoami(Extension(claims): Extension<VerifiedClaims>) -> Json<Value> {
    Json(json!({
        "sub": claims.subject(),
        "scope": claims.scopes().collect::<Vec<_>>(),
        "kid": claims.key_id(),
    }))
}

/// An app whose `/Patient/1` needs a token and whose `/metadata` does not.
async fn app(layer: BearerAuthLayer) -> TestClient {
    let router = Router::new()
        .route("/Patient/1", get(whoami))
        .route("/metadata", get(|| async { "capability statement" }))
        .layer(layer);
    TestClient::new(serve(router).await)
}

fn builder() -> BearerAuthBuilder {
    BearerAuthLayer::builder()
        .issuer("https://auth.test")
        .audience("tower-fhir")
        .skip_if(|parts| parts.uri.path() == "/metadata")
}

fn static_layer() -> BearerAuthLayer {
    builder()
        .key(VerificationKey::hmac(HMAC_SECRET).unwrap().with_kid("hs"))
        .key(
            VerificationKey::rsa_pem(RSA_PUBLIC)
                .unwrap()
                .with_kid("rsa"),
        )
        .key(VerificationKey::ec_pem(EC_PUBLIC).unwrap().with_kid("ec"))
        .key(VerificationKey::ed_pem(ED_PUBLIC).unwrap().with_kid("ed"))
        .key(
            VerificationKey::rsa_pem(RSA_PUBLIC)
                .unwrap()
                .with_kid("rsa-pinned")
                .with_algorithm(Algorithm::RS256)
                .unwrap(),
        )
        .build()
        .unwrap()
}

fn assert_invalid_token(reply: &Reply, description: &str) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{}", reply.text());
    assert!(
        reply
            .challenge()
            .starts_with("Bearer realm=\"fhir\", error=\"invalid_token\""),
        "{}",
        reply.challenge()
    );
    assert!(
        reply.challenge().contains(description),
        "{}",
        reply.challenge()
    );
    let outcome = reply.json();
    assert_eq!(outcome["resourceType"], "OperationOutcome");
    assert_eq!(outcome["issue"][0]["diagnostics"], description);
    assert_eq!(reply.headers["content-type"], "application/fhir+json");
}

#[tokio::test]
async fn valid_tokens_of_every_family_pass_with_their_claims() {
    let client = app(static_layer()).await;
    for (alg, kid) in [
        (Algorithm::HS256, "hs"),
        (Algorithm::HS512, "hs"),
        (Algorithm::RS256, "rsa"),
        (Algorithm::PS256, "rsa"),
        (Algorithm::ES256, "ec"),
        (Algorithm::EdDSA, "ed"),
    ] {
        let reply = client
            .get_bearer("/Patient/1", &mint(alg, Some(kid), &claims()))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{alg:?}: {}", reply.text());
        assert_eq!(
            reply.json(),
            json!({"sub": "app-1", "scope": ["4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f"], "kid": kid})
        );
    }
}

#[tokio::test]
async fn scheme_is_case_insensitive() {
    let client = app(static_layer()).await;
    let token = mint(Algorithm::HS256, Some("hs"), &claims());
    for scheme in ["bearer", "BEARER", "Bearer  "] {
        let reply = client
            .get(
                "/Patient/1",
                &[("authorization", &format!("{scheme} {token}"))],
            )
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{scheme:?}");
    }
}

#[tokio::test]
async fn missing_token_and_other_schemes_get_a_bare_challenge() {
    let client = app(static_layer()).await;
    for headers in [vec![], vec![("authorization", "Basic YXBwOnNlY3JldA==")]] {
        let reply = client.get("/Patient/1", &headers).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
        assert_eq!(reply.challenge(), "Bearer realm=\"fhir\"");
        assert_eq!(reply.json()["resourceType"], "OperationOutcome");
    }
}

#[tokio::test]
async fn malformed_authorization_is_a_bad_request() {
    let client = app(static_layer()).await;
    let token = mint(Algorithm::HS256, Some("hs"), &claims());
    let bearer = format!("Bearer {token}");
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("authorization", &bearer), ("authorization", &bearer)],
        vec![("authorization", "Bearer")],
        vec![("authorization", "Bearer    ")],
        vec![("authorization", "Bearer abc!def")],
        vec![("authorization", "Bearer a\"b")],
    ];
    for headers in cases {
        let reply = client.get("/Patient/1", &headers).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{headers:?}");
        assert!(
            reply.challenge().contains("error=\"invalid_request\""),
            "{}",
            reply.challenge()
        );
    }
}

#[tokio::test]
async fn alg_none_is_refused() {
    let client = app(static_layer()).await;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims().to_string());
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}"),
    ] {
        let reply = client.get_bearer("/Patient/1", &token).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{token}");
        assert!(reply.challenge().contains("invalid_token"));
    }
}

#[tokio::test]
async fn hmac_signed_with_the_rsa_public_key_is_refused() {
    let client = app(static_layer()).await;
    // The classic confusion: the attacker signs HS256 with the server's public key bytes.
    let forged_key = EncodingKey::from_secret(RSA_PUBLIC.as_bytes());
    for kid in [Some("rsa"), Some("rsa-pinned"), None] {
        let token = mint_with(&forged_key, Algorithm::HS256, kid, &claims());
        let reply = client.get_bearer("/Patient/1", &token).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{kid:?}");
    }
    let reply = client
        .get_bearer(
            "/Patient/1",
            &mint_with(&forged_key, Algorithm::HS256, Some("rsa"), &claims()),
        )
        .await;
    assert_invalid_token(&reply, "The token's algorithm is not allowed for its key");
}

#[tokio::test]
async fn a_key_pinned_to_one_algorithm_refuses_others_of_its_family() {
    let client = app(static_layer()).await;
    let reply = client
        .get_bearer(
            "/Patient/1",
            &mint(Algorithm::PS256, Some("rsa-pinned"), &claims()),
        )
        .await;
    assert_invalid_token(&reply, "The token's algorithm is not allowed for its key");
    let reply = client
        .get_bearer(
            "/Patient/1",
            &mint(Algorithm::RS256, Some("rsa-pinned"), &claims()),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn an_ec_key_refuses_other_curves_and_none_spelt_otherwise() {
    let client = app(static_layer()).await;
    let payload = URL_SAFE_NO_PAD.encode(claims().to_string());
    // ES384 (P-384) named against the P-256 key: refused before any signature is looked at.
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES384","typ":"JWT","kid":"ec"}"#);
    let signature = URL_SAFE_NO_PAD.encode([7u8; 96]);
    let reply = client
        .get_bearer("/Patient/1", &format!("{header}.{payload}.{signature}"))
        .await;
    assert_invalid_token(&reply, "The token's algorithm is not allowed for its key");
    // HS256 signed with the EC or Ed25519 public key's bytes: never an HMAC secret.
    for (public, kid) in [(EC_PUBLIC, "ec"), (ED_PUBLIC, "ed")] {
        let forged = EncodingKey::from_secret(public.as_bytes());
        let token = mint_with(&forged, Algorithm::HS256, Some(kid), &claims());
        let reply = client.get_bearer("/Patient/1", &token).await;
        assert_invalid_token(&reply, "The token's algorithm is not allowed for its key");
    }
    // `none` in other spellings, with a kid, with a signature: all refused.
    for alg in ["None", "NONE", "nOnE"] {
        let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"{alg}","kid":"rsa"}}"#));
        for token in [
            format!("{header}.{payload}."),
            format!("{header}.{payload}.{signature}"),
        ] {
            let reply = client.get_bearer("/Patient/1", &token).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{token}");
            assert!(reply.challenge().contains("invalid_token"), "{token}");
            let outcome = reply.json();
            assert_eq!(outcome["resourceType"], "OperationOutcome", "{token}");
        }
    }
}

#[tokio::test]
async fn algorithm_allow_list_applies_to_every_key() {
    let layer = builder()
        .key(VerificationKey::rsa_pem(RSA_PUBLIC).unwrap())
        .algorithms([Algorithm::RS256])
        .build()
        .unwrap();
    let client = app(layer).await;
    let reply = client
        .get_bearer("/Patient/1", &mint(Algorithm::PS256, None, &claims()))
        .await;
    assert_invalid_token(&reply, "The token's algorithm is not allowed for its key");
    let reply = client
        .get_bearer("/Patient/1", &mint(Algorithm::RS256, None, &claims()))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

/// An RS256 token (key `rsa`) with the usual claims and `field` set to `value`.
fn rs256_with(field: &str, value: Value) -> String {
    let mut c = claims();
    c[field] = value;
    mint(Algorithm::RS256, Some("rsa"), &c)
}

#[tokio::test]
async fn time_claims_are_checked_with_leeway() {
    let client = app(static_layer()).await;
    let with = |field: &str, value: Value| rs256_with(field, value);
    let reply = client
        .get_bearer("/Patient/1", &with("exp", json!(now() - 120)))
        .await;
    assert_invalid_token(&reply, "The access token expired");
    let reply = client
        .get_bearer("/Patient/1", &with("nbf", json!(now() + 600)))
        .await;
    assert_invalid_token(&reply, "The access token is not valid yet");
    // Within the default 60 s leeway: accepted.
    let reply = client
        .get_bearer("/Patient/1", &with("exp", json!(now() - 20)))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = client
        .get_bearer("/Patient/1", &with("nbf", json!(now() + 20)))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn the_leeway_edges_and_a_leeway_of_ones_own() {
    let with = |field: &str, value: Value| rs256_with(field, value);
    // Just past and just within the default 60 s (5 s either side: the test's own clock
    // moves while it runs).
    let client = app(static_layer()).await;
    for (field, at, expected) in [
        ("exp", now() - 65, StatusCode::UNAUTHORIZED),
        ("exp", now() - 55, StatusCode::OK),
        ("nbf", now() + 65, StatusCode::UNAUTHORIZED),
        ("nbf", now() + 55, StatusCode::OK),
    ] {
        let reply = client
            .get_bearer("/Patient/1", &with(field, json!(at)))
            .await;
        assert_eq!(reply.status, expected, "{field} {at}");
    }
    // A leeway of 5 s: ten seconds late is expired.
    let strict = builder()
        .key(
            VerificationKey::rsa_pem(RSA_PUBLIC)
                .unwrap()
                .with_kid("rsa"),
        )
        .leeway(Duration::from_secs(5))
        .build()
        .unwrap();
    let client = app(strict).await;
    let reply = client
        .get_bearer("/Patient/1", &with("exp", json!(now() - 10)))
        .await;
    assert_invalid_token(&reply, "The access token expired");
    let reply = client
        .get_bearer("/Patient/1", &with("nbf", json!(now() + 10)))
        .await;
    assert_invalid_token(&reply, "The access token is not valid yet");
    let reply = client
        .get_bearer("/Patient/1", &with("exp", json!(now() + 60)))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    // No `aud` at all, with an audience required: refused by name.
    let mut c = claims();
    c.as_object_mut().unwrap().remove("aud");
    let reply = client
        .get_bearer("/Patient/1", &mint(Algorithm::RS256, Some("rsa"), &c))
        .await;
    assert_invalid_token(&reply, "The access token has no aud claim");
}

#[tokio::test]
async fn missing_exp_is_refused() {
    let client = app(static_layer()).await;
    let mut c = claims();
    c.as_object_mut().unwrap().remove("exp");
    let reply = client
        .get_bearer("/Patient/1", &mint(Algorithm::HS256, Some("hs"), &c))
        .await;
    assert_invalid_token(&reply, "The access token has no valid exp claim");
}

/// An HS256 token (key `hs`) of the payload exactly as written.
fn hs256_raw(payload: &str) -> String {
    tower_fhir::install_crypto_provider();
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","kid":"hs","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature = jsonwebtoken::crypto::sign(
        signed.as_bytes(),
        &encoding_key(Algorithm::HS256),
        Algorithm::HS256,
    )
    .unwrap();
    format!("{signed}.{signature}")
}

/// Registered claims the crate reads must be what they say, and no claim may be named twice:
/// a string `iat` was read as none (so a check of its value passed), and a second `scope` was
/// read by its last value here, perhaps by its first elsewhere.
#[tokio::test]
async fn malformed_registered_claims_and_claims_named_twice_are_refused() {
    let client = app(static_layer()).await;
    for (field, value, description) in [
        (
            "iat",
            json!(now().to_string()),
            "The access token's iat claim is not a NumericDate",
        ),
        (
            "iat",
            json!(-5),
            "The access token's iat claim is not a NumericDate",
        ),
        (
            "iat",
            json!({}),
            "The access token's iat claim is not a NumericDate",
        ),
        // (jsonwebtoken reads `nbf` itself, and says so first.)
        ("nbf", json!("0"), "The access token has a malformed claim"),
        (
            "sub",
            json!(7),
            "The access token's sub claim is not a string",
        ),
        (
            "jti",
            json!(["a"]),
            "The access token's jti claim is not a string",
        ),
        ("exp", json!(-1), "The access token has no valid exp claim"),
    ] {
        let mut c = claims();
        c[field] = value.clone();
        let reply = client
            .get_bearer("/Patient/1", &mint(Algorithm::HS256, Some("hs"), &c))
            .await;
        assert!(
            reply.challenge().contains(description),
            "{field}: {value}: {}",
            reply.challenge()
        );
        assert_invalid_token(&reply, description);
    }
    // A fractional NumericDate is one (RFC 7519 §2).
    let mut c = claims();
    c["iat"] = json!(now() as f64 + 0.5);
    let reply = client
        .get_bearer("/Patient/1", &mint(Algorithm::HS256, Some("hs"), &c))
        .await;
    assert_eq!(reply.status, StatusCode::OK);

    let exp = now() + 3600;
    let once = format!(
        r#"{{"iss":"https://auth.test","aud":"tower-fhir","sub":"app-1","exp":{exp},"scope":"a"}}"#
    );
    let reply = client.get_bearer("/Patient/1", &hs256_raw(&once)).await;
    assert_eq!(reply.status, StatusCode::OK, "the raw token itself is good");
    for twice in [
        format!(
            r#"{{"iss":"https://auth.test","aud":"tower-fhir","sub":"app-1","exp":{exp},"scope":"a","scope":"b"}}"#
        ),
        format!(
            r#"{{"iss":"https://auth.test","aud":"tower-fhir","sub":"app-1","exp":{exp},"tenant":"a","x":1,"tenant":"a"}}"#
        ),
    ] {
        let reply = client.get_bearer("/Patient/1", &hs256_raw(&twice)).await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{twice}");
        assert_invalid_token(&reply, "The access token is malformed");
    }
}

#[tokio::test]
async fn wrong_issuer_or_audience_is_refused() {
    let client = app(static_layer()).await;
    let with = |field: &str, value: Value| {
        let mut c = claims();
        c[field] = value;
        mint(Algorithm::ES256, Some("ec"), &c)
    };
    let reply = client
        .get_bearer("/Patient/1", &with("iss", json!("https://evil.test")))
        .await;
    assert_invalid_token(&reply, "The access token's issuer is not trusted");
    let reply = client
        .get_bearer("/Patient/1", &with("aud", json!("another-api")))
        .await;
    assert_invalid_token(&reply, "The access token is meant for another audience");
    let reply = client
        .get_bearer("/Patient/1", &with("aud", json!(["x", "tower-fhir"])))
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    let mut c = claims();
    c.as_object_mut().unwrap().remove("iss");
    let reply = client
        .get_bearer("/Patient/1", &mint(Algorithm::ES256, Some("ec"), &c))
        .await;
    assert_invalid_token(&reply, "The access token has no iss claim");
}

#[tokio::test]
async fn several_issuers_and_audiences_may_be_allowed() {
    let layer = BearerAuthLayer::builder()
        .key(VerificationKey::hmac(HMAC_SECRET).unwrap())
        .issuer("https://a.test")
        .issuer("https://b.test")
        .audience("x")
        .audience("y")
        .build()
        .unwrap();
    let client = app(layer).await;
    for (iss, aud, status) in [
        ("https://a.test", "x", StatusCode::OK),
        ("https://b.test", "y", StatusCode::OK),
        ("https://c.test", "x", StatusCode::UNAUTHORIZED),
        ("https://a.test", "z", StatusCode::UNAUTHORIZED),
    ] {
        let c = json!({"iss": iss, "aud": aud, "exp": now() + 60, "sub": "s"});
        let reply = client
            .get_bearer("/Patient/1", &mint(Algorithm::HS256, None, &c))
            .await;
        assert_eq!(reply.status, status, "{iss} {aud}");
    }
}

/// A token whose JWS header declares `typ` (or, with `None`, declares none).
fn typed(typ: Option<&str>, claims: &Value) -> String {
    let mut header = jsonwebtoken::Header::new(Algorithm::ES256);
    header.typ = typ.map(str::to_owned);
    header.kid = Some("ec".to_owned());
    jsonwebtoken::encode(&header, claims, &encoding_key(Algorithm::ES256)).unwrap()
}

#[tokio::test]
async fn an_explicit_token_type_refuses_every_other_jwt() {
    // One key (the fast path) and several (the general one) check alike.
    let one_key = builder()
        .key(VerificationKey::ec_pem(EC_PUBLIC).unwrap().with_kid("ec"))
        .token_type("at+jwt")
        .build()
        .unwrap();
    let several = builder()
        .key(VerificationKey::ec_pem(EC_PUBLIC).unwrap().with_kid("ec"))
        .key(VerificationKey::hmac(HMAC_SECRET).unwrap().with_kid("hs"))
        .token_type("application/at+jwt")
        .build()
        .unwrap();
    for layer in [one_key, several] {
        let client = app(layer).await;
        for typ in [
            "at+jwt",
            "application/at+jwt",
            "AT+JWT",
            "Application/At+Jwt",
        ] {
            let reply = client
                .get_bearer("/Patient/1", &typed(Some(typ), &claims()))
                .await;
            assert_eq!(reply.status, StatusCode::OK, "{typ}: {}", reply.text());
        }
        // An ID token, an untyped JWT, other kinds of JWT the same keys may sign, and near
        // misses.
        for typ in [
            Some("JWT"),
            None,
            Some("dpop+jwt"),
            Some("logout+jwt"),
            Some("at+jwt "),
            Some("application/at+jwt/x"),
            Some("text/at+jwt"),
            Some(""),
        ] {
            let reply = client
                .get_bearer("/Patient/1", &typed(typ, &claims()))
                .await;
            assert_invalid_token(
                &reply,
                "The token's type (typ) is not one accepted for access tokens",
            );
        }
    }
}

#[tokio::test]
async fn a_token_type_for_one_issuer_holds_for_its_tokens_only() {
    let layer = builder()
        .key(VerificationKey::ec_pem(EC_PUBLIC).unwrap().with_kid("ec"))
        .token_type_for_issuer("https://typed.test", "at+jwt")
        .build()
        .unwrap();
    let client = app(layer).await;
    let from = |issuer: &str| {
        let mut c = claims();
        c["iss"] = json!(issuer);
        c
    };
    for (issuer, typ, status) in [
        ("https://auth.test", Some("JWT"), StatusCode::OK),
        ("https://auth.test", None, StatusCode::OK),
        ("https://typed.test", Some("at+jwt"), StatusCode::OK),
        ("https://typed.test", Some("JWT"), StatusCode::UNAUTHORIZED),
        ("https://typed.test", None, StatusCode::UNAUTHORIZED),
    ] {
        let reply = client
            .get_bearer("/Patient/1", &typed(typ, &from(issuer)))
            .await;
        assert_eq!(reply.status, status, "{issuer} {typ:?}: {}", reply.text());
    }
}

#[test]
fn a_token_type_must_be_a_media_type_name() {
    for bad in [
        "",
        "at+jwt; charset=x",
        "a/b/c",
        "at jwt",
        "/at+jwt",
        "application/",
    ] {
        let built = BearerAuthLayer::builder()
            .key(VerificationKey::hmac(HMAC_SECRET).unwrap())
            .token_type(bad)
            .build();
        assert!(built.is_err(), "{bad:?} was taken");
        let built = BearerAuthLayer::builder()
            .key(VerificationKey::hmac(HMAC_SECRET).unwrap())
            .token_type_for_issuer("https://a.test", bad)
            .build();
        assert!(built.is_err(), "{bad:?} was taken for an issuer");
    }
}

#[tokio::test]
async fn tampered_truncated_and_garbage_tokens_are_refused() {
    let client = app(static_layer()).await;
    let token = mint(Algorithm::RS256, Some("rsa"), &claims());
    let parts: Vec<&str> = token.split('.').collect();
    let mut evil = claims();
    evil["sub"] = json!("admin");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(evil.to_string()),
        parts[2]
    );
    let reply = client.get_bearer("/Patient/1", &tampered).await;
    assert_invalid_token(&reply, "The access token signature is invalid");

    for bad in [
        token[..token.len() - 10].to_owned(),
        format!("{}.{}", parts[0], parts[1]),
        parts[0].to_owned(),
        "not-a-jwt".to_owned(),
        "a.b.c".to_owned(),
        "....".to_owned(),
        format!("{token}.extra"),
        format!("{}.{}.{}", parts[0], "%%%", parts[2]).replace('%', "_"),
    ] {
        let reply = client.get_bearer("/Patient/1", &bad).await;
        assert_eq!(
            reply.status,
            StatusCode::UNAUTHORIZED,
            "{bad}: {}",
            reply.text()
        );
        assert!(reply.challenge().contains("invalid_token"));
        assert!(!reply.text().contains(&bad), "the token must not be echoed");
    }
}

#[tokio::test]
async fn an_embedded_jwk_header_is_never_trusted() {
    let client = app(static_layer()).await;
    // The attacker signs with its own key and ships its public key in the header.
    let attacker = EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).unwrap();
    let jwk = rsa_jwk(RSA2_PRIVATE, "rsa");
    let header = json!({"alg": "RS256", "kid": "rsa", "jwk": jwk});
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims().to_string())
    );
    let signature =
        jsonwebtoken::crypto::sign(signing_input.as_bytes(), &attacker, Algorithm::RS256).unwrap();
    let reply = client
        .get_bearer("/Patient/1", &format!("{signing_input}.{signature}"))
        .await;
    assert_invalid_token(&reply, "The access token signature is invalid");
}

#[tokio::test]
async fn large_tokens_up_to_the_limit_are_accepted() {
    let client = app(static_layer()).await;
    let mut c = claims();
    c["groups"] = json!("g".repeat(6000));
    let token = mint(Algorithm::RS256, Some("rsa"), &c);
    assert!(token.len() > 8 * 1024, "{}", token.len());
    assert_eq!(
        client.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );

    c["groups"] = json!("g".repeat(20_000));
    let token = mint(Algorithm::RS256, Some("rsa"), &c);
    let reply = client.get_bearer("/Patient/1", &token).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.challenge().contains("The bearer token is too long"));
}

#[tokio::test]
async fn skipped_paths_need_no_token() {
    let client = app(static_layer()).await;
    let reply = client.get("/metadata", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "capability statement");
}

#[tokio::test]
async fn a_custom_rejection_response_replaces_the_default() {
    let layer = builder()
        .key(VerificationKey::hmac(HMAC_SECRET).unwrap())
        .rejection_response(|rejection| {
            http::Response::builder()
                .status(rejection.status())
                .header("x-reason", rejection.error_code().unwrap_or("none"))
                .body(bytes::Bytes::from_static(b"custom"))
                .unwrap()
        })
        .build()
        .unwrap();
    let client = app(layer).await;
    let reply = client.get_bearer("/Patient/1", "a.b.c").await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(reply.headers["x-reason"], "invalid_token");
    assert_eq!(reply.text(), "custom");
}

#[tokio::test]
async fn the_cache_never_accepts_a_token_after_its_exp() {
    let layer = builder()
        .key(VerificationKey::hmac(HMAC_SECRET).unwrap())
        .leeway(Duration::ZERO)
        .build()
        .unwrap();
    let client = app(layer).await;
    let mut c = claims();
    c["exp"] = json!(now() + 2);
    let token = mint(Algorithm::HS256, None, &c);
    assert_eq!(
        client.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );
    assert_eq!(
        client.get_bearer("/Patient/1", &token).await.status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let reply = client.get_bearer("/Patient/1", &token).await;
    assert_invalid_token(&reply, "The access token expired");
}

mod jwks {
    use super::*;

    fn remote(server: &JwksServer) -> BearerAuthBuilder {
        builder().jwks_url(server.url())
    }

    #[tokio::test]
    async fn keys_are_fetched_once_and_reused() {
        let server = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "k1")]).await;
        let client = app(remote(&server).token_cache_capacity(0).build().unwrap()).await;
        for _ in 0..5 {
            let reply = client
                .get_bearer("/Patient/1", &mint(Algorithm::RS256, Some("k1"), &claims()))
                .await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        }
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn rotation_is_picked_up_and_the_old_key_dropped() {
        let server = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "old")]).await;
        let client = app(remote(&server).build().unwrap()).await;
        let old_token = mint(Algorithm::RS256, Some("old"), &claims());
        assert_eq!(
            client.get_bearer("/Patient/1", &old_token).await.status,
            StatusCode::OK
        );
        assert_eq!(server.hits(), 1);

        server.set_keys(vec![rsa_jwk(RSA2_PRIVATE, "new")]);
        let key = EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).unwrap();
        let new_token = mint_with(&key, Algorithm::RS256, Some("new"), &claims());
        let reply = client.get_bearer("/Patient/1", &new_token).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(server.hits(), 2, "one refetch for the new kid");

        // The old token was cached, but its key left the set: refused, and within the
        // cooldown no further fetch happens.
        let reply = client.get_bearer("/Patient/1", &old_token).await;
        assert_invalid_token(&reply, "No key is known for this token");
        assert_eq!(server.hits(), 2);
    }

    #[tokio::test]
    async fn an_unknown_kid_storm_causes_at_most_one_fetch_per_cooldown() {
        let server = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "k1")]).await;
        server.set_delay(Duration::from_millis(100));
        let client = app(remote(&server).build().unwrap()).await;
        let good = mint(Algorithm::RS256, Some("k1"), &claims());
        assert_eq!(
            client.get_bearer("/Patient/1", &good).await.status,
            StatusCode::OK
        );
        assert_eq!(server.hits(), 1);

        let storm = (0..100).map(|i| {
            let client = client.clone();
            let token = mint(Algorithm::RS256, Some(&format!("unknown-{i}")), &claims());
            tokio::spawn(async move { client.get_bearer("/Patient/1", &token).await.status })
        });
        for status in futures::future::join_all(storm).await {
            assert_eq!(status.unwrap(), StatusCode::UNAUTHORIZED);
        }
        assert_eq!(
            server.hits(),
            2,
            "concurrent misses share one fetch, then the cooldown holds"
        );
        // Known keys keep working throughout.
        assert_eq!(
            client.get_bearer("/Patient/1", &good).await.status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn the_refetch_cooldown_ends() {
        // A short cooldown (long enough that a stalled machine still makes its checks within
        // it): within it a new unknown `kid` is refused without a fetch; once it has passed,
        // the next unknown `kid` fetches again and its token is accepted.
        const COOLDOWN: Duration = Duration::from_secs(3);
        let server = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "k1")]).await;
        let client = app(remote(&server).refetch_cooldown(COOLDOWN).build().unwrap()).await;
        let good = mint(Algorithm::RS256, Some("k1"), &claims());
        assert_eq!(
            client.get_bearer("/Patient/1", &good).await.status,
            StatusCode::OK
        );
        assert_eq!(server.hits(), 1);

        // An unknown `kid` refetches once (the key is not there yet): the cooldown starts.
        let before = Instant::now();
        let early = mint(Algorithm::RS256, Some("not-yet"), &claims());
        assert_invalid_token(
            &client.get_bearer("/Patient/1", &early).await,
            "No key is known for this token",
        );
        let refetched = Instant::now();
        assert_eq!(server.hits(), 2, "one refetch for the unknown kid");

        // The provider publishes a new key; a token naming it within the cooldown is refused
        // without a fetch.
        server.set_keys(vec![
            rsa_jwk(RSA_PRIVATE, "k1"),
            rsa_jwk(RSA2_PRIVATE, "new"),
        ]);
        let key = EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).unwrap();
        let new_token = mint_with(&key, Algorithm::RS256, Some("new"), &claims());
        let reply = client.get_bearer("/Patient/1", &new_token).await;
        assert!(
            before.elapsed() < COOLDOWN,
            "too slow to test within the cooldown"
        );
        assert_invalid_token(&reply, "No key is known for this token");
        assert_eq!(server.hits(), 2, "no fetch within the cooldown");

        // Past the cooldown (counted from after the refetch began): the same token fetches the
        // keys again and is accepted.
        tokio::time::sleep_until((refetched + COOLDOWN + Duration::from_millis(50)).into()).await;
        let before = Instant::now();
        let reply = client.get_bearer("/Patient/1", &new_token).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["kid"], "new");
        assert_eq!(server.hits(), 3, "one refetch once the cooldown ended");

        // That refetch started a new cooldown.
        let unknown = mint(Algorithm::RS256, Some("still-unknown"), &claims());
        let reply = client.get_bearer("/Patient/1", &unknown).await;
        assert!(
            before.elapsed() < COOLDOWN,
            "too slow to test within the cooldown"
        );
        assert_invalid_token(&reply, "No key is known for this token");
        assert_eq!(server.hits(), 3, "a new cooldown after the refetch");
    }

    #[tokio::test]
    async fn cold_start_with_the_endpoint_down_is_503() {
        let server = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "k1")]).await;
        server.set_status(StatusCode::INTERNAL_SERVER_ERROR);
        let client = app(remote(&server).build().unwrap()).await;
        let token = mint(Algorithm::RS256, Some("k1"), &claims());
        let reply = client.get_bearer("/Patient/1", &token).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(reply.headers.contains_key("retry-after"));
        assert_eq!(reply.json()["issue"][0]["code"], "transient");

        // The endpoint recovers: after the one-second cold retry gap, keys are fetched.
        server.set_status(StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(
            client.get_bearer("/Patient/1", &token).await.status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn cached_keys_keep_working_while_the_endpoint_is_down() {
        let server = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "k1")]).await;
        let layer = remote(&server)
            .refresh_interval(Duration::from_millis(100))
            .refetch_cooldown(Duration::from_millis(100))
            .token_cache_capacity(0)
            .build()
            .unwrap();
        let client = app(layer).await;
        let token = mint(Algorithm::RS256, Some("k1"), &claims());
        assert_eq!(
            client.get_bearer("/Patient/1", &token).await.status,
            StatusCode::OK
        );

        server.set_status(StatusCode::SERVICE_UNAVAILABLE);
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(150)).await;
            assert_eq!(
                client.get_bearer("/Patient/1", &token).await.status,
                StatusCode::OK
            );
        }
        assert!(
            server.hits() >= 2,
            "refreshes were attempted: {}",
            server.hits()
        );
    }

    #[tokio::test]
    async fn keys_not_fetched_again_within_max_key_age_are_dropped_and_tokens_get_503() {
        let server = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "k1")]).await;
        let layer = remote(&server)
            .refresh_interval(Duration::from_millis(100))
            .refetch_cooldown(Duration::from_millis(100))
            .max_age_cap(Duration::from_millis(100))
            .max_key_age(Duration::from_millis(600))
            .build()
            .unwrap();
        let client = app(layer).await;
        let token = mint(Algorithm::RS256, Some("k1"), &claims());
        let status = || async { client.get_bearer("/Patient/1", &token).await };
        assert_eq!(status().await.status, StatusCode::OK);
        // The endpoint down: the keys are kept for a while...
        server.set_status(StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(status().await.status, StatusCode::OK);
        // ... not past max_key_age: the token (cached as verified, too) gets 503, an outage.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let reply = status().await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        assert!(reply.headers.contains_key("retry-after"));
        // Back, publishing no key (the key withdrawn): that is an answer, the token unknown.
        server.set_status(StatusCode::OK);
        server.set_keys(Vec::new());
        let mut reply = status().await;
        for _ in 0..20 {
            if reply.status != StatusCode::SERVICE_UNAVAILABLE {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            reply = status().await;
        }
        assert_invalid_token(&reply, "No key is known for this token");
        // The key back: verified again.
        server.set_keys(vec![rsa_jwk(RSA_PRIVATE, "k1")]);
        let mut reply = status().await;
        for _ in 0..20 {
            if reply.status == StatusCode::OK {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            reply = status().await;
        }
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }

    #[tokio::test]
    async fn refresh_follows_cache_control_max_age() {
        let server = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "k1")]).await;
        server.set_cache_control("public, max-age=1");
        let layer = remote(&server)
            .refetch_cooldown(Duration::from_millis(100))
            .token_cache_capacity(0)
            .build()
            .unwrap();
        let client = app(layer).await;
        let token = mint(Algorithm::RS256, Some("k1"), &claims());
        assert_eq!(
            client.get_bearer("/Patient/1", &token).await.status,
            StatusCode::OK
        );
        assert_eq!(
            client.get_bearer("/Patient/1", &token).await.status,
            StatusCode::OK
        );
        assert_eq!(server.hits(), 1, "fresh for max-age");
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(
            client.get_bearer("/Patient/1", &token).await.status,
            StatusCode::OK
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            server.hits(),
            2,
            "refreshed after max-age (5 min interval otherwise)"
        );
    }

    #[tokio::test]
    async fn hmac_secrets_published_in_a_jwks_are_never_trusted() {
        let secret = URL_SAFE_NO_PAD.encode(HMAC_SECRET);
        let server = JwksServer::start(vec![
            json!({"kty": "oct", "kid": "shared", "alg": "HS256", "k": secret}),
            rsa_jwk(RSA_PRIVATE, "k1"),
        ])
        .await;
        let client = app(remote(&server).build().unwrap()).await;
        let forged = mint(Algorithm::HS256, Some("shared"), &claims());
        assert_eq!(
            client.get_bearer("/Patient/1", &forged).await.status,
            StatusCode::UNAUTHORIZED
        );
        let good = mint(Algorithm::RS256, Some("k1"), &claims());
        assert_eq!(
            client.get_bearer("/Patient/1", &good).await.status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn crit_headers_and_an_emptied_jwks_on_the_fetched_path() {
        let server = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "k1")]).await;
        let layer = remote(&server)
            .token_cache_capacity(0)
            .refresh_interval(Duration::from_millis(100))
            .refetch_cooldown(Duration::from_millis(100))
            .build()
            .unwrap();
        let client = app(layer).await;
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(json!({"alg": "RS256", "kid": "k1", "crit": ["x"]}).to_string()),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        let signature =
            jsonwebtoken::crypto::sign(input.as_bytes(), &rsa, Algorithm::RS256).unwrap();
        let reply = client
            .get_bearer("/Patient/1", &format!("{input}.{signature}"))
            .await;
        assert_invalid_token(
            &reply,
            "The token has critical header extensions this server does not understand",
        );

        let token = mint(Algorithm::RS256, Some("k1"), &claims());
        let reply = client.get_bearer("/Patient/1", &token).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "before: hits {} {}",
            server.hits(),
            reply.text()
        );

        // The endpoint starts answering an empty set: the last good keys stay.
        server.set_keys(vec![]);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let token = mint(Algorithm::RS256, Some("k1"), &claims());
        for _ in 0..3 {
            let reply = client.get_bearer("/Patient/1", &token).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "hits {} {}",
                server.hits(),
                reply.text()
            );
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        assert!(server.hits() >= 2);
    }

    /// A layer trusting `a`'s keys for `https://a.test` and `b`'s for `https://b.test`, served.
    async fn two_providers(a: &JwksServer, b: &JwksServer) -> TestClient {
        let layer = BearerAuthLayer::builder()
            .jwks_url_for_issuer(a.url(), "https://a.test")
            .jwks_url_for_issuer(b.url(), "https://b.test")
            .build()
            .unwrap();
        app(layer).await
    }

    #[tokio::test]
    async fn an_identity_provider_cannot_sign_in_anothers_name() {
        let idp_a = JwksServer::start(vec![rsa_jwk(RSA_PRIVATE, "a1")]).await;
        let idp_b = JwksServer::start(vec![rsa_jwk(RSA2_PRIVATE, "b1")]).await;
        let client = two_providers(&idp_a, &idp_b).await;
        let key_b = EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).unwrap();
        let with_iss = |iss: &str| {
            let mut c = claims();
            c["iss"] = json!(iss);
            c
        };
        let a_as_a = mint(Algorithm::RS256, Some("a1"), &with_iss("https://a.test"));
        let b_as_b = mint_with(
            &key_b,
            Algorithm::RS256,
            Some("b1"),
            &with_iss("https://b.test"),
        );
        let a_as_b = mint(Algorithm::RS256, Some("a1"), &with_iss("https://b.test"));
        assert_eq!(
            client.get_bearer("/Patient/1", &a_as_a).await.status,
            StatusCode::OK
        );
        assert_eq!(
            client.get_bearer("/Patient/1", &b_as_b).await.status,
            StatusCode::OK
        );
        // Only B's keys are tried for a token naming B, and none has the `kid` a1.
        let reply = client.get_bearer("/Patient/1", &a_as_b).await;
        assert_invalid_token(&reply, "No key is known for this token");
        // Without a `kid`, B's keys are tried, and none verifies A's signature.
        let a_as_b = mint(Algorithm::RS256, None, &with_iss("https://b.test"));
        let reply = client.get_bearer("/Patient/1", &a_as_b).await;
        assert_invalid_token(&reply, "The access token signature is invalid");
        // An issuer no key vouches for (a trailing slash is another issuer), or none.
        for iss in [
            json!("https://c.test"),
            json!("https://a.test/"),
            json!(null),
        ] {
            let mut c = claims();
            c["iss"] = iss;
            let reply = client
                .get_bearer("/Patient/1", &mint(Algorithm::RS256, Some("a1"), &c))
                .await;
            assert_invalid_token(&reply, "The access token's issuer is not trusted");
        }

        // A key bound to no issuer vouches for the issuers that have no keys of their own, and
        // cannot sign in the name of one that has.
        let layer = BearerAuthLayer::builder()
            .jwks_url_for_issuer(idp_a.url(), "https://a.test")
            .key(VerificationKey::hmac(HMAC_SECRET).unwrap())
            .issuer("https://shared.test")
            .build()
            .unwrap();
        let client = app(layer).await;
        let shared = |iss: &str| mint(Algorithm::HS256, None, &with_iss(iss));
        assert_eq!(
            client
                .get_bearer("/Patient/1", &shared("https://shared.test"))
                .await
                .status,
            StatusCode::OK
        );
        // Only A's own (RSA) keys are tried for a token naming A.
        let reply = client
            .get_bearer("/Patient/1", &shared("https://a.test"))
            .await;
        assert_invalid_token(&reply, "The token's algorithm is not allowed for its key");
        assert_eq!(
            client.get_bearer("/Patient/1", &a_as_a).await.status,
            StatusCode::OK
        );
        // Nor by naming A in an array: jsonwebtoken takes an `iss` array holding an accepted
        // issuer, which every string-reading check here took for no issuer at all (so the
        // shared key vouched for it). `iss` is one string.
        for iss in [json!(["https://a.test"]), json!(["https://shared.test"])] {
            let mut c = claims();
            c["iss"] = iss;
            let reply = client
                .get_bearer("/Patient/1", &mint(Algorithm::HS256, None, &c))
                .await;
            assert_invalid_token(&reply, "The access token's iss claim is not a string");
        }

        // The same keys given unbound and bound (tried in that order): the unbound ones may
        // not vouch for the issuer, its bound ones then do.
        let layer = BearerAuthLayer::builder()
            .jwks_url(idp_a.url())
            .jwks_url_for_issuer(idp_a.url(), "https://a.test")
            .build()
            .unwrap();
        let client = app(layer).await;
        assert_eq!(
            client.get_bearer("/Patient/1", &a_as_a).await.status,
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn a_token_fetches_and_waits_on_its_own_issuers_keys_only() {
        // A's keys also hold a `kid` that B takes up later with a key of its own.
        let idp_a = JwksServer::start(vec![
            rsa_jwk(RSA_PRIVATE, "a1"),
            rsa_jwk(RSA_PRIVATE, "shared"),
        ])
        .await;
        let idp_b = JwksServer::start(vec![rsa_jwk(RSA2_PRIVATE, "b1")]).await;
        let key_a = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        let key_b = EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).unwrap();
        let token = |key: &EncodingKey, kid: &str, iss: &str| {
            let mut c = claims();
            c["iss"] = json!(iss);
            mint_with(key, Algorithm::RS256, Some(kid), &c)
        };
        // A new layer, with both providers' keys fetched.
        let fresh = || async {
            let client = two_providers(&idp_a, &idp_b).await;
            for (key, kid, iss) in [
                (&key_a, "a1", "https://a.test"),
                (&key_b, "b1", "https://b.test"),
            ] {
                let reply = client.get_bearer("/Patient/1", &token(key, kid, iss)).await;
                assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            }
            client
        };
        let hits = || (idp_a.hits(), idp_b.hits());
        // A publishes `new` beside its keys, and a token of A's naming it (signed with B's key
        // material, which A publishes under that `kid`) is asked for.
        let rotate_a = async |client: &TestClient, new: &str| {
            idp_a.set_keys(vec![
                rsa_jwk(RSA_PRIVATE, "a1"),
                rsa_jwk(RSA_PRIVATE, "shared"),
                rsa_jwk(RSA2_PRIVATE, new),
            ]);
            client
                .get_bearer("/Patient/1", &token(&key_b, new, "https://a.test"))
                .await
        };

        // Random `kid`s in B's name refetch B's keys (once a cooldown), never A's, and leave
        // A's cooldown alone: A's rotation right after is picked up.
        let client = fresh().await;
        let (a, b) = hits();
        for n in 0..5 {
            let forged = token(&key_b, &format!("random-{n}"), "https://b.test");
            let reply = client.get_bearer("/Patient/1", &forged).await;
            assert_invalid_token(&reply, "No key is known for this token");
        }
        assert_eq!(hits(), (a, b + 1));
        let reply = rotate_a(&client, "a2").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(hits(), (a + 1, b + 1));

        // B hangs, A rotates: a token with A's new `kid` fetches A's keys alone, so it neither
        // waits on B nor starts a fetch there.
        let client = fresh().await;
        let (a, b) = hits();
        idp_b.set_delay(Duration::from_secs(30));
        let reply = rotate_a(&client, "a3").await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(hits(), (a + 1, b));
        idp_b.set_delay(Duration::ZERO);

        // B takes up a `kid` that A also has (with B's own key): B's token is not judged by
        // A's key of that name, and B's keys are fetched for it.
        let client = fresh().await;
        idp_b.set_keys(vec![
            rsa_jwk(RSA2_PRIVATE, "b1"),
            rsa_jwk(RSA2_PRIVATE, "shared"),
        ]);
        let reply = client
            .get_bearer("/Patient/1", &token(&key_b, "shared", "https://b.test"))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        // A's key of that name signs for A, never for B.
        let reply = client
            .get_bearer("/Patient/1", &token(&key_a, "shared", "https://a.test"))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let reply = client
            .get_bearer("/Patient/1", &token(&key_a, "shared", "https://b.test"))
            .await;
        assert_invalid_token(&reply, "The access token signature is invalid");
    }

    #[tokio::test]
    async fn each_trusted_issuer_has_its_own_audience() {
        let idp = JwksServer::start(vec![rsa_jwk(RSA2_PRIVATE, "b1")]).await;
        let layer = BearerAuthLayer::builder()
            .key(VerificationKey::rsa_pem(RSA_PUBLIC).unwrap())
            .issuer("https://auth.test")
            .audience("tower-fhir")
            .jwks_url_for_issuer(idp.url(), "https://idp.test")
            .audience_for_issuer("https://idp.test", "api://idp-audience")
            .build()
            .unwrap();
        let client = app(layer).await;
        let key_b = EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).unwrap();
        let idp_token = |aud: &str| {
            let mut c = claims();
            c["iss"] = json!("https://idp.test");
            c["aud"] = json!(aud);
            mint_with(&key_b, Algorithm::RS256, Some("b1"), &c)
        };
        let own_token = |aud: &str| {
            let mut c = claims();
            c["aud"] = json!(aud);
            mint(Algorithm::RS256, None, &c)
        };
        for (token, expected) in [
            (idp_token("api://idp-audience"), StatusCode::OK),
            (own_token("tower-fhir"), StatusCode::OK),
            // Each audience holds for its own issuer only.
            (idp_token("tower-fhir"), StatusCode::UNAUTHORIZED),
            (own_token("api://idp-audience"), StatusCode::UNAUTHORIZED),
        ] {
            let reply = client.get_bearer("/Patient/1", &token).await;
            assert_eq!(reply.status, expected, "{}", reply.text());
            if expected == StatusCode::UNAUTHORIZED {
                assert_invalid_token(&reply, "The access token is not meant for this audience");
            }
        }
        // No `aud` at all is refused too.
        let mut c = claims();
        c["iss"] = json!("https://idp.test");
        c.as_object_mut().unwrap().remove("aud");
        let reply = client
            .get_bearer(
                "/Patient/1",
                &mint_with(&key_b, Algorithm::RS256, Some("b1"), &c),
            )
            .await;
        assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn unusable_jwks_entries_are_skipped() {
        let server = JwksServer::start(vec![
            json!({"kty": "RSA", "kid": "enc", "use": "enc", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB"}),
            json!({"kty": "EC", "kid": "p521", "crv": "P-521", "x": "AQAB", "y": "AQAB"}),
            rsa_jwk(RSA_PRIVATE, "k1"),
        ])
        .await;
        let client = app(remote(&server).build().unwrap()).await;
        let reply = client
            .get_bearer("/Patient/1", &mint(Algorithm::RS256, Some("k1"), &claims()))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
}

mod single_key {
    //! One static key takes a faster path (no header parse of our own): the same attacks fail.
    use super::*;

    fn layer() -> BearerAuthLayer {
        builder()
            .key(VerificationKey::rsa_pem(RSA_PUBLIC).unwrap())
            .build()
            .unwrap()
    }

    fn hand_made(header: Value, claims: &Value, signer: &EncodingKey, alg: Algorithm) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = jsonwebtoken::crypto::sign(input.as_bytes(), signer, alg).unwrap();
        format!("{input}.{signature}")
    }

    #[tokio::test]
    async fn the_fast_path_refuses_what_the_general_one_does() {
        let client = app(layer()).await;
        let good = mint(Algorithm::RS256, Some("any-kid"), &claims());
        assert_eq!(
            client.get_bearer("/Patient/1", &good).await.status,
            StatusCode::OK
        );

        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        // A `null` is a `crit` member too (RFC 7515: a non-empty array, or no member).
        for value in [json!(["exp"]), json!(null), json!([])] {
            let crit = hand_made(
                json!({"alg": "RS256", "crit": value}),
                &claims(),
                &rsa,
                Algorithm::RS256,
            );
            assert_invalid_token(
                &client.get_bearer("/Patient/1", &crit).await,
                "The token has critical header extensions this server does not understand",
            );
        }

        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let none = format!("{header}.{}.", URL_SAFE_NO_PAD.encode(claims().to_string()));
        assert_eq!(
            client.get_bearer("/Patient/1", &none).await.status,
            StatusCode::UNAUTHORIZED
        );

        let confused = mint_with(
            &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
            Algorithm::HS256,
            None,
            &claims(),
        );
        assert_invalid_token(
            &client.get_bearer("/Patient/1", &confused).await,
            "The token's algorithm is not allowed for its key",
        );

        let mut expired = claims();
        expired["exp"] = json!(now() - 600);
        let expired = mint(Algorithm::RS256, None, &expired);
        assert_invalid_token(
            &client.get_bearer("/Patient/1", &expired).await,
            "The access token expired",
        );

        let other_key = EncodingKey::from_rsa_pem(RSA2_PRIVATE.as_bytes()).unwrap();
        let forged = mint_with(&other_key, Algorithm::RS256, None, &claims());
        assert_invalid_token(
            &client.get_bearer("/Patient/1", &forged).await,
            "The access token signature is invalid",
        );
    }

    #[tokio::test]
    async fn a_key_with_a_kid_takes_only_tokens_naming_it_or_none() {
        for layer in [
            // The fast path (one static key) and the general one (two) answer alike.
            builder()
                .key(VerificationKey::rsa_pem(RSA_PUBLIC).unwrap().with_kid("k1"))
                .build()
                .unwrap(),
            builder()
                .key(VerificationKey::rsa_pem(RSA_PUBLIC).unwrap().with_kid("k1"))
                .key(VerificationKey::hmac(HMAC_SECRET).unwrap().with_kid("hs"))
                .build()
                .unwrap(),
        ] {
            let client = app(layer).await;
            for kid in [Some("k1"), None] {
                let token = mint(Algorithm::RS256, kid, &claims());
                let reply = client.get_bearer("/Patient/1", &token).await;
                assert_eq!(reply.status, StatusCode::OK, "kid {kid:?}");
            }
            // Signed by the right key, but naming another one: refused, and never cached.
            let token = mint(Algorithm::RS256, Some("k2"), &claims());
            for _ in 0..2 {
                assert_invalid_token(
                    &client.get_bearer("/Patient/1", &token).await,
                    "No key is known for this token",
                );
            }
        }
    }
}
