//! The gateway's configuration file (`--config FILE`), documented key by key in the README.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tower_fhir::limit::RateLimit;
use tower_fhir::tenant::TenantId;
use tower_fhir::token::AuthMethod;

/// The whole file. Every key but `tenants`' and `clients`' contents has a default. Its `Debug`
/// leaves the admin token out (client secrets are left out by `ClientConfig`'s).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// The address to listen on. Default `127.0.0.1:8080`.
    #[serde(default = "default_listen")]
    pub(crate) listen: SocketAddr,
    /// The URL clients reach the gateway at; FHIR is at its root. Default `http://{listen}`.
    #[serde(default)]
    pub(crate) public_base_url: Option<String>,
    /// Where clients, tenants and signing keys are kept across restarts. Default: a fresh
    /// directory under the system's temporary directory, gone with the machine.
    #[serde(default)]
    pub(crate) state_dir: Option<PathBuf>,
    /// The PostgreSQL database that many replicas share (`postgres://user@host:port/db`),
    /// instead of `state_dir`; `TOWER_FHIR_DATABASE_URL` wins over it. Not shown in `Debug`
    /// (it may hold a password).
    #[serde(default)]
    pub(crate) database_url: Option<String>,
    /// A PEM file of the root certificates (a private CA's) the database's certificate may
    /// chain to, beside the webpki roots. Default none.
    #[serde(default)]
    pub(crate) database_ca_file: Option<PathBuf>,
    /// A PEM file of the root certificates (a hospital's private CA's) that `https://`
    /// upstreams' certificates may chain to, beside the webpki roots. Default none.
    #[serde(default)]
    pub(crate) upstream_ca_file: Option<PathBuf>,
    /// With `database_url`: the longest this replica may go without hearing the database
    /// confirm it has every other replica's revocations; past it, every token gets `503`
    /// until it hears again (a revoked token is never taken longer than this through a
    /// partition). Default none: tokens are taken as when the database is down. 5 to
    /// [`MAX_CONNECTION_SECONDS`].
    #[serde(default)]
    pub(crate) revocation_max_staleness_seconds: Option<u64>,
    /// The token endpoint's settings.
    #[serde(default)]
    pub(crate) token: TokenConfig,
    /// Other identity providers whose tokens are accepted.
    #[serde(default)]
    pub(crate) trusted_issuers: Vec<TrustedIssuer>,
    /// Clients registered at the first start (after that, the state directory has them).
    #[serde(default)]
    pub(crate) clients: Vec<ClientConfig>,
    /// Tenants onboarded at the first start (after that, the state directory has them).
    #[serde(default)]
    pub(crate) tenants: Vec<TenantConfig>,
    /// The bearer token for `/admin/...`; without one, the admin API is off.
    #[serde(default)]
    pub(crate) admin_token: Option<String>,
    /// Where the admin API is served instead of beside the gateway on `listen` (an internal
    /// address, say); `listen` then answers `/admin/...` with `404`. Default none: on
    /// `listen`. Needs `admin_token`.
    #[serde(default)]
    pub(crate) admin_listen: Option<SocketAddr>,
    /// The least time between two fetches of a provider's JWKS caused by an unknown `kid`.
    /// Default 30; 1 to [`MAX_CONNECTION_SECONDS`].
    #[serde(default = "default_cooldown")]
    pub(crate) jwks_refetch_cooldown_seconds: u64,
    /// The FHIR release of what the gateway answers itself, where a request names none and
    /// no tenant decides: the `metadata` statement served without a token, and the `default`
    /// `$versions` reports without one. Default STU3 (`"3.0"`). (A request with a token that
    /// names no release goes to its tenant's first upstream whatever this says.)
    #[serde(default)]
    pub(crate) default_fhir_version: Option<tower_fhir::version::FhirVersion>,
    /// Upstream request timeout. Default 30; 1 to [`MAX_CONNECTION_SECONDS`].
    #[serde(default = "default_upstream_timeout")]
    pub(crate) upstream_timeout_seconds: u64,
    /// The most idle upstream connections kept, every plain-HTTP upstream and tenant together
    /// (HTTPS and h2c: per tenant and host). Default 512; 0 to [`MAX_IDLE_CONNECTIONS`].
    #[serde(default = "default_upstream_max_idle")]
    pub(crate) upstream_max_idle_connections: usize,
    /// Extend the `Forwarded`/`X-Forwarded-For` headers requests arrive with (behind a load
    /// balancer that sets them) instead of replacing them. Default false.
    #[serde(default)]
    pub(crate) trust_forwarded_headers: bool,
    /// The header a load balancer names the client in (`"x-forwarded-for"`: its last
    /// address; `"forwarded"`: its last `for`): the throttles count that address instead of
    /// the balancer's. Default none: the connection's peer.
    #[serde(default)]
    pub(crate) client_address_header: Option<ClientAddressHeader>,
    /// The balancers `client_address_header` is read from, and (with
    /// `trust_forwarded_headers`) whose forwarding headers are kept: addresses or networks
    /// (`10.0.0.0/8`, `2001:db8::/32`). Required with `client_address_header`; a request from
    /// any other peer counts as that peer, its forwarding headers dropped.
    #[serde(default)]
    pub(crate) client_address_trusted_peers: Vec<String>,
    /// Request headers forwarded to upstreams besides those FHIR clients need. Default none.
    #[serde(default)]
    pub(crate) forward_request_headers: Vec<String>,
    /// The Argon2id cost of client secret hashes. Default 4096 KiB, 2 passes.
    #[serde(default)]
    pub(crate) secret_hashing: Option<HashingConfig>,
    /// `text` (default) or `json` (one JSON object per line).
    #[serde(default)]
    pub(crate) log_format: LogFormat,
    /// Refuse (403) tokens that carry no SMART resource scope (only the tenant). Default
    /// false: such tokens keep tenant-wide access; tokens with SMART scopes are held to them
    /// either way.
    #[serde(default)]
    pub(crate) require_smart_scopes: bool,
    /// A larger request body gets 413 before anything reaches the upstream. Default 16 MiB.
    #[serde(default = "default_max_request_body")]
    pub(crate) max_request_body_bytes: u64,
    /// The most bytes of request bodies held at once to check their SMART scopes (Bundles,
    /// `_search` forms), all requests together; beyond, `503` with `Retry-After`. Default
    /// 256 MiB, or `max_request_body_bytes` when larger; at least `max_request_body_bytes`.
    #[serde(default)]
    pub(crate) max_buffered_request_bytes_total: Option<u64>,
    /// Where `GET /metrics` (Prometheus text) is served; off when absent.
    #[serde(default)]
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// Label request metrics with the tenant. Default true.
    #[serde(default = "default_true")]
    pub(crate) metrics_tenant_label: bool,
    /// How long a removed tenant's series stay on `/metrics` (with their final counts) after
    /// the gateway hears of the removal (through its admin API, or another replica's through
    /// the shared database); then they go, and a tenant added again counts from zero.
    /// Default 300: Prometheus, scraping once a minute by default, reads the final counts a
    /// few times, and the tenant's requests still in flight (which end within
    /// `upstream_timeout_seconds`, 30 by default) are counted in them rather than in new
    /// series left behind. 1 to [`MAX_CONNECTION_SECONDS`].
    #[serde(default = "default_removed_tenant_grace")]
    pub(crate) metrics_removed_tenant_grace_seconds: u64,
    /// A file (or `-` for stdout) receiving one JSON audit record per line per request.
    #[serde(default)]
    pub(crate) audit_log: Option<PathBuf>,
    /// How audit records keep query strings: `full`, `names` (default) or `none`.
    #[serde(default)]
    pub(crate) audit_query: AuditQuery,
    /// Browser origins allowed by CORS. Default none.
    #[serde(default)]
    pub(crate) cors_allowed_origins: Vec<String>,
    /// At most this many client secret checks at once. Default: the number of CPUs.
    #[serde(default)]
    pub(crate) token_hashing_concurrency: Option<usize>,
    /// A connection that has not sent a whole request head this long after it opened (or, over
    /// HTTP/1.1, after its previous response) is closed. Default 30.
    #[serde(default = "default_header_read_timeout")]
    pub(crate) header_read_timeout_seconds: u64,
    /// A request body that sends nothing for this long mid-way is answered `408` and its
    /// connection closed. Default 30.
    #[serde(default = "default_body_read_timeout")]
    pub(crate) body_read_timeout_seconds: u64,
    /// A request body that averages fewer bytes a second than this, past its first
    /// `body_read_timeout_seconds`, is answered `408`; 0 turns it off. Default 500.
    #[serde(default = "default_body_min_rate")]
    pub(crate) body_min_bytes_per_second: u32,
    /// A keep-alive connection with no request in flight and no bytes either way for this long
    /// is closed. Default 60.
    #[serde(default = "default_idle_timeout")]
    pub(crate) idle_timeout_seconds: u64,
    /// The most connections open at once; beyond it new ones wait in the listen backlog until
    /// one closes. Default 10000.
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: u32,
    /// The most connections one client address (an IPv6 one by its /64) holds open at once;
    /// more are closed as they come. `client_address_trusted_peers` are not counted. Default
    /// none: no such limit.
    #[serde(default)]
    pub(crate) max_connections_per_address: Option<u32>,
    /// After SIGTERM or Ctrl-C, how long in-flight requests may take before the gateway exits
    /// anyway. Default 30.
    #[serde(default = "default_shutdown_grace")]
    pub(crate) shutdown_grace_seconds: u64,
    /// Worker threads serving connections, each with a listening socket of its own on
    /// `listen`. Default: the CPUs this process may use.
    #[serde(default)]
    pub(crate) workers: Option<usize>,
    /// The most requests (streams) at once on one HTTP/2 connection; more are refused with
    /// `REFUSED_STREAM`, which clients retry. Default 100.
    #[serde(default = "default_http2_streams")]
    pub(crate) http2_max_concurrent_streams: u32,
    /// The most HTTP/2 requests in flight at once, every connection together (an HTTP/1.1
    /// connection carries one at a time, so `max_connections` bounds those); more get `503`
    /// at once. Each may hold an upstream connection and its buffers. Default 10000.
    #[serde(default = "default_http2_in_flight")]
    pub(crate) http2_max_requests_in_flight: u32,
    /// TLS on `listen`: the certificate chain, PEM, the server's certificate first. With
    /// `tls_private_key_file`; without both, plain HTTP.
    #[serde(default)]
    pub(crate) tls_certificate_file: Option<PathBuf>,
    /// The private key of `tls_certificate_file`, PEM (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub(crate) tls_private_key_file: Option<PathBuf>,
}

/// The most `workers` accepted.
pub(crate) const MAX_WORKERS: usize = 1024;

/// The most `http2_max_concurrent_streams` accepted.
const MAX_HTTP2_STREAMS: u32 = 1000;

fn default_http2_streams() -> u32 {
    100
}

/// The most `http2_max_requests_in_flight` accepted.
const MAX_HTTP2_IN_FLIGHT: u32 = 1_000_000;

fn default_http2_in_flight() -> u32 {
    10_000
}

/// `audit_query`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AuditQuery {
    Full,
    #[default]
    Names,
    None,
}

impl AuditQuery {
    pub(crate) fn recording(self) -> tower_fhir::ops::QueryRecording {
        use tower_fhir::ops::QueryRecording;
        match self {
            Self::Full => QueryRecording::Full,
            Self::Names => QueryRecording::Names,
            Self::None => QueryRecording::None,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("public_base_url", &self.public_base_url)
            .field("state_dir", &self.state_dir)
            .field(
                "database_url",
                &self.database_url.as_ref().map(|_| "<redacted>"),
            )
            .field("database_ca_file", &self.database_ca_file)
            .field("upstream_ca_file", &self.upstream_ca_file)
            .field(
                "revocation_max_staleness_seconds",
                &self.revocation_max_staleness_seconds,
            )
            .field("token", &self.token)
            .field("trusted_issuers", &self.trusted_issuers)
            .field("clients", &self.clients)
            .field("tenants", &self.tenants)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "jwks_refetch_cooldown_seconds",
                &self.jwks_refetch_cooldown_seconds,
            )
            .field("default_fhir_version", &self.default_fhir_version)
            .field("upstream_timeout_seconds", &self.upstream_timeout_seconds)
            .field(
                "upstream_max_idle_connections",
                &self.upstream_max_idle_connections,
            )
            .field("trust_forwarded_headers", &self.trust_forwarded_headers)
            .field("client_address_header", &self.client_address_header)
            .field(
                "client_address_trusted_peers",
                &self.client_address_trusted_peers,
            )
            .field("forward_request_headers", &self.forward_request_headers)
            .field("secret_hashing", &self.secret_hashing)
            .field("log_format", &self.log_format)
            .field("require_smart_scopes", &self.require_smart_scopes)
            .field("max_request_body_bytes", &self.max_request_body_bytes)
            .field(
                "max_buffered_request_bytes_total",
                &self.max_buffered_request_bytes_total,
            )
            .field("admin_listen", &self.admin_listen)
            .field("metrics_listen", &self.metrics_listen)
            .field("metrics_tenant_label", &self.metrics_tenant_label)
            .field(
                "metrics_removed_tenant_grace_seconds",
                &self.metrics_removed_tenant_grace_seconds,
            )
            .field("audit_log", &self.audit_log)
            .field("audit_query", &self.audit_query)
            .field("cors_allowed_origins", &self.cors_allowed_origins)
            .field("token_hashing_concurrency", &self.token_hashing_concurrency)
            .field(
                "header_read_timeout_seconds",
                &self.header_read_timeout_seconds,
            )
            .field("body_read_timeout_seconds", &self.body_read_timeout_seconds)
            .field("body_min_bytes_per_second", &self.body_min_bytes_per_second)
            .field("idle_timeout_seconds", &self.idle_timeout_seconds)
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_address",
                &self.max_connections_per_address,
            )
            .field("shutdown_grace_seconds", &self.shutdown_grace_seconds)
            .field("workers", &self.workers)
            .field(
                "http2_max_concurrent_streams",
                &self.http2_max_concurrent_streams,
            )
            .field(
                "http2_max_requests_in_flight",
                &self.http2_max_requests_in_flight,
            )
            .field("tls_certificate_file", &self.tls_certificate_file)
            .field("tls_private_key_file", &self.tls_private_key_file)
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HashingConfig {
    pub(crate) memory_kib: u32,
    pub(crate) iterations: u32,
}

/// `client_address_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ClientAddressHeader {
    #[serde(alias = "X-Forwarded-For")]
    XForwardedFor,
    #[serde(alias = "Forwarded")]
    Forwarded,
}

impl ClientAddressHeader {
    /// The client the header names, if it names one.
    pub(crate) fn client(
        self,
        headers: &http::HeaderMap,
    ) -> Option<tower_fhir::token::ForwardedClient> {
        use tower_fhir::token::ForwardedClient;
        match self {
            Self::XForwardedFor => ForwardedClient::from_x_forwarded_for(headers),
            Self::Forwarded => ForwardedClient::from_forwarded(headers),
        }
    }
}

/// What is believed of `client_address_trusted_peers` alone: `client_address_header` read
/// from them, and (with `trust_forwarded_headers`) the forwarding chains kept from them only.
#[derive(Debug)]
pub(crate) struct ClientAddressRule {
    header: Option<ClientAddressHeader>,
    trusted: Vec<Network>,
    /// `trust_forwarded_headers`: the chains of a request from any other peer are dropped.
    chains: bool,
}

/// What a request from a peer is believed to say of its client.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PeerSays {
    /// The client `client_address_header` names (a trusted balancer named one).
    Client(tower_fhir::token::ForwardedClient),
    /// Nothing to take from it: a trusted peer whose header names no client, or no header.
    Nothing,
    /// An untrusted peer's `Forwarded`/`X-Forwarded-*` chains, which
    /// `trust_forwarded_headers` would keep: to be dropped.
    DropChains,
}

impl ClientAddressRule {
    /// The client the header names, when `peer` is a trusted balancer and it names one.
    #[cfg(test)]
    pub(crate) fn client(
        &self,
        peer: std::net::IpAddr,
        headers: &http::HeaderMap,
    ) -> Option<tower_fhir::token::ForwardedClient> {
        match self.peer_says(peer, headers) {
            PeerSays::Client(client) => Some(client),
            _ => None,
        }
    }

    /// What a request from `peer` with `headers` is believed to say (see [`PeerSays`]).
    pub(crate) fn peer_says(&self, peer: std::net::IpAddr, headers: &http::HeaderMap) -> PeerSays {
        let peer = peer.to_canonical();
        if !self.trusted.iter().any(|network| network.contains(peer)) {
            return if self.chains {
                PeerSays::DropChains
            } else {
                PeerSays::Nothing
            };
        }
        match self.header.and_then(|header| header.client(headers)) {
            Some(client) => PeerSays::Client(client),
            None => PeerSays::Nothing,
        }
    }
}

/// An address and how many of its leading bits make its network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Network {
    address: std::net::IpAddr,
    prefix: u8,
}

impl Network {
    /// `192.0.2.1`, `10.0.0.0/8`, `2001:db8::/32`.
    pub(crate) fn parse(text: &str) -> Result<Self, String> {
        let invalid = || format!("{text:?} is not an address or a network (10.0.0.0/8)");
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: std::net::IpAddr = address.trim().parse().map_err(|_| invalid())?;
        let address = address.to_canonical();
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(prefix) => prefix
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(invalid)?,
        };
        Ok(Self { address, prefix })
    }

    pub(crate) fn contains(&self, ip: std::net::IpAddr) -> bool {
        let bits = |ip: std::net::IpAddr| match ip {
            std::net::IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
            std::net::IpAddr::V6(v6) => (u128::from(v6), 128u32),
        };
        let ((ours, width), (theirs, their_width)) = (bits(self.address), bits(ip));
        if width != their_width {
            return false;
        }
        let shift = width - u32::from(self.prefix);
        shift >= width || (ours >> shift) == (theirs >> shift)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenConfig {
    /// `iss` of issued tokens. Default: the public base URL.
    #[serde(default)]
    pub(crate) issuer: Option<String>,
    /// `aud` of issued tokens. Default `tower-fhir`.
    #[serde(default)]
    pub(crate) audience: Option<String>,
    /// Token lifetime. Default 3600.
    #[serde(default)]
    pub(crate) ttl_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrustedIssuer {
    pub(crate) issuer: String,
    pub(crate) jwks_uri: String,
    pub(crate) audience: String,
    /// The tenants this issuer's tokens may name. Without it (and without `any_tenant`) the
    /// issuer's tokens are refused for every tenant.
    #[serde(default)]
    pub(crate) tenants: Vec<TenantId>,
    /// The issuer's tokens may name any tenant.
    #[serde(default)]
    pub(crate) any_tenant: bool,
    /// The JWS `typ` values its access tokens declare (`at+jwt`); empty: not checked.
    #[serde(default)]
    pub(crate) token_types: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientConfig {
    pub(crate) client_id: String,
    /// A `client_secret_basic`/`client_secret_post` client's secret.
    #[serde(default)]
    pub(crate) client_secret: Option<String>,
    /// `client_secret_basic` (also `client_secret_post`) or `private_key_jwt`; default: as
    /// the keys given say.
    #[serde(default)]
    pub(crate) token_endpoint_auth_method: Option<AuthMethod>,
    /// A `private_key_jwt` client's public keys (a JWK Set).
    #[serde(default)]
    pub(crate) jwks: Option<serde_json::Value>,
    /// Where a `private_key_jwt` client publishes its public keys.
    #[serde(default)]
    pub(crate) jwks_uri: Option<String>,
    pub(crate) tenants: Vec<TenantId>,
    /// Scopes besides the tenant the client may ask for.
    #[serde(default)]
    pub(crate) scopes: Vec<String>,
    /// The client's rate limit across all its tenants. Default none.
    #[serde(default)]
    pub(crate) rate_limit: Option<RateLimit>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("client_id", &self.client_id)
            .field(
                "token_endpoint_auth_method",
                &self.token_endpoint_auth_method,
            )
            .field("jwks_uri", &self.jwks_uri)
            .field("tenants", &self.tenants)
            .field("rate_limit", &self.rate_limit)
            .finish_non_exhaustive()
    }
}

/// A tenant in the file: `{"id": ..., "upstreams": [...]}` (or `"in_process"`), with an
/// optional `rate_limit` for all its clients together.
pub(crate) type TenantConfig = tower_fhir::route::TenantEntry;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_cooldown() -> u64 {
    30
}

fn default_upstream_timeout() -> u64 {
    30
}

fn default_max_request_body() -> u64 {
    tower_fhir::ops::DEFAULT_MAX_REQUEST_BODY_BYTES
}

fn default_true() -> bool {
    true
}

fn default_header_read_timeout() -> u64 {
    30
}

fn default_body_read_timeout() -> u64 {
    30
}

fn default_body_min_rate() -> u32 {
    tower_fhir::ops::DEFAULT_BODY_MIN_RATE
}

fn default_idle_timeout() -> u64 {
    60
}

fn default_max_connections() -> u32 {
    10_000
}

fn default_shutdown_grace() -> u64 {
    30
}

fn default_removed_tenant_grace() -> u64 {
    300
}

/// The longest `header_read_timeout_seconds`, `body_read_timeout_seconds`,
/// `idle_timeout_seconds`, `shutdown_grace_seconds`, `upstream_timeout_seconds`,
/// `jwks_refetch_cooldown_seconds` and `metrics_removed_tenant_grace_seconds` accepted: a day
/// (a longer one could overflow the clock).
pub(crate) const MAX_CONNECTION_SECONDS: u64 = 86_400;

/// The most `upstream_max_idle_connections`.
const MAX_IDLE_CONNECTIONS: usize = 100_000;

fn default_upstream_max_idle() -> usize {
    tower_fhir::proxy::DEFAULT_POOL_MAX_IDLE
}

/// The least `revocation_max_staleness_seconds`: the revocation listener shows it hears the
/// database every fifth of it (a second at least), and a busy database or a reconnection
/// would otherwise refuse tokens now and then.
const MIN_REVOCATION_STALENESS: u64 = 5;

/// The longest `token.ttl_seconds` accepted: a day (access tokens are short-lived; a longer
/// one could overflow the clock).
const MAX_TOKEN_TTL_SECONDS: u64 = 86_400;

/// The most secret checks `token_hashing_concurrency` may run at once (each a thread).
pub(crate) const MAX_HASHING_CONCURRENCY: usize = 1024;
/// The most memory a secret check may take (`secret_hashing.memory_kib`): 1 GiB.
pub(crate) const MAX_HASHING_MEMORY_KIB: u32 = 1024 * 1024;
/// The most Argon2 passes a secret check may make (`secret_hashing.iterations`).
pub(crate) const MAX_HASHING_ITERATIONS: u32 = 64;

/// The shortest `admin_token` accepted.
const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// The environment variable that names the database, winning over `database_url`.
pub(crate) const DATABASE_URL_ENV: &str = "TOWER_FHIR_DATABASE_URL";

/// [`DATABASE_URL_ENV`], when it is set and not empty.
pub(crate) fn database_url_from_env() -> Option<String> {
    std::env::var(DATABASE_URL_ENV)
        .ok()
        .filter(|url| !url.is_empty())
}

impl Config {
    /// With a shared database, the replicas must name themselves alike: each would otherwise
    /// take its own listening address for the public base, so for its tokens' issuer, and
    /// refuse the tokens of every other replica (behind a balancer, a client's next request
    /// goes elsewhere: a `401` now and then). Checked once the environment's database is in.
    pub(crate) fn check_shared_database(&self) -> Result<(), String> {
        if self.database_url.is_some()
            && self.public_base_url.is_none()
            && self.token.issuer.is_none()
        {
            return Err("a shared database (database_url or TOWER_FHIR_DATABASE_URL) needs public_base_url: without it each replica names itself by its own listening address, in its tokens' issuer too, and refuses the other replicas' tokens".into());
        }
        if self.database_url.is_none() && self.revocation_max_staleness_seconds.is_some() {
            return Err("revocation_max_staleness_seconds needs a shared database (database_url or TOWER_FHIR_DATABASE_URL): without one, every revocation is made in this process and known at once".into());
        }
        Ok(())
    }

    /// Takes the database from [`DATABASE_URL_ENV`] when it is set (and not empty).
    pub(crate) fn database_from_env(&mut self) {
        if let Some(url) = database_url_from_env() {
            self.database_url = Some(url);
        }
    }

    /// The configuration in `text`; the error names the key it is about
    /// (`tenants[0].upstreams[0].fhir_version: ...`) when it is about one.
    fn parse(text: &str) -> Result<Self, String> {
        // serde reads a struct from an array too, by position: `[]` would be every default.
        if !text.trim_start().starts_with('{') {
            return Err("the configuration must be a JSON object ({\"listen\": ...})".into());
        }
        let mut json = serde_json::Deserializer::from_str(text);
        let config: Self = serde_path_to_error::deserialize(&mut json).map_err(|e| {
            let key = e.path().to_string();
            if key == "." {
                e.inner().to_string()
            } else {
                format!("{key}: {}", e.inner())
            }
        })?;
        json.end().map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// The gateway's own listening addresses, by key: no tenant's upstream may be one.
    /// `Err` naming the first tenant whose upstream is one of the gateway's own addresses
    /// ([`own_addresses`](Self::own_addresses)): its requests would come back to the gateway.
    pub(crate) fn check_own_addresses(&self) -> Result<(), String> {
        let tenants = self
            .tenants
            .iter()
            .map(|tenant| (tenant.id, &tenant.record));
        match crate::admin::first_at_own_address(&self.own_addresses(), tenants) {
            Some((tenant, refused)) => Err(format!("tenant {tenant}: {refused}")),
            None => Ok(()),
        }
    }

    pub(crate) fn own_addresses(&self) -> Vec<(&'static str, SocketAddr)> {
        let mut own = vec![("listen", self.listen)];
        own.extend(
            self.metrics_listen
                .map(|address| ("metrics_listen", address)),
        );
        own.extend(self.admin_listen.map(|address| ("admin_listen", address)));
        own
    }

    pub(crate) fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the configuration file {}: {e}", path.display()))?;
        let config = Self::parse(&text).map_err(|e| {
            format!(
                "the configuration file {} is not valid: {e}",
                path.display()
            )
        })?;
        if let Some(token) = &config.admin_token {
            // An empty or short token would open the admin API to anyone, or to guessing.
            if token.chars().count() < MIN_ADMIN_TOKEN_LEN
                || !token.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(format!(
                    "the configuration file {}: admin_token must be at least {MIN_ADMIN_TOKEN_LEN} printable ASCII characters without spaces",
                    path.display()
                ));
            }
        }
        if config.max_request_body_bytes > 1 << 60 {
            return Err(format!(
                "the configuration file {}: max_request_body_bytes must be at most 2^60",
                path.display()
            ));
        }
        if config.max_request_body_bytes == 0 {
            return Err(format!(
                "the configuration file {}: max_request_body_bytes must be at least 1",
                path.display()
            ));
        }
        if config
            .max_buffered_request_bytes_total
            .is_some_and(|total| total < config.max_request_body_bytes || total > 1 << 60)
        {
            return Err(format!(
                "the configuration file {}: max_buffered_request_bytes_total must be at least max_request_body_bytes ({}) and at most 2^60",
                path.display(),
                config.max_request_body_bytes
            ));
        }
        if config
            .token_hashing_concurrency
            .is_some_and(|n| !(1..=MAX_HASHING_CONCURRENCY).contains(&n))
        {
            return Err(format!(
                "the configuration file {}: token_hashing_concurrency must be 1 to {MAX_HASHING_CONCURRENCY}",
                path.display()
            ));
        }
        if let Some(cost) = &config.secret_hashing {
            // Each check takes this much memory on a thread of its own, and the start hashes
            // every configured client's secret: a cost past these would exhaust the memory or
            // take minutes a request.
            if !(8..=MAX_HASHING_MEMORY_KIB).contains(&cost.memory_kib)
                || !(1..=MAX_HASHING_ITERATIONS).contains(&cost.iterations)
            {
                return Err(format!(
                    "the configuration file {}: secret_hashing takes memory_kib 8 to {MAX_HASHING_MEMORY_KIB} (1 GiB) and iterations 1 to {MAX_HASHING_ITERATIONS}",
                    path.display()
                ));
            }
        }
        if let Err(e) = tower_fhir::ops::fhir_cors(&config.cors_allowed_origins) {
            return Err(format!(
                "the configuration file {}: cors_allowed_origins: {e}",
                path.display()
            ));
        }
        // One entry each: with two, one would be dropped without a word (and which one
        // differed between tenants and clients).
        let mut seen = std::collections::HashSet::new();
        if let Some(tenant) = config.tenants.iter().find(|tenant| !seen.insert(tenant.id)) {
            return Err(format!(
                "the configuration file {}: tenant {} is listed twice (however its id is spelt): keep one entry",
                path.display(),
                tenant.id
            ));
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(client) = config
            .clients
            .iter()
            .find(|client| !seen.insert(client.client_id.as_str()))
        {
            return Err(format!(
                "the configuration file {}: client {:?} is listed twice: keep one entry",
                path.display(),
                client.client_id
            ));
        }
        if let Some((tenant, version)) = config
            .tenants
            .iter()
            .find_map(|tenant| Some(tenant).zip(tenant.record.repeated_release()))
        {
            return Err(format!(
                "the configuration file {}: tenant {}: {}",
                path.display(),
                tenant.id,
                crate::admin::repeated_release(version)
            ));
        }
        if let Some((tenant, refused)) = config.tenants.iter().find_map(|tenant| {
            Some(tenant).zip(crate::admin::redacted_authorization(&tenant.record))
        }) {
            return Err(format!(
                "the configuration file {}: tenant {}: {refused}",
                path.display(),
                tenant.id
            ));
        }
        config
            .check_own_addresses()
            .map_err(|refused| format!("the configuration file {}: {refused}", path.display()))?;
        if let Some(nested) = tower_fhir::route::nested_bases(
            config
                .tenants
                .iter()
                .map(|tenant| (tenant.id, &tenant.record)),
        )
        .first()
        {
            return Err(format!(
                "the configuration file {}: {nested}",
                path.display()
            ));
        }
        config
            .client_address_rule()
            .map_err(|e| format!("the configuration file {}: {e}", path.display()))?;
        for (n, trusted) in config.trusted_issuers.iter().enumerate() {
            // Two entries for one issuer would bind its keys and tenants twice over (the
            // broader binding winning silently).
            if config.trusted_issuers[..n]
                .iter()
                .any(|earlier| earlier.issuer == trusted.issuer)
            {
                return Err(format!(
                    "the configuration file {}: trusted issuer {:?} is named twice: keep one entry",
                    path.display(),
                    trusted.issuer
                ));
            }
            if trusted.any_tenant && !trusted.tenants.is_empty() {
                return Err(format!(
                    "the configuration file {}: trusted issuer {:?} has both tenants and any_tenant: keep one",
                    path.display(),
                    trusted.issuer
                ));
            }
        }
        config
            .check_connection_limits()
            .map_err(|e| format!("the configuration file {}: {e}", path.display()))?;
        config
            .check_listeners()
            .map_err(|e| format!("the configuration file {}: {e}", path.display()))?;
        if config.tls_certificate_file.is_some() != config.tls_private_key_file.is_some() {
            return Err(format!(
                "the configuration file {}: tls_certificate_file and tls_private_key_file go together: give both for TLS, or neither",
                path.display()
            ));
        }
        Ok(config)
    }

    /// The connection keys and the other `_seconds` keys are within range: 0 would mean "close
    /// at once", "never accept" or "time out at once", so it is refused rather than read as
    /// "off" or raised without a word.
    fn check_connection_limits(&self) -> Result<(), String> {
        for (key, value) in [
            (
                "header_read_timeout_seconds",
                self.header_read_timeout_seconds,
            ),
            ("body_read_timeout_seconds", self.body_read_timeout_seconds),
            ("idle_timeout_seconds", self.idle_timeout_seconds),
            ("shutdown_grace_seconds", self.shutdown_grace_seconds),
            ("upstream_timeout_seconds", self.upstream_timeout_seconds),
            (
                "jwks_refetch_cooldown_seconds",
                self.jwks_refetch_cooldown_seconds,
            ),
            (
                "metrics_removed_tenant_grace_seconds",
                self.metrics_removed_tenant_grace_seconds,
            ),
        ] {
            if !(1..=MAX_CONNECTION_SECONDS).contains(&value) {
                return Err(format!(
                    "{key} must be between 1 and {MAX_CONNECTION_SECONDS} (a day), not {value}"
                ));
            }
        }
        if let Some(staleness) = self.revocation_max_staleness_seconds {
            if !(MIN_REVOCATION_STALENESS..=MAX_CONNECTION_SECONDS).contains(&staleness) {
                return Err(format!(
                    "revocation_max_staleness_seconds must be between {MIN_REVOCATION_STALENESS} and {MAX_CONNECTION_SECONDS} (a day), not {staleness}"
                ));
            }
        }
        if self.max_connections_per_address == Some(0) {
            return Err("max_connections_per_address must be at least 1, not 0".to_owned());
        }
        if self.upstream_max_idle_connections > MAX_IDLE_CONNECTIONS {
            return Err(format!(
                "upstream_max_idle_connections must be at most {MAX_IDLE_CONNECTIONS}, not {}",
                self.upstream_max_idle_connections
            ));
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1, not 0".to_owned());
        }
        if let Some(ttl) = self.token.ttl_seconds {
            if !(1..=MAX_TOKEN_TTL_SECONDS).contains(&ttl) {
                return Err(format!(
                    "token.ttl_seconds must be between 1 and {MAX_TOKEN_TTL_SECONDS} (a day), not {ttl}"
                ));
            }
        }
        if !(1..=MAX_HTTP2_STREAMS).contains(&self.http2_max_concurrent_streams) {
            return Err(format!(
                "http2_max_concurrent_streams must be between 1 and {MAX_HTTP2_STREAMS}, not {}",
                self.http2_max_concurrent_streams
            ));
        }
        if !(1..=MAX_HTTP2_IN_FLIGHT).contains(&self.http2_max_requests_in_flight) {
            return Err(format!(
                "http2_max_requests_in_flight must be between 1 and {MAX_HTTP2_IN_FLIGHT}, not {}",
                self.http2_max_requests_in_flight
            ));
        }
        if let Some(workers) = self.workers {
            if !(1..=MAX_WORKERS).contains(&workers) {
                return Err(format!(
                    "workers must be between 1 and {MAX_WORKERS}, not {workers}"
                ));
            }
        }
        Ok(())
    }

    /// `listen`, `admin_listen` and `metrics_listen` are three places: the same port on the
    /// same address, or on an address one of them covers (`0.0.0.0` all of IPv4, `[::]` all
    /// of both), could not be bound twice. Port 0 is a fresh port each time. And
    /// `admin_listen` serves an admin API, so it needs `admin_token`.
    pub(crate) fn check_listeners(&self) -> Result<(), String> {
        if self.admin_listen.is_some() && self.admin_token.is_none() {
            return Err("admin_listen is set without admin_token: the admin API is off".into());
        }
        let covers = |wide: std::net::IpAddr, other: std::net::IpAddr| {
            wide.is_unspecified() && (wide.is_ipv6() || other.is_ipv4())
        };
        let overlap = |a: SocketAddr, b: SocketAddr| {
            a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
        };
        let places = [
            ("listen", Some(self.listen)),
            ("admin_listen", self.admin_listen),
            ("metrics_listen", self.metrics_listen),
        ];
        for (n, (name, addr)) in places.iter().enumerate() {
            for (other, other_addr) in &places[n + 1..] {
                if let (Some(addr), Some(other_addr)) = (addr, other_addr) {
                    if overlap(*addr, *other_addr) {
                        return Err(format!(
                            "{other} ({other_addr}) takes the port {name} ({addr}) is on: give {other} a port of its own"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The listener's TLS, its files read; `None` for plain HTTP.
    pub(crate) fn tls(&self) -> Result<Option<crate::tls::FrontTls>, String> {
        match (&self.tls_certificate_file, &self.tls_private_key_file) {
            (Some(certificate), Some(key)) => {
                crate::tls::FrontTls::load(certificate, key).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// `client_address_header` with the peers it is read from; `None` without it.
    pub(crate) fn client_address_rule(&self) -> Result<Option<ClientAddressRule>, String> {
        let header = self.client_address_header;
        if header.is_none() && self.client_address_trusted_peers.is_empty() {
            return Ok(None);
        }
        if header.is_none()
            && !self.trust_forwarded_headers
            && self.max_connections_per_address.is_none()
        {
            return Err(
                "client_address_trusted_peers is set without client_address_header, trust_forwarded_headers or max_connections_per_address: it would trust nothing"
                    .into(),
            );
        }
        if self.client_address_trusted_peers.is_empty() {
            return Err("client_address_header needs client_address_trusted_peers: the balancers' addresses or networks (10.0.0.0/8), since any other client could write any address there".into());
        }
        let trusted = self
            .client_address_trusted_peers
            .iter()
            .map(|peer| {
                Network::parse(peer).map_err(|e| format!("client_address_trusted_peers: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(ClientAddressRule {
            header,
            trusted,
            chains: self.trust_forwarded_headers,
        }))
    }

    /// `max_connections_per_address`'s counts, `client_address_trusted_peers` exempt; `None`
    /// without the key.
    pub(crate) fn per_address(&self) -> Result<Option<crate::per_address::PerAddress>, String> {
        let Some(limit) = self.max_connections_per_address else {
            return Ok(None);
        };
        let exempt = self
            .client_address_trusted_peers
            .iter()
            .map(|peer| {
                Network::parse(peer).map_err(|e| format!("client_address_trusted_peers: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Some(crate::per_address::PerAddress::new(limit, exempt)))
    }

    /// `max_buffered_request_bytes_total`, or its default (at most 2^60).
    pub(crate) fn max_buffered_total(&self) -> u64 {
        self.max_buffered_request_bytes_total.unwrap_or(
            (tower_fhir::smart::DEFAULT_MAX_BUFFERED_TOTAL as u64)
                .max(self.max_request_body_bytes)
                .min(1 << 60),
        )
    }

    /// The worker threads to run: `workers`, or the CPUs this process may use.
    pub(crate) fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, usize::from)
                .min(MAX_WORKERS)
        })
    }

    /// An empty configuration with every default.
    pub(crate) fn empty() -> Self {
        serde_json::from_str("{}").expect("every key has a default")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_holds_no_secret() {
        let config: Config = serde_json::from_str(
            r#"{"admin_token": "admin-token-that-is-secret",
                "clients": [{"client_id": "app", "client_secret": "client-secret-that-is-secret",
                             "tenants": ["4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f"]}],
                "tenants": [{"id": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
                             "upstreams": [{"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "3.0",
                                            "authorization": "Bearer upstream-token-that-is-secret"}]}]}"#,
        )
        .unwrap();
        let shown = format!("{config:?}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains("app"), "{shown}");
        assert!(!shown.contains("that-is-secret"), "{shown}");
    }

    #[test]
    fn operations_keys_have_their_defaults_and_are_read() {
        let empty = Config::empty();
        assert!(!empty.require_smart_scopes);
        assert_eq!(empty.max_request_body_bytes, 16 * 1024 * 1024);
        assert_eq!(empty.metrics_listen, None);
        assert!(empty.metrics_tenant_label);
        assert_eq!(empty.metrics_removed_tenant_grace_seconds, 300);
        assert_eq!(empty.audit_log, None);
        assert_eq!(empty.audit_query, AuditQuery::Names);
        assert!(empty.cors_allowed_origins.is_empty());
        assert_eq!(empty.token_hashing_concurrency, None);
        let config: Config = serde_json::from_str(
            r#"{"max_request_body_bytes": 1024, "metrics_listen": "127.0.0.1:9100",
                "metrics_tenant_label": false, "metrics_removed_tenant_grace_seconds": 60,
                "audit_log": "-", "audit_query": "full",
                "cors_allowed_origins": ["https://app.example"], "token_hashing_concurrency": 3}"#,
        )
        .unwrap();
        assert_eq!(config.max_request_body_bytes, 1024);
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9100".parse().unwrap())
        );
        assert!(!config.metrics_tenant_label);
        assert_eq!(config.metrics_removed_tenant_grace_seconds, 60);
        assert_eq!(config.audit_log.as_deref(), Some(Path::new("-")));
        assert_eq!(config.audit_query, AuditQuery::Full);
        assert_eq!(config.cors_allowed_origins, ["https://app.example"]);
        assert_eq!(config.token_hashing_concurrency, Some(3));
        assert!(serde_json::from_str::<Config>(r#"{"audit_query": "values"}"#).is_err());
    }

    #[test]
    fn hashing_costs_are_bounded() {
        let file = std::env::temp_dir().join(format!("hashing-{}.json", std::process::id()));
        let load = |json: &str| {
            std::fs::write(&file, json).unwrap();
            Config::load(&file)
        };
        for (json, says) in [
            (
                r#"{"token_hashing_concurrency": 0}"#,
                "token_hashing_concurrency must be 1 to 1024",
            ),
            (
                r#"{"token_hashing_concurrency": 1000000}"#,
                "token_hashing_concurrency must be 1 to 1024",
            ),
            (
                r#"{"secret_hashing": {"memory_kib": 268435456, "iterations": 2}}"#,
                "secret_hashing takes memory_kib 8 to",
            ),
            (
                r#"{"secret_hashing": {"memory_kib": 4, "iterations": 2}}"#,
                "secret_hashing takes memory_kib 8 to",
            ),
            (
                r#"{"secret_hashing": {"memory_kib": 4096, "iterations": 100000}}"#,
                "iterations 1 to 64",
            ),
            (
                r#"{"secret_hashing": {"memory_kib": 4096, "iterations": 0}}"#,
                "iterations 1 to 64",
            ),
        ] {
            let refused = load(json).unwrap_err();
            assert!(refused.contains(says), "{json}: {refused}");
        }
        for json in [
            r#"{"token_hashing_concurrency": 1024}"#,
            r#"{"secret_hashing": {"memory_kib": 1048576, "iterations": 64}}"#,
            r#"{"secret_hashing": {"memory_kib": 8, "iterations": 1}}"#,
        ] {
            assert!(load(json).is_ok(), "{json}");
        }
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn header_policy_keys_are_read() {
        let config: Config = serde_json::from_str(
            r#"{"forward_request_headers": ["X-Api-Key"],
                "tenants": [{"id": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
                             "upstreams": [{"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "3.0",
                                            "allow_set_cookie": true}]}]}"#,
        )
        .unwrap();
        assert_eq!(config.forward_request_headers, ["X-Api-Key"]);
        let upstream = config.tenants[0].record.default_upstream().unwrap();
        assert!(upstream.set_cookie_allowed());
        assert!(Config::empty().forward_request_headers.is_empty());
    }

    #[test]
    fn limit_keys_are_read_and_bad_values_refused() {
        let config: Config = serde_json::from_str(
            r#"{"clients": [{"client_id": "app", "client_secret": "client-secret-0123456789",
                             "tenants": [], "rate_limit": {"requests_per_second": 5, "burst": 10}}],
                "tenants": [{"id": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
                             "rate_limit": {"requests_per_second": 2, "burst": 2},
                             "upstreams": [{"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "3.0",
                                            "max_concurrency": 4}]}]}"#,
        )
        .unwrap();
        assert_eq!(config.clients[0].rate_limit, RateLimit::new(5, 10).ok());
        let record = &config.tenants[0].record;
        assert_eq!(record.rate_limit(), RateLimit::new(2, 2).ok());
        assert_eq!(
            record
                .default_upstream()
                .unwrap()
                .max_concurrency()
                .map(|n| n.get()),
            Some(4)
        );
        let refused = serde_json::from_str::<Config>(
            r#"{"tenants": [{"id": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
                             "rate_limit": {"requests_per_second": 0, "burst": 2},
                             "upstreams": [{"base_url": "http://127.0.0.1:9001/fhir", "fhir_version": "3.0"}]}]}"#,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            refused.contains("rate_limit.requests_per_second must be a whole number from 1"),
            "{refused}"
        );
    }

    #[test]
    fn connection_keys_have_their_defaults_and_are_read() {
        let defaults = Config::empty();
        assert_eq!(defaults.header_read_timeout_seconds, 30);
        assert_eq!(defaults.body_read_timeout_seconds, 30);
        assert_eq!(defaults.body_min_bytes_per_second, 500);
        assert_eq!(defaults.idle_timeout_seconds, 60);
        assert_eq!(defaults.max_connections, 10_000);
        assert_eq!(defaults.shutdown_grace_seconds, 30);
        assert_eq!(defaults.check_connection_limits(), Ok(()));
        assert!(defaults.worker_count() >= 1);
        let two: Config = serde_json::from_str(r#"{"workers": 2}"#).unwrap();
        assert_eq!(two.worker_count(), 2);
        let none: Config = serde_json::from_str(r#"{"workers": 0}"#).unwrap();
        assert_eq!(
            none.check_connection_limits(),
            Err("workers must be between 1 and 1024, not 0".to_owned())
        );

        let config: Config = serde_json::from_str(
            r#"{"header_read_timeout_seconds": 5, "idle_timeout_seconds": 7,
                "max_connections": 2, "shutdown_grace_seconds": 9,
                "body_read_timeout_seconds": 11, "body_min_bytes_per_second": 0}"#,
        )
        .unwrap();
        assert_eq!(config.header_read_timeout_seconds, 5);
        assert_eq!(config.body_read_timeout_seconds, 11);
        assert_eq!(config.body_min_bytes_per_second, 0);
        assert_eq!(config.idle_timeout_seconds, 7);
        assert_eq!(config.max_connections, 2);
        assert_eq!(config.shutdown_grace_seconds, 9);
        assert_eq!(config.check_connection_limits(), Ok(()));
        let shown = format!("{config:?}");
        assert!(shown.contains("idle_timeout_seconds: 7"), "{shown}");
    }

    #[test]
    fn the_buffered_bodies_budget_has_its_default_and_holds_the_largest_body() {
        assert_eq!(Config::empty().max_buffered_total(), 256 * 1024 * 1024);
        let large: Config =
            serde_json::from_str(r#"{"max_request_body_bytes": 1073741824}"#).unwrap();
        assert_eq!(large.max_buffered_total(), 1 << 30);
        let file = std::env::temp_dir().join(format!("budget-{}.json", std::process::id()));
        std::fs::write(
            &file,
            r#"{"max_request_body_bytes": 2048, "max_buffered_request_bytes_total": 1024}"#,
        )
        .unwrap();
        let refused = Config::load(&file).unwrap_err();
        std::fs::write(&file, r#"{"max_buffered_request_bytes_total": 33554432}"#).unwrap();
        let loaded = Config::load(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert!(
            refused.contains(
                "max_buffered_request_bytes_total must be at least max_request_body_bytes (2048)"
            ),
            "{refused}"
        );
        assert_eq!(loaded.max_buffered_total(), 32 * 1024 * 1024);
    }

    #[test]
    fn the_client_address_header_is_read_from_trusted_peers_only() {
        let rule = |json: &str| {
            serde_json::from_str::<Config>(json)
                .unwrap()
                .client_address_rule()
        };
        let config = r#"{"client_address_header": "x-forwarded-for",
                          "client_address_trusted_peers": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.1"]}"#;
        let rule = rule(config).unwrap().unwrap();
        let mut headers = http::HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        let named = |peer: &str| {
            rule.client(peer.parse().unwrap(), &headers)
                .map(|client| client.0.to_string())
        };
        for trusted in ["10.1.2.3", "::ffff:10.9.9.9", "2001:db8:1::5", "192.0.2.1"] {
            assert_eq!(named(trusted).as_deref(), Some("203.0.113.9"), "{trusted}");
        }
        for untrusted in ["11.0.0.1", "192.0.2.2", "2001:db9::1", "127.0.0.1"] {
            assert_eq!(named(untrusted), None, "{untrusted}");
        }
        for (json, error) in [
            (
                r#"{"client_address_header": "forwarded"}"#,
                "needs client_address_trusted_peers",
            ),
            (
                r#"{"client_address_trusted_peers": ["10.0.0.0/8"]}"#,
                "without client_address_header, trust_forwarded_headers or max_connections_per_address",
            ),
            (
                r#"{"client_address_header": "forwarded", "client_address_trusted_peers": ["10.0.0.0/33"]}"#,
                "is not an address or a network",
            ),
            (
                r#"{"client_address_header": "forwarded", "client_address_trusted_peers": ["balancer"]}"#,
                "is not an address or a network",
            ),
        ] {
            let refused = serde_json::from_str::<Config>(json)
                .unwrap()
                .client_address_rule()
                .unwrap_err();
            assert!(refused.contains(error), "{json}: {refused}");
        }
        // With trust_forwarded_headers, the trusted peers alone keep their chains.
        let rule = serde_json::from_str::<Config>(
            r#"{"trust_forwarded_headers": true, "client_address_trusted_peers": ["10.0.0.0/8"]}"#,
        )
        .unwrap()
        .client_address_rule()
        .unwrap()
        .unwrap();
        assert_eq!(
            rule.peer_says("10.0.0.1".parse().unwrap(), &headers),
            PeerSays::Nothing
        );
        assert_eq!(
            rule.peer_says("11.0.0.1".parse().unwrap(), &headers),
            PeerSays::DropChains
        );
        // Without it, an untrusted peer's chains are the proxy's to drop anyway.
        let rule = serde_json::from_str::<Config>(config)
            .unwrap()
            .client_address_rule()
            .unwrap()
            .unwrap();
        assert_eq!(
            rule.peer_says("11.0.0.1".parse().unwrap(), &headers),
            PeerSays::Nothing
        );
        assert!(Network::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Network::parse("::/0")
            .unwrap()
            .contains("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn tenants_whose_bases_nest_are_refused() {
        let file = std::env::temp_dir().join(format!("nested-{}.json", std::process::id()));
        let config = |inner: &str| {
            format!(
                r#"{{"tenants": [
                    {{"id": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
                      "upstreams": [{{"base_url": "http://hapi:8080/fhir", "fhir_version": "4.0"}}]}},
                    {{"id": "5e2a7d3f-9b4c-4d6e-8f80-2b3c4d5e6f70",
                      "upstreams": [{{"base_url": "{inner}", "fhir_version": "4.0"}}]}}]}}"#
            )
        };
        std::fs::write(&file, config("http://hapi:8080/fhir/tenant-b")).unwrap();
        let refused = Config::load(&file).unwrap_err();
        assert!(
            refused.contains("tenant 5e2a7d3f-9b4c-4d6e-8f80-2b3c4d5e6f70's upstream http://hapi:8080/fhir/tenant-b lies under tenant 4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f's"),
            "{refused}"
        );
        std::fs::write(&file, config("http://hapi:8080/fhir-b")).unwrap();
        let loaded = Config::load(&file);
        std::fs::remove_file(&file).unwrap();
        assert!(loaded.is_ok(), "{:?}", loaded.err());
    }

    #[test]
    fn a_tenant_whose_upstream_is_the_gateway_itself_is_refused() {
        let file = std::env::temp_dir().join(format!("own-{}.json", std::process::id()));
        std::fs::write(
            &file,
            r#"{"listen": "127.0.0.1:18443", "tenants": [
                {"id": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
                 "upstreams": [{"base_url": "http://localhost:18443/fhir", "fhir_version": "4.0"}]}]}"#,
        )
        .unwrap();
        let refused = Config::load(&file).unwrap_err();
        std::fs::remove_file(&file).unwrap();
        assert!(
            refused.contains("is this gateway's own listen (127.0.0.1:18443)"),
            "{refused}"
        );
    }

    #[test]
    fn a_tenant_or_client_listed_twice_is_refused() {
        let file = std::env::temp_dir().join(format!("twice-{}.json", std::process::id()));
        let tenant = |id: &str, port: u16| {
            format!(
                r#"{{"id": "{id}", "upstreams": [{{"base_url": "http://127.0.0.1:{port}/fhir", "fhir_version": "4.0"}}]}}"#
            )
        };
        let client = r#"{"client_id": "app", "client_secret": "a-long-enough-client-secret-0123", "tenants": []}"#;
        for (tenants, clients, says) in [
            (
                vec![
                    tenant("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f", 9001),
                    tenant("4D1F6C2E8A3B4C5D9E7F1A2B3C4D5E6F", 9002),
                ],
                vec![],
                "tenant 4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f is listed twice",
            ),
            (
                vec![],
                vec![client, client],
                "client \"app\" is listed twice",
            ),
        ] {
            std::fs::write(
                &file,
                format!(
                    r#"{{"tenants": [{}], "clients": [{}]}}"#,
                    tenants.join(","),
                    clients.join(",")
                ),
            )
            .unwrap();
            let refused = Config::load(&file).unwrap_err();
            assert!(refused.contains(says), "{refused}");
        }
        std::fs::remove_file(&file).unwrap();
    }

    #[test]
    fn connection_keys_out_of_range_are_refused() {
        for (json, expected) in [
            (
                r#"{"header_read_timeout_seconds": 0}"#,
                "header_read_timeout_seconds must be between 1 and 86400 (a day), not 0",
            ),
            (
                r#"{"idle_timeout_seconds": 0}"#,
                "idle_timeout_seconds must be between 1",
            ),
            (
                r#"{"body_read_timeout_seconds": 0}"#,
                "body_read_timeout_seconds must be between 1 and 86400 (a day), not 0",
            ),
            (
                r#"{"shutdown_grace_seconds": 86401}"#,
                "shutdown_grace_seconds must be between 1 and 86400 (a day), not 86401",
            ),
            (
                r#"{"upstream_timeout_seconds": 0}"#,
                "upstream_timeout_seconds must be between 1 and 86400 (a day), not 0",
            ),
            (
                r#"{"jwks_refetch_cooldown_seconds": 86401}"#,
                "jwks_refetch_cooldown_seconds must be between 1 and 86400 (a day), not 86401",
            ),
            (
                r#"{"metrics_removed_tenant_grace_seconds": 0}"#,
                "metrics_removed_tenant_grace_seconds must be between 1 and 86400 (a day), not 0",
            ),
            (
                r#"{"max_connections": 0}"#,
                "max_connections must be at least 1, not 0",
            ),
            (
                r#"{"token": {"ttl_seconds": 18446744073709551615}}"#,
                "token.ttl_seconds must be between 1 and 86400 (a day), not 18446744073709551615",
            ),
            (
                r#"{"token": {"ttl_seconds": 0}}"#,
                "token.ttl_seconds must be between 1 and 86400 (a day), not 0",
            ),
            (
                r#"{"upstream_max_idle_connections": 100001}"#,
                "upstream_max_idle_connections must be at most 100000, not 100001",
            ),
            (
                r#"{"revocation_max_staleness_seconds": 4}"#,
                "revocation_max_staleness_seconds must be between 5 and 86400 (a day), not 4",
            ),
        ] {
            let config: Config = serde_json::from_str(json).unwrap();
            let error = config.check_connection_limits().unwrap_err();
            assert!(error.contains(expected), "{json}: {error}");
        }
    }

    #[test]
    fn revocation_max_staleness_needs_a_database() {
        let mut config: Config =
            serde_json::from_str(r#"{"revocation_max_staleness_seconds": 30}"#).unwrap();
        assert!(config.check_connection_limits().is_ok());
        let error = config.check_shared_database().unwrap_err();
        assert!(
            error.starts_with("revocation_max_staleness_seconds needs a shared database"),
            "{error}"
        );
        config.database_url = Some("postgres://gateway@127.0.0.1:9/none".to_owned());
        config.public_base_url = Some("https://gateway.example".to_owned());
        assert_eq!(config.check_shared_database(), Ok(()));
    }
}
