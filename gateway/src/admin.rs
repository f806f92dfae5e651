//! The admin API: list, onboard, change and remove tenants; list and register clients, change
//! which tenants and scopes they may get tokens for, revoke them, reset their secrets; rotate
//! and retire signing keys. Bearer `admin_token`; every change is written to the state (`state_dir` or the
//! database; `503` with `Retry-After` when it cannot be) and takes effect at once (for tokens issued from
//! then on: one already issued keeps its scope until it expires; a tenant's or a client's
//! `rate_limit` applies to tokens already issued too, at their next request). An address that
//! presents five wrong admin tokens within a minute gets `429` for a while (`AdminThrottle`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tower_fhir::limit::{RateLimit, RateLimitLayer};
use tower_fhir::outcome::Refusal;
use tower_fhir::postgres::PgSigningKeys;
use tower_fhir::proxy::ForwardedClient;
use tower_fhir::route::{
    nested_bases, DirectoryError, NestedBases, RouteCache, TenantEntry, TenantRecord, TenantStore,
};
use tower_fhir::tenant::TenantId;
use tower_fhir::token::{
    is_client_id, AuthMethod, ClientKeys, ClientRecord, ClientStore, ClientUpdate, NewClient,
    SigningKey, SigningKeys, TokenEndpoint,
};

pub(crate) use crate::throttle::AdminThrottle;
use crate::throttle::{Source, Verdict};

pub(crate) struct Admin {
    pub(crate) token: String,
    pub(crate) directory: Arc<dyn TenantStore>,
    /// This process's route cache: a changed or removed tenant is forgotten before the change
    /// is answered, so the next request sees it (other replicas follow the directory's changes).
    pub(crate) routes: RouteCache,
    pub(crate) clients: Arc<dyn ClientStore>,
    /// The gateway's rate limits: a client's changed limit applies at once.
    pub(crate) limits: RateLimitLayer,
    /// Wrong admin tokens per source address.
    pub(crate) throttle: AdminThrottle,
    /// The token endpoint's signing keys.
    pub(crate) keys: KeyAdmin,
    /// The longest lifetime of the gateway's tokens: how long a replaced key stays published.
    pub(crate) token_lifetime: Duration,
    /// Held from checking a tenant change against the other tenants until it is saved, so two
    /// changes through this process cannot each pass the check and nest together.
    pub(crate) tenant_writes: tokio::sync::Mutex<()>,
    /// The token endpoint: revoking a client revokes the tokens it holds.
    pub(crate) endpoint: TokenEndpoint,
    /// How long a request body may pause, and its least average rate (the gateway's
    /// `body_read_timeout_seconds` and `body_min_bytes_per_second`).
    pub(crate) body_timeout: Duration,
    pub(crate) body_min_rate: u32,
    /// The gateway's own listening addresses, by key (`listen`, `metrics_listen`,
    /// `admin_listen`): no tenant's upstream may be one.
    pub(crate) own_addresses: Vec<(&'static str, std::net::SocketAddr)>,
    /// The lock on `state_dir` (file mode): while it is lost, changes are refused.
    pub(crate) state_lock: Option<Arc<crate::state::DirLock>>,
}

/// The most an admin request's body may hold: a tenant or a client is a few kilobytes.
pub(crate) const MAX_ADMIN_BODY_BYTES: u64 = 1 << 20;

/// Where the signing keys are changed.
pub(crate) enum KeyAdmin {
    /// In `state_dir`: this process alone signs with them.
    Files(SigningKeys),
    /// In the database, for every replica.
    Database(PgSigningKeys),
}

impl KeyAdmin {
    fn keys(&self) -> SigningKeys {
        match self {
            Self::Files(keys) => keys.clone(),
            Self::Database(keys) => keys.signing_keys(),
        }
    }
}

/// Clock skew tolerated by verifiers, added to how long a replaced key stays published.
const LEEWAY: Duration = Duration::from_secs(60);

/// The routes under `/admin`.
pub(crate) fn routes(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/admin/tenants", get(list_tenants))
        .route(
            "/admin/tenants/{id}",
            put(put_tenant).delete(delete_tenant).get(get_tenant),
        )
        .route("/admin/clients", get(list_clients))
        .route(
            "/admin/clients/{client_id}",
            put(put_client).get(get_client).delete(delete_client),
        )
        .route("/admin/clients/{client_id}/secret", post(reset_secret))
        .route("/admin/clients/{client_id}/tokens", delete(refuse_tokens))
        .route("/admin/signing-keys", get(list_keys).post(rotate_keys))
        .route("/admin/signing-keys/{kid}", delete(retire_key))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such admin route") })
        .layer(middleware::from_fn(detached))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&admin),
            state_held,
        ))
        // Every admin path needs the admin token, one that names no route included (so the
        // routes cannot be listed without it); checked once, before any handler.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&admin),
            require_admin,
        ))
        // Every request's body is bounded first, as the gateway's are.
        .layer(middleware::from_fn_with_state(
            Arc::clone(&admin),
            bounded_body,
        ))
        .layer(middleware::map_response(mark_refusal))
        .with_state(admin)
}

/// Runs the rest of an admin request (past the token check) in a task of its own, which this
/// future awaits: a client that goes away, or a timeout in front of the gateway, drops this
/// future, not the request's work. A change's steps (the write, then the refusal of a client's
/// tokens, this process's caches told) all run once begun; dropped between two of them, a
/// client would be left revoked or narrowed with its tokens working, or a tenant changed with
/// this process's route cache still holding it.
async fn detached(request: Request, next: Next) -> Response {
    // In the request's span (its request id, in every line the handler logs).
    let run = tracing::Instrument::instrument(next.run(request), tracing::Span::current());
    match tokio::spawn(run).await {
        Ok(response) => response,
        Err(err) => {
            tracing::error!(error = %err, "an admin request failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request failed: see the gateway's log",
            )
        }
    }
}

/// What answers under `/admin` when the admin API is off: `404` for every path, with
/// `{"error": "the admin API is off: {why}"}`, so an administrator is told why rather than
/// having the request taken for a FHIR one.
pub(crate) fn off(why: &'static str) -> Router {
    Router::new()
        .fallback(move || async move {
            error(
                StatusCode::NOT_FOUND,
                &format!("the admin API is off: {why}"),
            )
        })
        .layer(middleware::map_response(mark_refusal))
}

/// What answers `/admin/...` on `listen` when the admin API is on `admin_listen`: `404`, as
/// for a path that names nothing (the admin token is not asked for, nor checked, here).
pub(crate) fn elsewhere() -> Router {
    Router::new()
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not found") })
        .layer(middleware::map_response(mark_refusal))
}

/// A refusal that is not JSON (axum's own: a method a route does not take, a body past the
/// limit as it arrives) made one, as every other admin answer is; its headers kept.
fn as_json(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if status.as_u16() < 400 || is_json {
        return response;
    }
    let message = match status {
        StatusCode::NOT_FOUND => "no such admin route".to_owned(),
        StatusCode::METHOD_NOT_ALLOWED => "this admin route does not take that method".to_owned(),
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("an admin request's body may hold at most {MAX_ADMIN_BODY_BYTES} bytes")
        }
        other => other
            .canonical_reason()
            .unwrap_or("refused")
            .to_ascii_lowercase(),
    };
    let (mut parts, _) = response.into_parts();
    let replacement = error(status, &message);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, replacement.into_body())
}

/// Names what an answer from 400 up refused, for the request's audit record and metrics
/// (their `outcome`): the FHIR issue code its status stands for.
async fn mark_refusal(response: Response) -> Response {
    let mut response = as_json(response);
    let status = response.status().as_u16();
    if status >= 400 && response.extensions().get::<Refusal>().is_none() {
        let code = match status {
            400 | 422 => "invalid",
            401 => "login",
            403 => "forbidden",
            404 => "not-found",
            405 | 415 => "not-supported",
            409 => "conflict",
            413 => "too-long",
            429 => "throttled",
            503 => "transient",
            _ => "exception",
        };
        response.extensions_mut().insert(Refusal(code));
    }
    response
}

/// `413` for a body declared larger than [`MAX_ADMIN_BODY_BYTES`] (before it is read); any
/// other body read at most that far, and given up on when it pauses longer than the body
/// timeout or falls behind the least rate (its handler then answers `400`, `413` past the
/// limit).
async fn bounded_body(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_ADMIN_BODY_BYTES) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("an admin request's body may hold at most {MAX_ADMIN_BODY_BYTES} bytes"),
        );
    }
    let request = request.map(|body| {
        let limited = http_body_util::Limited::new(body, MAX_ADMIN_BODY_BYTES as usize);
        axum::body::Body::new(
            tower_fhir::ops::TimedBody::new(limited, admin.body_timeout)
                .min_rate(admin.body_min_rate),
        )
    });
    next.run(request).await
}

/// Why a tenant whose upstreams serve one release twice is refused.
pub(crate) fn repeated_release(version: tower_fhir::version::FhirVersion) -> String {
    format!("two upstreams serve FHIR {version}: requests for that release would only ever reach the first")
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// `503` with `Retry-After`: the store (a database that went away, say) cannot answer now;
/// the same request may succeed shortly.
fn unavailable(message: &str) -> Response {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
    response
}

/// Refuses a change (any method but `GET` and `HEAD`) while `state_dir` is not the one this
/// process locked (removed, or made again: [`DirLock::held`](crate::state::DirLock::held)):
/// written there, it would be the only state in a directory that lost the rest, and another
/// gateway may own it. `503`: a restart over the right state is what serves it again.
async fn state_held(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    let reads = matches!(*request.method(), http::Method::GET | http::Method::HEAD);
    if !reads && admin.state_lock.as_ref().is_some_and(|lock| !lock.held()) {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the state directory was removed or replaced while the gateway runs: no change can be kept; restart the gateway over the state it should serve",
        );
    }
    next.run(request).await
}

/// Lets a request through only with the admin token (compared in constant time), and not at
/// all from an address that presented too many wrong ones lately (`429`, `Retry-After`).
async fn require_admin(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    // The scheme is case-insensitive (RFC 9110 §11.1). Two `Authorization` headers present
    // no token (a proxy before the gateway may read the other one).
    let mut authorizations = request.headers().get_all(header::AUTHORIZATION).iter();
    let presented = authorizations
        .next()
        .filter(|_| authorizations.next().is_none())
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        // RFC 6750: `Bearer 1*SP b64token`, as the FHIR routes read it.
        .map(|(_, token)| token.trim_start_matches(' '));
    // The client a trusted balancer names, else the connection's peer.
    let from = ForwardedClient::source(request.extensions());
    // The address as it is written (`Option`'s `Debug` would wrap it in `Some(...)`).
    let shown = from.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
    let verdict = admin.throttle.check(
        Source::of(from),
        presented,
        &admin.token,
        std::time::Instant::now(),
    );
    match verdict {
        Verdict::Allowed => return next.run(request).await,
        Verdict::Blocked(wait) => {
            tracing::warn!(
                from = %shown,
                "admin request refused: too many wrong admin tokens from this address"
            );
            let mut response = error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many wrong admin tokens from this address; retry later",
            );
            // Rounded up, so a client waiting `Retry-After` seconds is not refused again.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs.max(1)));
            return response;
        }
        Verdict::Refused => {}
    }
    tracing::warn!(from = %shown, "admin request refused: missing or wrong admin token");
    let mut response = error(StatusCode::UNAUTHORIZED, "a valid admin token is required");
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer realm=\"admin\""),
    );
    response
}

fn tenant_id(id: &str) -> Result<TenantId, Box<Response>> {
    TenantId::parse(id).map_err(|_| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "the tenant id is not a GUID",
        ))
    })
}

/// A refused `rate_limit` or `max_concurrency` in a body, in the one sentence saying why.
fn limit_refusal(body: &[u8]) -> Option<Response> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    if let Some(limit) = value.get("rate_limit").filter(|limit| !limit.is_null()) {
        if let Err(e) = RateLimit::deserialize(limit) {
            return Some(error(StatusCode::BAD_REQUEST, &e.to_string()));
        }
    }
    let upstreams = value.get("upstreams").unwrap_or(&value).as_array()?;
    upstreams.iter().find_map(|upstream| {
        let max = upstream.get("max_concurrency")?;
        let whole = max.as_u64().is_some_and(|n| (1..=1 << 20).contains(&n));
        (!whole).then(|| {
            error(
                StatusCode::BAD_REQUEST,
                "max_concurrency must be a whole number from 1 to 1048576",
            )
        })
    })
}

async fn put_tenant(
    State(admin): State<Arc<Admin>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let tenant = match tenant_id(&id) {
        Ok(tenant) => tenant,
        Err(response) => return *response,
    };
    let body = match without_own_id(tenant, body) {
        Ok(body) => body,
        Err(response) => return *response,
    };
    // `{"upstreams": [...]}` or `{"in_process": {...}}`, `rate_limit` beside either; or just
    // the list of upstreams.
    let upstreams = match serde_json::from_slice::<TenantRecord>(&body) {
        Ok(record) => record,
        Err(e) => {
            if let Some(refused) = limit_refusal(&body) {
                return refused;
            }
            return error(
                StatusCode::BAD_REQUEST,
                &format!(
                    "the body must be {{\"upstreams\": [{{\"base_url\": ..., \"fhir_version\": ...}}]}} with at least one valid upstream, or {{\"in_process\": {{\"key\": ..., \"fhir_versions\": [...]}}}}: {e}"
                ),
            );
        }
    };
    if let Some(version) = upstreams.repeated_release() {
        return error(StatusCode::BAD_REQUEST, &repeated_release(version));
    }
    if let Some(refused) = redacted_authorization(&upstreams) {
        return error(StatusCode::BAD_REQUEST, &refused);
    }
    if let Some(refused) = at_own_address(&admin.own_addresses, &upstreams) {
        return error(StatusCode::BAD_REQUEST, &refused);
    }
    let _locks = match lock_tenant_writes(&admin, tenant, "check a change", "saved").await {
        Ok(locks) => locks,
        Err(response) => return response,
    };
    if let Some(refused) = lifted_rate_limit(&admin, tenant, &body).await {
        return refused;
    }
    match nested_with_others(&admin, tenant, &upstreams).await {
        Ok(None) => {}
        Ok(Some(nested)) => return error(StatusCode::CONFLICT, &nested.to_string()),
        Err(err) => {
            tracing::error!(%tenant, error = %err, "could not read the tenants to check a change");
            // Why, for the administrator: a stored record that cannot be read (named) is
            // theirs to correct or delete, not to wait out.
            return unavailable(&format!(
                "the tenant could not be saved: the other tenants could not be read to check it ({err})"
            ));
        }
    }
    let saved = admin.directory.put(tenant, upstreams.clone()).await;
    // Read-your-writes: the change stream would tell this process too, but only after the
    // answer may have reached the client. Also after a failure: a write that timed out may
    // have been made (a database that committed it), and this process's own changes do not
    // come back to it from the database.
    admin.routes.invalidate(tenant).await;
    let existed = match saved {
        Ok(existed) => existed,
        Err(err) => {
            tracing::error!(%tenant, error = %err, "could not save a tenant");
            return unavailable("the tenant could not be saved");
        }
    };
    tracing::info!(%tenant, created = !existed, "tenant onboarded or changed");
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    (status, Json(tenant_json(tenant, &upstreams))).into_response()
}

/// `400` for a change to a tenant that has a rate limit whose body does not name
/// `"rate_limit"`: the tenant is replaced whole, so the change would lift the limit that
/// guards its upstream without saying so (`"rate_limit": null` lifts it). `503` when the
/// tenant as it is cannot be read. Called under the tenant write locks, so the limit read is
/// the one the change replaces.
async fn lifted_rate_limit(admin: &Admin, tenant: TenantId, body: &[u8]) -> Option<Response> {
    let names_it = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| {
            value
                .as_object()
                .map(|fields| fields.contains_key("rate_limit"))
        })
        .unwrap_or(false);
    if names_it {
        return None;
    }
    match admin.directory.lookup(tenant).await {
        Ok(Some(existing)) => existing.rate_limit().map(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "the tenant has a rate limit: a PUT without \"rate_limit\" would lift it; send it to keep it, or \"rate_limit\": null to lift it",
            )
        }),
        Ok(None) => None,
        Err(err) => {
            tracing::error!(%tenant, error = %err, "could not read the tenant to check a change");
            Some(unavailable(&format!(
                "the tenant could not be saved: it could not be read to check the change ({err})"
            )))
        }
    }
}

/// The body of `PUT /admin/tenants/{id}` without the `"id"` that a record read with `GET`
/// names, when it is `tenant` (in any spelling of the GUID); the body unchanged when it names
/// none. `400` for an id that is another tenant's, or not a GUID: a tenant's id cannot change.
fn without_own_id(tenant: TenantId, body: Bytes) -> Result<Bytes, Box<Response>> {
    let Ok(serde_json::Value::Object(mut fields)) = serde_json::from_slice(&body) else {
        return Ok(body);
    };
    let named = match fields.remove("id") {
        None | Some(serde_json::Value::Null) => return Ok(body),
        Some(named) => named,
    };
    match named.as_str().map(TenantId::parse) {
        Some(Ok(named)) if named == tenant => serde_json::to_vec(&fields)
            .map(Bytes::from)
            .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, &e.to_string()))),
        Some(Ok(named)) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!(
                "the body's id {named} is not the tenant of the path, {tenant}: a tenant's id cannot change (leave id out, or make it the path's; to onboard {named}, PUT to /admin/tenants/{named})"
            ),
        ))),
        _ => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            &format!("the body's id is not a GUID: leave id out, or make it the path's, {tenant}"),
        ))),
    }
}

/// The first upstream base of `record` that lies under another tenant's on the same server,
/// or holds one: that tenant's tokens would reach the other's data through the path. Reads
/// every other tenant (a lookup each).
async fn nested_with_others(
    admin: &Admin,
    tenant: TenantId,
    record: &TenantRecord,
) -> Result<Option<NestedBases>, DirectoryError> {
    if record.upstreams().is_empty() {
        return Ok(None);
    }
    // (Read at once: a lookup each took 10 s for 50,000 tenants in PostgreSQL, under the
    // lock every replica's tenant writes take.)
    let others = admin.directory.records().await?;
    let all = others
        .iter()
        .filter(|(other, _)| *other != tenant)
        .map(|(other, found)| (*other, found))
        .chain([(tenant, record)]);
    Ok(nested_bases(all)
        .into_iter()
        .find(|nested| nested.outer_tenant == tenant || nested.inner_tenant == tenant))
}

/// What `GET /admin/tenants/{id}` shows in place of an upstream's `authorization`.
pub(crate) const REDACTED: &str = "<redacted>";

/// The first of `tenants` whose upstream is one of `own` addresses, and why
/// ([`at_own_address`]).
pub(crate) fn first_at_own_address<'a>(
    own: &[(&'static str, std::net::SocketAddr)],
    tenants: impl IntoIterator<Item = (TenantId, &'a TenantRecord)>,
) -> Option<(TenantId, String)> {
    tenants
        .into_iter()
        .find_map(|(tenant, record)| Some(tenant).zip(at_own_address(own, record)))
}

/// Why a tenant is refused whose upstream is one of this gateway's own listening addresses
/// (`own`: each with its key's name), if one is: a request would come back to the gateway,
/// and again, until the upstream timeouts end it (a loop of thousands of requests), or reach
/// the metrics or admin endpoint with a tenant's token. The upstream's host is read as the
/// resolver reads it (`127.1`, `0x7f000001`, `2130706433`, `[::ffff:127.0.0.1]` are
/// `127.0.0.1`; `localhost.` and names under `.localhost` are `localhost`). An address names
/// the listener when it is the same, or when the listener is a loopback one or takes every
/// address (`0.0.0.0`, `::`) and the upstream is a loopback or unspecified address (a
/// connection to `0.0.0.0` reaches this host) or `localhost`. (A host name that resolves to
/// this machine is not looked up.)
pub(crate) fn at_own_address(
    own: &[(&'static str, std::net::SocketAddr)],
    record: &TenantRecord,
) -> Option<String> {
    record.upstreams().iter().find_map(|upstream| {
        let base = upstream.base();
        let authority = base.authority();
        let default_port = if base.scheme() == &http::uri::Scheme::HTTPS {
            443
        } else {
            80
        };
        let port = authority.port_u16().unwrap_or(default_port);
        let host = authority.host();
        let ip = tower_fhir::route::host_address(host);
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        // This host, whichever of its addresses a listener takes.
        let local = match ip {
            Some(ip) => ip.is_loopback() || ip.is_unspecified(),
            None => name == "localhost" || name.ends_with(".localhost"),
        };
        let (key, address) = own.iter().find(|(_, own)| {
            let listener = own.ip().to_canonical();
            own.port() == port
                && (ip == Some(listener)
                    || (local && (listener.is_loopback() || listener.is_unspecified())))
        })?;
        Some(format!(
            "upstream {} is this gateway's own {key} ({address}): a request would come back to \
             the gateway instead of reaching a FHIR server",
            base.as_str()
        ))
    })
}

/// Why a tenant whose upstream's `authorization` is [`REDACTED`] is refused, if one is: the
/// record was read back from `GET` and sent again, and would send the placeholder upstream as
/// its credential. A tenant is written whole, so leaving `authorization` out does not keep the
/// stored credential: that upstream then gets no `Authorization` header.
pub(crate) fn redacted_authorization(record: &TenantRecord) -> Option<String> {
    let upstream = record.upstreams().iter().find(|upstream| {
        upstream
            .authorization()
            .is_some_and(|value| value.as_bytes().trim_ascii() == REDACTED.as_bytes())
    })?;
    Some(format!(
        "the authorization of upstream {} is {REDACTED:?}, the placeholder GET /admin/tenants/{{id}} shows in place of a credential: send the real credential, or leave authorization out to send that upstream no Authorization header (the stored credential is not kept: a tenant is replaced whole)",
        upstream.base()
    ))
}

/// The tenant as stored, upstream credentials left out.
fn tenant_json(tenant: TenantId, record: &TenantRecord) -> serde_json::Value {
    let entry = TenantEntry {
        id: tenant,
        record: record.clone(),
    };
    let mut shown = serde_json::to_value(entry).unwrap_or_default();
    if let Some(list) = shown.get_mut("upstreams").and_then(|u| u.as_array_mut()) {
        for upstream in list {
            if let Some(fields) = upstream.as_object_mut() {
                if fields.remove("authorization").is_some() {
                    fields.insert("authorization".into(), json!(REDACTED));
                }
            }
        }
    }
    shown
}

/// The most entries a page of a list may ask for (`limit`).
const MAX_PAGE: usize = 10_000;

/// The page a list's query asks for (`?limit=N&after=ID`, both optional).
#[derive(Debug, PartialEq, Eq)]
struct Page<T> {
    /// Only the entries after this id (which need not be one).
    after: Option<T>,
    /// At most this many (1 to [`MAX_PAGE`]).
    limit: Option<usize>,
}

impl<T> Page<T> {
    /// Whether it asks for the whole list: the answer as it was before pages.
    fn is_whole(&self) -> bool {
        self.after.is_none() && self.limit.is_none()
    }

    /// How many entries to read: one past `limit`, to tell whether another page follows.
    fn read(&self) -> Option<usize> {
        self.limit.map(|limit| limit + 1)
    }

    /// Cuts `entries` (read with [`read`](Self::read)) to the page; the `next` to answer
    /// with (the page's last id, for `after`) when more follow.
    fn cut<E>(&self, entries: &mut Vec<E>, id: impl Fn(&E) -> String) -> Option<String> {
        let limit = self.limit?;
        if entries.len() <= limit {
            return None;
        }
        entries.truncate(limit);
        entries.last().map(id)
    }
}

/// The page the query of `uri` asks for, `after` read by `parse_after` (`None`: refused, with
/// `after_is` saying what it must be); `400` for a query that names another parameter, or one
/// twice, or a `limit` that is not a whole number from 1 to [`MAX_PAGE`]. Values are
/// form-urlencoded (percent-decoded, `+` a space: a client id's `+` is sent as `%2B`). Refused
/// rather than ignored, as the admin API's bodies refuse a member they do not take: a
/// misspelled `limit` would otherwise answer the whole list.
fn page_query<T>(
    uri: &http::Uri,
    list: &str,
    parse_after: impl Fn(&str) -> Option<T>,
    after_is: &str,
) -> Result<Page<T>, Box<Response>> {
    let refused = |message: String| Box::new(error(StatusCode::BAD_REQUEST, &message));
    let Query(pairs) = Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map_err(|e| refused(format!("the query cannot be read: {e}")))?;
    let (mut after, mut limit) = (None, None);
    for (name, value) in pairs {
        let slot = match name.as_str() {
            "after" => &mut after,
            "limit" => &mut limit,
            _ => {
                return Err(refused(format!(
                    "GET {list} takes the query parameters limit and after, not {:?}",
                    name.chars().take(64).collect::<String>()
                )))
            }
        };
        if slot.replace(value).is_some() {
            return Err(refused(format!("the query names {name} more than once")));
        }
    }
    let limit = match limit {
        None => None,
        Some(text) => {
            let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
            // (Digits past `u64`: more than the most.)
            let number = digits.then(|| text.parse::<u64>().unwrap_or(u64::MAX));
            match number.and_then(|n| usize::try_from(n).ok()) {
                Some(n) if (1..=MAX_PAGE).contains(&n) => Some(n),
                _ => {
                    return Err(refused(format!(
                        "limit must be a whole number from 1 to {MAX_PAGE}, not {:?}",
                        text.chars().take(64).collect::<String>()
                    )))
                }
            }
        }
    };
    let after = match after {
        None => None,
        Some(text) => match parse_after(&text) {
            Some(after) => Some(after),
            None => return Err(refused(format!("after must be {after_is}"))),
        },
    };
    Ok(Page { after, limit })
}

/// `{"tenants": [ids]}`, sorted: ids only, since a record each would take a lookup each (read
/// one with `GET /admin/tenants/{id}`). A page with `?limit=N` (1 to [`MAX_PAGE`]) and
/// `after=<tenant id>` (those after it; it need not be a tenant), with `"next"`, the last id
/// shown, when `limit` was given and more follow; the pages in order make up the whole list.
async fn list_tenants(State(admin): State<Arc<Admin>>, uri: http::Uri) -> Response {
    let page = match page_query(
        &uri,
        "/admin/tenants",
        |text| TenantId::parse(text).ok(),
        "a tenant id (a GUID)",
    ) {
        Ok(page) => page,
        Err(response) => return *response,
    };
    let listed = if page.is_whole() {
        admin.directory.list().await.map(|mut tenants| {
            tenants.sort_unstable();
            tenants.dedup();
            tenants
        })
    } else {
        admin.directory.list_after(page.after, page.read()).await
    };
    match listed {
        Ok(mut tenants) => {
            let next = page.cut(&mut tenants, TenantId::to_string);
            let mut shown = json!({"tenants": tenants});
            if let Some(next) = next {
                shown["next"] = json!(next);
            }
            Json(shown).into_response()
        }
        Err(err) => {
            tracing::error!(error = %err, "could not list the tenants");
            unavailable("the tenant directory cannot answer")
        }
    }
}

async fn get_tenant(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    let tenant = match tenant_id(&id) {
        Ok(tenant) => tenant,
        Err(response) => return *response,
    };
    match admin.directory.lookup(tenant).await {
        Ok(Some(upstreams)) => Json(tenant_json(tenant, &upstreams)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such tenant"),
        Err(err) => {
            tracing::error!(%tenant, error = %err, "could not read a tenant");
            unavailable("the tenant directory cannot answer")
        }
    }
}

/// This process's tenant-write lock, then every replica's (a shared database's lock): a check
/// and the write it allows, or a replica's seeding, are one step. `Err`: the `503` answer,
/// the tenant not `done` ("saved", "removed").
async fn lock_tenant_writes<'a>(
    admin: &'a Admin,
    tenant: TenantId,
    doing: &str,
    done: &str,
) -> Result<
    (
        tokio::sync::MutexGuard<'a, ()>,
        tower_fhir::route::TenantWriteLock,
    ),
    Response,
> {
    let writing = admin.tenant_writes.lock().await;
    match admin.directory.lock_writes().await {
        Ok(shared) => Ok((writing, shared)),
        Err(err) => {
            tracing::error!(%tenant, error = %err, "could not lock tenant writes to {doing}");
            Err(unavailable(&format!("the tenant could not be {done}")))
        }
    }
}

async fn delete_tenant(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    let tenant = match tenant_id(&id) {
        Ok(tenant) => tenant,
        Err(response) => return *response,
    };
    // Under the lock a replica seeding its configured tenants takes: a removal made between
    // its check that the tenant was never removed and its insert would be undone by it.
    let _locks = match lock_tenant_writes(&admin, tenant, "remove a tenant", "removed").await {
        Ok(locks) => locks,
        Err(response) => return response,
    };
    let deleted = admin.directory.delete(tenant).await;
    // Whatever the answer (as for a `PUT`): a removal that timed out may have been made, and
    // the same `DELETE` again then finds no tenant.
    admin.routes.invalidate(tenant).await;
    match deleted {
        Ok(true) => {
            tracing::info!(%tenant, "tenant removed");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, "no such tenant"),
        Err(err) => {
            tracing::error!(%tenant, error = %err, "could not remove a tenant");
            unavailable("the tenant could not be removed")
        }
    }
}

async fn reset_secret(
    State(admin): State<Arc<Admin>>,
    Path(client_id): Path<String>,
    body: Bytes,
) -> Response {
    // A secret sent here would not be the one set: said, rather than ignored. (An empty JSON
    // object, which many clients send with every POST, says nothing.)
    let says_nothing = body.trim_ascii().is_empty()
        || serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body)
            .is_ok_and(|members| members.is_empty());
    if !says_nothing {
        return error(
            StatusCode::BAD_REQUEST,
            "POST /admin/clients/{client_id}/secret takes no body: it makes a new secret and shows it once (a secret provisioned elsewhere is given when the client is registered)",
        );
    }
    match admin.clients.client(&client_id).await {
        Ok(Some(record)) if record.revoked => return error(StatusCode::NOT_FOUND, "no such client"),
        Ok(Some(record)) if record.token_endpoint_auth_method == AuthMethod::PrivateKeyJwt => {
            return error(
                StatusCode::CONFLICT,
                "the client authenticates with private_key_jwt and has no secret: change its keys with PUT /admin/clients/{client_id}",
            )
        }
        Ok(Some(_)) => {}
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such client"),
        Err(err) => {
            tracing::error!(error = %err, "client store failed");
            return unavailable("the client store failed");
        }
    }
    // The tokens the client holds are refused before the secret changes (up to two seconds
    // ahead; a failure then leaves the secret as it was), and again after it, the cut-off
    // moved past the change.
    if let Err(err) = admin.endpoint.revoke_tokens_of(&client_id).await {
        return tokens_not_refused(&client_id, &err, "before its secret was reset");
    }
    match admin
        .clients
        .rotate_secret(&client_id, Duration::ZERO)
        .await
    {
        Ok(secret) => {
            tracing::info!(client_id = %client_id, "client secret reset by an administrator");
            // The new secret is in force: shown (`200`) whatever follows, as it is shown once.
            let mut shown = json!({"client_id": client_id, "client_secret": secret.expose()});
            if let Err(why) = refuse_tokens_again(&admin, &client_id).await {
                shown["warning"] = json!(format!("the secret is reset, but {why}"));
            }
            let mut response = Json(shown).into_response();
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            response
        }
        Err(err) if err.is_refused() => error(StatusCode::NOT_FOUND, "no such client"),
        Err(err) => {
            tracing::error!(error = %err, "could not rotate a client secret");
            unavailable("the secret could not be rotated")
        }
    }
}

/// Refuses every token the client holds (issued up to two seconds from now), by every replica
/// and after a restart, and changes nothing else: for a token that leaked without its secret,
/// or to finish a change whose refusal after it failed. `204`; `404` for an unknown or revoked
/// client (a revoked one's tokens are refused already); `503` when the refusal cannot be
/// recorded for the other replicas.
async fn refuse_tokens(State(admin): State<Arc<Admin>>, Path(client_id): Path<String>) -> Response {
    match admin.clients.client(&client_id).await {
        Ok(Some(record)) if !record.revoked => {}
        Ok(_) => return error(StatusCode::NOT_FOUND, "no such client"),
        Err(err) => return store_failed(&err, "looking up a client"),
    }
    match admin.endpoint.revoke_tokens_of(&client_id).await {
        Ok(()) => {
            tracing::info!(client_id = %client_id, "the tokens a client holds refused by an administrator");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(err) if err.is_refused() => error(StatusCode::NOT_FOUND, "no such client"),
        Err(err) => {
            tracing::error!(client_id = %client_id, error = %err, "the tokens a client holds could not be refused at every replica");
            unavailable(
                "the tokens the client holds could not be refused at every replica (the client \
                 store or the revocation log failed): send the same DELETE again",
            )
        }
    }
}

/// The answer when the tokens a client holds could not be refused before a change to it
/// (`doing` says which), so the change was not made: `404` for a client gone meanwhile, else
/// `503`.
fn tokens_not_refused(
    client_id: &str,
    err: &tower_fhir::token::StoreError,
    doing: &str,
) -> Response {
    if err.is_refused() {
        return error(StatusCode::NOT_FOUND, "no such client");
    }
    tracing::error!(client_id = %client_id, error = %err, "the tokens a client holds could not be refused {doing}; the change was not made");
    unavailable(
        "the tokens the client holds could not be refused at every replica, so the change was \
         not made (this replica may refuse them already, until they expire): send the same \
         request again",
    )
}

/// Refuses again the tokens the client holds, after a change to it that began by refusing
/// them: the cut-off moves past the change, for a token checked before it and signed after.
/// The reason, for the answer, when that cannot be recorded for the other replicas.
async fn refuse_tokens_again(admin: &Admin, client_id: &str) -> Result<(), String> {
    admin.endpoint.revoke_tokens_of(client_id).await.map_err(|err| {
        tracing::error!(client_id = %client_id, error = %err, "the tokens a client took while it was being changed could not be refused at every replica");
        "the tokens the client took while it was being changed (if the change took more than \
         the two seconds the first refusal covered) could not be refused at every replica: \
         DELETE /admin/clients/{client_id}/tokens refuses them"
            .to_owned()
    })
}

/// The body of `PUT /admin/clients/{client_id}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientBody {
    /// The tenants the client may get tokens for.
    tenants: Vec<TenantId>,
    /// Scopes besides the tenant it may ask for; `None` when the body leaves them out.
    #[serde(default)]
    scopes: Option<Vec<String>>,
    /// Registration only: a secret provisioned elsewhere (else one is generated).
    #[serde(default)]
    client_secret: Option<String>,
    /// The client's rate limit across its tenants (`null`: unlimited); `None` when the body
    /// leaves it out.
    #[serde(default, deserialize_with = "present")]
    rate_limit: Option<Option<RateLimit>>,
    /// Registration only: `client_secret_basic` (the default) or `private_key_jwt`.
    #[serde(default)]
    token_endpoint_auth_method: Option<AuthMethod>,
    /// Registration only: a `private_key_jwt` client's public keys (a JWK Set).
    #[serde(default)]
    jwks: Option<serde_json::Value>,
    /// Registration only: where a `private_key_jwt` client publishes its public keys.
    #[serde(default)]
    jwks_uri: Option<String>,
}

/// A member that is there, `null` or not: `Some` (so that one left out, `None` by default,
/// can be told from `null`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl ClientBody {
    /// The scopes it gives (none when left out).
    fn scopes(&self) -> &[String] {
        self.scopes.as_deref().unwrap_or_default()
    }

    /// Why it may not change a registered client that has scopes or a rate limit it leaves
    /// out: a body that names neither would lift the restriction without saying so (a
    /// tenant-only token reads and writes everything of its tenant).
    fn leaves_out(&self, record: &ClientRecord) -> Option<String> {
        if self.scopes.is_none() && !record.scopes.is_empty() {
            return Some(format!(
                "the client may get only the scopes {:?}: a PUT without \"scopes\" would lift that; send them to keep them, or \"scopes\": [] to give it every scope of its tenants",
                record.scopes
            ));
        }
        if self.rate_limit.is_none() && record.rate_limit.is_some() {
            return Some(
                "the client has a rate limit: a PUT without \"rate_limit\" would lift it; send it to keep it, or \"rate_limit\": null to lift it"
                    .to_owned(),
            );
        }
        None
    }

    /// Whether it would change how a registered client authenticates (its secret, or its
    /// method): registration only.
    fn changes_authentication(&self, record: &ClientRecord) -> bool {
        self.client_secret.is_some()
            || self
                .token_endpoint_auth_method
                .is_some_and(|method| method != record.token_endpoint_auth_method)
    }

    /// Whether it takes a tenant or a scope away from the registered client, or gives its
    /// first SMART resource scope to a client that had none: its tokens had tenant-wide
    /// access, which the new scopes narrow.
    fn takes_away(&self, record: &ClientRecord) -> bool {
        let tenant_wide = |scopes: &[String]| {
            tower_fhir::smart::Grants::from_scopes(scopes.iter().map(String::as_str), None)
                .is_empty()
        };
        record
            .tenants
            .iter()
            .any(|tenant| !self.tenants.contains(tenant))
            || record
                .scopes
                .iter()
                .any(|scope| !self.scopes().contains(scope))
            || (tenant_wide(&record.scopes) && !tenant_wide(self.scopes()))
    }

    /// New keys for a registered `private_key_jwt` client, if the body gives any.
    fn keys(&mut self) -> Result<Option<ClientKeys>, &'static str> {
        match (self.jwks.take(), self.jwks_uri.take()) {
            (None, None) => Ok(None),
            (Some(jwks), None) => Ok(Some(ClientKeys::Jwks(jwks))),
            (None, Some(uri)) => Ok(Some(ClientKeys::JwksUri(uri))),
            (Some(_), Some(_)) => Err("give jwks or jwks_uri, not both"),
        }
    }
}

/// The client as stored, without its secrets' hashes; and which of its tenants are not
/// `onboarded`: they have no upstream here yet, so their tokens would be refused.
fn client_fields(
    record: &ClientRecord,
    onboarded: impl Fn(&TenantId) -> bool,
) -> serde_json::Value {
    let not_onboarded: Vec<&TenantId> = record
        .tenants
        .iter()
        .filter(|tenant| !onboarded(tenant))
        .collect();
    json!({
        "client_id": record.id,
        "tenants": record.tenants,
        "scopes": record.scopes,
        "revoked": record.revoked,
        "rate_limit": record.rate_limit,
        "token_endpoint_auth_method": record.token_endpoint_auth_method.as_str(),
        "jwks": record.jwks,
        "jwks_uri": record.jwks_uri,
        "tenants_not_onboarded": not_onboarded,
    })
}

/// The client as [`client_fields`] shows it, its tenants found in the directory at once (one
/// read, not a lookup each: a client of 50,000 tenants took 10 s in PostgreSQL).
async fn client_json(admin: &Admin, record: &ClientRecord) -> serde_json::Value {
    let onboarded = onboarded(admin, std::slice::from_ref(record)).await;
    client_fields(record, |tenant| onboarded.contains(tenant))
}

/// Which of the tenants of `clients` are onboarded, asked of the directory at once for those
/// alone ([`TenantStore::present`]: not the whole tenant list). When the directory cannot
/// answer, none are (said at `warn`).
async fn onboarded(admin: &Admin, clients: &[ClientRecord]) -> HashSet<TenantId> {
    let mut tenants: Vec<TenantId> = clients
        .iter()
        .flat_map(|client| client.tenants.iter().copied())
        .collect();
    tenants.sort_unstable();
    tenants.dedup();
    match admin.directory.present(tenants).await {
        Ok(present) => present,
        Err(err) => {
            tracing::warn!(error = %err, "could not read which clients' tenants are onboarded");
            HashSet::new()
        }
    }
}

/// `{"clients": [...]}`, sorted by `client_id` (byte order), revoked ones included: each as
/// `GET /admin/clients/{client_id}` shows it (no secrets). Which tenants are onboarded is asked
/// of the directory once, for the tenants of the clients shown alone ([`onboarded`]); a
/// directory that cannot answer leaves every tenant not onboarded, as it does for one client.
/// A page with `?limit=N` (1 to [`MAX_PAGE`]) and `after=<client id>` (those after it; it need not be a
/// client's), with `"next"`, the last `client_id` shown, when `limit` was given and more
/// follow; the pages in order make up the whole list.
async fn list_clients(State(admin): State<Arc<Admin>>, uri: http::Uri) -> Response {
    let page = match page_query(
        &uri,
        "/admin/clients",
        |text| is_client_id(text).then(|| text.to_owned()),
        "a client id (1 to 255 printable ASCII characters or spaces)",
    ) {
        Ok(page) => page,
        Err(response) => return *response,
    };
    let listed = if page.is_whole() {
        admin.clients.clients().await
    } else {
        admin
            .clients
            .clients_after(page.after.as_deref(), page.read())
            .await
    };
    let mut clients = match listed {
        Ok(clients) => clients,
        Err(err) => {
            tracing::error!(error = %err, "could not list the clients");
            return unavailable("the client store failed");
        }
    };
    clients.sort_by(|a, b| a.id.cmp(&b.id));
    let next = page.cut(&mut clients, |client| client.id.clone());
    let onboarded = onboarded(&admin, &clients).await;
    let shown: Vec<serde_json::Value> = clients
        .iter()
        .map(|record| client_fields(record, |tenant| onboarded.contains(tenant)))
        .collect();
    let mut shown = json!({"clients": shown});
    if let Some(next) = next {
        shown["next"] = json!(next);
    }
    Json(shown).into_response()
}

fn store_failed(err: &tower_fhir::token::StoreError, doing: &str) -> Response {
    if err.is_refused() {
        return error(StatusCode::BAD_REQUEST, &err.to_string());
    }
    tracing::error!(error = %err, "client store failed while {doing}");
    unavailable("the client store failed")
}

/// Whether the client is registered now (a store that fails says no).
async fn registered(admin: &Admin, client_id: &str) -> bool {
    matches!(admin.clients.client(client_id).await, Ok(Some(_)))
}

/// How many times a change to a client is decided again on the client as it is then, when
/// another change was written between its read and its write, before it is answered `409`.
const CLIENT_CHANGE_ATTEMPTS: usize = 4;

/// Replaces the entitlements of the client `record` says was registered (`200`).
///
/// Whether the change takes something away (so that the client's tokens are refused) is
/// decided on the client as read; the write is made only if the client is still so
/// ([`ClientUpdate::if_unchanged`]), else it is decided again on the client as it is now. So
/// a tenant or scope another request granted meanwhile, for which the client may have taken
/// tokens, is never written away without those tokens refused.
async fn change_client(
    admin: &Admin,
    client_id: &str,
    mut body: ClientBody,
    mut record: ClientRecord,
) -> Response {
    let keys = match body.keys() {
        Ok(keys) => keys,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let tenants = body.tenants.len();
    let mut attempts = 1;
    // Whether an attempt refused the client's tokens (a later one, decided on the client as
    // it then was, may not).
    let mut refused = false;
    loop {
        if record.revoked {
            return error(
                StatusCode::CONFLICT,
                "the client is revoked; register the application under a new client id",
            );
        }
        if let Some(why) = body.leaves_out(&record) {
            // (Decided again on the client as it now is: an earlier attempt may have refused
            // its tokens already.)
            let also = if refused {
                " (the tokens the client held were refused by an earlier attempt: it takes new ones)"
            } else {
                ""
            };
            return error(StatusCode::BAD_REQUEST, &format!("{why}{also}"));
        }
        if body.changes_authentication(&record) {
            return error(
                StatusCode::BAD_REQUEST,
                "the client is registered: its authentication method stays as registered (change a secret with POST /admin/clients/{client_id}/secret, keys with jwks or jwks_uri; or register the application under a new client id)",
            );
        }
        let replaces_keys = match &keys {
            Some(ClientKeys::Jwks(jwks)) => record.jwks.as_ref() != Some(jwks),
            Some(ClientKeys::JwksUri(uri)) => record.jwks_uri.as_ref() != Some(uri),
            None => false,
        };
        // Tokens the client holds for what it loses (a tenant, a scope) or taken with the
        // keys replaced are refused: before the change (up to two seconds ahead; a failure
        // then leaves the client as it was), and again after it, the cut-off moved past it.
        let takes_away = replaces_keys || body.takes_away(&record);
        let mut update = ClientUpdate::new(body.tenants.clone(), body.scopes().to_vec())
            .rate_limit(body.rate_limit.flatten())
            .if_unchanged(&record);
        if let Some(keys) = &keys {
            update = update.keys(keys.clone());
        }
        // A change the store would refuse refuses no token either.
        if let Err(err) = update.check(&record) {
            return store_failed(&err, "changing a client");
        }
        if takes_away {
            if let Err(err) = admin.endpoint.revoke_tokens_of(client_id).await {
                return tokens_not_refused(client_id, &err, "before it was changed");
            }
            refused = true;
        }
        // One write, checked whole: a body refused (or a store failing) leaves the client
        // as it was, and no replica sees half of it.
        match admin.clients.update(client_id, update).await {
            Ok(()) => {}
            Err(err) if err.is_conflict() && attempts < CLIENT_CHANGE_ATTEMPTS => {
                attempts += 1;
                record = match admin.clients.client(client_id).await {
                    Ok(Some(record)) => record,
                    Ok(None) => return error(StatusCode::NOT_FOUND, "no such client"),
                    Err(err) => return store_failed(&err, "looking up a client"),
                };
                continue;
            }
            Err(err) if err.is_conflict() => {
                tracing::warn!(client_id = %client_id, attempts, tokens_refused = refused, "a client change was not made: other changes to the client were written between each of its reads and its write");
                let also = if refused {
                    " (the tokens the client held were refused on the way: it takes new ones)"
                } else {
                    ""
                };
                return error(
                    StatusCode::CONFLICT,
                    &format!("other requests changed the client while this change was being made, each time it was tried: this one was not applied{also}; GET the client and PUT again"),
                );
            }
            // Deleted since it was read.
            Err(err) if err.is_refused() && !registered(admin, client_id).await => {
                return error(StatusCode::NOT_FOUND, "no such client");
            }
            Err(err) if err.is_refused() => return store_failed(&err, "changing a client"),
            Err(err) => {
                // The store failed, or timed out: the change may have been made all the same
                // (a database that committed it). Its tokens are refused again as if it had
                // been: the same request again would find nothing taken away.
                if takes_away {
                    let _ = refuse_tokens_again(admin, client_id).await;
                }
                return store_failed(&err, "changing a client");
            }
        }
        if replaces_keys {
            tracing::info!(client_id = %client_id, "client keys replaced by an administrator");
        }
        admin.limits.forget_client(client_id);
        tracing::info!(client_id = %client_id, tenants, tokens_refused = refused, "client entitlements changed");
        // The change is made: answered `200` whatever follows (the same PUT again would
        // find nothing taken away), with a warning when the tokens taken meanwhile could
        // not be refused everywhere.
        let warning = if takes_away {
            refuse_tokens_again(admin, client_id).await.err()
        } else {
            None
        };
        return match admin.clients.client(client_id).await {
            Ok(Some(record)) => {
                let mut shown = client_json(admin, &record).await;
                if let Some(why) = warning {
                    shown["warning"] = json!(format!("the client is changed, but {why}"));
                }
                Json(shown).into_response()
            }
            Ok(None) => error(StatusCode::NOT_FOUND, "no such client"),
            Err(err) => store_failed(&err, "looking up a client"),
        };
    }
}

/// Registers the client (`201`, its secret shown this once) or replaces its entitlements
/// (`200`).
async fn put_client(
    State(admin): State<Arc<Admin>>,
    Path(client_id): Path<String>,
    body: Bytes,
) -> Response {
    let body = match serde_json::from_slice::<ClientBody>(&body) {
        Ok(body) => body,
        Err(_) => {
            if let Some(refused) = limit_refusal(&body) {
                return refused;
            }
            return error(
                StatusCode::BAD_REQUEST,
                "the body must be {\"tenants\": [GUID, ...], \"scopes\": [...]} (and, to register with a given secret, \"client_secret\"; for private_key_jwt, \"jwks\" or \"jwks_uri\")",
            );
        }
    };
    let existing = match admin.clients.client(&client_id).await {
        Ok(existing) => existing,
        Err(err) => return store_failed(&err, "looking up a client"),
    };
    match existing {
        Some(record) => change_client(&admin, &client_id, body, record).await,
        None => {
            let mut client = NewClient::new(client_id.clone());
            for tenant in body.tenants {
                client = client.tenant(tenant);
            }
            for scope in body.scopes.into_iter().flatten() {
                client = client.scope(scope);
            }
            if let Some(secret) = body.client_secret {
                client = client.secret(secret);
            }
            if let Some(limit) = body.rate_limit.flatten() {
                client = client.rate_limit(limit);
            }
            if let Some(method) = body.token_endpoint_auth_method {
                client = client.token_endpoint_auth_method(method);
            }
            if let Some(jwks) = body.jwks {
                client = client.jwks(jwks);
            }
            if let Some(uri) = body.jwks_uri {
                client = client.jwks_uri(uri);
            }
            let secret = match admin.clients.register(client).await {
                Ok(secret) => secret,
                // Another request registered it since it was looked up: this body was not
                // applied, and that other request's secret is the client's.
                Err(err) if err.is_refused() && registered(&admin, &client_id).await => {
                    return error(
                        StatusCode::CONFLICT,
                        "another request registered this client at the same time; this one was not applied: PUT again to change it",
                    )
                }
                Err(err) => return store_failed(&err, "registering a client"),
            };
            tracing::info!(client_id = %client_id, "client registered by an administrator");
            // The client is registered and its secret shown once: `201` with the secret
            // whatever the reading back does (a PUT sent again would change the client, and
            // answer without one).
            let mut shown = match admin.clients.client(&client_id).await {
                Ok(Some(record)) => client_json(&admin, &record).await,
                Ok(None) => json!({"client_id": client_id,
                    "warning": "the client is registered, but another request removed it since"}),
                Err(err) => {
                    tracing::error!(error = %err, client_id = %client_id, "could not read a registered client back");
                    json!({"client_id": client_id,
                        "warning": "the client is registered, but could not be read back: GET /admin/clients/{client_id} shows it"})
                }
            };
            // A private_key_jwt client has no secret to show.
            if !secret.is_empty() {
                shown["client_secret"] = json!(secret.expose());
            }
            let mut response = (StatusCode::CREATED, Json(shown)).into_response();
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            response
        }
    }
}

async fn get_client(State(admin): State<Arc<Admin>>, Path(client_id): Path<String>) -> Response {
    match admin.clients.client(&client_id).await {
        Ok(Some(record)) => Json(client_json(&admin, &record).await).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "no such client"),
        Err(err) => store_failed(&err, "looking up a client"),
    }
}

/// The published keys' `kid`s and the one that signs.
fn keys_json(keys: &SigningKeys) -> serde_json::Value {
    let published: Vec<serde_json::Value> = keys.jwks()["keys"]
        .as_array()
        .map(|keys| keys.iter().map(|key| key["kid"].clone()).collect())
        .unwrap_or_default();
    json!({"current": keys.current_kid(), "published": published})
}

async fn list_keys(State(admin): State<Arc<Admin>>) -> Response {
    Json(keys_json(&admin.keys.keys())).into_response()
}

/// The body of `POST /admin/signing-keys`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the new key is published before it signs (with a database; default
    /// [`DEFAULT_PUBLISH_SECONDS`]).
    #[serde(default)]
    publish_seconds: Option<u64>,
}

/// How long a new key is published before it signs, by default: longer than the JWKS may be
/// cached (`max-age=300`), so a verifier honouring its cache has the key before any token it
/// signed reaches it.
const DEFAULT_PUBLISH_SECONDS: u64 = 360;

/// The longest `publish_seconds`.
const MAX_PUBLISH_SECONDS: u64 = 86_400;

/// Rotates to a new key: with a database, published by every replica at once and signing
/// after `publish_seconds` (default [`DEFAULT_PUBLISH_SECONDS`]); on files, signing at once. The keys it replaces stay
/// published until the last token they signed has expired.
async fn rotate_keys(State(admin): State<Arc<Admin>>, body: Bytes) -> Response {
    let body: RotateBody = if body.is_empty() {
        RotateBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(body) => body,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    &format!("the body must be {{\"publish_seconds\": N}} or empty: {e}"),
                )
            }
        }
    };
    if body
        .publish_seconds
        .is_some_and(|s| s > MAX_PUBLISH_SECONDS)
    {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("publish_seconds must be at most {MAX_PUBLISH_SECONDS}"),
        );
    }
    let retire_after = admin.token_lifetime + LEEWAY;
    match &admin.keys {
        KeyAdmin::Database(keys) => {
            let publish =
                Duration::from_secs(body.publish_seconds.unwrap_or(DEFAULT_PUBLISH_SECONDS));
            match keys.rotate(publish, retire_after).await {
                Ok(kid) => {
                    tracing::info!(%kid, "signing key rotation started by an administrator");
                    Json(json!({"kid": kid, "signs_in_seconds": publish.as_secs(),
                        "replaced_keys_retire_in_seconds": (publish + retire_after).as_secs()}))
                    .into_response()
                }
                Err(err) => {
                    tracing::error!(error = %err, "could not rotate the signing keys");
                    unavailable("the signing keys could not be rotated")
                }
            }
        }
        KeyAdmin::Files(keys) => {
            if body.publish_seconds.is_some_and(|s| s > 0) {
                return error(
                    StatusCode::BAD_REQUEST,
                    "publish_seconds needs database_url: one process publishes a new key and signs with it at once",
                );
            }
            let replaced: Vec<String> = keys_json(keys)["published"]
                .as_array()
                .map(|kids| {
                    kids.iter()
                        .filter_map(|k| k.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            // The key file is written and synced on a blocking thread, not this worker.
            let rotating = keys.clone();
            let rotated = tokio::task::spawn_blocking(move || {
                SigningKey::generate_es256().and_then(|key| {
                    let kid = key.kid().to_owned();
                    rotating.rotate(key).map(|()| kid)
                })
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|rotated| rotated.map_err(|e| e.to_string()));
            match rotated {
                Ok(kid) => {
                    tracing::info!(%kid, "signing key rotated by an administrator");
                    // The replaced keys go once their last token has expired (while this
                    // process runs: after a restart they stay published, which is harmless,
                    // until retired by hand).
                    let keys = keys.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(retire_after).await;
                        // The key file written on a blocking thread, not a worker.
                        let _ = tokio::task::spawn_blocking(move || {
                            for old in replaced {
                                if keys.retire(&old).is_ok() {
                                    tracing::info!(kid = %old, "replaced signing key retired");
                                }
                            }
                        })
                        .await;
                    });
                    Json(json!({"kid": kid, "signs_in_seconds": 0,
                        "replaced_keys_retire_in_seconds": retire_after.as_secs()}))
                    .into_response()
                }
                Err(err) => {
                    tracing::error!(error = %err, "could not rotate the signing keys");
                    unavailable("the signing keys could not be rotated")
                }
            }
        }
    }
}

/// Stops publishing the key `kid` at once (a compromised key): tokens it signed are refused.
async fn retire_key(State(admin): State<Arc<Admin>>, Path(kid): Path<String>) -> Response {
    let keys = admin.keys.keys();
    if keys.current_kid() == kid {
        return error(
            StatusCode::CONFLICT,
            "the key that signs now cannot be retired: rotate first (POST /admin/signing-keys)",
        );
    }
    let published = keys_json(&keys)["published"]
        .as_array()
        .is_some_and(|kids| kids.iter().any(|k| k == &json!(kid)));
    if !published {
        return error(StatusCode::NOT_FOUND, "no such published key");
    }
    let retired = match &admin.keys {
        KeyAdmin::Database(keys) => keys
            .retire(&kid)
            .await
            .map_err(|e| (e.is_refused(), e.to_string())),
        KeyAdmin::Files(keys) => {
            // The key file is written and synced on a blocking thread, not this worker.
            let (keys, retired) = (keys.clone(), kid.clone());
            match tokio::task::spawn_blocking(move || keys.retire(&retired)).await {
                Ok(retired) => retired.map_err(|e| (true, e.to_string())),
                Err(e) => Err((false, e.to_string())),
            }
        }
    };
    match retired {
        Ok(()) => {
            tracing::warn!(%kid, "signing key retired by an administrator: its tokens are refused");
            StatusCode::NO_CONTENT.into_response()
        }
        // Another replica changed the keys meanwhile: what they are now refuses it.
        Err((true, message)) => error(StatusCode::CONFLICT, &message),
        Err((false, error)) => {
            tracing::error!(%error, "could not retire a signing key");
            unavailable("the key could not be retired")
        }
    }
}

/// Revokes the client: no new tokens (the id stays taken), and the ones it holds are refused
/// from now on, by every replica.
async fn delete_client(State(admin): State<Arc<Admin>>, Path(client_id): Path<String>) -> Response {
    match admin.clients.client(&client_id).await {
        Ok(Some(_)) => {}
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such client"),
        Err(err) => return store_failed(&err, "looking up a client"),
    }
    match admin.endpoint.revoke_client(&client_id).await {
        Ok(()) => {
            tracing::info!(client_id = %client_id, "client revoked by an administrator");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(err) if err.is_refused() => store_failed(&err, "revoking a client"),
        Err(err) => {
            // Revoked in the store (and here) but not told to the other replicas, whose
            // bearer layers still take its tokens: say so; the same DELETE again finishes it.
            let revoked = matches!(
                admin.clients.client(&client_id).await,
                Ok(Some(record)) if record.revoked
            );
            if !revoked {
                return store_failed(&err, "revoking a client");
            }
            tracing::error!(client_id = %client_id, error = %err, "a client was revoked, but its tokens' revocation was not shared with the other replicas");
            unavailable(
                "the client is revoked, but its tokens' revocation could not be shared with \
                 the other replicas, which still accept them: send the same DELETE again",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;
    use tower_fhir::route::{InMemoryDirectory, TenantRoutingLayer};
    use tower_fhir::token::InMemoryClientStore;

    const TENANT: &str = "7f9c5e1a-2b3d-4c5e-8f90-1a2b3c4d5e6f";

    /// An admin API over `directory`, with a route cache that follows nothing: only the admin
    /// handlers themselves can make it forget a tenant.
    fn admin(directory: &InMemoryDirectory) -> (Router, RouteCache) {
        admin_with::<TokensOnly>(directory, None)
    }

    /// The page `query` asks for of the clients' list, or the status refusing it.
    fn client_page(query: &str) -> Result<Page<String>, StatusCode> {
        let uri: http::Uri = format!("/admin/clients{query}").parse().unwrap();
        page_query(
            &uri,
            "/admin/clients",
            |text| is_client_id(text).then(|| text.to_owned()),
            "a client id",
        )
        .map_err(|response| response.status())
    }

    #[test]
    fn a_lists_query_is_form_urlencoded_and_refused_when_it_names_anything_else() {
        let page = |after: Option<&str>, limit: Option<usize>| Page {
            after: after.map(str::to_owned),
            limit,
        };
        for (query, read) in [
            ("", page(None, None)),
            ("?", page(None, None)),
            ("?&", page(None, None)),
            ("?limit=2", page(None, Some(2))),
            ("?limit=10000&after=a", page(Some("a"), Some(10000))),
            ("?after=app%2Bx&limit=007", page(Some("app+x"), Some(7))),
            ("?after=app+2", page(Some("app 2"), None)),
            ("?after=app%202", page(Some("app 2"), None)),
            ("?after=%7E%21", page(Some("~!"), None)),
            // A parameter's name is decoded too.
            ("?l%69mit=3", page(None, Some(3))),
        ] {
            assert_eq!(client_page(query), Ok(read), "{query}");
        }
        for refused in [
            "?limit=0",
            "?limit=10001",
            "?limit=99999999999999999999999999",
            "?limit=-1",
            "?limit=+5",
            "?limit=5.0",
            "?limit=",
            "?limit",
            "?limit=two",
            "?limit=1&limit=1",
            "?after=a&after=b",
            "?after=",
            "?after=%00",
            "?after=%C3%A9",
            "?after=%FF",
            "?page=2",
            "?Limit=2",
            "?limit=2&cursor=a",
        ] {
            assert_eq!(
                client_page(refused),
                Err(StatusCode::BAD_REQUEST),
                "{refused}"
            );
        }
        let too_long = format!("?after={}", "a".repeat(256));
        assert!(client_page(&too_long).is_err());
        assert!(client_page(&format!("?after={}", "a".repeat(255))).is_ok());
        // Tenants: a GUID in any spelling.
        let tenant_page = |query: &str| {
            let uri: http::Uri = format!("/admin/tenants{query}").parse().unwrap();
            page_query(
                &uri,
                "/admin/tenants",
                |t| TenantId::parse(t).ok(),
                "a GUID",
            )
        };
        let upper = format!("?after={}", TENANT.to_uppercase());
        let read = tenant_page(&upper).unwrap();
        assert_eq!(read.after, TenantId::parse(TENANT).ok());
        assert!(tenant_page("?after=not-a-guid").is_err());
        assert!(tenant_page("?after=app-1").is_err());
    }

    /// A revocation log that records tokens but not clients (the trait's default).
    struct TokensOnly;
    impl tower_fhir::auth::RevocationLog for TokensOnly {
        fn record(
            &self,
            _: Option<&str>,
            _: &str,
            _: u64,
        ) -> futures::future::BoxFuture<'static, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
    }

    fn admin_with<L: tower_fhir::auth::RevocationLog>(
        directory: &InMemoryDirectory,
        clients: Option<(InMemoryClientStore, L)>,
    ) -> (Router, RouteCache) {
        let (clients, log) = match clients {
            Some((clients, log)) => (clients, Some(log)),
            None => (InMemoryClientStore::new(), None),
        };
        admin_over(directory.clone(), Arc::new(clients), log)
    }

    /// An admin API over any directory and client store.
    fn admin_over<L: tower_fhir::auth::RevocationLog>(
        directory: impl TenantStore + Clone,
        clients: Arc<dyn ClientStore>,
        log: Option<L>,
    ) -> (Router, RouteCache) {
        let routing = TenantRoutingLayer::builder(directory.clone())
            .build()
            .unwrap();
        let routes = routing.cache().clone();
        let endpoint = TokenEndpoint::builder()
            .issuer("https://gateway.test")
            .audience("tower-fhir")
            .store(clients.clone());
        let endpoint = match log {
            Some(log) => endpoint.revocation_log(log),
            None => endpoint,
        };
        let admin = Admin {
            token: "admin-secret".into(),
            directory: Arc::new(directory),
            routes: routes.clone(),
            clients,
            limits: RateLimitLayer::new(),
            throttle: AdminThrottle::default(),
            keys: KeyAdmin::Files(SigningKeys::generate().unwrap()),
            token_lifetime: Duration::from_secs(3600),
            tenant_writes: tokio::sync::Mutex::new(()),
            endpoint: endpoint.build().unwrap(),
            body_timeout: Duration::from_secs(30),
            body_min_rate: 0,
            own_addresses: vec![
                ("listen", "0.0.0.0:8080".parse().unwrap()),
                ("metrics_listen", "127.0.0.1:9090".parse().unwrap()),
            ],
            state_lock: None,
        };
        (super::routes(Arc::new(admin)), routes)
    }

    /// A request to the admin API with the admin token.
    fn admin_request(method: &str, path: &str, body: String) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, "Bearer admin-secret")
            .body(Body::from(body))
            .unwrap()
    }

    async fn send(router: &Router, method: &str, body: &str) -> StatusCode {
        let request = Request::builder()
            .method(method)
            .uri(format!("/admin/tenants/{TENANT}"))
            .header(header::AUTHORIZATION, "Bearer admin-secret")
            .body(Body::from(body.to_owned()))
            .unwrap();
        router.clone().oneshot(request).await.unwrap().status()
    }

    /// `GET path` with the admin token: its status, `Retry-After` and JSON body.
    async fn get(router: &Router, path: &str) -> (StatusCode, bool, serde_json::Value) {
        let request = Request::builder()
            .uri(path)
            .header(header::AUTHORIZATION, "Bearer admin-secret")
            .body(Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let retry = response.headers().contains_key(header::RETRY_AFTER);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, retry, serde_json::from_slice(&body).unwrap())
    }

    /// A directory that cannot list its tenants (a database gone away, say); look-ups work,
    /// and so does `present` when the flag says so (a store that finds tenants by their ids
    /// without its list).
    #[derive(Clone)]
    struct Unlisted(InMemoryDirectory, bool);
    impl tower_fhir::route::TenantDirectory for Unlisted {
        fn lookup(&self, tenant: TenantId) -> tower_fhir::route::DirectoryFuture {
            self.0.lookup(tenant)
        }
    }
    impl TenantStore for Unlisted {
        fn put(
            &self,
            tenant: TenantId,
            record: TenantRecord,
        ) -> tower_fhir::route::TenantStoreFuture<bool> {
            self.0.put(tenant, record)
        }
        fn put_all(
            &self,
            tenants: Vec<(TenantId, TenantRecord)>,
        ) -> tower_fhir::route::TenantStoreFuture<()> {
            self.0.put_all(tenants)
        }
        fn delete(&self, tenant: TenantId) -> tower_fhir::route::TenantStoreFuture<bool> {
            self.0.delete(tenant)
        }
        fn list(&self) -> tower_fhir::route::TenantStoreFuture<Vec<TenantId>> {
            Box::pin(async { Err(DirectoryError::new("the database went away")) })
        }
        fn present(
            &self,
            tenants: Vec<TenantId>,
        ) -> tower_fhir::route::TenantStoreFuture<std::collections::HashSet<TenantId>> {
            if self.1 {
                self.0.present(tenants)
            } else {
                Box::pin(async { Err(DirectoryError::new("the database went away")) })
            }
        }
        fn changes(&self) -> tokio::sync::broadcast::Receiver<TenantId> {
            self.0.changes()
        }
    }

    /// The methods a test's client store passes on to the store in `self.$field` unchanged:
    /// `register`, `rotate_secret`, `revoke`, `set_entitlements`.
    macro_rules! delegate_to {
        ($field:tt) => {
            fn register(
                &self,
                client: NewClient,
            ) -> tower_fhir::token::StoreFuture<tower_fhir::token::ClientSecret> {
                self.$field.register(client)
            }
            fn rotate_secret(
                &self,
                id: &str,
                grace: Duration,
            ) -> tower_fhir::token::StoreFuture<tower_fhir::token::ClientSecret> {
                self.$field.rotate_secret(id, grace)
            }
            fn revoke(&self, id: &str) -> tower_fhir::token::StoreFuture<()> {
                self.$field.revoke(id)
            }
            fn set_entitlements(
                &self,
                id: &str,
                tenants: Vec<TenantId>,
                scopes: Vec<String>,
            ) -> tower_fhir::token::StoreFuture<()> {
                self.$field.set_entitlements(id, tenants, scopes)
            }
        };
    }

    /// A client store without `clients`: the trait's default, which fails.
    struct Unlisting(InMemoryClientStore);
    impl ClientStore for Unlisting {
        delegate_to!(0);
        fn client(&self, id: &str) -> tower_fhir::token::StoreFuture<Option<ClientRecord>> {
            self.0.client(id)
        }
    }

    #[tokio::test]
    async fn an_upstream_at_the_gateways_own_address_is_refused() {
        let directory = InMemoryDirectory::new();
        let (router, _) = admin(&directory);
        let body = |base: &str| {
            format!(r#"{{"upstreams": [{{"base_url": "{base}", "fhir_version": "4.0"}}]}}"#)
        };
        // `listen` takes every address on 8080; `metrics_listen` is 127.0.0.1:9090.
        for own in [
            "http://127.0.0.1:8080/loop",
            "http://localhost:8080/fhir",
            "http://[::1]:8080/fhir",
            "http://0.0.0.0:8080/fhir",
            "http://127.0.0.1:9090",
            "http://LOCALHOST:9090/metrics",
            // Other spellings of loopback, as the resolver reads them.
            "http://0.0.0.0:9090/metrics",
            "http://[::ffff:127.0.0.1]:9090/metrics",
            "http://127.1:9090/metrics",
            "http://0x7f000001:9090/metrics",
            "http://2130706433:9090/metrics",
            "http://0177.0.0.1:9090/metrics",
            "http://localhost.:9090/metrics",
            "http://gateway.localhost:9090/metrics",
            "http://[::]:9090/metrics",
            "http://127.1:8080/fhir",
            "http://2130706433:8080/fhir",
            "http://localhost.:8080/fhir",
        ] {
            assert_eq!(
                send(&router, "PUT", &body(own)).await,
                StatusCode::BAD_REQUEST,
                "{own}"
            );
        }
        for other in [
            "http://127.0.0.1:8081/fhir",
            "http://10.0.0.7:9090/fhir",
            "https://127.0.0.1/fhir",
            "http://hapi.internal:8080/fhir",
            "http://10.1:9090/fhir",
        ] {
            assert_eq!(
                send(&router, "PUT", &body(other)).await,
                StatusCode::CREATED,
                "{other}"
            );
            assert_eq!(send(&router, "DELETE", "").await, StatusCode::NO_CONTENT);
        }
    }

    #[tokio::test]
    async fn a_store_that_cannot_list_answers_503_and_the_directory_only_hides_onboarding() {
        let tenant = TenantId::parse(TENANT).unwrap();
        let directory = InMemoryDirectory::new();
        let record: TenantRecord = serde_json::from_str(
            r#"{"upstreams": [{"base_url": "http://127.0.0.1:1/fhir", "fhir_version": "4.0"}]}"#,
        )
        .unwrap();
        directory.put(tenant, record).await.unwrap();
        let clients = InMemoryClientStore::new();
        clients
            .register(NewClient::new("app").tenant(tenant))
            .await
            .unwrap();

        // The directory cannot list: no tenant list (503, Retry-After, JSON); the clients are
        // still listed, their tenants shown as not onboarded (as one client's are when the
        // directory cannot answer).
        let (router, _) = admin_over::<TokensOnly>(
            Unlisted(directory.clone(), false),
            Arc::new(clients.clone()),
            None,
        );
        let (status, retry, body) = get(&router, "/admin/tenants").await;
        assert_eq!((status, retry), (StatusCode::SERVICE_UNAVAILABLE, true));
        assert_eq!(body["error"], "the tenant directory cannot answer");
        let (status, _, body) = get(&router, "/admin/clients").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["clients"][0]["tenants_not_onboarded"], json!([TENANT]));
        // Which tenants are onboarded is asked for those tenants alone (`present`), not read
        // from the list: a store that finds them without its list shows them onboarded.
        let (router, _) = admin_over::<TokensOnly>(
            Unlisted(directory.clone(), true),
            Arc::new(clients.clone()),
            None,
        );
        for path in ["/admin/clients", "/admin/clients?limit=1"] {
            let (status, _, body) = get(&router, path).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(
                body["clients"][0]["tenants_not_onboarded"],
                json!([]),
                "{path}"
            );
        }
        let (status, _, body) = get(&router, "/admin/clients/app").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["tenants_not_onboarded"], json!([]));

        // The client store cannot list: 503, not an empty list.
        let (router, _) = admin_over::<TokensOnly>(directory, Arc::new(Unlisting(clients)), None);
        let (status, retry, body) = get(&router, "/admin/clients").await;
        assert_eq!((status, retry), (StatusCode::SERVICE_UNAVAILABLE, true));
        assert_eq!(body["error"], "the client store failed");
        let (status, _, body) = get(&router, "/admin/tenants").await;
        assert_eq!(
            (status, body),
            (StatusCode::OK, json!({"tenants": [TENANT]}))
        );
    }

    #[tokio::test]
    async fn a_tenant_body_may_name_the_paths_id_in_any_spelling_and_no_other() {
        use tower_fhir::route::TenantDirectory;
        let directory = InMemoryDirectory::new();
        let (router, _) = admin(&directory);
        let tenant = TenantId::parse(TENANT).unwrap();
        let with_id = |id: serde_json::Value| {
            json!({"id": id, "upstreams": [{"base_url": "http://127.0.0.1:1/fhir", "fhir_version": "4.0"}]})
                .to_string()
        };
        for refused in [
            json!("9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f"),
            json!("not-a-guid"),
            json!(7),
        ] {
            assert_eq!(
                send(&router, "PUT", &with_id(refused.clone())).await,
                StatusCode::BAD_REQUEST,
                "{refused}"
            );
        }
        assert!(directory.lookup(tenant).await.unwrap().is_none());
        let upper = TENANT.to_ascii_uppercase();
        assert_eq!(
            send(&router, "PUT", &with_id(json!(upper))).await,
            StatusCode::CREATED
        );
        for same in [
            json!(format!("{{{TENANT}}}")),
            json!(TENANT.replace('-', "")),
            json!(null),
        ] {
            assert_eq!(
                send(&router, "PUT", &with_id(same.clone())).await,
                StatusCode::OK,
                "{same}"
            );
        }
    }

    #[tokio::test]
    async fn a_revocation_not_shared_with_the_other_replicas_says_so() {
        let clients = InMemoryClientStore::new();
        clients
            .register(NewClient::new("app").secret("app-secret-0123456789"))
            .await
            .unwrap();
        let (router, _) = admin_with(
            &InMemoryDirectory::new(),
            Some((clients.clone(), TokensOnly)),
        );
        for _ in 0..2 {
            let response = router
                .clone()
                .oneshot(admin_request("DELETE", "/admin/clients/app", String::new()))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(response.headers().contains_key(header::RETRY_AFTER));
            let body = axum::body::to_bytes(response.into_body(), 4096)
                .await
                .unwrap();
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains("the client is revoked, but"), "{body}");
        }
        assert!(clients.client("app").await.unwrap().unwrap().revoked);
    }

    #[tokio::test]
    async fn a_reset_or_narrowing_that_cannot_refuse_the_tokens_everywhere_changes_nothing() {
        let clients = InMemoryClientStore::new();
        let tenant = TenantId::parse(TENANT).unwrap();
        clients
            .register(
                NewClient::new("app")
                    .secret("app-secret-0123456789")
                    .tenant(tenant)
                    .scope("system/*.read"),
            )
            .await
            .unwrap();
        let before = clients.client("app").await.unwrap().unwrap();
        // The log cannot record a client's tokens refused (the trait's default).
        let (router, _) = admin_with(
            &InMemoryDirectory::new(),
            Some((clients.clone(), TokensOnly)),
        );
        let narrowed = serde_json::json!({"tenants": [], "scopes": ["system/*.read"]});
        for request in [
            admin_request("POST", "/admin/clients/app/secret", String::new()),
            admin_request("PUT", "/admin/clients/app", narrowed.to_string()),
        ] {
            let response = router.clone().oneshot(request).await.unwrap();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert!(response.headers().contains_key(header::RETRY_AFTER));
            let body = axum::body::to_bytes(response.into_body(), 4096)
                .await
                .unwrap();
            let body = String::from_utf8_lossy(&body);
            assert!(body.contains("the change was not made"), "{body}");
            assert!(!body.contains("client_secret"), "{body}");
        }
        let after = clients.client("app").await.unwrap().unwrap();
        assert_eq!(after.secrets, before.secrets, "the secret is as it was");
        assert_eq!(
            after.tenants, before.tenants,
            "the tenants are as they were"
        );
        // Refusing its tokens alone: refused here, but not recorded for the other replicas.
        let response = router
            .clone()
            .oneshot(admin_request(
                "DELETE",
                "/admin/clients/app/tokens",
                String::new(),
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let response = router
            .clone()
            .oneshot(admin_request(
                "DELETE",
                "/admin/clients/nobody/tokens",
                String::new(),
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        // A change that takes nothing away needs no refusal, and is made.
        let wider = serde_json::json!({"tenants": [TENANT], "scopes": ["system/*.read", "launch"]});
        let response = router
            .clone()
            .oneshot(admin_request(
                "PUT",
                "/admin/clients/app",
                wider.to_string(),
            ))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            clients.client("app").await.unwrap().unwrap().scopes.len(),
            2
        );
    }

    #[tokio::test]
    async fn a_change_made_whose_second_refusal_fails_is_answered_with_a_warning() {
        let tenant = TenantId::parse(TENANT).unwrap();
        let narrowed = serde_json::json!({"tenants": []}).to_string();
        for (method, path, body) in [
            ("POST", "/admin/clients/app/secret", String::new()),
            ("PUT", "/admin/clients/app", narrowed),
        ] {
            let clients = InMemoryClientStore::new();
            clients
                .register(
                    NewClient::new("app")
                        .secret("app-secret-0123456789")
                        .tenant(tenant),
                )
                .await
                .unwrap();
            let (router, _) = admin_with(
                &InMemoryDirectory::new(),
                Some((
                    clients.clone(),
                    CountsClients {
                        fails_after: Some(1),
                        ..CountsClients::default()
                    },
                )),
            );
            let response = router
                .oneshot(admin_request(method, path, body))
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK, "{method} {path}");
            let body = axum::body::to_bytes(response.into_body(), 4096)
                .await
                .unwrap();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let warning = body["warning"].as_str().unwrap_or_default();
            assert!(
                warning.contains("DELETE /admin/clients/{client_id}/tokens"),
                "{method} {path}: {body}"
            );
            let record = clients.client("app").await.unwrap().unwrap();
            if method == "POST" {
                assert!(body["client_secret"].is_string(), "the new secret is shown");
            } else {
                assert!(record.tenants.is_empty(), "the change is made");
            }
        }
    }

    /// A client store where another administrator's change is written between each read of
    /// a client and the write of a change to it, `races` times: each grants the tenant
    /// `raced` if the client lacks it, or takes it away if it has it.
    struct Racing {
        inner: InMemoryClientStore,
        raced: TenantId,
        races: std::sync::atomic::AtomicUsize,
    }
    impl ClientStore for Racing {
        delegate_to!(inner);
        fn client(&self, id: &str) -> tower_fhir::token::StoreFuture<Option<ClientRecord>> {
            self.inner.client(id)
        }
        fn update(&self, id: &str, update: ClientUpdate) -> tower_fhir::token::StoreFuture<()> {
            use std::sync::atomic::Ordering::SeqCst;
            let race = self
                .races
                .fetch_update(SeqCst, SeqCst, |left| left.checked_sub(1))
                .is_ok();
            let (inner, id, raced) = (self.inner.clone(), id.to_owned(), self.raced);
            Box::pin(async move {
                if race {
                    let mut record = inner.client(&id).await?.expect("registered");
                    match record.tenants.iter().position(|t| *t == raced) {
                        Some(at) => drop(record.tenants.remove(at)),
                        None => record.tenants.push(raced),
                    }
                    inner
                        .set_entitlements(&id, record.tenants, record.scopes)
                        .await?;
                }
                inner.update(&id, update).await
            })
        }
    }

    /// A client store whose reads fail after the first `reads` (a database that registered a
    /// client, then timed out).
    struct FailsToRead {
        inner: InMemoryClientStore,
        reads: std::sync::atomic::AtomicUsize,
    }
    impl ClientStore for FailsToRead {
        delegate_to!(inner);
        fn client(&self, id: &str) -> tower_fhir::token::StoreFuture<Option<ClientRecord>> {
            use std::sync::atomic::Ordering::SeqCst;
            if self
                .reads
                .fetch_update(SeqCst, SeqCst, |left| left.checked_sub(1))
                .is_ok()
            {
                return self.inner.client(id);
            }
            Box::pin(async { Err(tower_fhir::token::StoreError::new("timed out")) })
        }
    }

    #[tokio::test]
    async fn a_registered_clients_secret_is_shown_when_it_cannot_be_read_back() {
        let inner = InMemoryClientStore::new();
        let store = FailsToRead {
            inner: inner.clone(),
            reads: 1.into(),
        };
        let (router, _) = admin_over(
            InMemoryDirectory::new(),
            Arc::new(store),
            None::<CountsClients>,
        );
        let body = serde_json::json!({"tenants": [TENANT]}).to_string();
        let response = router
            .oneshot(admin_request("PUT", "/admin/clients/new", body))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body = axum::body::to_bytes(response.into_body(), 4096)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let secret = body["client_secret"].as_str().expect("the secret is shown");
        assert!(body["warning"]
            .as_str()
            .unwrap()
            .contains("could not be read back"));
        // The secret shown is the client's.
        let record = inner.client("new").await.unwrap().unwrap();
        assert!(!record.secrets.is_empty());
        assert!(!secret.is_empty());
    }

    /// A revocation log that counts the refusals of all a client's tokens, each once recorded
    /// (after `delay`); with `fails_after`, the refusals past that many fail.
    #[derive(Default, Clone)]
    struct CountsClients {
        count: Arc<std::sync::atomic::AtomicUsize>,
        delay: Duration,
        fails_after: Option<usize>,
    }
    impl tower_fhir::auth::RevocationLog for CountsClients {
        fn record(
            &self,
            _: Option<&str>,
            _: &str,
            _: u64,
        ) -> futures::future::BoxFuture<'static, Result<(), String>> {
            Box::pin(async { Ok(()) })
        }
        fn record_client(
            &self,
            _: Option<&str>,
            _: &str,
            _: u64,
            _: u64,
        ) -> futures::future::BoxFuture<'static, Result<(), String>> {
            let (count, delay, fails_after) =
                (Arc::clone(&self.count), self.delay, self.fails_after);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                let before = count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                match fails_after {
                    Some(most) if before >= most => Err("the log is gone".to_owned()),
                    _ => Ok(()),
                }
            })
        }
    }

    /// A client store whose change is written at once, then answered late (`late`) or as a
    /// failure after all (a database that committed, then timed out).
    struct Committing {
        inner: InMemoryClientStore,
        late: Duration,
        fails: bool,
    }
    impl ClientStore for Committing {
        delegate_to!(inner);
        fn client(&self, id: &str) -> tower_fhir::token::StoreFuture<Option<ClientRecord>> {
            self.inner.client(id)
        }
        fn update(&self, id: &str, update: ClientUpdate) -> tower_fhir::token::StoreFuture<()> {
            let written = self.inner.update(id, update);
            let (late, fails) = (self.late, self.fails);
            Box::pin(async move {
                written.await?;
                tokio::time::sleep(late).await;
                if fails {
                    return Err(tower_fhir::token::StoreError::new("timed out"));
                }
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn a_change_whose_caller_leaves_or_whose_store_fails_after_writing_still_refuses_the_tokens(
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        let tenant = TenantId::parse(TENANT).unwrap();
        let narrowed = serde_json::json!({"tenants": []}).to_string();
        // The caller gone while the store answers (its change written): the request goes on
        // and refuses the tokens again after the change.
        let inner = InMemoryClientStore::new();
        inner
            .register(NewClient::new("app").tenant(tenant))
            .await
            .unwrap();
        let store = Committing {
            inner: inner.clone(),
            late: Duration::from_millis(300),
            fails: false,
        };
        let log = CountsClients::default();
        let (router, _) = admin_over(InMemoryDirectory::new(), Arc::new(store), Some(log.clone()));
        let request = router.oneshot(admin_request("PUT", "/admin/clients/app", narrowed.clone()));
        assert!(tokio::time::timeout(Duration::from_millis(100), request)
            .await
            .is_err());
        assert_eq!(log.count.load(SeqCst), 1, "refused before the change");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(log.count.load(SeqCst), 2, "refused again after it");
        assert!(inner
            .client("app")
            .await
            .unwrap()
            .unwrap()
            .tenants
            .is_empty());

        // The store failing after it wrote: `503`, the tokens refused again all the same.
        let inner = InMemoryClientStore::new();
        inner
            .register(NewClient::new("app").tenant(tenant))
            .await
            .unwrap();
        let store = Committing {
            inner: inner.clone(),
            late: Duration::ZERO,
            fails: true,
        };
        let log = CountsClients::default();
        let (router, _) = admin_over(InMemoryDirectory::new(), Arc::new(store), Some(log.clone()));
        let response = router
            .oneshot(admin_request("PUT", "/admin/clients/app", narrowed))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(log.count.load(SeqCst), 2);
    }

    #[tokio::test]
    async fn a_revocation_whose_caller_leaves_is_still_recorded_for_the_other_replicas() {
        use std::sync::atomic::Ordering::SeqCst;
        let clients = InMemoryClientStore::new();
        clients.register(NewClient::new("app")).await.unwrap();
        let log = CountsClients {
            delay: Duration::from_millis(300),
            ..CountsClients::default()
        };
        let (router, _) = admin_over(
            InMemoryDirectory::new(),
            Arc::new(clients.clone()),
            Some(log.clone()),
        );
        let request = router.oneshot(admin_request("DELETE", "/admin/clients/app", String::new()));
        assert!(tokio::time::timeout(Duration::from_millis(100), request)
            .await
            .is_err());
        assert!(clients.client("app").await.unwrap().unwrap().revoked);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(log.count.load(SeqCst), 1, "the revocation reached the log");
    }

    /// A directory whose writes are made, then answered as failures (a database that
    /// committed, then timed out).
    #[derive(Clone)]
    struct CommitsThenFails(InMemoryDirectory);
    impl tower_fhir::route::TenantDirectory for CommitsThenFails {
        fn lookup(&self, tenant: TenantId) -> tower_fhir::route::DirectoryFuture {
            self.0.lookup(tenant)
        }
    }
    impl TenantStore for CommitsThenFails {
        fn put(
            &self,
            tenant: TenantId,
            record: TenantRecord,
        ) -> tower_fhir::route::TenantStoreFuture<bool> {
            let written = self.0.put(tenant, record);
            Box::pin(async move {
                written.await?;
                Err(DirectoryError::new("timed out"))
            })
        }
        fn put_all(
            &self,
            tenants: Vec<(TenantId, TenantRecord)>,
        ) -> tower_fhir::route::TenantStoreFuture<()> {
            self.0.put_all(tenants)
        }
        fn delete(&self, tenant: TenantId) -> tower_fhir::route::TenantStoreFuture<bool> {
            let written = self.0.delete(tenant);
            Box::pin(async move {
                written.await?;
                Err(DirectoryError::new("timed out"))
            })
        }
        fn list(&self) -> tower_fhir::route::TenantStoreFuture<Vec<TenantId>> {
            self.0.list()
        }
        fn changes(&self) -> tokio::sync::broadcast::Receiver<TenantId> {
            self.0.changes()
        }
    }

    #[tokio::test]
    async fn a_tenant_write_answered_as_failed_is_routed_anew_all_the_same() {
        let directory = InMemoryDirectory::new();
        let (router, routes) = admin_over::<TokensOnly>(
            CommitsThenFails(directory.clone()),
            Arc::new(InMemoryClientStore::new()),
            None,
        );
        let tenant = TenantId::parse(TENANT).unwrap();
        assert!(routes.resolve(tenant).await.unwrap().is_none());
        let body =
            r#"{"upstreams": [{"base_url": "http://127.0.0.1:1/fhir", "fhir_version": "4.0"}]}"#;
        assert_eq!(
            send(&router, "PUT", body).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(
            routes.resolve(tenant).await.unwrap().is_some(),
            "the tenant written is still cached as unknown"
        );
        assert_eq!(
            send(&router, "DELETE", "").await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(
            routes.resolve(tenant).await.unwrap().is_none(),
            "the tenant removed is still routed"
        );
    }

    #[tokio::test]
    async fn a_tenant_granted_between_a_changes_read_and_its_write_is_taken_away_with_its_tokens() {
        let tenant = TenantId::parse(TENANT).unwrap();
        let raced = TenantId::parse("0b8e2f4a-6c1d-4e3f-9a7b-5c6d7e8f9a0b").unwrap();
        let unchanged = serde_json::json!({"tenants": [TENANT]}).to_string();
        for races in [0, 1, CLIENT_CHANGE_ATTEMPTS] {
            let inner = InMemoryClientStore::new();
            inner
                .register(NewClient::new("app").tenant(tenant))
                .await
                .unwrap();
            let store = Racing {
                inner: inner.clone(),
                raced,
                races: races.into(),
            };
            let log = CountsClients::default();
            let (router, _) =
                admin_over(InMemoryDirectory::new(), Arc::new(store), Some(log.clone()));
            let response = router
                .oneshot(admin_request(
                    "PUT",
                    "/admin/clients/app",
                    unchanged.clone(),
                ))
                .await
                .unwrap();
            let refusals = log.count.load(std::sync::atomic::Ordering::SeqCst);
            let record = inner.client("app").await.unwrap().unwrap();
            match races {
                // Nothing taken away from the client as read, nor written meanwhile.
                0 => {
                    assert_eq!(response.status(), StatusCode::OK);
                    assert_eq!((record.tenants, refusals), (vec![tenant], 0));
                }
                // The tenant granted after the read was seen at the write: decided again on
                // the client as it then was, the change takes it away and refuses the tokens
                // (before the write and after it).
                1 => {
                    assert_eq!(response.status(), StatusCode::OK);
                    assert_eq!((record.tenants, refusals), (vec![tenant], 2));
                }
                // Changed again before every write: not applied, and said so; the client is
                // as the other writer left it.
                // (The attempts alternate between the tenant granted, so taken away with the
                // tokens refused, and not.)
                _ => {
                    assert_eq!(response.status(), StatusCode::CONFLICT);
                    assert_eq!((record.tenants, refusals), (vec![tenant], 2));
                }
            }
        }
    }

    #[tokio::test]
    async fn a_client_revoked_or_gone_between_a_changes_read_and_its_write_is_so_answered() {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        /// Revokes the client (`revoke`) or, as a store of one's own might, deletes it, just
        /// before a change's write.
        struct Ending {
            inner: InMemoryClientStore,
            revoke: bool,
            gone: Arc<AtomicBool>,
        }
        impl ClientStore for Ending {
            delegate_to!(inner);
            fn client(&self, id: &str) -> tower_fhir::token::StoreFuture<Option<ClientRecord>> {
                if self.gone.load(SeqCst) {
                    return Box::pin(async { Ok(None) });
                }
                self.inner.client(id)
            }
            fn update(&self, id: &str, update: ClientUpdate) -> tower_fhir::token::StoreFuture<()> {
                let (inner, id) = (self.inner.clone(), id.to_owned());
                if !self.revoke {
                    self.gone.store(true, SeqCst);
                    let refused = format!("no client {id:?}");
                    return Box::pin(async move {
                        Err(tower_fhir::token::StoreError::refused(refused))
                    });
                }
                Box::pin(async move {
                    inner.revoke(&id).await?;
                    inner.update(&id, update).await
                })
            }
        }
        for (revoke, status) in [(true, StatusCode::CONFLICT), (false, StatusCode::NOT_FOUND)] {
            let inner = InMemoryClientStore::new();
            inner.register(NewClient::new("app")).await.unwrap();
            let store = Ending {
                inner,
                revoke,
                gone: Arc::default(),
            };
            let (router, _) =
                admin_over::<TokensOnly>(InMemoryDirectory::new(), Arc::new(store), None);
            let body = serde_json::json!({"tenants": [TENANT]}).to_string();
            let response = router
                .oneshot(admin_request("PUT", "/admin/clients/app", body))
                .await
                .unwrap();
            assert_eq!(response.status(), status, "revoked: {revoke}");
        }
    }

    #[test]
    fn a_change_takes_away_a_tenant_or_a_scope_the_client_had() {
        let tenant = TenantId::parse(TENANT).unwrap();
        let other = TenantId::parse("00000000-0000-4000-8000-000000000001").unwrap();
        let record = |tenants: Vec<TenantId>, scopes: &[&str]| ClientRecord {
            id: "app".into(),
            secrets: Vec::new(),
            tenants,
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            token_lifetime_secs: None,
            revoked: false,
            rate_limit: None,
            token_endpoint_auth_method: AuthMethod::ClientSecret,
            jwks: None,
            jwks_uri: None,
        };
        let body = |json: serde_json::Value| serde_json::from_value::<ClientBody>(json).unwrap();
        let had = record(vec![tenant, other], &["a", "b"]);
        for (json, takes) in [
            (
                serde_json::json!({"tenants": [other, tenant], "scopes": ["b", "a"]}),
                false,
            ),
            (
                serde_json::json!({"tenants": [tenant, other, tenant], "scopes": ["a", "b", "c"]}),
                false,
            ),
            (
                serde_json::json!({"tenants": [tenant], "scopes": ["a", "b"]}),
                true,
            ),
            (
                serde_json::json!({"tenants": [tenant, other], "scopes": ["a"]}),
                true,
            ),
            (serde_json::json!({"tenants": [tenant, other]}), true),
        ] {
            assert_eq!(body(json.clone()).takes_away(&had), takes, "{json}");
        }
        // A client without resource scopes had tenant-wide tokens: its first resource scope
        // (even one that does not parse, which grants nothing) narrows them; other scopes
        // added do not.
        let open = record(vec![tenant], &["openid"]);
        for (scopes, takes) in [
            (serde_json::json!(["openid", "launch"]), false),
            (serde_json::json!(["openid", "system/Patient.rs"]), true),
            (serde_json::json!(["openid", "system/patient.rs"]), true),
        ] {
            let json = serde_json::json!({"tenants": [tenant], "scopes": scopes});
            assert_eq!(body(json.clone()).takes_away(&open), takes, "{json}");
        }
    }

    #[tokio::test]
    async fn a_changed_tenant_is_routed_anew_by_the_time_the_change_is_answered() {
        let directory = InMemoryDirectory::new();
        let (router, routes) = admin(&directory);
        let tenant = TenantId::parse(TENANT).unwrap();
        // A request before onboarding: the cache now holds "not onboarded".
        assert!(routes.resolve(tenant).await.unwrap().is_none());

        let body =
            r#"{"upstreams": [{"base_url": "http://127.0.0.1:1/fhir", "fhir_version": "4.0"}]}"#;
        assert_eq!(send(&router, "PUT", body).await, StatusCode::CREATED);
        let record = routes.resolve(tenant).await.unwrap();
        assert!(
            record.is_some(),
            "the onboarded tenant is still cached as unknown"
        );

        let moved =
            r#"{"upstreams": [{"base_url": "http://127.0.0.1:2/fhir", "fhir_version": "4.0"}]}"#;
        assert_eq!(send(&router, "PUT", moved).await, StatusCode::OK);
        let record = routes.resolve(tenant).await.unwrap().unwrap();
        assert_eq!(
            record.upstreams()[0].base().as_str(),
            "http://127.0.0.1:2/fhir"
        );

        assert_eq!(send(&router, "DELETE", "").await, StatusCode::NO_CONTENT);
        assert!(
            routes.resolve(tenant).await.unwrap().is_none(),
            "the removed tenant is still routed"
        );
    }

    #[tokio::test]
    async fn two_upstreams_of_one_release_are_refused() {
        use tower_fhir::route::TenantDirectory;
        let directory = InMemoryDirectory::new();
        let (router, _) = admin(&directory);
        let twice = r#"{"upstreams": [{"base_url": "http://127.0.0.1:1/fhir", "fhir_version": "4.0"},
                                      {"base_url": "http://127.0.0.1:2/fhir", "fhir_version": "4.0"}]}"#;
        assert_eq!(send(&router, "PUT", twice).await, StatusCode::BAD_REQUEST);
        assert!(directory
            .lookup(TenantId::parse(TENANT).unwrap())
            .await
            .unwrap()
            .is_none());
        let two_releases = r#"{"upstreams": [{"base_url": "http://127.0.0.1:1/fhir", "fhir_version": "4.0"},
                                             {"base_url": "http://127.0.0.1:2/fhir", "fhir_version": "3.0"}]}"#;
        assert_eq!(
            send(&router, "PUT", two_releases).await,
            StatusCode::CREATED
        );
    }
}
