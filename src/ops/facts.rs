//! What the layers learn about a request, for the audit record and metrics written after it.

use std::cell::RefCell;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::auth::VerifiedClaims;
use crate::tenant::TenantId;

/// What the gateway's layers learn about the request being served, as they learn it: the
/// verified claims, the tenant, the upstream.
///
/// The [`ObserveLayer`](super::ObserveLayer) keeps the [`Facts`] of each request it watches and
/// makes them the current request's on the thread while the inner service's `call` runs and
/// each time its response future is polled; it reads them when the response is ready. The
/// tenant, routing and token layers fill them with the functions here, and so may a layer or
/// handler of your own, from the request's `call` or its future. Facts set on another task are
/// not seen: one the handler spawns, or the worker of a `tower::buffer::Buffer` (or any
/// middleware that hands requests to another task) between the `ObserveLayer` and the layers
/// that set them; put such middleware outside the `ObserveLayer`. With no `ObserveLayer`
/// watching (or nothing for it to record) they do nothing.
///
/// The facts are the request's own, not shared between threads: no lock and no reference
/// count of their own (the claims and upstream they record are `Arc`s, each counted once).
///
/// ```
/// use tower_fhir::ops::{Facts, RequestFacts};
///
/// // Outside a watched request: nothing is recorded.
/// RequestFacts::set_client_id("app");
/// assert!(RequestFacts::snapshot().is_none());
///
/// let mut facts = Facts::default();
/// RequestFacts::watching(&mut facts, || RequestFacts::set_client_id("app"));
/// assert_eq!(facts.client_id().as_deref(), Some("app"));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct RequestFacts;

/// The facts of the request whose `call` or `poll` runs on this thread, when `watched`.
struct Current {
    watched: bool,
    facts: Facts,
}

thread_local! {
    static CURRENT: RefCell<Current> = const {
        RefCell::new(Current {
            watched: false,
            facts: Facts {
                claims: None,
                client: None,
                issuer: None,
                tenant: None,
                upstream: None,
            },
        })
    };
}

/// What [`RequestFacts::watching`] puts back when its call returns or unwinds: the facts of
/// the request watched further out (or none) to the thread, the caller's with what was
/// recorded to it. (Swapped, both ways: nothing is dropped or copied.)
struct Restore<'a> {
    facts: &'a mut Facts,
    outer_watched: bool,
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let _ = CURRENT.try_with(|current| {
            if let Ok(mut current) = current.try_borrow_mut() {
                std::mem::swap(&mut current.facts, self.facts);
                current.watched = self.outer_watched;
            }
        });
    }
}

impl RequestFacts {
    /// Runs `f` with `facts` as the current request's, then puts them back with what `f`
    /// recorded (also when `f` panics). Calls nest: inside, the innermost watch is current.
    /// The [`ObserveLayer`](super::ObserveLayer) does this around each `call` and `poll`.
    pub fn watching<R>(facts: &mut Facts, f: impl FnOnce() -> R) -> R {
        // While `f` runs, `facts` holds the outer request's (swapped out of the thread's).
        let installed = CURRENT.try_with(|current| {
            let mut current = current.try_borrow_mut().ok()?;
            std::mem::swap(&mut current.facts, facts);
            Some(std::mem::replace(&mut current.watched, true))
        });
        match installed {
            Ok(Some(outer_watched)) => {
                let _restore = Restore {
                    facts,
                    outer_watched,
                };
                f()
            }
            // The thread's storage is being torn down (or in use, which the functions here
            // never leave it): `f` runs unwatched.
            _ => f(),
        }
    }

    /// Whether a request is watched on this thread now (so what it would record is wanted).
    pub fn is_watched() -> bool {
        CURRENT
            .try_with(|current| current.try_borrow().is_ok_and(|current| current.watched))
            .unwrap_or(false)
    }

    fn with(f: impl FnOnce(&mut Facts)) {
        let _ = CURRENT.try_with(|current| {
            if let Ok(mut current) = current.try_borrow_mut() {
                if current.watched {
                    f(&mut current.facts);
                }
            }
        });
    }

    /// Records the verified claims (the client and issuer are read from them).
    pub fn set_claims(claims: &VerifiedClaims) {
        Self::with(|facts| facts.claims = Some(claims.clone()));
    }

    /// Records the client by hand (the token endpoint, before any token exists).
    pub fn set_client_id(client: &str) {
        Self::with(|facts| facts.client = Some(client.to_owned()));
    }

    /// Records the issuer by hand (the token endpoint's own, for a token request).
    pub fn set_issuer(issuer: &str) {
        Self::with(|facts| facts.issuer = Some(Arc::from(issuer)));
    }

    /// Records the tenant.
    pub fn set_tenant(tenant: TenantId) {
        Self::with(|facts| facts.tenant = Some(tenant));
    }

    /// Records the upstream's base URL.
    pub fn set_upstream(upstream: &Arc<str>) {
        Self::with(|facts| facts.upstream = Some(Arc::clone(upstream)));
    }

    /// What has been recorded so far for the current request, if one is watched.
    pub fn snapshot() -> Option<Facts> {
        CURRENT
            .try_with(|current| {
                let current = current.try_borrow().ok()?;
                current.watched.then(|| current.facts.clone())
            })
            .ok()
            .flatten()
    }
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
    /// Where the request came from (see [`AuditRecord::client_address`]).
    ///
    /// [`AuditRecord::client_address`]: super::AuditRecord::client_address
    pub(crate) client_address: Option<IpAddr>,
    /// The request id (when it is text), the path, then the query, one after the other.
    text: Box<str>,
    /// Where the request id ends (`None`: no request id) and where the path does.
    id_end: Option<usize>,
    path_end: usize,
    /// Whether the request id needs no escape in a JSON string (what the request-id layer
    /// makes or keeps never does; an id from elsewhere may).
    id_clean: bool,
}

impl RequestParts {
    pub(crate) fn new(
        start: Instant,
        method: http::Method,
        client_address: Option<IpAddr>,
        uri: &http::Uri,
        request_id: Option<&http::HeaderValue>,
    ) -> Self {
        let (id, id_clean) = match request_id.and_then(id_text) {
            Some((id, clean)) => (Some(id), clean),
            None => (None, false),
        };
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
            client_address: client_address.map(|ip| ip.to_canonical()),
            text: text.into_boxed_str(),
            id_end,
            path_end,
            id_clean,
        }
    }

    /// The request id, when the request had one that is text.
    pub(crate) fn request_id(&self) -> Option<&str> {
        Some(&self.text[..self.id_end?])
    }

    /// Whether the request id needs no escape in a JSON string (`false` without one).
    pub(crate) fn request_id_is_clean(&self) -> bool {
        self.id_clean
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

/// A request id as text (what [`HeaderValue::to_str`](http::HeaderValue::to_str) takes), and
/// whether it needs no escape in a JSON string: both from one scan when it is printable ASCII
/// with no `"` or `\`, as every id the request-id layer makes or keeps is.
fn id_text(id: &http::HeaderValue) -> Option<(&str, bool)> {
    let bytes = id.as_bytes();
    if super::audit::is_plain_ascii(bytes) {
        // (Printable ASCII: `to_str` would take it, and so does the quicker UTF-8 check.)
        return std::str::from_utf8(bytes).ok().map(|id| (id, true));
    }
    // Text if it is visible ASCII and tabs: not plain, it then has a tab, `"` or `\`, which
    // need an escape.
    id.to_str().ok().map(|id| (id, false))
}

/// What the layers learned about one request (see [`RequestFacts`]).
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct Facts {
    /// The verified token's claims.
    pub claims: Option<VerifiedClaims>,
    /// The client, when known otherwise than from the claims (the token endpoint's client).
    pub client: Option<String>,
    /// The issuer, when known otherwise than from the claims (the token endpoint's own).
    pub issuer: Option<Arc<str>>,
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

    /// The issuer: the one set by hand, else the token's.
    pub fn issuer(&self) -> Option<String> {
        if let Some(issuer) = &self.issuer {
            return Some(issuer.to_string());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_parts_keep_the_id_path_and_query_as_the_request_had_them() {
        let parts = |uri: &str, id: Option<http::HeaderValue>| {
            let uri: http::Uri = uri.parse().unwrap();
            let parts =
                RequestParts::new(Instant::now(), http::Method::GET, None, &uri, id.as_ref());
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
        // Whether the id needs no escape in a JSON string.
        let clean = |id: Option<&[u8]>| {
            let uri: http::Uri = "/".parse().unwrap();
            let id = id.map(|id| http::HeaderValue::from_bytes(id).unwrap());
            let parts =
                RequestParts::new(Instant::now(), http::Method::GET, None, &uri, id.as_ref());
            (
                parts.request_id().map(str::to_owned),
                parts.request_id_is_clean(),
            )
        };
        assert_eq!(clean(Some(b"r-1")), (Some("r-1".into()), true));
        assert_eq!(clean(Some(b"")), (Some(String::new()), true));
        let uuid = "0f6c2e8a-3b4c-4d5e-9f1a-2b3c4d5e6f70";
        assert_eq!(clean(Some(uuid.as_bytes())), (Some(uuid.into()), true));
        assert_eq!(clean(Some(b"a b~{}")), (Some("a b~{}".into()), true));
        for escaped in ["a\"b", "a\tb", "a\\b", "a-longer-id-with-a-\""] {
            assert_eq!(
                clean(Some(escaped.as_bytes())),
                (Some(escaped.into()), false)
            );
        }
        assert_eq!(clean(Some(b"caf\xe9")), (None, false));
        assert_eq!(clean(None), (None, false));
    }

    #[test]
    fn the_client_comes_from_the_first_claim_that_names_it() {
        let claims = |json: serde_json::Value| {
            VerifiedClaims::assume_verified(json.as_object().unwrap().clone()).unwrap()
        };
        let mut facts = Facts::default();
        RequestFacts::watching(&mut facts, || {
            RequestFacts::set_claims(&claims(
                serde_json::json!({"exp": 1, "sub": "s", "azp": "a", "iss": "i"}),
            ));
            let seen = RequestFacts::snapshot().unwrap();
            assert_eq!(seen.client_id().as_deref(), Some("a"));
            assert_eq!(seen.issuer().as_deref(), Some("i"));
            RequestFacts::set_claims(&claims(serde_json::json!({"exp": 1, "sub": "s"})));
            assert_eq!(
                RequestFacts::snapshot().unwrap().client_id().as_deref(),
                Some("s")
            );
            RequestFacts::set_client_id("by-hand");
        });
        assert_eq!(facts.client_id().as_deref(), Some("by-hand"));
        let tenant = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
        RequestFacts::watching(&mut facts, || RequestFacts::set_tenant(tenant));
        assert_eq!(facts.tenant, Some(tenant));
        assert_eq!(facts.client_id().as_deref(), Some("by-hand"), "kept");
    }

    #[test]
    fn watches_nest_and_each_request_gets_its_own_facts_back_also_after_a_panic() {
        let tenant =
            |n: u8| TenantId::parse(&format!("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e{n:02x}")).unwrap();
        let (mut outer, mut inner) = (Facts::default(), Facts::default());
        assert!(!RequestFacts::is_watched());
        RequestFacts::watching(&mut outer, || {
            assert!(RequestFacts::is_watched());
            RequestFacts::set_tenant(tenant(1));
            RequestFacts::watching(&mut inner, || RequestFacts::set_tenant(tenant(2)));
            RequestFacts::set_client_id("outer");
        });
        assert_eq!(
            (outer.tenant, outer.client.as_deref()),
            (Some(tenant(1)), Some("outer"))
        );
        assert_eq!((inner.tenant, inner.client), (Some(tenant(2)), None));
        assert!(!RequestFacts::is_watched());

        let mut failing = Facts::default();
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            RequestFacts::watching(&mut failing, || {
                RequestFacts::set_tenant(tenant(3));
                panic!("an inner layer's bug");
            })
        }));
        assert!(panicked.is_err());
        assert_eq!(failing.tenant, Some(tenant(3)), "recorded before the panic");
        assert!(
            !RequestFacts::is_watched(),
            "the thread watches nothing after it"
        );
        RequestFacts::set_tenant(tenant(4));
        assert_eq!(failing.tenant, Some(tenant(3)));
    }
}
