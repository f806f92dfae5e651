//! TLS for the database's connections: rustls (aws-lc-rs), the server's certificate checked
//! against the webpki roots (Mozilla's) and any root certificates given, for the host name
//! the URL names.
//!
//! Which connections are encrypted follows the URL's `sslmode` when it says `disable` or
//! `require`; otherwise (none, or `prefer`, whose fall-back to clear text anyone in the path
//! could force) where the database is: a host beyond loopback gets `require` (TLS, or no
//! connection: a password and every tenant's record must not cross a network in clear), a
//! loopback address, `localhost` or a Unix socket gets `disable` (nothing crosses a network;
//! a local server's certificate is often a self-signed one no client could check).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// Makes the TLS session of each connection (see the [module docs](self)).
#[derive(Clone)]
pub(crate) struct PgTls {
    config: Arc<rustls::ClientConfig>,
}

impl PgTls {
    /// Trusting the webpki roots and `extra_roots` (PEM certificates).
    pub(crate) fn new(extra_roots: &[Vec<u8>]) -> Result<Self, String> {
        Ok(Self {
            config: Arc::new(crate::tls_client::client_config(extra_roots)?),
        })
    }
}

/// Sets `config`'s `sslmode` where it is `prefer` (tokio-postgres's default, so also where the
/// URL names none): `require` for a host beyond loopback, `disable` for loopback,
/// `localhost` and Unix sockets (see the [module docs](self)). An explicit `disable` or
/// `require` is kept.
pub(crate) fn default_ssl_mode(config: &mut tokio_postgres::Config) {
    if config.get_ssl_mode() != SslMode::Prefer {
        return;
    }
    let local = config.get_hosts().iter().all(|host| match host {
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        #[cfg(unix)]
        Host::Unix(_) => true,
    }) && !config.get_hostaddrs().iter().any(|ip| !ip.is_loopback());
    config.ssl_mode(if local {
        SslMode::Disable
    } else {
        SslMode::Require
    });
}

impl<S> MakeTlsConnect<S> for PgTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type TlsConnect = PgTlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<PgTlsConnect, io::Error> {
        // Asked for every connection, TLS or not: a Unix socket or a `hostaddr` alone names
        // no host (""), which matters only if TLS is then made (and tokio-postgres makes
        // none without a host name: such a connection with `require` fails, as it must).
        let name = (!domain.is_empty())
            .then(|| ServerName::try_from(domain.to_owned()))
            .transpose()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(PgTlsConnect {
            connector: tokio_rustls::TlsConnector::from(Arc::clone(&self.config)),
            name,
        })
    }
}

/// The TLS handshake of one connection, for the host name it was made for.
pub(crate) struct PgTlsConnect {
    connector: tokio_rustls::TlsConnector,
    /// `None` without a host name: no TLS can be made (its certificate would name nothing).
    name: Option<ServerName<'static>>,
}

impl<S> TlsConnect<S> for PgTlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = PgTlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<PgTlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self.name.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "TLS needs the database's host name to check its certificate for",
                )
            })?;
            self.connector
                .connect(name, stream)
                .await
                .map(|stream| PgTlsStream(Box::new(stream)))
        })
    }
}

/// A connection to the database over TLS.
pub(crate) struct PgTlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for PgTlsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PgTlsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for PgTlsStream<S> {
    /// None: SCRAM without channel binding (the server's certificate is what the session is
    /// checked by).
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> SslMode {
        let mut config: tokio_postgres::Config = url.parse().unwrap();
        default_ssl_mode(&mut config);
        config.get_ssl_mode()
    }

    #[test]
    fn a_database_beyond_loopback_needs_tls_unless_the_url_says_otherwise() {
        for url in [
            "postgres://gateway@db.internal/gateway",
            "postgres://gateway@10.0.0.5:5432/gateway",
            "postgres://gateway@[2001:db8::1]/gateway",
            "postgres://gateway@127.0.0.1,db.internal/gateway",
        ] {
            assert_eq!(mode(url), SslMode::Require, "{url}");
        }
        for url in [
            "postgres://gateway@127.0.0.1:5432/gateway",
            "postgres://gateway@localhost/gateway",
            "postgres://gateway@[::1]/gateway",
            "host=/var/run/postgresql user=gateway dbname=gateway",
        ] {
            assert_eq!(mode(url), SslMode::Disable, "{url}");
        }
        assert_eq!(
            mode("postgres://gateway@db.internal/gateway?sslmode=disable"),
            SslMode::Disable
        );
        // `prefer` is no choice of clear text: read by where the database is.
        assert_eq!(
            mode("postgres://gateway@db.internal/gateway?sslmode=prefer"),
            SslMode::Require
        );
        assert_eq!(
            mode("postgres://gateway@127.0.0.1/gateway?sslmode=prefer"),
            SslMode::Disable
        );
        // What other parts of the URL hold is not read as the mode.
        assert_eq!(
            mode("postgres://gateway:ab%20sslmode=disable@db.internal/gateway"),
            SslMode::Require
        );
        assert_eq!(
            mode("host=db.internal user=gateway dbname=gateway sslmode = disable"),
            SslMode::Disable
        );
        assert_eq!(
            mode("postgres://gateway@127.0.0.1/gateway?sslmode=require"),
            SslMode::Require
        );
    }
}
