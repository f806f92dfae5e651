//! What the layers learn about a request, for the audit record and metrics written after it.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::auth::VerifiedClaims;
use crate::tenant::TenantId;

/// A slot the gateway's layers fill as they learn who is asking and for what: the verified
/// claims, the tenant, the upstream. The [`ObserveLayer`](super::ObserveLayer) puts one in
/// each request's extensions and reads it when the response is ready; the tenant, routing and
/// token layers fill it when they find one. A layer or handler of your own may fill it too.
/// (With nothing to record, the `ObserveLayer` puts none in.)
///
/// Clones share the slot. Without an `ObserveLayer` outside, nothing puts one in and the
/// layers skip the filling.
///
/// ```
/// use tower_fhir::ops::RequestFacts;
///
/// let facts = RequestFacts::default();
/// facts.set_client_id("app");
/// assert_eq!(facts.snapshot().client_id().as_deref(), Some("app"));
/// ```
#[derive(Clone, Default)]
pub struct RequestFacts {
    inner: Arc<Shared>,
}

/// The slot, and what the [`ObserveLayer`](super::ObserveLayer) took from the request for its
/// audit record: one allocation a request for both.
#[derive(Default)]
struct Shared {
    facts: Mutex<Facts>,
    request: Option<RequestParts>,
}

/// What an audit record needs from the request, taken before it goes in.
///
/// The request id, path and query are copied into one small string: the URI's and the
/// header's bytes are slices of hyper's read buffer, and holding them until the response is
/// ready would make hyper allocate a new buffer for every request.
pub(crate) struct RequestParts {
    /// When the request arrived, on the monotonic clock: the record's wall time is made from
    /// it (see `Clock`), so the request path reads one clock, not two.
    pub(crate) start: Instant,
    pub(crate) method: http::Method,
    /// The request id (when it is text), the path, then the query, one after the other.
    text: Box<str>,
    /// Where the request id ends (`None`: no request id) and where the path does.
    id_end: Option<usize>,
    path_end: usize,
}

impl RequestParts {
    pub(crate) fn new(
        start: Instant,
        method: http::Method,
        uri: &http::Uri,
        request_id: Option<&http::HeaderValue>,
    ) -> Self {
        let id = request_id.and_then(|id| id.to_str().ok());
        let (path, query) = (uri.path(), uri.query().unwrap_or(""));
        let mut text = String::with_capacity(id.map_or(0, str::len) + path.len() + query.len());
        text.push_str(id.unwrap_or(""));
        let id_end = id.map(|_| text.len());
        text.push_str(path);
        let path_end = text.len();
        text.push_str(query);
        Self {
            start,
            method,
            text: text.into_boxed_str(),
            id_end,
            path_end,
        }
    }

    /// The request id, when the request had one that is text.
    pub(crate) fn request_id(&self) -> Option<&str> {
        Some(&self.text[..self.id_end?])
    }

    /// The URI's path.
    pub(crate) fn path(&self) -> &str {
        &self.text[self.id_end.unwrap_or(0)..self.path_end]
    }

    /// The URI's query, when not empty.
    pub(crate) fn query(&self) -> Option<&str> {
        Some(&self.text[self.path_end..]).filter(|query| !query.is_empty())
    }
}

/// What a [`RequestFacts`] holds at one moment.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct Facts {
    /// The verified token's claims.
    pub claims: Option<VerifiedClaims>,
    /// The client, when known otherwise than from the claims (the token endpoint's client).
    pub client: Option<String>,
    /// The tenant the request is for.
    pub tenant: Option<TenantId>,
    /// The upstream FHIR server's base URL.
    pub upstream: Option<Arc<str>>,
}

impl Facts {
    /// The client: the one set by hand, else the token's
    /// ([`VerifiedClaims::client_id`]).
    pub fn client_id(&self) -> Option<String> {
        if let Some(client) = &self.client {
            return Some(client.clone());
        }
        self.claims.as_ref()?.client_id().map(str::to_owned)
    }

    /// The token's issuer.
    pub fn issuer(&self) -> Option<String> {
        self.claims
            .as_ref()
            .and_then(|c| c.issuer())
            .map(str::to_owned)
    }
}

impl fmt::Debug for Facts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Facts")
            .field("client_id", &self.client_id())
            .field("issuer", &self.issuer())
            .field("tenant", &self.tenant)
            .field("upstream", &self.upstream)
            .finish()
    }
}

impl RequestFacts {
    /// A slot that also keeps the request's parts for the audit record.
    pub(crate) fn with_request(request: RequestParts) -> Self {
        Self {
            inner: Arc::new(Shared {
                facts: Mutex::default(),
                request: Some(request),
            }),
        }
    }

    /// The request's parts, when the slot was made with them.
    pub(crate) fn request(&self) -> Option<&RequestParts> {
        self.inner.request.as_ref()
    }

    fn with(&self, f: impl FnOnce(&mut Facts)) {
        f(&mut self
            .inner
            .facts
            .lock()
            .unwrap_or_else(PoisonError::into_inner));
    }

    /// Reads what has been recorded so far, without copying it.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&Facts) -> R) -> R {
        f(&self
            .inner
            .facts
            .lock()
            .unwrap_or_else(PoisonError::into_inner))
    }

    /// Records the verified claims (the client and issuer are read from them).
    pub fn set_claims(&self, claims: &VerifiedClaims) {
        let claims = claims.clone();
        self.with(|facts| facts.claims = Some(claims));
    }

    /// Records the client by hand (the token endpoint, before any token exists).
    pub fn set_client_id(&self, client: &str) {
        let client = client.to_owned();
        self.with(|facts| facts.client = Some(client));
    }

    /// Records the tenant.
    pub fn set_tenant(&self, tenant: TenantId) {
        self.with(|facts| facts.tenant = Some(tenant));
    }

    /// Records the upstream's base URL.
    pub fn set_upstream(&self, upstream: Arc<str>) {
        self.with(|facts| facts.upstream = Some(upstream));
    }

    /// What has been recorded so far.
    pub fn snapshot(&self) -> Facts {
        self.read(Facts::clone)
    }
}

impl fmt::Debug for RequestFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.snapshot().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_parts_keep_the_id_path_and_query_as_the_request_had_them() {
        let parts = |uri: &str, id: Option<http::HeaderValue>| {
            let uri: http::Uri = uri.parse().unwrap();
            let parts = RequestParts::new(Instant::now(), http::Method::GET, &uri, id.as_ref());
            assert_eq!(parts.path(), uri.path());
            assert_eq!(parts.query(), uri.query().filter(|q| !q.is_empty()));
            (
                parts.request_id().map(str::to_owned),
                parts.path().to_owned(),
                parts.query().map(str::to_owned),
            )
        };
        let id = |bytes: &[u8]| Some(http::HeaderValue::from_bytes(bytes).unwrap());
        assert_eq!(
            parts("/Patient?name=a&b", id(b"r-1")),
            (
                Some("r-1".into()),
                "/Patient".into(),
                Some("name=a&b".into())
            )
        );
        assert_eq!(
            parts("/Patient/1?", None),
            (None, "/Patient/1".into(), None)
        );
        assert_eq!(parts("/", id(b"")), (Some(String::new()), "/".into(), None));
        assert_eq!(
            parts("http://gw.example/fhir/Patient?x", id(b"caf\xe9")),
            (None, "/fhir/Patient".into(), Some("x".into()))
        );
        assert_eq!(parts("*", id(b"r")).1, "*");
    }

    #[test]
    fn the_client_comes_from_the_first_claim_that_names_it() {
        let claims = |json: serde_json::Value| {
            VerifiedClaims::assume_verified(json.as_object().unwrap().clone()).unwrap()
        };
        let facts = RequestFacts::default();
        facts.set_claims(&claims(
            serde_json::json!({"exp": 1, "sub": "s", "azp": "a", "iss": "i"}),
        ));
        let seen = facts.snapshot();
        assert_eq!(seen.client_id().as_deref(), Some("a"));
        assert_eq!(seen.issuer().as_deref(), Some("i"));
        facts.set_claims(&claims(serde_json::json!({"exp": 1, "sub": "s"})));
        assert_eq!(facts.snapshot().client_id().as_deref(), Some("s"));
        facts.set_client_id("by-hand");
        assert_eq!(facts.snapshot().client_id().as_deref(), Some("by-hand"));
        let tenant = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
        facts.clone().set_tenant(tenant);
        assert_eq!(facts.snapshot().tenant, Some(tenant));
    }
}
