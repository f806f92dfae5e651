//! The HTTP client connector shared by the JWKS fetcher and the proxy: plain HTTP, or with the
//! `tls` feature, HTTPS through rustls as well.

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;

/// The connector type: `HttpConnector`, wrapped in rustls with the `tls` feature.
#[cfg(feature = "tls")]
pub(crate) type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
/// The connector type: `HttpConnector`, wrapped in rustls with the `tls` feature.
#[cfg(not(feature = "tls"))]
pub(crate) type Connector = HttpConnector;

/// Whether this build can reach `https://` URLs.
#[cfg(feature = "remote-jwks")]
pub(crate) const HTTPS: bool = cfg!(feature = "tls");

/// A plain-HTTP connector with this connect timeout, `TCP_NODELAY` set.
pub(crate) fn http_connector(connect_timeout: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect_timeout));
    http.set_nodelay(true);
    http
}

/// A connector with this connect timeout, trusting the webpki roots and `extra_roots` (PEM
/// certificates) with the `tls` feature.
pub(crate) fn connector(
    connect_timeout: Duration,
    extra_roots: &[Vec<u8>],
) -> Result<Connector, String> {
    #[cfg_attr(not(feature = "tls"), allow(unused_mut))]
    let mut http = http_connector(connect_timeout);
    #[cfg(feature = "tls")]
    {
        http.enforce_http(false);
        let config = crate::tls_client::client_config(extra_roots)?;
        Ok(hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http))
    }
    #[cfg(not(feature = "tls"))]
    {
        if !extra_roots.is_empty() {
            return Err("root certificates need the `tls` feature".to_owned());
        }
        Ok(http)
    }
}
