//! CORS for browser apps: tower-http's layer with what FHIR clients send and read.

use std::fmt;
use std::time::Duration;

use http::header::{self, HeaderName};
use http::{HeaderValue, Method};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::request_id::X_REQUEST_ID;

/// An origin [`fhir_cors`] cannot use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOrigin(pub String);

impl fmt::Display for InvalidOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not an origin (scheme://host[:port], no path, no `*`)",
            self.0
        )
    }
}

impl std::error::Error for InvalidOrigin {}

/// tower-http's [`CorsLayer`] for a FHIR API used from browsers at `origins`
/// (`https://app.example`, exactly as browsers send them).
///
/// Preflight `OPTIONS` requests are answered by the layer itself, without a token; other
/// requests go on and their responses get `Access-Control-Allow-Origin` when their origin is
/// allowed. Allowed: FHIR's methods; the request headers `Authorization`, `Content-Type`,
/// `Accept`, `Prefer`, `If-Match`, `If-None-Match`, `If-None-Exist`, `If-Modified-Since` and
/// `X-Request-Id`; the response headers `Location`, `Content-Location`, `ETag`,
/// `Last-Modified` and `X-Request-Id` are exposed. No credentials mode: tokens travel in
/// `Authorization`, not in cookies. Preflights are cached for 10 minutes.
///
/// ```
/// use tower_fhir::ops::fhir_cors;
///
/// let _cors = fhir_cors(["https://app.example"]).unwrap();
/// assert!(fhir_cors(["*"]).is_err());
/// assert!(fhir_cors(["https://app.example/path"]).is_err());
/// ```
pub fn fhir_cors<I>(origins: I) -> Result<CorsLayer, InvalidOrigin>
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
    Ok(CorsLayer::new()
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
        ])
        .max_age(Duration::from_secs(600)))
}

/// `http(s)://host[:port]`, nothing after.
fn is_origin(origin: &str) -> bool {
    let Some(rest) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return false;
    };
    !rest.is_empty()
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
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
        ] {
            assert!(fhir_cors([bad]).is_err(), "{bad}");
        }
        assert!(fhir_cors(["http://localhost:3000", "https://[::1]:8443"]).is_ok());
    }
}
