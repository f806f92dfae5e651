//! A load generator for FHIR gateways: `cargo run --release -p fhir-loadgen -- --help`.
//!
//! Drives any FHIR gateway over HTTP/1.1 (or HTTP/2 with `--http2`), plain or over TLS (an
//! `https://` target: the webpki roots, `--ca-file` for your own, `--insecure` for none), each
//! worker on a connection of its own (so `--connections 10000` holds 10,000 open): a closed loop, or a
//! fixed request rate with coordinated-omission correction (latency counted from when each
//! request was due, not when it was sent). Tokens are minted locally (one per tenant, HS256
//! from a shared secret or RS256/PS256/ES256/EdDSA from a private key in PEM) or fetched from a
//! token endpoint with client credentials (one per tenant, `scope=<tenant>`, refetched before
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
  --connections N         concurrent connections (closed loop), default 16
  --rate R                open loop: R requests per second, latency from when each was due
  --duration S            seconds to measure, default 10 (or --requests N)
  --requests N            stop after N measured requests
  --warmup S              seconds of load before measuring, default 1
  --timeout S             seconds to wait for a connection, a request's answer or its body,
                          default 10; past it the request counts as an error (\"timeout\")
                          and its connection is closed
  --max-error-rate F      exit 1 when more than this share of the measured requests failed
                          (no HTTP answer: connection refused, reset, timeout...) or when
                          none was answered; default 0.01 (1%)
  --tenants ID,ID,...     tenant GUIDs (or --tenant-count N to make N of them)
  --tenant-count N        N generated tenant GUIDs
  --mint-hs256 SECRET     mint tokens locally (with --issuer, --audience)
  --mint-key FILE         mint tokens locally, signed with the PEM private key in FILE
                          (with --alg, --issuer, --audience and, if the gateway wants it, --kid)
  --alg ALG               --mint-key's algorithm: RS256..RS512, PS256..PS512, ES256, ES384,
                          EdDSA; default ES256
  --kid KID               the `kid` header of minted tokens
  --bearer TOKEN          send this one bearer token with every request (a gateway whose
                          tokens you get elsewhere)
  --token-url URL         fetch tokens with client credentials (--client-id, --client-secret)
  --path PATH             one request path instead of the client mix
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
    },
    Endpoint {
        url: String,
        client_id: String,
        client_secret: String,
    },
}

struct Options {
    target: String,
    connections: usize,
    rate: Option<f64>,
    duration: Duration,
    requests: Option<u64>,
    warmup: Duration,
    /// How long to wait for a connection, an answer or a body.
    timeout: Duration,
    /// Above this share of failed requests (or with none answered), the run exits 1.
    max_error_rate: f64,
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

fn options() -> Result<Options, String> {
    let mut o = Options {
        target: String::new(),
        connections: 16,
        rate: None,
        duration: Duration::from_secs(10),
        requests: None,
        warmup: Duration::from_secs(1),
        timeout: Duration::from_secs(10),
        max_error_rate: 0.01,
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
    let (mut token_url, mut client_id, mut client_secret) = (None, None, None);
    let mut bearer: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<f64>().map_err(|e| format!("{v}: {e}"));
        match flag.as_str() {
            "--help" | "-h" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--target" => o.target = value()?.trim_end_matches('/').to_owned(),
            "--connections" => o.connections = number(value()?)?.max(1.0) as usize,
            "--rate" => o.rate = Some(number(value()?)?).filter(|r| *r > 0.0),
            "--duration" => o.duration = Duration::from_secs_f64(number(value()?)?),
            "--requests" => o.requests = Some(number(value()?)? as u64),
            "--warmup" => o.warmup = Duration::from_secs_f64(number(value()?)?),
            "--max-error-rate" => {
                let share = number(value()?)?;
                if !(0.0..=1.0).contains(&share) {
                    return Err(format!("--max-error-rate {share}: a share from 0 to 1"));
                }
                o.max_error_rate = share;
            }
            "--timeout" => {
                let seconds = number(value()?)?;
                if !(seconds > 0.0 && seconds.is_finite()) {
                    return Err(format!("--timeout {seconds}: must be above 0"));
                }
                o.timeout = Duration::from_secs_f64(seconds);
            }
            "--tenants" => o.tenants = value()?.split(',').map(str::to_owned).collect(),
            "--tenant-count" => {
                let n = number(value()?)? as u32;
                o.tenants = (0..n)
                    .map(|i| format!("00000000-0000-4000-8000-{i:012x}"))
                    .collect();
            }
            "--mint-hs256" => secret = Some(value()?),
            "--mint-key" => key_file = Some(value()?),
            "--alg" => alg = Some(value()?),
            "--kid" => kid = Some(value()?),
            "--issuer" => issuer = Some(value()?),
            "--audience" => audience = Some(value()?),
            "--token-url" => token_url = Some(value()?),
            "--bearer" => bearer = Some(value()?),
            "--client-id" => client_id = Some(value()?),
            "--client-secret" => client_secret = Some(value()?),
            "--path" => {
                o.mix = vec![Interaction {
                    weight: 1,
                    method: Method::GET,
                    path: value()?,
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
            Tokens::Mint {
                key,
                header: Box::new(header),
                issuer,
                audience,
            }
        }
        (None, Some(url)) => Tokens::Endpoint {
            url,
            client_id: client_id.ok_or("--token-url needs --client-id")?,
            client_secret: client_secret.ok_or("--token-url needs --client-secret")?,
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
            } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let claims = json!({"iss": issuer, "aud": audience, "sub": "loadgen", "iat": now,
                                    "exp": now + 3600, "scope": tenant});
                let token = encode(header, &claims, key).map_err(|e| e.to_string())?;
                (token, 3600)
            }
            Tokens::Endpoint {
                url,
                client_id,
                client_secret,
            } => {
                let form = format!(
                    "grant_type=client_credentials&client_id={}&client_secret={}&scope={}",
                    urlencode(client_id),
                    urlencode(client_secret),
                    urlencode(tenant)
                );
                let request = Request::post(url)
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(Full::from(form))
                    .map_err(|e| e.to_string())?;
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
    /// Slots of the rate's schedule due in the measured window and never sent: the target
    /// fell behind.
    unsent: u64,
}

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
    /// With `--requests N`: how many of the N measured requests were taken.
    claimed: AtomicU64,
    /// Set on Ctrl-C: the schedule stops.
    interrupted: std::sync::atomic::AtomicBool,
    done: AtomicU64,
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
    latency: Histogram<u64>,
    /// At a fixed rate: from when each request was due to when it was sent (µs).
    send_delay: Histogram<u64>,
    seconds: Vec<Histogram<u64>>,
    /// The failed requests (counted, not timed) by the second they were due.
    errors_by_second: Vec<u64>,
}

impl Default for Measured {
    fn default() -> Self {
        Self {
            tally: Tally::default(),
            latency: histogram(),
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
            let _ = all.latency.add(&worker.latency);
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
        // A second with errors only is a second of the timeline too.
        if all.seconds.len() < all.errors_by_second.len() {
            all.seconds
                .resize_with(all.errors_by_second.len(), plot::second_histogram);
        }
        all
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
                // How late the load generator itself sent the request.
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
        let outcome = match tokio::time::timeout(self.options.timeout, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // The connection may still owe an answer: do not reuse it.
                *connection = Connection::None;
                Err("timeout".to_owned())
            }
        };
        if self.measures(due) {
            let took = due.elapsed().as_micros().max(1) as u64;
            self.record(worker, due, took, Some(outcome));
        }
    }

    /// Whether a request due at `due` is in the measured window.
    fn measures(&self, due: Instant) -> bool {
        due >= self.measuring_from && due < self.stop_at
    }

    /// Records a request due at `due` that took `took` µs: its outcome, or `None` for a slot
    /// never sent (its latency then a lower bound: from when it was due to when its worker
    /// stopped).
    fn record(&self, worker: usize, due: Instant, took: u64, outcome: Option<Result<u16, String>>) {
        let second = due.duration_since(self.measuring_from).as_secs() as usize;
        let shard = &self.measured[worker % self.measured.len()];
        let mut measured = shard.lock().unwrap();
        // Failed requests are counted, not timed: their latencies (a refused connection's
        // few µs, a timeout's seconds) say nothing of the target's answers.
        match outcome {
            Some(Ok(status)) => *measured.tally.statuses.entry(status).or_default() += 1,
            Some(Err(error)) => {
                *measured.tally.errors.entry(error).or_default() += 1;
                if measured.errors_by_second.len() <= second {
                    measured.errors_by_second.resize(second + 1, 0);
                }
                measured.errors_by_second[second] += 1;
                drop(measured);
                self.done.fetch_add(1, Ordering::Relaxed);
                return;
            }
            None => measured.tally.unsent += 1,
        }
        measured.latency.saturating_record(took);
        if measured.seconds.len() <= second {
            measured
                .seconds
                .resize_with(second + 1, plot::second_histogram);
        }
        measured.seconds[second].saturating_record(took);
        let unsent = outcome.is_none();
        drop(measured);
        if !unsent {
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
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
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
    let stop_at = measuring_from
        + if options.requests.is_some() && options.duration == Duration::from_secs(10) {
            Duration::from_secs(3600)
        } else {
            options.duration
        };
    let options_connections = options.connections;
    let shared = Arc::new(Shared {
        tokens,
        options,
        sequence: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        interrupted: std::sync::atomic::AtomicBool::new(false),
        claimed: AtomicU64::new(0),
        done: AtomicU64::new(0),
        measuring_from,
        stop_at,
        measured: (0..options_connections.clamp(1, MEASURED_SHARDS))
            .map(|_| Mutex::default())
            .collect(),
    });

    let progress = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = shared.done.load(Ordering::Relaxed);
                // The last whole second measured: its p99 and max.
                let recent = Instant::now()
                    .checked_duration_since(measuring_from)
                    .and_then(|d| (d.as_secs() as usize).checked_sub(1))
                    .and_then(|second| Measured::second(&shared.measured, second));
                let latency = recent.map_or(String::new(), |(p99, max)| {
                    format!(
                        "  p99 {:.2} ms  max {:.2} ms",
                        p99 as f64 / 1000.0,
                        max as f64 / 1000.0
                    )
                });
                eprint!(
                    "\r{:>6.1} s  {:>8} requests  {:>8} req/s{latency}   ",
                    start.elapsed().as_secs_f64(),
                    done,
                    done - last
                );
                last = done;
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
    // slot is due and hands it to its worker. Worker `w` owns every N-th slot.
    let mut slots = Vec::new();
    let mut schedule = Vec::new();
    for _ in 0..shared.options.connections {
        let (hand, take) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
        schedule.push(hand);
        slots.push(take);
    }
    if let Some(rate) = shared.options.rate {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || keep_schedule(&shared, rate, start, schedule));
    }
    let mut workers = tokio::task::JoinSet::new();
    for (worker, mut slots) in slots.into_iter().enumerate() {
        let shared = Arc::clone(&shared);
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
            // A late request is measured from when it was due (coordinated-omission
            // correction). Once the window has closed, the slots still waiting for this
            // worker are the target's backlog: each counts, unsent, with the least latency
            // it would have had.
            let mut stopped = None;
            while let Some((i, due)) = slots.recv().await {
                if let Some(stopped) = stopped {
                    if shared.measures(due) {
                        let took = Instant::duration_since(&stopped, due).as_micros().max(1);
                        shared.record(worker, due, took as u64, None);
                    }
                    continue;
                }
                shared.one(worker, &mut connection, i, due).await;
                if Instant::now() >= shared.stop_at {
                    stopped = Some(Instant::now());
                }
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
        match plot::svg(file, &title, &timeline, latency) {
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

/// Hands each slot of a fixed rate's schedule, from `start` until the measured window ends, to
/// its worker when it is due: slot `k` (due at `start + k / rate`) to worker `k % N`.
fn keep_schedule(
    shared: &Shared,
    rate: f64,
    start: Instant,
    workers: Vec<tokio::sync::mpsc::UnboundedSender<(u64, Instant)>>,
) {
    for k in 0u64.. {
        let due = start + Duration::from_secs_f64(k as f64 / rate);
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
        let _ = workers[(k % workers.len() as u64) as usize].send((k, due));
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

/// Prints the report; `cpu` holds each watched process's CPU seconds in the measured window.
fn report(
    shared: &Shared,
    measured: &Measured,
    elapsed: Duration,
    cpu: &[(String, f64)],
    timeline: &[plot::Second],
    interrupted: bool,
) -> bool {
    let (tally, latency) = (&measured.tally, &measured.latency);
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
    let failed = answered == 0 || error_rate > shared.options.max_error_rate;
    let sent = shared.sent.load(Ordering::Relaxed);
    let scheduled = sent + tally.unsent;
    // At a fixed rate: slots left unsent, or fewer sent than asked, mean the target (or the
    // load generator) fell behind the schedule.
    let behind = shared.options.rate.and_then(|asked| {
        let achieved = sent as f64 / elapsed.as_secs_f64().max(1e-9);
        (tally.unsent > 0 || achieved < 0.95 * asked).then(|| {
            format!(
                "the target fell behind the rate: {achieved:.0} of {asked} req/s sent, \
                 {} of {scheduled} scheduled requests never sent (their latency counted \
                 until the run stopped)",
                tally.unsent
            )
        })
    });
    if let Some(warning) = &behind {
        eprintln!("warning: {warning}");
    }
    let quantiles = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)];
    let per_request = |seconds: f64| seconds * 1e6 / total.max(1) as f64;
    if shared.options.json {
        let mut percentiles = serde_json::Map::new();
        for (name, q) in quantiles {
            percentiles.insert(name.into(), json!(latency.value_at_quantile(q)));
        }
        percentiles.insert("max".into(), json!(latency.max()));
        let report = json!({
            "target": shared.options.target,
            "mode": shared.options.rate.map_or("closed".to_owned(), |r| format!("rate {r}/s")),
            "rate": shared.options.rate,
            "warmup_seconds": shared.options.warmup.as_secs_f64(),
            "duration_seconds": shared.options.duration.as_secs_f64(),
            "requests_asked": shared.options.requests,
            "connections": shared.options.connections,
            "protocol": match (shared.options.http2, shared.options.tls.is_some()) {
                (true, false) => "h2c",
                (true, true) => "h2",
                (false, _) => "http/1.1",
            },
            "tls": shared.options.tls.is_some(),
            "tenants": shared.options.tenants.len(),
            "seconds": elapsed.as_secs_f64(),
            "interrupted": interrupted,
            "requests": total,
            "answered": answered,
            "error_count": errors,
            "non_2xx": non_2xx,
            "error_rate": error_rate,
            "errors_per_second": errors as f64 / seconds,
            "scheduled": scheduled,
            "sent": sent,
            "completed": total,
            "unsent": tally.unsent,
            "warning": behind,
            "requests_per_second": rate,
            "latency_us": percentiles,
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
        println!("{report:#}");
        return failed;
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
         ({:.0}/s, {:.2}% of requests); {non_2xx} answers not 2xx",
        elapsed.as_secs_f64(),
        errors as f64 / seconds,
        error_rate * 100.0
    );
    println!(
        "requests     {scheduled} scheduled, {sent} sent, {total} completed, {} unsent",
        tally.unsent
    );
    if let Some(warning) = &behind {
        println!("WARNING      {warning}");
    }
    print!("latency us  "); // of the answered requests (and, at a fixed rate, the unsent)
    for (name, q) in quantiles {
        print!(" {name} {}", latency.value_at_quantile(q));
    }
    println!(" max {}", latency.max());
    if let Some((p50, p99)) = send_delay {
        println!("send delay   p50 {p50} p99 {p99} us (the load generator's own lateness)");
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
    if answered == 0 {
        println!("FAILED       no request was answered");
    } else if failed {
        println!(
            "FAILED       {errors} of {total} requests failed ({:.2}%, more than \
             --max-error-rate {}%)",
            error_rate * 100.0,
            shared.options.max_error_rate * 100.0
        );
    }
    failed
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
}
