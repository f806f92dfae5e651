//! The admin API: onboard, change and remove tenants, reset a client's secret. Bearer
//! `admin_token`; every change is written under `state_dir` and takes effect at once.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tower_fhir::route::{FileDirectory, TenantUpstreams};
use tower_fhir::tenant::TenantId;
use tower_fhir::token::ClientStore;

pub(crate) struct Admin {
    pub(crate) token: String,
    pub(crate) directory: FileDirectory,
    pub(crate) clients: Arc<dyn ClientStore>,
}

/// The routes under `/admin`.
pub(crate) fn routes(admin: Arc<Admin>) -> Router {
    Router::new()
        .route(
            "/admin/tenants/{id}",
            put(put_tenant).delete(delete_tenant).get(get_tenant),
        )
        .route("/admin/clients/{client_id}/secret", post(reset_secret))
        // Every admin route needs the admin token; checked once, before any handler.
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&admin),
            require_admin,
        ))
        .with_state(admin)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

/// Lets a request through only with the admin token (compared in constant time).
async fn require_admin(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let expected = admin.token.as_bytes();
    let same = presented.len() == expected.len()
        && presented
            .bytes()
            .zip(expected)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0;
    if same {
        return next.run(request).await;
    }
    tracing::warn!("admin request refused: missing or wrong admin token");
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

/// The body of `PUT /admin/tenants/{id}`: `{"upstreams": [...]}` or just the list.
#[derive(Deserialize)]
#[serde(untagged)]
enum TenantBody {
    Wrapped { upstreams: TenantUpstreams },
    List(TenantUpstreams),
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
    let upstreams = match serde_json::from_slice::<TenantBody>(&body) {
        Ok(TenantBody::Wrapped { upstreams } | TenantBody::List(upstreams)) => upstreams,
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the body must be {\"upstreams\": [{\"base_url\": ..., \"fhir_version\": ...}]} with at least one valid upstream",
            )
        }
    };
    let existed = admin.directory.get(tenant).is_some();
    if let Err(err) = admin.directory.upsert(tenant, upstreams) {
        tracing::error!(%tenant, error = %err, "could not save a tenant");
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the tenant could not be saved",
        );
    }
    tracing::info!(%tenant, created = !existed, "tenant onboarded or changed");
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    (status, Json(tenant_json(&admin, tenant))).into_response()
}

/// The tenant as stored, upstream credentials left out.
fn tenant_json(admin: &Admin, tenant: TenantId) -> serde_json::Value {
    let upstreams = admin.directory.get(tenant).map(|upstreams| {
        let mut value = serde_json::to_value(&upstreams).unwrap_or_default();
        if let Some(list) = value.as_array_mut() {
            for upstream in list {
                if let Some(fields) = upstream.as_object_mut() {
                    if fields.remove("authorization").is_some() {
                        fields.insert("authorization".into(), json!("<redacted>"));
                    }
                }
            }
        }
        value
    });
    json!({"id": tenant, "upstreams": upstreams})
}

async fn get_tenant(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    match tenant_id(&id) {
        Ok(tenant) if admin.directory.get(tenant).is_some() => {
            Json(tenant_json(&admin, tenant)).into_response()
        }
        Ok(_) => error(StatusCode::NOT_FOUND, "no such tenant"),
        Err(response) => *response,
    }
}

async fn delete_tenant(State(admin): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    let tenant = match tenant_id(&id) {
        Ok(tenant) => tenant,
        Err(response) => return *response,
    };
    match admin.directory.remove(tenant) {
        Ok(true) => {
            tracing::info!(%tenant, "tenant removed");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => error(StatusCode::NOT_FOUND, "no such tenant"),
        Err(err) => {
            tracing::error!(%tenant, error = %err, "could not remove a tenant");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the tenant could not be removed",
            )
        }
    }
}

async fn reset_secret(State(admin): State<Arc<Admin>>, Path(client_id): Path<String>) -> Response {
    match admin.clients.client(&client_id).await {
        Ok(Some(record)) if !record.revoked => {}
        Ok(_) => return error(StatusCode::NOT_FOUND, "no such client"),
        Err(err) => {
            tracing::error!(error = %err, "client store failed");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "the client store failed");
        }
    }
    match admin
        .clients
        .rotate_secret(&client_id, Duration::ZERO)
        .await
    {
        Ok(secret) => {
            tracing::info!(client_id = %client_id, "client secret reset by an administrator");
            let mut response =
                Json(json!({"client_id": client_id, "client_secret": secret.expose()}))
                    .into_response();
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            response
        }
        Err(err) => {
            tracing::error!(error = %err, "could not rotate a client secret");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the secret could not be rotated",
            )
        }
    }
}
