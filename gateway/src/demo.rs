//! The embedded demo: two small hospital FHIR servers in-process (one DSTU2, one STU3)
//! onboarded as two tenants, a demo client entitled to both, an admin token, and curl commands
//! that work as printed.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::ServiceExt;
use tower_fhir::gateway::Gateway;
use tower_fhir::route::{TenantRecord, Upstream};
use tower_fhir::tenant::TenantId;
use tower_fhir::version::FhirVersion;

use crate::config::{ClientConfig, Config, TenantConfig};
use crate::demo_fhir;

/// Contoso General (DSTU2) and Fabrikam Clinic (STU3), as customers' directory tenants.
const TENANT_DSTU2: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
const TENANT_STU3: &str = "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f";
const DEMO_CLIENT: &str = "demo-app";
const DEMO_SECRET: &str = "demo-secret-change-me-0123456789";
const DEMO_ADMIN_TOKEN: &str = "demo-admin-token-change-me";

/// The demo: two in-process hospitals as tenants, one client entitled to both.
pub(crate) async fn config() -> Config {
    let contoso = demo_fhir::start(
        "Contoso General (DSTU2)",
        FhirVersion::Dstu2,
        &[
            ("1001", "Chalmers", "Peter", "1974-12-25"),
            ("1002", "Windsor", "Anne", "1960-03-11"),
        ],
    )
    .await;
    let fabrikam = demo_fhir::start(
        "Fabrikam Clinic (STU3)",
        FhirVersion::Stu3,
        &[
            ("2001", "Nguyen", "Linh", "1988-07-02"),
            ("2002", "Okafor", "Chidi", "1979-05-30"),
        ],
    )
    .await;
    // The demo's ids and its own servers' URLs are valid by construction.
    let id = |id: &str| TenantId::parse(id).expect("a demo tenant id is a GUID");
    let tenant = |tenant: &str, base: &str, version| TenantConfig {
        id: id(tenant),
        record: TenantRecord::new([
            Upstream::parse(base, version).expect("a demo hospital's URL is valid")
        ])
        .expect("one upstream"),
    };
    let mut config = Config::empty();
    // A try-out on one machine: a thousand connections and HTTP/2 requests at once are plenty,
    // and fit the open files limits of most machines (the defaults may need 31,536).
    config.max_connections = 1_000;
    config.http2_max_requests_in_flight = 1_000;
    config.tenants = vec![
        tenant(TENANT_DSTU2, &contoso, FhirVersion::Dstu2),
        tenant(TENANT_STU3, &fabrikam, FhirVersion::Stu3),
    ];
    config.clients = vec![ClientConfig {
        client_id: DEMO_CLIENT.into(),
        client_secret: Some(DEMO_SECRET.into()),
        token_endpoint_auth_method: None,
        jwks: None,
        jwks_uri: None,
        tenants: vec![id(TENANT_DSTU2), id(TENANT_STU3)],
        scopes: Vec::new(),
        rate_limit: None,
    }];
    config.admin_token = Some(DEMO_ADMIN_TOKEN.into());
    config
}

/// Keeps the demo's admin API only on a loopback address: its token is published (here and in
/// the README), and whoever has it may point a tenant anywhere the gateway can reach.
pub(crate) fn keep_admin_on_loopback(config: &mut Config) {
    if !config.listen.ip().is_loopback() {
        config.admin_token = None;
    }
}

/// Prints the demo credentials, a token per tenant (from the gateway's own token endpoint)
/// and curl commands that work as printed.
pub(crate) async fn print(base: &str, gateway: &Gateway, admin: bool) {
    let token = |tenant: &'static str| {
        let gateway = gateway.clone();
        async move {
            let request = axum::http::Request::post("/oauth/token")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Full::<Bytes>::from(format!(
                    "grant_type=client_credentials&client_id={DEMO_CLIENT}&client_secret={DEMO_SECRET}&scope={tenant}"
                )))
                .expect("a valid request");
            let response = gateway.oneshot(request).await.expect("infallible");
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["access_token"].as_str().map(str::to_owned))
                .unwrap_or_default()
        }
    };
    let token_dstu2 = token(TENANT_DSTU2).await;
    let token_stu3 = token(TENANT_STU3).await;
    use std::fmt::Write as _;
    let mut text = format!("demo client: client_id {DEMO_CLIENT}, client_secret {DEMO_SECRET}\n");
    if admin {
        let _ = writeln!(text, "demo admin token: {DEMO_ADMIN_TOKEN}");
    } else {
        text.push_str("the admin API is off: the demo's admin token is published, and this demo listens beyond loopback (run it on 127.0.0.1 to use it)\n");
    }
    let _ = write!(
        text,
        "demo token for the DSTU2 tenant (ES256, valid for 1 hour):\n  {token_dstu2}\n\
         demo token for the STU3 tenant (ES256, valid for 1 hour):\n  {token_stu3}\n\n\
         try:\n\
         \x20 curl -s {base}/metadata    # no token needed: names the token endpoint\n\
         \x20 curl -s -u {DEMO_CLIENT}:{DEMO_SECRET} -d grant_type=client_credentials -d scope={TENANT_STU3} {base}/oauth/token\n\
         \x20 curl -s -H 'Authorization: Bearer {token_stu3}' '{base}/Patient?family=ngu'\n\
         \x20 curl -s -H 'Authorization: Bearer {token_dstu2}' {base}/Patient/1001\n\
         \x20 curl -s -H 'Authorization: Bearer {token_stu3}' -d 'family=okafor' {base}/Patient/_search\n\
         \x20 curl -si {base}/Patient/1001    # 401 with WWW-Authenticate\n"
    );
    // (Not println!, which panics on a closed stdout: the gateway serves on without it.)
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
}
