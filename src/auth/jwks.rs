//! A JWKS document fetched over HTTP with the hyper-util client.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::keys::KeySet;
use super::source::{FetchedKeys, KeySource, KeySourceError, KeySourceFuture};
use crate::client::{connector, Connector, HTTPS};

/// The largest JWKS document accepted; real ones are a few kilobytes.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// A [`KeySource`] that GETs a JWKS document from a URL.
///
/// Answers other than `200` with a JWKS body are errors (the last good keys stay in use);
/// `Cache-Control: max-age` is passed on so the layer refreshes when the server says to.
#[derive(Clone)]
pub struct HttpJwks {
    uri: Uri,
    client: Client<Connector, Empty<Bytes>>,
}

impl HttpJwks {
    /// A source for this URL: `https://` with the `tls` feature, or `http://` to a loopback
    /// host (a local identity provider; elsewhere anyone on the path could swap the keys).
    /// Other URLs are refused here, not at the first request. HMAC (`oct`) entries are never
    /// taken from a fetched JWKS.
    pub fn new(url: &str) -> Result<Self, InvalidJwksUrl> {
        Self::with_roots(url, &[])
    }

    /// A source for this URL that also trusts these PEM root certificates (a private CA). A
    /// PEM document that is broken or holds no certificate is refused.
    pub fn with_roots(
        url: &str,
        root_certificates_pem: &[Vec<u8>],
    ) -> Result<Self, InvalidJwksUrl> {
        let uri: Uri = url.parse().map_err(|_| InvalidJwksUrl(url.to_owned()))?;
        let scheme_ok = match uri.scheme_str() {
            // Keys over plain HTTP can be swapped by anyone on the path: loopback only.
            Some("http") => uri.host().is_some_and(is_loopback),
            Some("https") => HTTPS,
            _ => false,
        };
        // Credentials in the URL would be sent as part of its authority and written into
        // every log line that names the URL.
        let credentials = uri.authority().is_some_and(|a| a.as_str().contains('@'));
        if !scheme_ok || uri.host().is_none() || credentials {
            return Err(InvalidJwksUrl(url.to_owned()));
        }
        let connector = connector(Duration::from_secs(5), root_certificates_pem)
            .map_err(|_| InvalidJwksUrl(url.to_owned()))?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self { uri, client })
    }

    /// The URL fetched.
    pub fn url(&self) -> &Uri {
        &self.uri
    }

    async fn get(
        client: Client<Connector, Empty<Bytes>>,
        uri: Uri,
    ) -> Result<FetchedKeys, KeySourceError> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(uri.clone())
            .header(header::ACCEPT, "application/jwk-set+json, application/json")
            .body(Empty::new())
            .map_err(|e| KeySourceError::new(format!("JWKS request for {}: {e}", shown(&uri))))?;
        let response = client.request(request).await.map_err(|e| {
            KeySourceError::new(format!("JWKS fetch from {} failed: {e}", shown(&uri)))
        })?;
        let status = response.status();
        let max_age = max_age(response.headers());
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| KeySourceError::new(format!("JWKS body from {}: {e}", shown(&uri))))?
            .to_bytes();
        if status != StatusCode::OK {
            return Err(KeySourceError::new(format!(
                "JWKS fetch from {}: status {status}",
                shown(&uri)
            )));
        }
        // A JWKS is public: an HMAC secret published in one would let anyone sign tokens.
        let keys = KeySet::from_public_jwks(&body)
            .map_err(|e| KeySourceError::new(format!("JWKS from {}: {e}", shown(&uri))))?;
        Ok(FetchedKeys { keys, max_age })
    }
}

impl KeySource for HttpJwks {
    fn fetch(&self) -> KeySourceFuture {
        Box::pin(Self::get(self.client.clone(), self.uri.clone()))
    }
}

impl fmt::Debug for HttpJwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpJwks")
            .field("uri", &shown(&self.uri))
            .finish()
    }
}

/// A JWKS URL keys may not be fetched from: not absolute, `http://` to another host than a
/// loopback address, `https://` without the `tls` feature, or with credentials. Shown (by
/// `Display` and `Debug`) without credentials or query: see [`redacted_url`](Self::redacted_url).
#[derive(Clone, PartialEq, Eq)]
pub struct InvalidJwksUrl(pub String);

impl InvalidJwksUrl {
    /// The URL as errors and logs may name it: credentials before the host and the query
    /// replaced by `<redacted>` (everything up to its last `@` counts as credentials).
    pub fn redacted_url(&self) -> String {
        redacted(&self.0)
    }
}

impl fmt::Debug for InvalidJwksUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("InvalidJwksUrl")
            .field(&self.redacted_url())
            .finish()
    }
}

impl fmt::Display for InvalidJwksUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not a JWKS URL keys may be fetched from: an absolute https:// URL (with the `tls` feature), or http:// to a loopback address only (keys over plain HTTP elsewhere could be swapped on the way), with no credentials in it: {:?}",
            redacted(&self.0)
        )
    }
}

impl std::error::Error for InvalidJwksUrl {}

/// `uri` as logs and errors name it: [`redacted`].
fn shown(uri: &Uri) -> String {
    redacted(&uri.to_string())
}

/// A URL as logs and errors may show it: credentials before its host (`user:password@`) and
/// its query or fragment (which may carry a token) replaced by `<redacted>`. Everything up to
/// the last `@` counts as credentials, wherever it is: a password with an unencoded `/` or
/// `?` (which does not parse as one) is not shown either, at the price of a path with an `@`
/// shown shorter.
fn redacted(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let (credentials, rest) = match rest.rfind('@') {
        Some(at) => ("<redacted>@", &rest[at + 1..]),
        None => ("", rest),
    };
    let (rest, query) = match rest.find(['?', '#']) {
        Some(at) => (&rest[..at], "?<redacted>"),
        None => (rest, ""),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{credentials}{rest}{query}"),
        None => format!("{credentials}{rest}{query}"),
    }
}

/// Whether a URL host is this machine.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `Cache-Control: max-age` (`no-cache`/`no-store` count as zero).
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    let mut found = None;
    for value in headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v: &HeaderValue| v.to_str().ok())
    {
        for directive in value.split(',').map(str::trim) {
            let (name, arg) = directive.split_once('=').unwrap_or((directive, ""));
            if name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("no-cache") {
                return Some(Duration::ZERO);
            }
            if name.eq_ignore_ascii_case("max-age") {
                found = arg.trim_matches('"').parse().ok().map(Duration::from_secs);
            }
        }
    }
    found
}

/// A JWKS URL's keys fetched and cached outside any bearer layer (the token endpoint's
/// `private_key_jwt` clients registered with a `jwks_uri`): refreshed every 5 minutes (or the
/// document's max-age, an hour at most), fetched again for an unknown `kid` at most every 30 s,
/// the last good keys kept while the URL fails, for a day at most.
#[cfg(feature = "token")]
pub(crate) struct RemoteKeys(std::sync::Arc<super::source::RefreshingKeys>);

#[cfg(feature = "token")]
impl RemoteKeys {
    pub(crate) fn new(url: &str) -> Result<Self, InvalidJwksUrl> {
        let source = HttpJwks::new(url)?;
        let policy = super::source::RefreshPolicy {
            interval: std::time::Duration::from_secs(300),
            cooldown: std::time::Duration::from_secs(30),
            max_age_cap: std::time::Duration::from_secs(3_600),
            max_key_age: std::time::Duration::from_secs(86_400),
            timeout: std::time::Duration::from_secs(5),
        };
        Ok(Self(std::sync::Arc::new(
            super::source::RefreshingKeys::new(Box::new(source), policy),
        )))
    }

    /// The keys, fetched first if they never were.
    pub(crate) async fn current(&self) -> std::sync::Arc<super::KeySet> {
        self.0.refresh_if_due();
        if !self.0.has_fetched() {
            if let Some(fetch) = self.0.fetch(super::source::Trigger::Cold) {
                let _ = fetch.await;
            }
        }
        self.0.current()
    }

    /// The keys after a fetch for an unknown `kid` (when the cooldown allows one).
    pub(crate) async fn refetch(&self) -> std::sync::Arc<super::KeySet> {
        if let Some(fetch) = self.0.fetch(super::source::Trigger::UnknownKid) {
            let _ = fetch.await;
        }
        self.0.current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(header::CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn reads_max_age() {
        assert_eq!(
            max_age(&headers(&["public, max-age=600"])),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            max_age(&headers(&["Max-Age=\"60\""])),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            max_age(&headers(&["public", "max-age=5"])),
            Some(Duration::from_secs(5))
        );
        assert_eq!(max_age(&headers(&["no-store"])), Some(Duration::ZERO));
        assert_eq!(max_age(&headers(&["max-age=soon"])), None);
        assert_eq!(max_age(&headers(&[])), None);
    }

    #[test]
    fn only_http_urls() {
        assert!(HttpJwks::new("http://127.0.0.1:1/jwks").is_ok());
        assert!(HttpJwks::new("http://localhost:1/jwks").is_ok());
        assert!(HttpJwks::new("http://[::1]:1/jwks").is_ok());
        assert!(
            HttpJwks::new("http://idp.example/jwks").is_err(),
            "plain HTTP off loopback"
        );
        assert_eq!(
            HttpJwks::new("https://idp.example/jwks").is_ok(),
            cfg!(feature = "tls")
        );
        assert!(HttpJwks::new("/jwks").is_err());
        assert!(HttpJwks::new("not a url").is_err());
    }

    /// Credentials in a JWKS URL are refused (they would go out in its authority and into
    /// every log line naming it), and the refusal does not repeat them.
    #[test]
    fn credentials_in_the_url_are_refused_and_not_repeated() {
        let Err(refused) = HttpJwks::new("http://user:s3cret@127.0.0.1:1/jwks?token=t0ken") else {
            panic!("credentials accepted");
        };
        let said = refused.to_string();
        assert!(
            !said.contains("s3cret") && !said.contains("t0ken"),
            "{said}"
        );
        let debugged = format!("{refused:?}");
        assert!(
            !debugged.contains("s3cret") && !debugged.contains("t0ken"),
            "{debugged}"
        );
        assert!(
            said.contains("http://<redacted>@127.0.0.1:1/jwks?<redacted>"),
            "{said}"
        );
        assert!(HttpJwks::new("http://127.0.0.1:1/jwks?tenant=a").is_ok());
    }

    #[test]
    fn redacted_urls_keep_where_they_point_and_drop_secrets() {
        for (url, shown) in [
            ("https://idp.example/keys", "https://idp.example/keys"),
            (
                "https://u:p@idp.example:8443/keys",
                "https://<redacted>@idp.example:8443/keys",
            ),
            (
                "https://idp.example/keys?sig=abc",
                "https://idp.example/keys?<redacted>",
            ),
            ("https://idp.example/a@b", "https://<redacted>@b"),
            ("u:p@host/x?y", "<redacted>@host/x?<redacted>"),
            // Passwords that do not parse as one.
            ("https://user:pa/ss@idp/keys", "https://<redacted>@idp/keys"),
            ("https://user:pa?ss@idp/keys", "https://<redacted>@idp/keys"),
            ("https://user:pa#ss@idp/keys", "https://<redacted>@idp/keys"),
            ("https://idp/keys#frag", "https://idp/keys?<redacted>"),
        ] {
            assert_eq!(redacted(url), shown, "{url}");
        }
    }

    /// A fetch that fails names the URL without its query.
    #[tokio::test]
    async fn a_failed_fetch_names_the_url_without_its_query() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let jwks = HttpJwks::new(&format!("http://127.0.0.1:{port}/jwks?token=t0ken")).unwrap();
        let Err(error) = jwks.fetch().await else {
            panic!("fetched from a closed port");
        };
        let said = error.to_string();
        assert!(!said.contains("t0ken"), "{said}");
        assert!(
            said.contains(&format!("127.0.0.1:{port}/jwks?<redacted>")),
            "{said}"
        );
    }
}
