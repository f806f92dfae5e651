//! A load generator for FHIR gateways: `cargo run --release -p fhir-loadgen -- --help`.
//!
//! Drives any FHIR gateway over HTTP/1.1 (or HTTP/2 with `--http2`), plain or over TLS (an
//! `https://` target: the webpki roots, `--ca-file` for your own, `--insecure` for none), each
//! worker on a connection of its own (so `--connections 10000` holds 10,000 open): a closed loop, or a
//! fixed request rate with coordinated-omission correction (latency counted from when each
//! request was due, not when it was sent). Tokens are minted locally (one per tenant, HS256
//! from a shared secret or RS256/PS256/ES256/EdDSA from a private key in PEM) or fetched from a
//! token endpoint with client credentials (one per tenant, `--scope`, by default the tenant, refetched before
//! they expire). Requests follow the deployed DSTU2/STU3 client mix (Patient read and search,
//! Observation, Condition, Encounter, AllergyIntolerance, MedicationOrder, Coverage), a mix of
//! your own with its weights (`--mix FILE`), or hit one path. The report: throughput, latency percentiles from an HDR histogram, status counts and
//! errors, as a table, or as JSON with `--json`; with `--cpu-of LABEL=PID` also the CPU time
//! the server under test (and its upstream, ...) spent per request, read from `/proc`. A progress
//! line goes to stderr every second.
//!
//! ```text
//! cargo run --release -p fhir-loadgen -- --target http://127.0.0.1:8080 \
//!     --mint-hs256 tower-fhir-demo-secret-change-me-0123456789 --issuer urn:tower-fhir:demo \
//!     --audience tower-fhir --tenants 4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f \
//!     --connections 32 --duration 10 --warmup 2
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

mod plot;

/// mimalloc, as the gateway binary uses: the load generator then spends on allocation what
/// the gateway does, and a comparison measures the HTTP work, not two allocators.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const HELP: &str = "\
fhir-loadgen: drive a FHIR gateway and report throughput and latency

usage: fhir-loadgen --target URL [OPTIONS]

  --target URL            the gateway's FHIR base, http:// or https:// (required)
  --connections N         concurrent connections, default 16; each carries one request at
                          a time (closed loop: sends its next when the last is answered)
  --rate R                open loop: R requests per second (above 0, at most 10,000,000),
                          latency from when each was due. A request due while every
                          connection is busy waits for one (its \"send delay\", part of its
                          latency): R x latency must stay under N, and the report says
                          when the connections, not the target, were the limit
  --duration S            seconds to measure (above 0, at most a year), default 10; with
                          --requests N and no --duration, until N were measured (at most
                          an hour); with both, whichever comes first
  --requests N            stop after N measured requests
  --warmup S              seconds of load before measuring (0 to a year), default 1
  --timeout S             seconds to wait for a connection, a request's answer or its body
                          (above 0, at most a year), default 10; past it the request counts
                          as an error (\"timeout\"), its connection is closed, and its
                          latency is counted as at least the time it waited
  --max-error-rate F      exit 1 when more than this share of the measured requests failed
                          (no HTTP answer: connection refused, reset, timeout...) or when
                          none was answered; default 0.01 (1%)
  --max-non-2xx-rate F    exit 1 when more than this share of the answered requests had a
                          status other than 2xx (401, 404, 503...); default 1 (not checked)
  --max-unsent-rate F     at a fixed rate: exit 1 when more than this share of the requests
                          due were never sent (every connection busy: the rate was not
                          held); default 0.01 (1%)
  --tenants ID,ID,...     tenant GUIDs (or --tenant-count N to make N of them)
  --tenant-count N        N generated tenant GUIDs
  --mint-hs256 SECRET     mint tokens locally (with --issuer, --audience)
  --mint-key FILE         mint tokens locally, signed with the PEM private key in FILE
                          (with --alg, --issuer, --audience and, if the gateway wants it, --kid)
  --alg ALG               --mint-key's algorithm: RS256..RS512, PS256..PS512, ES256, ES384,
                          EdDSA; default ES256
  --kid KID               the `kid` header of minted tokens
  --typ TYP               the `typ` header of minted tokens; default at+jwt (RFC 9068's
                          access tokens, which tower-fhir's gateway requires of its own)
  --bearer TOKEN          send this one bearer token with every request (a gateway whose
                          tokens you get elsewhere)
  --token-url URL         fetch tokens with client credentials (--client-id, --client-secret)
  --client-auth HOW       how --token-url's client authenticates: post (client_id and
                          client_secret in the form, the default) or basic (HTTP Basic)
  --scope SCOPE           the scope asked of --token-url, or put in minted tokens, with
                          {tenant} replaced by each tenant's GUID; default {tenant}
                          (tower-fhir's); say \"{tenant} system/*.rs\", or another
                          gateway's own (\"api://fhir/.default\")
  --header 'NAME: VALUE'  send this header with every FHIR request (an API key, a tenant
                          header, Prefer...; not with token requests); repeat for several
  --path PATH             one request path (starting with /, under --target's path)
                          instead of the client mix
  --mix FILE              your own mix: a line per interaction, `WEIGHT METHOD PATH [BODY]`
                          (BODY form-encoded, for POST _search); `#` starts a comment
  --http2                 HTTP/2 instead of HTTP/1.1: with prior knowledge (h2c) on http://,
                          agreed by ALPN on https:// (a server that does not agree fails)
  --ca-file FILE          https: also trust the certificates in this PEM file (a private CA,
                          or a self-signed server certificate); repeat for several. The
                          webpki roots (Mozilla's) are always trusted
  --insecure              https: accept any server certificate, unchecked (a test bed with a
                          throwaway certificate); the handshake's signatures are still checked
  --json                  print the report as JSON (with the per-second timeline)
  --plot FILE.svg         draw the run: requests per second and latency (p50, p90, p99,
                          max) over time, and latency by percentile (SVG)
  --cpu-of LABEL=PID      also report the CPU time process PID (all its threads, user and
                          system, from /proc: Linux only) spent per measured request; repeat
                          for several (the server under test, its upstream, ...)

Latency: the percentiles (\"latency\", the JSON report's latency_us, the chart and the
timeline) count every request due in the measured window, from when it was due: answered
ones until their body ended; failed ones (timeout, refused, reset) until they failed, a
timeout at least --timeout; at a fixed rate, slots never sent until the run stopped. The
failed and the unsent are lower bounds. The answered requests' own percentiles are shown
beside them (\"answered\", answered_latency_us).

Ctrl-C stops the run early, prints the report of what was measured so far and exits 130.

Tokens for every tenant are fetched (or minted) before the run, 16 at a time, and refetched
during it when 80% of their lifetime has passed.
";

#[derive(Clone)]
enum Tokens {
    None,
    /// One `Authorization` value for every request (`--bearer`).
    Static(HeaderValue),
    Mint {
        key: EncodingKey,
        header: Box<Header>,
        issuer: Option<String>,
        audience: Option<String>,
        /// `--scope`: the scope claim, `{tenant}` replaced.
        scope: String,
    },
    Endpoint {
        url: String,
        client_id: String,
        client_secret: String,
        /// `--scope`: the scope asked for, `{tenant}` replaced.
        scope: String,
        /// `--client-auth basic`: the credentials in an HTTP Basic `Authorization` header.
        basic: bool,
    },
}

struct Options {
    target: String,
    connections: usize,
    rate: Option<f64>,
    /// `--duration`, when given.
    duration: Option<Duration>,
    requests: Option<u64>,
    warmup: Duration,
    /// How long to wait for a connection, an answer or a body.
    timeout: Duration,
    /// Above this share of failed requests (or with none answered), the run exits 1.
    max_error_rate: f64,
    /// Above this share of answered requests with a status other than 2xx, the run exits 1.
    max_non_2xx_rate: f64,
    /// At a fixed rate, above this share of the requests due never sent, the run exits 1.
    max_unsent_rate: f64,
    /// `--header`s, sent with every request.
    headers: Vec<(http::HeaderName, HeaderValue)>,
    tenants: Vec<String>,
    tokens: Tokens,
    mix: Vec<Interaction>,
    http2: bool,
    json: bool,
    /// Where the run's SVG chart goes, if anywhere.
    plot: Option<std::path::PathBuf>,
    /// Processes whose CPU time per request is reported, with their labels.
    cpu_of: Vec<(String, u32)>,
    /// `host:port` and the path prefix of `target`.
    authority: String,
    /// `host:port` to connect to (port 80, or 443 for https, when `target` names none).
    connect_to: String,
    base_path: String,
    /// PEM files of certificates to trust besides the webpki roots (`--ca-file`).
    ca_files: Vec<String>,
    /// Accept any server certificate (`--insecure`).
    insecure: bool,
    /// How to speak TLS to an `https://` target; `None` for `http://`.
    tls: Option<TargetTls>,
    /// How to speak TLS to an `https://` token URL (HTTP/1.1).
    token_tls: Option<Arc<rustls::ClientConfig>>,
}

/// TLS to the target: the client's configuration (its ALPN the protocol asked for) and the
/// name the server's certificate must carry.
struct TargetTls {
    config: Arc<rustls::ClientConfig>,
    server_name: rustls::pki_types::ServerName<'static>,
}

impl Options {
    /// How long the measured window lasts at most: `--duration`; else, with `--requests`,
    /// an hour (the run ends when they are measured); else 10 s.
    fn window(&self) -> Duration {
        match (self.duration, self.requests) {
            (Some(duration), _) => duration,
            (None, Some(_)) => Duration::from_secs(3600),
            (None, None) => Duration::from_secs(10),
        }
    }
}

/// The longest `--duration`, `--warmup` or `--timeout`: a year, in seconds.
const MOST_SECONDS: f64 = 365.0 * 86_400.0;

/// The highest `--rate`: the schedule hands out one slot at a time.
const MOST_RATE: f64 = 10_000_000.0;

/// `flag`'s value `given` as seconds: a number from 0 (above 0 unless `zero`) to a year.
fn seconds(flag: &str, given: &str, zero: bool) -> Result<Duration, String> {
    let seconds: f64 = given.parse().map_err(|e| format!("{flag} {given}: {e}"))?;
    let least = if zero { "from 0" } else { "above 0" };
    if !(seconds.is_finite() && (seconds > 0.0 || zero && seconds == 0.0)) || seconds > MOST_SECONDS
    {
        return Err(format!(
            "{flag} {given}: seconds {least}, at most {MOST_SECONDS} (a year)"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// `flag`'s value `given` as a whole number from 1 to `most` (`1e6` taken).
fn whole(flag: &str, given: &str, most: u64) -> Result<u64, String> {
    let number: f64 = given.parse().map_err(|e| format!("{flag} {given}: {e}"))?;
    if !(number >= 1.0 && number <= most as f64 && number.fract() == 0.0) {
        return Err(format!("{flag} {given}: a whole number from 1 to {most}"));
    }
    Ok(number as u64)
}

/// `flag`'s value `given` as a share from 0 to 1.
fn share(flag: &str, given: &str) -> Result<f64, String> {
    let share: f64 = given.parse().map_err(|e| format!("{flag} {given}: {e}"))?;
    if !(0.0..=1.0).contains(&share) {
        return Err(format!("{flag} {given}: a share from 0 to 1"));
    }
    Ok(share)
}

/// The options of the command line.
fn options() -> Result<Options, String> {
    parse_options(std::env::args().skip(1))
}

/// The options given as `args` (the command line without the program's name).
fn parse_options(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut o = Options {
        target: String::new(),
        connections: 16,
        rate: None,
        duration: None,
        requests: None,
        warmup: Duration::from_secs(1),
        timeout: Duration::from_secs(10),
        max_error_rate: 0.01,
        max_non_2xx_rate: 1.0,
        max_unsent_rate: 0.01,
        headers: Vec::new(),
        tenants: Vec::new(),
        tokens: Tokens::None,
        mix: default_mix(),
        http2: false,
        json: false,
        plot: None,
        cpu_of: Vec::new(),
        authority: String::new(),
        connect_to: String::new(),
        base_path: String::new(),
        ca_files: Vec::new(),
        insecure: false,
        tls: None,
        token_tls: None,
    };
    let (mut issuer, mut audience, mut secret) = (None, None, None);
    let (mut key_file, mut alg, mut kid) = (None, None, None::<String>);
    let mut typ = "at+jwt".to_owned();
    let (mut token_url, mut client_id, mut client_secret) = (None, None, None);
    let (mut scope, mut basic) = ("{tenant}".to_owned(), None);
    let mut bearer: Option<String> = None;
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--help" | "-h" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--target" => o.target = value()?.trim_end_matches('/').to_owned(),
            "--connections" => {
                o.connections = whole(&flag, &value()?, 1_000_000)? as usize;
            }
            "--rate" => {
                let given = value()?;
                let rate: f64 = given.parse().map_err(|e| format!("--rate {given}: {e}"))?;
                if !(rate > 0.0 && rate <= MOST_RATE) {
                    return Err(format!(
                        "--rate {given}: requests per second above 0, at most {MOST_RATE} \
                         (for a closed loop, give no --rate)"
                    ));
                }
                o.rate = Some(rate);
            }
            "--duration" => o.duration = Some(seconds(&flag, &value()?, false)?),
            "--requests" => o.requests = Some(whole(&flag, &value()?, u64::MAX >> 11)?),
            "--warmup" => o.warmup = seconds(&flag, &value()?, true)?,
            "--max-error-rate" => o.max_error_rate = share(&flag, &value()?)?,
            "--max-non-2xx-rate" => o.max_non_2xx_rate = share(&flag, &value()?)?,
            "--max-unsent-rate" => o.max_unsent_rate = share(&flag, &value()?)?,
            "--scope" => scope = value()?,
            "--client-auth" => {
                basic = match value()?.as_str() {
                    "basic" => Some(true),
                    "post" => Some(false),
                    other => return Err(format!("--client-auth {other}: basic or post")),
                }
            }
            "--header" => {
                let given = value()?;
                let (name, header) = given
                    .split_once(':')
                    .ok_or(format!("--header {given:?}: expected 'NAME: VALUE'"))?;
                let name = http::HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| format!("--header {given:?}: {name:?} is not a header name"))?;
                let header = HeaderValue::from_str(header.trim()).map_err(|_| {
                    format!("--header {given:?}: the value is not one a header can carry")
                })?;
                o.headers.push((name, header));
            }
            "--timeout" => o.timeout = seconds(&flag, &value()?, false)?,
            "--tenants" => o.tenants = value()?.split(',').map(str::to_owned).collect(),
            "--tenant-count" => {
                let n = whole(&flag, &value()?, 1_000_000)?;
                o.tenants = (0..n)
                    .map(|i| format!("00000000-0000-4000-8000-{i:012x}"))
                    .collect();
            }
            "--mint-hs256" => secret = Some(value()?),
            "--mint-key" => key_file = Some(value()?),
            "--alg" => alg = Some(value()?),
            "--kid" => kid = Some(value()?),
            "--typ" => typ = value()?,
            "--issuer" => issuer = Some(value()?),
            "--audience" => audience = Some(value()?),
            "--token-url" => token_url = Some(value()?),
            "--bearer" => bearer = Some(value()?),
            "--client-id" => client_id = Some(value()?),
            "--client-secret" => client_secret = Some(value()?),
            "--path" => {
                let path = value()?;
                if !path.starts_with('/') {
                    return Err(format!(
                        "--path {path:?}: a path starts with / (it goes after --target's)"
                    ));
                }
                o.mix = vec![Interaction {
                    weight: 1,
                    method: Method::GET,
                    path,
                    body: String::new(),
                }]
            }
            "--mix" => {
                let file = value()?;
                let text = std::fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"))?;
                o.mix = parse_mix(&text).map_err(|e| format!("{file}: {e}"))?;
            }
            "--json" => o.json = true,
            "--plot" => {
                let file = std::path::PathBuf::from(value()?);
                if file.extension().and_then(|e| e.to_str()) != Some("svg") {
                    return Err(format!(
                        "--plot {}: the chart is SVG: name a .svg file",
                        file.display()
                    ));
                }
                o.plot = Some(file);
            }
            "--http2" => o.http2 = true,
            "--ca-file" => o.ca_files.push(value()?),
            "--insecure" => o.insecure = true,
            "--cpu-of" => {
                let given = value()?;
                let (label, pid) = given
                    .split_once('=')
                    .ok_or(format!("--cpu-of {given}: expected LABEL=PID"))?;
                let pid = pid.parse().map_err(|e| format!("--cpu-of {given}: {e}"))?;
                cpu_seconds(pid).map_err(|e| format!("--cpu-of {given}: {e}"))?;
                o.cpu_of.push((label.to_owned(), pid));
            }
            other => return Err(format!("unknown option {other}\n\n{HELP}")),
        }
    }
    if o.target.is_empty() {
        return Err(format!("--target is required\n\n{HELP}"));
    }
    let minting_key = match (secret, key_file) {
        (Some(_), Some(_)) => return Err("--mint-hs256 or --mint-key, not both".to_owned()),
        (Some(secret), None) => Some((
            EncodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        )),
        (None, Some(file)) => Some(minting_key(&file, alg.as_deref().unwrap_or("ES256"))?),
        (None, None) => None,
    };
    if o.insecure && !o.ca_files.is_empty() {
        return Err("--ca-file or --insecure, not both".to_owned());
    }
    let sources = [minting_key.is_some(), token_url.is_some(), bearer.is_some()];
    if sources.iter().filter(|given| **given).count() > 1 {
        return Err("give one of --mint-hs256/--mint-key, --token-url and --bearer".to_owned());
    }
    if basic.is_some() && token_url.is_none() {
        return Err("--client-auth is for --token-url's client".to_owned());
    }
    let tokens_given = sources.iter().any(|given| *given);
    if tokens_given
        && o.headers
            .iter()
            .any(|(name, _)| name == http::header::AUTHORIZATION)
    {
        return Err(
            "--header Authorization beside a token: give the token with --bearer".to_owned(),
        );
    }
    if let Some(token) = bearer {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "--bearer: not a token a header can carry".to_owned())?;
        o.tokens = Tokens::Static(value);
        return finish(o);
    }
    o.tokens = match (minting_key, token_url) {
        (Some((key, algorithm)), _) => {
            let mut header = Header::new(algorithm);
            header.kid = kid;
            header.typ = Some(typ);
            Tokens::Mint {
                key,
                header: Box::new(header),
                issuer,
                audience,
                scope,
            }
        }
        (None, Some(url)) => Tokens::Endpoint {
            url,
            client_id: client_id.ok_or("--token-url needs --client-id")?,
            client_secret: client_secret.ok_or("--token-url needs --client-secret")?,
            scope,
            basic: basic.unwrap_or(false),
        },
        (None, None) => Tokens::None,
    };
    finish(o)
}

/// Checks the target and fills in what follows from it.
fn finish(mut o: Options) -> Result<Options, String> {
    let target: Uri = o.target.parse().map_err(|e| format!("--target: {e}"))?;
    o.connect_to = connect_address(&target)?;
    o.authority = target
        .authority()
        .map(|a| a.to_string())
        .ok_or("--target needs a host")?;
    o.base_path = target.path().trim_end_matches('/').to_owned();
    // Built here, whatever the URLs, so that a bad `--ca-file` is an error before the run.
    // (No ALPN: hyper-rustls, speaking HTTP/1.1 only, offers none.)
    o.token_tls = Some(tls_config(&o, &[])?);
    if target.scheme_str() == Some("https") {
        let host = target.host().ok_or("--target needs a host")?;
        // `[::1]` names the address `::1`.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name =
            rustls::pki_types::ServerName::try_from(host).map_err(|e| format!("--target: {e}"))?;
        let alpn: &[&[u8]] = if o.http2 { &[b"h2"] } else { &[b"http/1.1"] };
        o.tls = Some(TargetTls {
            config: tls_config(&o, alpn)?,
            server_name,
        });
    }
    if o.tenants.is_empty() {
        o.tenants
            .push("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f".to_owned());
    }
    Ok(o)
}

/// Where to connect for `target`, an `http://` or `https://` URL: its host and port, 80 (443
/// for https) when it names none.
fn connect_address(target: &Uri) -> Result<String, String> {
    let default_port = match target.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return Err("--target must be an http:// or https:// URL".to_owned()),
    };
    let authority = target.authority().ok_or("--target needs a host")?;
    Ok(format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(default_port)
    ))
}

/// A TLS client configuration offering the protocols `alpn`: the webpki roots and
/// `--ca-file`'s certificates, or (`--insecure`) any certificate.
fn tls_config(o: &Options, alpn: &[&[u8]]) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let mut config = if o.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for file in &o.ca_files {
            let mut found = 0;
            for certificate in
                CertificateDer::pem_file_iter(file).map_err(|e| format!("--ca-file {file}: {e}"))?
            {
                let certificate = certificate.map_err(|e| format!("--ca-file {file}: {e}"))?;
                roots
                    .add(certificate)
                    .map_err(|e| format!("--ca-file {file}: {e}"))?;
                found += 1;
            }
            if found == 0 {
                return Err(format!("--ca-file {file}: no CERTIFICATE in it"));
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(Arc::new(config))
}

/// `--insecure`: any server certificate is taken, unchecked; the handshake's signatures are
/// still verified (with the certificate's key), so the connection is at least whole.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The key in PEM `file` for `alg`, an asymmetric JWS algorithm.
fn minting_key(file: &str, alg: &str) -> Result<(EncodingKey, Algorithm), String> {
    let algorithm: Algorithm = alg.parse().map_err(|_| format!("--alg {alg}: unknown"))?;
    let pem = std::fs::read(file).map_err(|e| format!("--mint-key {file}: {e}"))?;
    let key = match algorithm {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => EncodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => {
            return Err(format!(
                "--alg {alg}: --mint-key takes an asymmetric algorithm"
            ))
        }
    }
    .map_err(|e| format!("--mint-key {file}: not a {alg} private key: {e}"))?;
    Ok((key, algorithm))
}

/// One kind of request in the mix, and how often it comes.
struct Interaction {
    weight: u32,
    method: Method,
    path: String,
    body: String,
}

/// The deployed clients' interactions, with weights (reads dominate).
const MIX: [(u32, Method, &str); 10] = [
    (20, Method::GET, "/Patient/123"),
    (10, Method::POST, "/Patient/_search"),
    (
        15,
        Method::GET,
        "/Observation?patient=123&category=vital-signs&_sort:desc=date",
    ),
    (
        10,
        Method::GET,
        "/Observation?patient=123&category=vital-signs&_sort=-date",
    ),
    (10, Method::GET, "/Condition?patient=123&_count=10"),
    (
        10,
        Method::GET,
        "/Encounter?patient=123&_sort:desc=date&_count=1",
    ),
    (8, Method::GET, "/AllergyIntolerance?patient=123"),
    (7, Method::GET, "/MedicationOrder?patient=123&_count=10"),
    (5, Method::GET, "/MedicationRequest?patient=123&_count=10"),
    (5, Method::GET, "/Coverage?patient=123"),
];

fn default_mix() -> Vec<Interaction> {
    MIX.iter()
        .map(|(weight, method, path)| Interaction {
            weight: *weight,
            method: method.clone(),
            path: (*path).to_owned(),
            body: if method == Method::POST {
                "family=chalmers&given=peter&_count=10".to_owned()
            } else {
                String::new()
            },
        })
        .collect()
}

/// Reads a `--mix` file: `WEIGHT METHOD PATH [BODY]` per line.
fn parse_mix(text: &str) -> Result<Vec<Interaction>, String> {
    let mut mix = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [weight, method, path, rest @ ..] = fields.as_slice() else {
            return Err(format!(
                "line {}: expected WEIGHT METHOD PATH [BODY]",
                number + 1
            ));
        };
        let weight: u32 = weight
            .parse()
            .map_err(|_| format!("line {}: weight {weight:?} is not a number", number + 1))?;
        let method: Method = method
            .to_ascii_uppercase()
            .parse()
            .map_err(|_| format!("line {}: method {method:?}", number + 1))?;
        if !path.starts_with('/') {
            return Err(format!("line {}: the path must start with /", number + 1));
        }
        if rest.len() > 1 {
            return Err(format!(
                "line {}: the body must have no spaces (form-encode it)",
                number + 1
            ));
        }
        if weight > 0 {
            mix.push(Interaction {
                weight,
                method,
                path: (*path).to_owned(),
                body: rest.first().map_or(String::new(), |b| (*b).to_owned()),
            });
        }
    }
    if mix.is_empty() {
        return Err("the mix has no interaction with a weight above zero".to_owned());
    }
    Ok(mix)
}

/// Request `i`'s interaction: a fixed pseudo-random walk through the weights, so every run
/// sends the same sequence.
fn pick(i: u64, mix: &[Interaction]) -> &Interaction {
    let total: u64 = mix.iter().map(|m| u64::from(m.weight)).sum();
    let mut at = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % total;
    for interaction in mix {
        if at < u64::from(interaction.weight) {
            return interaction;
        }
        at -= u64::from(interaction.weight);
    }
    &mix[0]
}

/// Tokens per tenant, refetched when close to expiry.
struct TokenBook {
    tokens: Tokens,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// By tenant index: the `Authorization` value ready to send. (One slot per tenant, so a
    /// request costs the load generator the same whatever the number of tenants.)
    held: Vec<Mutex<Option<Held>>>,
    /// By tenant index: held by the one fetch under way.
    fetching: Vec<tokio::sync::Mutex<()>>,
    /// How long the token endpoint may take to answer (`--timeout`).
    timeout: Duration,
    /// By tenant index: whether a refetch is under way (one at a time).
    refetching: Vec<std::sync::atomic::AtomicBool>,
}

/// A token in use.
struct Held {
    value: HeaderValue,
    /// From then, it is fetched again in the background (80% of its lifetime).
    refetch_at: Instant,
    /// From then, a request waits for a fresh one (a tenth of its lifetime, at most a
    /// minute, before it expires).
    expires_at: Instant,
}

impl TokenBook {
    /// The `Authorization` value for tenant number `index`, `tenant`. Past 80% of its
    /// lifetime a token is fetched again on a task of its own, one fetch at a time, while
    /// requests go on with the one held: no measured request waits for the token endpoint
    /// (unless a token expires before a new one comes).
    async fn bearer(
        self: &Arc<Self>,
        index: usize,
        tenant: &str,
    ) -> Result<Option<HeaderValue>, String> {
        match &self.tokens {
            Tokens::None => return Ok(None),
            Tokens::Static(value) => return Ok(Some(value.clone())),
            _ => {}
        }
        if let Some(value) = self.held_or_refetch(index, tenant) {
            return Ok(Some(value));
        }
        // None held, or it expired: one fetch a tenant at a time (a refetch under way
        // included); the others wait for it, then take what it got.
        let _turn = self.fetching[index].lock().await;
        if let Some(held) = &*self.held[index].lock().unwrap() {
            if Instant::now() < held.expires_at {
                return Ok(Some(held.value.clone()));
            }
        }
        self.fetch(index, tenant).await.map(Some)
    }

    /// The token held for tenant `index` if it has not expired, starting its refetch when due.
    fn held_or_refetch(self: &Arc<Self>, index: usize, tenant: &str) -> Option<HeaderValue> {
        if let Some(held) = &*self.held[index].lock().unwrap() {
            let now = Instant::now();
            if now < held.expires_at {
                if now >= held.refetch_at && !self.refetching[index].swap(true, Ordering::AcqRel) {
                    let (book, tenant) = (Arc::clone(self), tenant.to_owned());
                    tokio::spawn(async move {
                        let turn = book.fetching[index].lock().await;
                        let fetched = book.fetch(index, &tenant).await;
                        drop(turn);
                        if let Err(error) = fetched {
                            eprintln!("\nrefetching a token failed: {error}");
                            // At most one try a second against a failing endpoint.
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        book.refetching[index].store(false, Ordering::Release);
                    });
                }
                return Some(held.value.clone());
            }
        }
        None
    }

    /// Gets a token for `tenant` and holds it in slot `index`.
    async fn fetch(&self, index: usize, tenant: &str) -> Result<HeaderValue, String> {
        let (token, lifetime) = match &self.tokens {
            Tokens::None | Tokens::Static(_) => unreachable!("answered above"),
            Tokens::Mint {
                key,
                header,
                issuer,
                audience,
                scope,
            } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let scope = scope.replace("{tenant}", tenant);
                let claims = json!({"iss": issuer, "aud": audience, "sub": "loadgen", "iat": now,
                                    "exp": now + 3600, "scope": scope});
                let token = encode(header, &claims, key).map_err(|e| e.to_string())?;
                (token, 3600)
            }
            Tokens::Endpoint {
                url,
                client_id,
                client_secret,
                scope,
                basic,
            } => {
                let scope = urlencode(&scope.replace("{tenant}", tenant));
                let mut request =
                    Request::post(url).header("content-type", "application/x-www-form-urlencoded");
                let form = if *basic {
                    // RFC 6749 §2.3.1: each form-encoded, then joined and base64-encoded.
                    use base64::Engine as _;
                    let pair = format!("{}:{}", urlencode(client_id), urlencode(client_secret));
                    let encoded = base64::engine::general_purpose::STANDARD.encode(pair);
                    request = request.header("authorization", format!("Basic {encoded}"));
                    format!("grant_type=client_credentials&scope={scope}")
                } else {
                    format!(
                        "grant_type=client_credentials&client_id={}&client_secret={}&scope={scope}",
                        urlencode(client_id),
                        urlencode(client_secret),
                    )
                };
                let request = request.body(Full::from(form)).map_err(|e| e.to_string())?;
                let asked = async {
                    let response = self
                        .client
                        .request(request)
                        .await
                        .map_err(|e| with_causes(&e))?;
                    let status = response.status();
                    let body = response
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?
                        .to_bytes();
                    Ok::<_, String>((status, body))
                };
                let (status, body) = tokio::time::timeout(self.timeout, asked)
                    .await
                    .map_err(|_| format!("no answer within {:?}", self.timeout))??;
                let reply: serde_json::Value =
                    serde_json::from_slice(&body).map_err(|e| e.to_string())?;
                let token = reply["access_token"]
                    .as_str()
                    .ok_or(format!("token endpoint answered {status}: {reply}"))?;
                (
                    token.to_owned(),
                    reply["expires_in"].as_u64().unwrap_or(300),
                )
            }
        };
        let now = Instant::now();
        // (At most a year: `Instant` arithmetic must not overflow.)
        let lifetime = Duration::from_secs(lifetime.clamp(1, 365 * 86_400));
        let refetch_at = now + lifetime.mul_f64(0.8);
        // Given up on a tenth of its lifetime (at most a minute) before it expires.
        let expires_at = now + lifetime - lifetime.div_f64(10.0).min(Duration::from_secs(60));
        let value = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| "the token is not a valid header value".to_owned())?;
        *self.held[index].lock().unwrap() = Some(Held {
            value: value.clone(),
            refetch_at,
            expires_at,
        });
        Ok(value)
    }
}

/// An error and its causes, `: `-separated (hyper-util's client says only "client error
/// (Connect)"; its causes say which certificate or address).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        text.push_str(": ");
        text.push_str(&error.to_string());
        cause = error.source();
    }
    text
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Default)]
struct Tally {
    statuses: BTreeMap<u16, u64>,
    errors: BTreeMap<String, u64>,
    /// Slots of the rate's schedule due in the measured window and never sent: every
    /// connection was busy until the window closed.
    unsent: u64,
    /// Latencies above the histograms' top ([`MOST_LATENCY_US`]), recorded as that.
    clamped: u64,
}

/// The longest latency the histograms hold, in µs (600 s); a longer one is recorded as this,
/// and counted.
const MOST_LATENCY_US: u64 = 600_000_000;

/// One worker's own connection to the target, opened on first use and again after a failure.
enum Connection {
    None,
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Connection {
    async fn send(
        &mut self,
        options: &Options,
        mut request: Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, String> {
        // A connection the server closed after its last answer (keep-alive ended, as nginx
        // does after `keepalive_requests`) is opened again and the request sent on the new
        // one: only a request actually sent can fail.
        loop {
            let fresh = match self {
                Connection::None => true,
                Connection::Http1(sender) => sender.is_closed(),
                Connection::Http2(sender) => sender.is_closed(),
            };
            if fresh {
                *self = Connection::open(options).await?;
            }
            let ready = match self {
                Connection::Http1(sender) => sender.ready().await,
                Connection::Http2(sender) => sender.ready().await,
                Connection::None => unreachable!("opened above"),
            };
            if let Err(e) = ready {
                *self = Connection::None;
                if fresh {
                    return Err(format!("send: {e}"));
                }
                continue;
            }
            let sent = match self {
                Connection::Http1(sender) => sender.try_send_request(request).await,
                Connection::Http2(sender) => sender.try_send_request(request).await,
                Connection::None => unreachable!("opened above"),
            };
            match sent {
                Ok(response) => return Ok(response),
                Err(mut e) => {
                    *self = Connection::None;
                    match e.take_message() {
                        // Not written: the connection closed first.
                        Some(unsent) if !fresh => request = unsent,
                        _ => return Err(format!("send: {}", e.into_error())),
                    }
                }
            }
        }
    }

    async fn open(options: &Options) -> Result<Connection, String> {
        let stream = tokio::net::TcpStream::connect(&options.connect_to)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        let Some(tls) = &options.tls else {
            return Self::handshake(stream, options.http2).await;
        };
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config))
            .connect(tls.server_name.clone(), stream)
            .await
            .map_err(|e| format!("tls: {e}"))?;
        if options.http2 && stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err("tls: the server did not agree to HTTP/2 (ALPN h2)".to_owned());
        }
        Self::handshake(stream, options.http2).await
    }

    /// HTTP/1.1 or HTTP/2 on a connected stream, its connection driven by a task of its own.
    async fn handshake<S>(stream: S, http2: bool) -> Result<Connection, String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let io = hyper_util::rt::TokioIo::new(stream);
        if http2 {
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(connection);
            Ok(Connection::Http2(sender))
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(connection);
            Ok(Connection::Http1(sender))
        }
    }
}

struct Shared {
    options: Options,
    tokens: Arc<TokenBook>,
    sequence: AtomicU64,
    /// Requests due in the measured window that were sent (answered or not).
    sent: AtomicU64,
    /// Of those, the µs from when each was sent until it was answered or failed, summed.
    serving_us: AtomicU64,
    /// At a fixed rate: slots due in the measured window that came when every connection
    /// was busy, so waited for one to be free (or were never sent).
    all_busy: AtomicU64,
    /// With `--requests N`: how many of the N measured requests were taken.
    claimed: AtomicU64,
    /// Set on Ctrl-C: the schedule stops.
    interrupted: std::sync::atomic::AtomicBool,
    /// Measured requests sent and completed, answered or failed.
    done: AtomicU64,
    /// Of those, the failed (no answer).
    failed: AtomicU64,
    measuring_from: Instant,
    stop_at: Instant,
    /// What the workers measured, in [`MEASURED_SHARDS`] shards at most: worker `w` records
    /// into shard `w % len`, so few workers share a lock (the progress line reads them once a
    /// second) and 10,000 connections do not hold 10,000 sets of histograms (the whole run's
    /// is about 170 KiB, a second's about 24 KiB).
    measured: Vec<Mutex<Measured>>,
}

/// The most shards of [`Shared::measured`] (a second's histogram is about 24 KiB).
const MEASURED_SHARDS: usize = 64;

/// Some workers' statuses and errors, their latencies, and each measured second's latencies
/// by when the requests were due.
struct Measured {
    tally: Tally,
    /// Every request due in the window, from when it was due (µs): answered ones until their
    /// body ended, failed ones until they failed and unsent slots until the run stopped (the
    /// last two lower bounds).
    latency: Histogram<u64>,
    /// The answered requests' latencies only (any status).
    answered_latency: Histogram<u64>,
    /// At a fixed rate: from when each request was due to when it was sent (µs).
    send_delay: Histogram<u64>,
    /// Each second's share of `latency`, by when the requests were due.
    seconds: Vec<Histogram<u64>>,
    /// The failed requests by the second they were due (also in `seconds`).
    errors_by_second: Vec<u64>,
}

impl Default for Measured {
    fn default() -> Self {
        Self {
            tally: Tally::default(),
            latency: histogram(),
            answered_latency: histogram(),
            send_delay: histogram(),
            seconds: Vec::new(),
            errors_by_second: Vec::new(),
        }
    }
}

impl Measured {
    /// Everything the workers measured, together.
    fn merged(shards: &[Mutex<Measured>]) -> Measured {
        let mut all = Measured::default();
        for worker in shards {
            let worker = worker.lock().unwrap();
            for (status, count) in &worker.tally.statuses {
                *all.tally.statuses.entry(*status).or_default() += count;
            }
            for (error, count) in &worker.tally.errors {
                *all.tally.errors.entry(error.clone()).or_default() += count;
            }
            all.tally.unsent += worker.tally.unsent;
            all.tally.clamped += worker.tally.clamped;
            let _ = all.latency.add(&worker.latency);
            let _ = all.answered_latency.add(&worker.answered_latency);
            let _ = all.send_delay.add(&worker.send_delay);
            if all.seconds.len() < worker.seconds.len() {
                all.seconds
                    .resize_with(worker.seconds.len(), plot::second_histogram);
            }
            for (sum, second) in all.seconds.iter_mut().zip(&worker.seconds) {
                let _ = sum.add(second);
            }
            if all.errors_by_second.len() < worker.errors_by_second.len() {
                all.errors_by_second
                    .resize(worker.errors_by_second.len(), 0);
            }
            for (sum, errors) in all
                .errors_by_second
                .iter_mut()
                .zip(&worker.errors_by_second)
            {
                *sum += errors;
            }
        }
        all
    }

    /// Records a request due in measured second `second` that took `took` µs from when it
    /// was due: its outcome, or `None` for a slot never sent. Every one is in the latencies;
    /// a failed or unsent one with the time it waited, a lower bound of what its answer
    /// would have taken (a timeout's at least `--timeout`).
    fn record(&mut self, second: usize, took: u64, outcome: Option<Result<u16, String>>) {
        match outcome {
            Some(Ok(status)) => {
                *self.tally.statuses.entry(status).or_default() += 1;
                self.answered_latency.saturating_record(took);
            }
            Some(Err(error)) => {
                *self.tally.errors.entry(error).or_default() += 1;
                if self.errors_by_second.len() <= second {
                    self.errors_by_second.resize(second + 1, 0);
                }
                self.errors_by_second[second] += 1;
            }
            None => self.tally.unsent += 1,
        }
        if took > MOST_LATENCY_US {
            self.tally.clamped += 1;
        }
        self.latency.saturating_record(took);
        if self.seconds.len() <= second {
            self.seconds.resize_with(second + 1, plot::second_histogram);
        }
        self.seconds[second].saturating_record(took);
    }

    /// The p99 and max of measured second `second`, over every worker.
    fn second(shards: &[Mutex<Measured>], second: usize) -> Option<(u64, u64)> {
        let mut sum = plot::second_histogram();
        for worker in shards {
            if let Some(h) = worker.lock().unwrap().seconds.get(second) {
                let _ = sum.add(h);
            }
        }
        (!sum.is_empty()).then(|| (sum.value_at_quantile(0.99), sum.max()))
    }
}

impl Shared {
    /// Sends request `i` for worker `worker`, and records it when it was due within the
    /// measured window.
    async fn one(&self, worker: usize, connection: &mut Connection, i: u64, due: Instant) {
        let index = (i as usize) % self.options.tenants.len();
        let tenant = &self.options.tenants[index];
        let Interaction {
            method, path, body, ..
        } = pick(i, &self.options.mix);
        if self.measures(due) {
            self.sent.fetch_add(1, Ordering::Relaxed);
            if self.options.rate.is_some() {
                // How late the request is sent: the wait for a free connection, and the
                // schedule's own lag.
                let late = due.elapsed().as_micros().max(1) as u64;
                let shard = &self.measured[worker % self.measured.len()];
                shard.lock().unwrap().send_delay.saturating_record(late);
            }
        }
        let attempt = async {
            // HTTP/1.1 sends the path with a Host header; HTTP/2 the whole URI.
            let uri: Uri = if self.options.http2 {
                format!("{}{}", self.options.target, path)
            } else {
                format!("{}{}", self.options.base_path, path)
            }
            .parse()
            .map_err(|e| format!("{e}"))?;
            let mut request = Request::builder()
                .method(method.clone())
                .uri(uri)
                .header("accept", "application/fhir+json");
            if !self.options.http2 {
                request = request.header("host", &self.options.authority);
            }
            if !body.is_empty() {
                request = request.header("content-type", "application/x-www-form-urlencoded");
            }
            for (name, value) in &self.options.headers {
                request = request.header(name, value);
            }
            if let Some(value) = self.tokens.bearer(index, tenant).await? {
                request = request.header(http::header::AUTHORIZATION, value);
            }
            let request = request
                .body(Full::from(body.clone()))
                .map_err(|e| e.to_string())?;
            let response = connection.send(&self.options, request).await?;
            let status = response.status().as_u16();
            response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {e}"))?;
            Ok::<u16, String>(status)
        };
        let sending = Instant::now();
        let outcome = match tokio::time::timeout(self.options.timeout, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // The connection may still owe an answer: do not reuse it.
                *connection = Connection::None;
                Err("timeout".to_owned())
            }
        };
        if self.measures(due) {
            let serving = sending.elapsed().as_micros() as u64;
            self.serving_us.fetch_add(serving, Ordering::Relaxed);
            let took = due.elapsed().as_micros().max(1) as u64;
            self.record(worker, due, took, Some(outcome));
        }
    }

    /// Whether a request due at `due` is in the measured window.
    fn measures(&self, due: Instant) -> bool {
        due >= self.measuring_from && due < self.stop_at
    }

    /// Records a request due at `due` that took `took` µs from then: its outcome, or `None`
    /// for a slot never sent (see [`Measured::record`]).
    fn record(&self, worker: usize, due: Instant, took: u64, outcome: Option<Result<u16, String>>) {
        let second = due.duration_since(self.measuring_from).as_secs() as usize;
        let sent = outcome.is_some();
        if matches!(outcome, Some(Err(_))) {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let shard = &self.measured[worker % self.measured.len()];
        shard.lock().unwrap().record(second, took, outcome);
        if sent {
            self.done.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// With `--requests N`, takes one of the N measured requests for a request due at `due`
    /// (before it is sent, so exactly N are); false when all N are taken.
    fn claim(&self, due: Instant) -> bool {
        match self.options.requests {
            Some(n) if self.measures(due) => self.claimed.fetch_add(1, Ordering::Relaxed) < n,
            _ => true,
        }
    }

    fn finished(&self) -> bool {
        Instant::now() >= self.stop_at
            || self
                .options
                .requests
                .is_some_and(|n| self.claimed.load(Ordering::Relaxed) >= n)
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MOST_LATENCY_US, 3).expect("histogram bounds")
}

/// The token endpoint's connector: `http://`, or `https://` with the target's trust
/// (`--ca-file`, `--insecure`), HTTP/1.1.
fn token_connector(options: &Options) -> hyper_rustls::HttpsConnector<HttpConnector> {
    let config = options.token_tls.clone().expect("made with the options");
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(Arc::unwrap_or_clone(config))
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

#[tokio::main]
async fn main() {
    let options = match options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    tower_fhir::install_crypto_provider();
    let tokens = TokenBook {
        tokens: options.tokens.clone(),
        client: Client::builder(TokioExecutor::new()).build(token_connector(&options)),
        held: options.tenants.iter().map(|_| Mutex::default()).collect(),
        refetching: options.tenants.iter().map(|_| Default::default()).collect(),
        fetching: options.tenants.iter().map(|_| Default::default()).collect(),
        timeout: options.timeout,
    };
    let tokens = Arc::new(tokens);
    if let Err(message) = prefetch(&tokens, &options.tenants).await {
        eprintln!("could not get tokens: {message}");
        std::process::exit(1);
    }
    // Over TLS, one connection first: a certificate or protocol the load generator cannot
    // take is a mistake in the options (exit 2), not thousands of failed handshakes counted
    // as the target's errors. (A target that refuses connections is measured as such.)
    if options.tls.is_some() {
        let probe = tokio::time::timeout(options.timeout, Connection::open(&options)).await;
        if let Ok(Err(message)) = probe {
            if message.starts_with("tls:") {
                eprintln!("cannot speak TLS to the target: {message}");
                std::process::exit(2);
            }
        }
    }
    let start = Instant::now();
    let measuring_from = start + options.warmup;
    let stop_at = measuring_from + options.window();
    let options_connections = options.connections;
    let shared = Arc::new(Shared {
        tokens,
        options,
        sequence: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        serving_us: AtomicU64::new(0),
        all_busy: AtomicU64::new(0),
        interrupted: std::sync::atomic::AtomicBool::new(false),
        claimed: AtomicU64::new(0),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        measuring_from,
        stop_at,
        measured: (0..options_connections.clamp(1, MEASURED_SHARDS))
            .map(|_| Mutex::default())
            .collect(),
    });

    let progress = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let (mut last, mut last_failed) = (0, 0);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = shared.done.load(Ordering::Relaxed);
                let failed = shared.failed.load(Ordering::Relaxed);
                // The last whole second measured: its p99 and max.
                let recent = Instant::now()
                    .checked_duration_since(measuring_from)
                    .and_then(|d| (d.as_secs() as usize).checked_sub(1))
                    .and_then(|second| Measured::second(&shared.measured, second));
                // A second with nothing completed (a stalled target) says so, not the last
                // figures; the line is cleared to its end (`ESC [K`) each time.
                let latency = recent.map_or("  p99 -  max -".to_owned(), |(p99, max)| {
                    format!(
                        "  p99 {:.2} ms  max {:.2} ms",
                        p99 as f64 / 1000.0,
                        max as f64 / 1000.0
                    )
                });
                // Answered a second, and the failed (no answer) beside them when there are any.
                let failing = failed - last_failed;
                let errors = if failing > 0 {
                    format!("  {failing} errors/s")
                } else {
                    String::new()
                };
                eprint!(
                    "\r{:>6.1} s  {:>8} requests  {:>8} req/s{errors}{latency}\x1b[K",
                    start.elapsed().as_secs_f64(),
                    done,
                    (done - last).saturating_sub(failing)
                );
                (last, last_failed) = (done, failed);
            }
        })
    };

    // The watched processes' CPU time when measuring starts (and, below, when it ends).
    let cpu_at_start = {
        let watched = shared.options.cpu_of.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(measuring_from.into()).await;
            cpu_times(&watched)
        })
    };

    // At a fixed rate, one thread keeps the schedule: it sleeps (`std::thread::sleep`, to
    // within tens of µs, where tokio's timer rounds up to the next millisecond) until each
    // slot is due and puts it in one queue, which the workers take from in turn: a slot goes
    // to a worker waiting for one, or, with every connection busy, waits for the first that
    // is free.
    let (hand, queue) = tokio::sync::mpsc::unbounded_channel::<Slot>();
    let queue = Arc::new(tokio::sync::Mutex::new(queue));
    if let Some(rate) = shared.options.rate {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || keep_schedule(&shared, rate, start, hand));
    } else {
        drop(hand);
    }
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..shared.options.connections {
        let shared = Arc::clone(&shared);
        let queue = Arc::clone(&queue);
        workers.spawn(async move {
            let mut connection = Connection::None;
            if shared.options.rate.is_none() {
                while !shared.finished() {
                    let due = Instant::now();
                    if !shared.claim(due) {
                        break;
                    }
                    let i = shared.sequence.fetch_add(1, Ordering::Relaxed);
                    shared.one(worker, &mut connection, i, due).await;
                    if matches!(connection, Connection::None) {
                        // The request failed and took its connection with it (refused, reset,
                        // timed out): a short pause before the next, so a dead target is not
                        // asked in a tight loop that takes a whole CPU.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                return;
            }
            // Open the connection before the first slot (spread over the warm-up), so every
            // connection is held for the whole run.
            let opening = shared
                .options
                .warmup
                .mul_f64(0.5 * worker as f64 / shared.options.connections as f64);
            tokio::time::sleep_until((start + opening).into()).await;
            let opening = Connection::open(&shared.options);
            if let Ok(Ok(opened)) = tokio::time::timeout(shared.options.timeout, opening).await {
                connection = opened;
            }
            loop {
                let free_since = Instant::now();
                let next = queue.lock().await.recv().await;
                let Some(Slot { i, due, handed }) = next else {
                    return;
                };
                // Handed out before this worker was free: no connection was (a free one
                // would have been waiting for it), so it waited for this one.
                let waited = handed < free_since;
                if waited && shared.measures(due) {
                    shared.all_busy.fetch_add(1, Ordering::Relaxed);
                }
                // A late request is measured from when it was due (coordinated-omission
                // correction). The slots still waiting for a connection when the window
                // closed are the backlog: each counts, unsent, with the least latency it
                // would have had. (One a waiting worker takes is sent, however late the
                // schedule handed it out.)
                if waited && free_since >= shared.stop_at {
                    if shared.measures(due) {
                        let took = Instant::now().duration_since(due).as_micros().max(1);
                        shared.record(worker, due, took as u64, None);
                    }
                    continue;
                }
                shared.one(worker, &mut connection, i, due).await;
            }
        });
    }
    // Every worker ends at most `--timeout` after the measured window; Ctrl-C ends them at once.
    let interrupted = tokio::select! {
        _ = async { while workers.join_next().await.is_some() {} } => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        shared.interrupted.store(true, Ordering::Relaxed);
        workers.abort_all();
    }
    let cpu_at_end = cpu_times(&shared.options.cpu_of);
    progress.abort();
    eprintln!();
    let elapsed = Instant::now()
        .min(shared.stop_at)
        .saturating_duration_since(measuring_from);
    let cpu = match cpu_at_start.await {
        Ok(Ok(start)) => match cpu_at_end {
            Ok(end) => start
                .iter()
                .zip(end)
                .map(|((label, before), (_, after))| (label.clone(), after - before))
                .collect(),
            Err(message) => {
                eprintln!("CPU time not measured: {message}");
                Vec::new()
            }
        },
        Ok(Err(message)) => {
            eprintln!("CPU time not measured: {message}");
            Vec::new()
        }
        Err(_) => Vec::new(),
    };
    let measured = Measured::merged(&shared.measured);
    let timeline = {
        // The seconds inside the measured window (a request due at its very end may run on).
        let within = (elapsed.as_secs_f64().ceil() as usize).min(measured.seconds.len());
        plot::timeline(&measured.seconds[..within])
    };
    // The report first: a chart that cannot be written loses nothing of the run.
    let latency = &measured.latency;
    let failed = report(&shared, &measured, elapsed, &cpu, &timeline, interrupted);
    if let Some(file) = &shared.options.plot {
        let title = format!(
            "{} - {}, {} connections",
            shared.options.target,
            shared
                .options
                .rate
                .map_or("closed loop".to_owned(), |r| format!("{r} req/s")),
            shared.options.connections
        );
        match plot::svg(file, &title, &timeline, latency, &measured.answered_latency) {
            Ok(()) => eprintln!("plot written to {}", file.display()),
            Err(message) => {
                eprintln!("{message}");
                std::process::exit(1);
            }
        }
    }
    if interrupted {
        std::process::exit(130);
    }
    if failed {
        std::process::exit(1);
    }
}

/// A slot of a fixed rate's schedule: its number, when it was due, when it was handed out.
struct Slot {
    i: u64,
    due: Instant,
    handed: Instant,
}

/// Hands each slot of a fixed rate's schedule, from `start` until the measured window ends, to
/// the workers' queue when it is due: slot `k` is due at `start + k / rate`.
fn keep_schedule(
    shared: &Shared,
    rate: f64,
    start: Instant,
    queue: tokio::sync::mpsc::UnboundedSender<Slot>,
) {
    // (Compared as seconds first: at a rate of 1e-300, slot 1's offset is no `Duration`.)
    let window = shared.stop_at.duration_since(start).as_secs_f64();
    for k in 0u64.. {
        let offset = k as f64 / rate;
        if offset >= window {
            return;
        }
        let due = start + Duration::from_secs_f64(offset);
        if due >= shared.stop_at {
            return;
        }
        // Sleep until due, waking at least every 100 ms to see whether the run was stopped.
        loop {
            // (Not `finished()`: a schedule that lags still hands out every slot due in the
            // window, for its worker to send or count unsent.)
            if shared.interrupted.load(Ordering::Relaxed) {
                return;
            }
            let now = Instant::now();
            if now >= due {
                break;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(100)));
        }
        if !shared.claim(due) {
            return;
        }
        let handed = Instant::now();
        let _ = queue.send(Slot { i: k, due, handed });
    }
}

/// Each watched process's CPU time so far (user and system, all threads), in seconds.
fn cpu_times(watched: &[(String, u32)]) -> Result<Vec<(String, f64)>, String> {
    watched
        .iter()
        .map(|(label, pid)| Ok((label.clone(), cpu_seconds(*pid)?)))
        .collect()
}

/// The CPU time process `pid` has used (`utime` + `stime` of `/proc/PID/stat`), in seconds.
fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("process {pid}: {e}"))?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let after_name = stat
        .rsplit_once(')')
        .ok_or(format!("process {pid}: unreadable stat"))?
        .1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat; `after_name` starts at field 3.
    let ticks = |at: usize| {
        fields
            .get(at - 3)
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or(format!("process {pid}: unreadable stat"))
    };
    Ok((ticks(14)? + ticks(15)?) as f64 / clock_ticks_per_second())
}

/// The unit of `/proc/PID/stat` times (`getconf CLK_TCK`; 100 on every Linux we know of).
fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .filter(|ticks: &f64| *ticks > 0.0)
            .unwrap_or(100.0)
    })
}

/// Gets every tenant's token before the run, 16 requests at a time.
async fn prefetch(tokens: &Arc<TokenBook>, tenants: &[String]) -> Result<(), String> {
    use futures::{StreamExt, TryStreamExt};
    if matches!(tokens.tokens, Tokens::None) {
        return Ok(());
    }
    let started = Instant::now();
    futures::stream::iter(tenants.iter().enumerate())
        .map(|(index, tenant)| tokens.bearer(index, tenant))
        .buffer_unordered(16)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    if tenants.len() > 1 {
        eprintln!(
            "{} tokens in {:.1} s",
            tenants.len(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Why a run fails, if it does: no request answered, more failed than `--max-error-rate`
/// allows, more answers not 2xx than `--max-non-2xx-rate` allows.
fn failures(
    answered: u64,
    errors: u64,
    non_2xx: u64,
    unsent: u64,
    max_error_rate: f64,
    max_non_2xx_rate: f64,
    max_unsent_rate: f64,
) -> Vec<String> {
    let mut failures = Vec::new();
    let due = answered + errors + unsent;
    let unsent_rate = unsent as f64 / due.max(1) as f64;
    if unsent_rate > max_unsent_rate {
        failures.push(format!(
            "{unsent} of {due} requests due were never sent ({:.2}%, more than \
             --max-unsent-rate {}%): the rate was not held",
            unsent_rate * 100.0,
            max_unsent_rate * 100.0
        ));
    }
    let total = answered + errors;
    let error_rate = errors as f64 / total.max(1) as f64;
    let non_2xx_rate = non_2xx as f64 / answered.max(1) as f64;
    if answered == 0 {
        failures.push("no request was answered".to_owned());
    }
    if error_rate > max_error_rate {
        failures.push(format!(
            "{errors} of {total} requests failed ({:.2}%, more than --max-error-rate {}%)",
            error_rate * 100.0,
            max_error_rate * 100.0
        ));
    }
    if non_2xx_rate > max_non_2xx_rate {
        failures.push(format!(
            "{non_2xx} of {answered} answers were not 2xx ({:.2}%, more than \
             --max-non-2xx-rate {}%)",
            non_2xx_rate * 100.0,
            max_non_2xx_rate * 100.0
        ));
    }
    failures
}

/// How a fixed rate's schedule was kept in the measured window.
struct Pace {
    /// `--rate`.
    asked: f64,
    /// The measured window's length.
    seconds: f64,
    connections: usize,
    /// Slots sent, and never sent.
    sent: u64,
    unsent: u64,
    /// Slots that came due with every connection busy.
    all_busy: u64,
    /// The sent requests' time from sent to answered (or failed), summed (µs).
    serving_us: u64,
    /// The send delay's p99 (µs).
    send_delay_p99: u64,
}

impl Pace {
    fn scheduled(&self) -> u64 {
        self.sent + self.unsent
    }

    /// Requests sent per second.
    fn achieved(&self) -> f64 {
        self.sent as f64 / self.seconds.max(1e-9)
    }

    /// The sent requests' mean time from sent to answered or failed (µs).
    fn mean_service_us(&self) -> Option<f64> {
        (self.sent > 0).then(|| self.serving_us as f64 / self.sent as f64)
    }

    /// Whether the load generator's connections, one request at a time each, held the rate
    /// back: slots never sent, or more than 1% of them due with every connection busy.
    fn connection_limited(&self) -> bool {
        self.unsent > 0 || self.all_busy * 100 > self.scheduled()
    }

    /// What the report warns of, if anything: the connections were the limit, or the
    /// schedule itself fell behind.
    fn warning(&self) -> Option<String> {
        let (asked, achieved) = (self.asked, self.achieved());
        if self.connection_limited() {
            let unsent = if self.unsent > 0 {
                format!(
                    ", and {} were never sent (their latency counted until the run stopped)",
                    self.unsent
                )
            } else {
                String::new()
            };
            // Little's law: the rate times the time each request holds its connection is
            // how many connections are busy on average.
            let service = self.mean_service_us().unwrap_or(0.0);
            let busy = asked * service / 1e6;
            let suggest = ((busy * 1.25).ceil() as usize).max(2 * self.connections);
            return Some(format!(
                "the load generator's connections were the limit, not necessarily the \
                 target: all {} were busy (one request at a time each) when {} of {} \
                 scheduled requests came due, so those waited for a free connection (send \
                 delay p99 {:.1} ms, counted in their latency){unsent}; {achieved:.0} of \
                 {asked} req/s sent. With the target's mean of {:.1} ms from sent to \
                 answered (or failed), {asked} req/s keeps about {busy:.0} connections busy: \
                 run with --connections {suggest} or more (a target that cannot keep up \
                 then shows it in its latency)",
                self.connections,
                self.all_busy,
                self.scheduled(),
                self.send_delay_p99 as f64 / 1000.0,
                service / 1000.0,
            ));
        }
        (achieved < 0.95 * asked).then(|| {
            format!(
                "the load generator fell behind its own schedule: {achieved:.0} of {asked} \
                 req/s sent while connections were free (the machine running it may be too \
                 busy)"
            )
        })
    }
}

/// Prints the report; `cpu` holds each watched process's CPU seconds in the measured window.
fn report(
    shared: &Shared,
    measured: &Measured,
    elapsed: Duration,
    cpu: &[(String, f64)],
    timeline: &[plot::Second],
    interrupted: bool,
) -> bool {
    let (tally, latency, answered_latency) = (
        &measured.tally,
        &measured.latency,
        &measured.answered_latency,
    );
    let send_delay = shared.options.rate.map(|_| {
        let d = &measured.send_delay;
        (d.value_at_quantile(0.5), d.value_at_quantile(0.99))
    });
    let answered: u64 = tally.statuses.values().sum();
    let errors: u64 = tally.errors.values().sum();
    let non_2xx: u64 = tally
        .statuses
        .iter()
        .filter(|(status, _)| !(200..300).contains(*status))
        .map(|(_, count)| count)
        .sum();
    let total = answered + errors;
    let seconds = elapsed.as_secs_f64().max(1e-9);
    let rate = answered as f64 / seconds;
    let error_rate = errors as f64 / total.max(1) as f64;
    let non_2xx_rate = non_2xx as f64 / answered.max(1) as f64;
    let failures = failures(
        answered,
        errors,
        non_2xx,
        tally.unsent,
        shared.options.max_error_rate,
        shared.options.max_non_2xx_rate,
        shared.options.max_unsent_rate,
    );
    let sent = shared.sent.load(Ordering::Relaxed);
    let scheduled = sent + tally.unsent;
    let pace = shared.options.rate.map(|asked| Pace {
        asked,
        seconds,
        connections: shared.options.connections,
        sent,
        unsent: tally.unsent,
        all_busy: shared.all_busy.load(Ordering::Relaxed),
        serving_us: shared.serving_us.load(Ordering::Relaxed),
        send_delay_p99: send_delay.map_or(0, |(_, p99)| p99),
    });
    let behind = pace.as_ref().and_then(Pace::warning);
    if let Some(warning) = &behind {
        eprintln!("warning: {warning}");
    }
    if tally.clamped > 0 {
        eprintln!(
            "warning: {} requests took longer than 600 s; their latencies count as 600 s",
            tally.clamped
        );
    }
    let quantiles = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];
    let per_request = |seconds: f64| seconds * 1e6 / total.max(1) as f64;
    if shared.options.json {
        let percentiles = |h: &Histogram<u64>| {
            let mut percentiles = serde_json::Map::new();
            for (name, q) in quantiles {
                percentiles.insert(name.into(), json!(h.value_at_quantile(q)));
            }
            percentiles.insert("max".into(), json!(h.max()));
            percentiles
        };
        let options = &shared.options;
        let mut report = json!({
            "target": options.target,
            "mode": options.rate.map_or("closed".to_owned(), |r| format!("rate {r}/s")),
            "rate": options.rate,
            "warmup_seconds": options.warmup.as_secs_f64(),
            // `null` with `--requests` and no `--duration`.
            "duration_seconds": (options.duration.is_some() || options.requests.is_none())
                .then(|| options.window().as_secs_f64()),
            "requests_asked": options.requests,
            "connections": options.connections,
            "max_error_rate": options.max_error_rate,
            "max_non_2xx_rate": options.max_non_2xx_rate,
            "max_unsent_rate": options.max_unsent_rate,
            "protocol": match (options.http2, options.tls.is_some()) {
                (true, false) => "h2c",
                (true, true) => "h2",
                (false, _) => "http/1.1",
            },
            "tls": options.tls.is_some(),
            "tenants": options.tenants.len(),
            "seconds": elapsed.as_secs_f64(),
            "interrupted": interrupted,
            "requests": total,
            "answered": answered,
            "error_count": errors,
            "non_2xx": non_2xx,
            "error_rate": error_rate,
            "non_2xx_rate": non_2xx_rate,
            "errors_per_second": errors as f64 / seconds,
            "scheduled": scheduled,
            "sent": sent,
            "completed": total,
            "unsent": tally.unsent,
            "latency_clamped": tally.clamped,
            "all_connections_busy": pace.as_ref().map(|p| p.all_busy),
            "connection_limited": pace.as_ref().map(Pace::connection_limited),
            "mean_service_us": pace.as_ref().and_then(Pace::mean_service_us),
            "warning": behind,
            "failed": !failures.is_empty(),
            "failures": failures,
        });
        // (In two parts: one `json!` of it all is too deep for the macro.)
        let measures = json!({
            "requests_per_second": rate,
            // Every request due: answered, failed and unsent (the last two lower bounds).
            "latency_us": percentiles(latency),
            "latency_includes": {"answered": answered, "failed": errors, "unsent": tally.unsent},
            "answered_latency_us": percentiles(answered_latency),
            "send_delay_us": send_delay.map(|(p50, p99)| json!({"p50": p50, "p99": p99})),
            "statuses": tally.statuses.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "errors": tally.errors,
            "cpu_us_per_request": cpu
                .iter()
                .map(|(label, seconds)| (label.clone(), json!(per_request(*seconds))))
                .collect::<serde_json::Map<_, _>>(),
            "timeline": timeline
                .iter()
                .enumerate()
                .map(|(second, s)| json!({"second": second, "requests": s.requests,
                    "errors": measured.errors_by_second.get(second).copied().unwrap_or(0),
                    "p50_us": s.p50, "p90_us": s.p90, "p99_us": s.p99, "max_us": s.max}))
                .collect::<Vec<_>>(),
        });
        if let (Some(report), serde_json::Value::Object(measures)) =
            (report.as_object_mut(), measures)
        {
            report.extend(measures);
        }
        println!("{report:#}");
        return !failures.is_empty();
    }
    if interrupted {
        println!("interrupted  (Ctrl-C): the report covers what was measured until then");
    }
    println!("target       {}", shared.options.target);
    println!(
        "load         {}, {} connections, {} tenants",
        shared
            .options
            .rate
            .map_or("closed loop".to_owned(), |r| format!("{r} req/s")),
        shared.options.connections,
        shared.options.tenants.len()
    );
    println!(
        "measured     {:.1} s, {answered} answered, {rate:.0} req/s; {errors} errors \
         ({:.0}/s, {:.2}% of requests); {non_2xx} answers not 2xx ({:.2}%)",
        elapsed.as_secs_f64(),
        errors as f64 / seconds,
        error_rate * 100.0,
        non_2xx_rate * 100.0
    );
    println!(
        "requests     {scheduled} scheduled, {sent} sent, {total} completed, {} unsent",
        tally.unsent
    );
    if let Some(warning) = &behind {
        println!("WARNING      {warning}");
    }
    let percentiles = |h: &Histogram<u64>| {
        let mut line = String::new();
        for (name, q) in quantiles {
            line.push_str(&format!(" {name} {}", h.value_at_quantile(q)));
        }
        line.push_str(&format!(" max {}", h.max()));
        line
    };
    println!(
        "latency us  {}  (all {}: {answered} answered, {errors} failed, {} unsent; failed \
         and unsent counted as lower bounds, until they failed or the run stopped)",
        percentiles(latency),
        latency.len(),
        tally.unsent
    );
    println!(
        "answered us {}  (the {answered} answered only)",
        percentiles(answered_latency)
    );
    if let Some((p50, p99)) = send_delay {
        println!(
            "send delay   p50 {p50} p99 {p99} us (from due to sent: the wait for a free \
             connection, and the schedule's own lag; part of the latency)"
        );
    }
    if let Some(pace) = &pace {
        println!(
            "connections  all {} busy when {} of {scheduled} scheduled requests came due",
            pace.connections, pace.all_busy
        );
    }
    for (status, count) in &tally.statuses {
        println!("status {status}   {count}");
    }
    for (error, count) in &tally.errors {
        println!("error        {count} x {error}");
    }
    for (label, seconds) in cpu {
        println!(
            "cpu          {label}: {:.1} us a request ({:.0}% of a core)",
            per_request(*seconds),
            seconds * 100.0 / elapsed.as_secs_f64().max(1e-9)
        );
    }
    for failure in &failures {
        println!("FAILED       {failure}");
    }
    !failures.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_without_a_port_is_reached_on_port_80() {
        let address = |url: &str| connect_address(&url.parse().unwrap());
        assert_eq!(address("http://gateway/fhir").unwrap(), "gateway:80");
        assert_eq!(address("http://127.0.0.1:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(address("http://[::1]/fhir").unwrap(), "[::1]:80");
        assert_eq!(address("https://gateway").unwrap(), "gateway:443");
        assert_eq!(
            address("https://gateway:8443/fhir").unwrap(),
            "gateway:8443"
        );
        assert!(address("ftp://gateway").is_err());
    }

    fn parse(args: &[&str]) -> Result<Options, String> {
        let target = ["--target", "http://127.0.0.1:9/fhir"];
        parse_options(target.iter().chain(args).map(|a| (*a).to_owned()))
    }

    #[test]
    fn numbers_out_of_range_are_refused_not_panicked_on() {
        for (args, named) in [
            (&["--duration", "-1"][..], "--duration -1"),
            (&["--duration", "nan"], "--duration nan"),
            (&["--duration", "0"], "--duration 0"),
            (&["--duration", "1e30"], "--duration 1e30"),
            (&["--duration", "inf"], "--duration inf"),
            (&["--warmup", "nan"], "--warmup nan"),
            (&["--warmup", "-0.5"], "--warmup -0.5"),
            (&["--warmup", "1e20"], "--warmup 1e20"),
            (&["--timeout", "1e30"], "--timeout 1e30"),
            (&["--timeout", "0"], "--timeout 0"),
            (&["--rate", "0"], "--rate 0"),
            (&["--rate", "nan"], "--rate nan"),
            (&["--rate", "inf"], "--rate inf"),
            (&["--rate", "-5"], "--rate -5"),
            (&["--rate", "1e300"], "--rate 1e300"),
            (&["--connections", "0"], "--connections 0"),
            (&["--connections", "inf"], "--connections inf"),
            (&["--requests", "0"], "--requests 0"),
            (&["--requests", "nan"], "--requests nan"),
            (&["--requests", "2.5"], "--requests 2.5"),
            (&["--tenant-count", "-1"], "--tenant-count -1"),
            (&["--max-error-rate", "nan"], "--max-error-rate nan"),
            (&["--max-non-2xx-rate", "1.5"], "--max-non-2xx-rate 1.5"),
            (&["--duration", "ten"], "--duration ten"),
        ] {
            let error = parse(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} taken"));
            assert!(error.starts_with(named), "{args:?}: {error}");
        }
    }

    #[test]
    fn numbers_in_range_are_taken() {
        let o = parse(&[
            "--duration",
            "0.5",
            "--warmup",
            "0",
            "--timeout",
            "31536000",
            "--rate",
            "0.5",
            "--connections",
            "1e3",
            "--requests",
            "300",
            "--max-non-2xx-rate",
            "0.25",
        ])
        .unwrap();
        assert_eq!(o.duration, Some(Duration::from_millis(500)));
        assert_eq!(o.warmup, Duration::ZERO);
        assert_eq!(o.timeout, Duration::from_secs(31_536_000));
        assert_eq!(o.rate, Some(0.5));
        assert_eq!(o.connections, 1000);
        assert_eq!(o.requests, Some(300));
        assert_eq!(o.max_non_2xx_rate, 0.25);
        // Not checked unless asked.
        assert_eq!(parse(&[]).unwrap().max_non_2xx_rate, 1.0);
    }

    #[test]
    fn paths_headers_and_client_authentication_are_checked() {
        let error = parse(&["--path", "Patient/1"]).err().unwrap();
        assert!(error.contains("a path starts with /"), "{error}");
        assert!(parse(&["--path", "/Patient/1"]).is_ok());
        let error = parse(&["--header", "no colon"]).err().unwrap();
        assert!(error.contains("expected 'NAME: VALUE'"), "{error}");
        let error = parse(&["--header", "bad name: x"]).err().unwrap();
        assert!(error.contains("not a header name"), "{error}");
        let o = parse(&["--header", "X-Api-Key:  k3y "]).unwrap();
        assert_eq!(o.headers[0].0, "x-api-key");
        assert_eq!(o.headers[0].1, "k3y");
        let error = parse(&["--client-auth", "jwt"]).err().unwrap();
        assert!(error.contains("basic or post"), "{error}");
        let error = parse(&["--client-auth", "basic"]).err().unwrap();
        assert!(error.contains("for --token-url"), "{error}");
        let error = parse(&["--bearer", "t", "--header", "Authorization: Basic x"])
            .err()
            .unwrap();
        assert!(error.contains("give the token with --bearer"), "{error}");
        assert!(parse(&["--header", "Authorization: Basic x"]).is_ok());
        assert_eq!(parse(&[]).unwrap().max_unsent_rate, 0.01);
    }

    #[test]
    fn a_duration_of_10_with_a_number_of_requests_is_a_duration() {
        let window = |args: &[&str]| parse(args).unwrap().window();
        let ten = Duration::from_secs(10);
        assert_eq!(window(&["--duration", "10", "--requests", "5"]), ten);
        assert_eq!(window(&["--requests", "5", "--duration", "10"]), ten);
        assert_eq!(
            window(&["--duration", "3", "--requests", "5"]),
            ten / 10 * 3
        );
        assert_eq!(window(&[]), ten);
        assert_eq!(window(&["--requests", "5"]), Duration::from_secs(3600));
    }

    #[test]
    fn failed_and_unsent_requests_count_in_the_latencies_as_lower_bounds() {
        let mut measured = Measured::default();
        // 998 answered in 1 ms, one timed out after 10 s, one never sent (2 s).
        for _ in 0..998 {
            measured.record(0, 1_000, Some(Ok(200)));
        }
        measured.record(1, 10_000_000, Some(Err("timeout".to_owned())));
        measured.record(1, 2_000_000, None);
        let latency = &measured.latency;
        assert_eq!(latency.len(), 1000);
        assert!(latency.value_at_quantile(0.999) >= 2_000_000);
        assert!(latency.max() >= 10_000_000);
        // The answered requests' own latencies are kept apart.
        assert_eq!(measured.answered_latency.len(), 998);
        assert!(measured.answered_latency.max() < 1_100);
        // Each second holds the requests due in it, the failed ones too.
        assert_eq!(measured.seconds[0].len(), 998);
        assert_eq!(measured.seconds[1].len(), 2);
        assert!(measured.seconds[1].max() >= 10_000_000);
        assert_eq!(measured.errors_by_second, [0, 1]);
        assert_eq!(measured.tally.errors["timeout"], 1);
        assert_eq!(measured.tally.unsent, 1);
        assert_eq!(measured.tally.clamped, 0);
        // Merging the shards keeps both, and counts a latency past the histograms' top.
        let mut other = Measured::default();
        other.record(0, MOST_LATENCY_US + 1, Some(Ok(200)));
        let shards = [Mutex::new(measured), Mutex::new(other)];
        let all = Measured::merged(&shards);
        assert_eq!(all.tally.clamped, 1);
        assert_eq!(all.latency.len(), 1001);
        assert_eq!(all.answered_latency.len(), 999);
    }

    #[test]
    fn answers_not_2xx_fail_the_run_past_their_share() {
        // Every answer a 401: only --max-non-2xx-rate sees it.
        assert!(failures(100, 0, 100, 0, 0.01, 1.0, 0.01).is_empty());
        let failed = failures(100, 0, 100, 0, 0.01, 0.05, 0.01);
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(
            failed[0].contains("100 of 100 answers were not 2xx"),
            "{failed:?}"
        );
        assert!(failed[0].contains("--max-non-2xx-rate 5%"), "{failed:?}");
        // At the share, not above it: passes.
        assert!(failures(100, 0, 5, 0, 0.01, 0.05, 0.01).is_empty());
        // Errors are not answers: a share of the answered.
        assert!(failures(10, 90, 0, 0, 1.0, 0.0, 0.01).is_empty());
        assert_eq!(failures(0, 5, 0, 0, 0.01, 1.0, 0.01).len(), 2);
        // Half the schedule never sent: the rate was not held.
        let failed = failures(50, 0, 0, 50, 0.01, 1.0, 0.01);
        assert_eq!(failed.len(), 1);
        assert!(
            failed[0].contains("50 of 100 requests due were never sent"),
            "{failed:?}"
        );
        assert!(failures(99, 0, 0, 1, 0.01, 1.0, 0.01).is_empty());
    }

    fn pace() -> Pace {
        Pace {
            asked: 100.0,
            seconds: 10.0,
            connections: 2,
            sent: 1000,
            unsent: 0,
            all_busy: 0,
            serving_us: 1000 * 5_000,
            send_delay_p99: 100,
        }
    }

    #[test]
    fn a_rate_the_connections_cannot_carry_is_blamed_on_them() {
        assert_eq!(pace().warning(), None);
        assert!(!pace().connection_limited());
        // 100/s at 50 ms each keeps 5 connections busy: 2 cannot carry it.
        let limited = Pace {
            sent: 400,
            unsent: 600,
            all_busy: 990,
            serving_us: 400 * 50_000,
            send_delay_p99: 5_000_000,
            ..pace()
        };
        assert!(limited.connection_limited());
        let warning = limited.warning().unwrap();
        for text in [
            "the load generator's connections were the limit",
            "all 2 were busy",
            "990 of 1000 scheduled requests",
            "send delay p99 5000.0 ms",
            "600 were never sent",
            "40 of 100 req/s sent",
            "mean of 50.0 ms",
            "about 5 connections busy",
            "--connections 7 or more",
        ] {
            assert!(warning.contains(text), "{text:?} not in {warning}");
        }
        assert!(!warning.contains("target fell behind"), "{warning}");
        // More than 1% of the slots waiting for a connection is enough.
        assert!(Pace {
            all_busy: 11,
            ..pace()
        }
        .connection_limited());
        assert!(!Pace {
            all_busy: 10,
            ..pace()
        }
        .connection_limited());
        // A schedule behind with connections free is the load generator's own lag.
        let lagging = Pace {
            sent: 500,
            ..pace()
        }
        .warning()
        .unwrap();
        assert!(
            lagging.contains("fell behind its own schedule"),
            "{lagging}"
        );
        assert!(lagging.contains("50 of 100 req/s"), "{lagging}");
    }
}
