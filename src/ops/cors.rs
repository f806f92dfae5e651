//! CORS for browser apps: tower-http's layer with what FHIR clients send and read.

use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderName};
use http::{HeaderValue, Method, Request, Response};
use tower_http::cors::{AllowOrigin, Cors, CorsLayer};
use tower_layer::Layer;
use tower_service::Service;

use super::request_id::{X_REQUEST_ID, X_UPSTREAM_REQUEST_ID};

/// An origin [`fhir_cors`] cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOrigin(pub String);

/// Says what is wrong: for an origin that is one but for upper-case letters or its scheme's
/// default port (which no browser sends, so it would never match), which of those and the
/// origin to write instead; otherwise what an origin looks like.
impl fmt::Display for InvalidOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let origin = &self.0;
        let mut wrong = Vec::new();
        let mut fixed = origin.to_ascii_lowercase();
        if fixed != *origin {
            wrong.push("has upper-case letters".to_owned());
        }
        let default_port = [("https://", ":443"), ("http://", ":80")]
            .into_iter()
            .find(|(scheme, port)| fixed.starts_with(scheme) && fixed.ends_with(port));
        if let Some((_, port)) = default_port {
            fixed.truncate(fixed.len() - port.len());
            wrong.push(format!("gives its scheme's default port ({})", &port[1..]));
        }
        if wrong.is_empty() || !is_origin(&fixed) {
            return write!(
                f,
                "{origin:?} is not an origin (scheme://host[:port], no path, no `*`)"
            );
        }
        write!(
            f,
            "{origin:?} {}: browsers send an origin in lower case and without its scheme's \
             default port, so it would never match; write {fixed:?}",
            wrong.join(" and ")
        )
    }
}

impl std::error::Error for InvalidOrigin {}

/// tower-http's [`CorsLayer`] for a FHIR API used from browsers at `origins`
/// (`https://app.example`, exactly as browsers send them: lower case, no default port).
///
/// Preflight `OPTIONS` requests (with `Origin` and `Access-Control-Request-Method`) are
/// answered by the layer itself, without a token; other requests go on and their responses
/// get `Access-Control-Allow-Origin` when their origin is allowed. An `OPTIONS` that is no
/// preflight (DSTU2's capabilities interaction, `OPTIONS [base]`) goes on as it came: tower-http's
/// layer alone would answer every `OPTIONS` itself. Allowed: FHIR's methods; the request headers `Authorization`, `Content-Type`,
/// `Accept`, `Prefer`, `If-Match`, `If-None-Match`, `If-None-Exist`, `If-Modified-Since` and
/// `X-Request-Id`; the response headers `Location`, `Content-Location`, `ETag`,
/// `Last-Modified`, `X-Request-Id` and `X-Upstream-Request-Id` are exposed. No credentials mode: tokens travel in
/// `Authorization`, not in cookies. Preflights are cached for 10 minutes.
///
/// ```
/// use tower_fhir::ops::fhir_cors;
///
/// let _cors = fhir_cors(["https://app.example"]).unwrap();
/// assert!(fhir_cors(["*"]).is_err());
/// assert!(fhir_cors(["https://app.example/path"]).is_err());
/// // Never what a browser sends: it would never match.
/// assert!(fhir_cors(["https://App.example"]).is_err());
/// assert!(fhir_cors(["https://app.example:443"]).is_err());
/// ```
pub fn fhir_cors<I>(origins: I) -> Result<FhirCorsLayer, InvalidOrigin>
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    let mut allowed = Vec::new();
    for origin in origins {
        let origin = origin.as_ref();
        if !is_origin(origin) {
            return Err(InvalidOrigin(origin.to_owned()));
        }
        let value = HeaderValue::from_str(origin).map_err(|_| InvalidOrigin(origin.to_owned()))?;
        allowed.push(value);
    }
    let cors = CorsLayer::new()
        .allow_origin(AllowOrigin::list(allowed))
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            HeaderName::from_static("prefer"),
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            HeaderName::from_static("if-none-exist"),
            header::IF_MODIFIED_SINCE,
            X_REQUEST_ID,
        ])
        .expose_headers([
            header::LOCATION,
            header::CONTENT_LOCATION,
            header::ETAG,
            header::LAST_MODIFIED,
            X_REQUEST_ID,
            X_UPSTREAM_REQUEST_ID,
        ])
        .max_age(Duration::from_secs(600));
    Ok(FhirCorsLayer { cors })
}

/// `http(s)://host[:port]` as a browser serializes it: lower case, a port only when not the
/// scheme's default (decimal, no leading zero), nothing after.
fn is_origin(origin: &str) -> bool {
    let (rest, default_port) = match (
        origin.strip_prefix("https://"),
        origin.strip_prefix("http://"),
    ) {
        (Some(rest), _) => (rest, "443"),
        (None, Some(rest)) => (rest, "80"),
        (None, None) => return false,
    };
    // An IPv6 host is bracketed; any other holds no `:`.
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((address, after)) if address.parse::<std::net::Ipv6Addr>().is_ok() => {
                (address, after)
            }
            _ => return false,
        },
        None => rest.split_at(rest.find(':').unwrap_or(rest.len())),
    };
    let host_ok = rest.starts_with('[')
        || (!host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-')));
    let port_ok = match port.strip_prefix(':') {
        None => port.is_empty(),
        Some(port) => {
            !port.is_empty()
                && !port.starts_with('0')
                && port.parse::<u16>().is_ok()
                && port != default_port
        }
    };
    host_ok && port_ok
}

/// The layer [`fhir_cors`] makes: tower-http's [`CorsLayer`], its preflight answer given only
/// to preflights.
#[derive(Debug, Clone)]
#[must_use]
pub struct FhirCorsLayer {
    cors: CorsLayer,
}

impl FhirCorsLayer {
    /// Adjusts the tower-http layer inside (credentials, more headers, another max age).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_fhir::ops::fhir_cors;
    ///
    /// let _cors = fhir_cors(["https://app.example"]).unwrap().map(|cors| cors.max_age(Duration::from_secs(60)));
    /// ```
    pub fn map(self, adjust: impl FnOnce(CorsLayer) -> CorsLayer) -> Self {
        Self {
            cors: adjust(self.cors),
        }
    }
}

impl<S> Layer<S> for FhirCorsLayer {
    type Service = FhirCors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FhirCors {
            cors: self.cors.layer(Restore { inner }),
        }
    }
}

/// The service [`FhirCorsLayer`] makes.
#[derive(Debug, Clone)]
pub struct FhirCors<S> {
    cors: Cors<Restore<S>>,
}

/// Marks a request that came as an `OPTIONS` but is no preflight: it passes tower-http's layer
/// as a `GET` (which gets the headers of an actual CORS request), and [`Restore`] makes it an
/// `OPTIONS` again.
#[derive(Clone, Copy)]
struct NoPreflight;

/// Gives an `OPTIONS` that is no preflight its method back (see [`NoPreflight`]).
#[derive(Debug, Clone)]
pub(crate) struct Restore<S> {
    inner: S,
}

impl<S, ReqBody> Service<Request<ReqBody>> for Restore<S>
where
    S: Service<Request<ReqBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        if request.extensions_mut().remove::<NoPreflight>().is_some() {
            *request.method_mut() = Method::OPTIONS;
        }
        self.inner.call(request)
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for FhirCors<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Default,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = tower_http::cors::ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.cors.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let headers = request.headers();
        let preflight = headers.contains_key(header::ORIGIN)
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if request.method() == Method::OPTIONS && !preflight {
            *request.method_mut() = Method::GET;
            request.extensions_mut().insert(NoPreflight);
        }
        self.cors.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response, StatusCode};
    use std::convert::Infallible;
    use tower::{Layer, ServiceExt};

    #[tokio::test]
    async fn a_preflight_is_answered_and_the_origin_allowed_only_when_listed() {
        let cors = fhir_cors(["https://app.example"]).unwrap();
        let service = cors.layer(tower::service_fn(|_r: Request<()>| async {
            Ok::<_, Infallible>(Response::builder().status(401).body(()).unwrap())
        }));
        let preflight = |origin: &str| {
            Request::options("/Patient/1")
                .header("origin", origin)
                .header("access-control-request-method", "GET")
                .header("access-control-request-headers", "authorization")
                .body(())
                .unwrap()
        };
        let allowed = service
            .clone()
            .oneshot(preflight("https://app.example"))
            .await
            .unwrap();
        assert_eq!(allowed.status(), StatusCode::OK);
        assert_eq!(
            allowed.headers()["access-control-allow-origin"],
            "https://app.example"
        );
        let other = service
            .clone()
            .oneshot(preflight("https://evil.example"))
            .await
            .unwrap();
        assert!(other.headers().get("access-control-allow-origin").is_none());
        let plain = Request::get("/Patient/1")
            .header("origin", "https://app.example")
            .body(())
            .unwrap();
        let answered = service.oneshot(plain).await.unwrap();
        assert_eq!(
            answered.status(),
            StatusCode::UNAUTHORIZED,
            "not a preflight: goes on"
        );
        assert!(answered.headers()["access-control-expose-headers"]
            .to_str()
            .unwrap()
            .contains("x-request-id"));
    }

    #[tokio::test]
    async fn an_options_that_is_no_preflight_goes_on_as_an_options() {
        let cors = fhir_cors(["https://app.example"]).unwrap();
        let service = cors.layer(tower::service_fn(|r: Request<()>| async move {
            let status = if r.method() == Method::OPTIONS {
                401
            } else {
                500
            };
            Ok::<_, Infallible>(Response::builder().status(status).body(()).unwrap())
        }));
        for (origin, method) in [
            (None, None),
            (Some("https://app.example"), None),
            (Some("https://evil.example"), None),
            (None, Some("GET")),
        ] {
            let mut request = Request::options("/");
            if let Some(origin) = origin {
                request = request.header("origin", origin);
            }
            if let Some(method) = method {
                request = request.header("access-control-request-method", method);
            }
            let answered = service
                .clone()
                .oneshot(request.body(()).unwrap())
                .await
                .unwrap();
            assert_eq!(
                answered.status(),
                StatusCode::UNAUTHORIZED,
                "{origin:?} {method:?}"
            );
            let headers = answered.headers();
            assert!(headers.get("access-control-allow-methods").is_none());
            // An allowed origin's actual OPTIONS may read the answer, as its GET may.
            let allowed = headers.get("access-control-allow-origin");
            if origin == Some("https://app.example") {
                assert_eq!(allowed.unwrap(), "https://app.example");
                let exposed = headers["access-control-expose-headers"].to_str().unwrap();
                assert!(exposed.contains("x-upstream-request-id"), "{exposed}");
            } else {
                assert!(allowed.is_none(), "{origin:?}");
            }
        }
    }

    #[test]
    fn origins_are_checked() {
        for bad in [
            "",
            "*",
            "app.example",
            "https://",
            "https://a/b",
            "ftp://a",
            "https://a b",
            "https://App.example",
            "HTTPS://app.example",
            "https://app.example:443",
            "http://app.example:80",
            "https://a:",
            "https://a:1:2",
            "https://:8080",
            "https://a:0443",
            "https://a:65536",
            "https://[::1",
            "https://[zz]:1",
            "https://[::1]x",
        ] {
            assert!(fhir_cors([bad]).is_err(), "{bad}");
        }
        assert!(fhir_cors(["https://app.example:80", "http://app.example:443"]).is_ok());
        assert!(fhir_cors(["http://127.0.0.1:8080", "https://[::1]", "https://a-b.c"]).is_ok());
        assert!(fhir_cors(["http://localhost:3000", "https://[::1]:8443"]).is_ok());
    }

    #[test]
    fn a_refused_origin_says_what_is_wrong_with_it() {
        let said = |origin: &str| fhir_cors([origin]).err().unwrap().to_string();
        let rule = "browsers send an origin in lower case and without its scheme's default \
                    port, so it would never match";
        for (origin, wrong, fixed) in [
            (
                "https://App.example",
                "has upper-case letters",
                "https://app.example",
            ),
            (
                "HTTPS://app.example",
                "has upper-case letters",
                "https://app.example",
            ),
            (
                "https://app.example:443",
                "gives its scheme's default port (443)",
                "https://app.example",
            ),
            (
                "http://[::1]:80",
                "gives its scheme's default port (80)",
                "http://[::1]",
            ),
            (
                "HTTP://App.example:80",
                "has upper-case letters and gives its scheme's default port (80)",
                "http://app.example",
            ),
        ] {
            assert_eq!(
                said(origin),
                format!("{origin:?} {wrong}: {rule}; write {fixed:?}")
            );
        }
        // Anything else is not an origin at all, or not only for those reasons.
        for origin in ["https://App.example/path", "*", "https://a:0443", "ftp://A"] {
            assert_eq!(
                said(origin),
                format!("{origin:?} is not an origin (scheme://host[:port], no path, no `*`)")
            );
        }
    }
}
