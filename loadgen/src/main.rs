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
//! line goes to stderr every second on a terminal, every 5 s (plain) elsewhere.
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

  --target URL            the gateway's FHIR base, http:// or https:// (required); a port
                          it names must be from 1 to 65535 (none: 80, or 443 for https)
  --connections N         concurrent connections, default 16; each carries one request at
                          a time (closed loop: sends its next when the last is answered)
  --rate R                open loop: R requests per second (above 0, at most 10,000,000),
                          latency from when each was due. A request due while every
                          connection is busy waits for one (its \"send delay\", part of its
                          latency): R x latency must stay under N. When they did not, the
                          report says what held the rate back, as far as the run tells:
                          the connections (the target as fast with all busy as with few:
                          the --connections to try), the target (slower as they filled,
                          no more answers a second: its throughput), spells of a slower
                          target, or the load generator's own schedule. The slots due in
                          one --timeout (at most 1,048,576, at least 4 a connection) may
                          wait for a connection; one due with that many waiting is never
                          sent (\"unsent\"). Slots due while the connections are still
                          opening (--warmup 0) do not count as waits for a busy one
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
                          instead of the client mix; checked before the run (exit 2) as a
                          URI's path and query: percent-encode spaces and the like (%20)
  --mix FILE              your own mix: a line per interaction, `WEIGHT METHOD PATH [BODY]`
                          (BODY form-encoded, for POST _search); `#` starts a comment; its
                          paths checked as --path's
  --http2                 HTTP/2 instead of HTTP/1.1: with prior knowledge (h2c) on http://,
                          agreed by ALPN on https://; one connection first, and a server that
                          does not agree (on http://, one answering in HTTP/1) stops the
                          run before it starts (exit 2)
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
failed and the unsent are lower bounds (latencies_are_lower_bounds): with unsent slots, an
overloaded run's, the real latencies were longer, by how much the run cannot say, and the
report says so (LOWER BOUNDS; the chart shades the seconds that had any). The answered
requests' own percentiles are shown beside them (\"answered\", answered_latency_us). A
closed loop's latencies are not corrected for coordinated omission (each connection sends
its next request when its last is answered, so a stall delays requests instead of showing
in their latency: in max, hardly in the percentiles; the report says so,
coordinated_omission_corrected false): --rate's are.

Progress: a line on stderr each second, over the last, on a terminal; elsewhere (a log, a
pipe) a plain line every 5 s, with no escape codes.

Ctrl-C stops the run early, prints the report of what was measured so far and exits 130;
the requests in flight then are cut off, counted (in_flight_at_stop) with their time until
then, lower bounds, and the slots not yet sent are unsent.

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
                check_path(&path).map_err(|e| format!("--path {path:?}: {e}"))?;
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
    let target: Uri = o
        .target
        .parse()
        .map_err(|e| format!("--target {}: {e}", o.target))?;
    o.connect_to = connect_address(&target).map_err(|e| format!("--target {}: {e}", o.target))?;
    o.authority = target
        .authority()
        .map(|a| a.to_string())
        .ok_or("--target needs a host")?;
    o.base_path = target.path().trim_end_matches('/').to_owned();
    // Every request's URI is made here once, as each request makes it: a path the run could
    // not send is a mistake in the options (exit 2), not thousands of errors counted as the
    // target's.
    for interaction in &o.mix {
        for http2 in [false, true] {
            request_uri(&o.target, &o.base_path, http2, &interaction.path).map_err(|e| {
                format!(
                    "--target {} with the path {:?}: {e}",
                    o.target, interaction.path
                )
            })?;
        }
    }
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
/// for https) when it names none (or an empty one, `host:`, as RFC 3986 §3.2.3 reads it). A
/// port that is not one (`99999`, `80a`, `0`) is an error: `http`'s `port_u16` reads it as no
/// port at all, which would send the load to port 80.
fn connect_address(target: &Uri) -> Result<String, String> {
    let default_port = match target.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return Err("the target must be an http:// or https:// URL".to_owned()),
    };
    let authority = target.authority().ok_or("the target needs a host")?;
    let port = match port_text(authority.as_str()) {
        None | Some("") => default_port,
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(format!("port {text} is not a port (1 to 65535)")),
        },
    };
    Ok(format!("{}:{port}", authority.host()))
}

/// What follows the host in `authority` (`[user@]host[:port]`, the host perhaps `[v6]`) after
/// its `:`, if anything does: the port as written, checked by no one yet.
fn port_text(authority: &str) -> Option<&str> {
    let host_and_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, rest)| rest);
    let after_host = match host_and_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']').map_or("", |(_, rest)| rest),
        None => host_and_port
            .find(':')
            .map_or("", |colon| &host_and_port[colon..]),
    };
    after_host.strip_prefix(':')
}

/// Checks `path`, one of the mix's or `--path`'s, as what goes after the target's path in a
/// request: from `/`, a path and query a URI can carry (no spaces, no `<`, nothing outside
/// ASCII: percent-encoded, they are), and no fragment (never sent to a server).
fn check_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("a path starts with / (it goes after --target's)".to_owned());
    }
    if path.contains('#') {
        return Err("a fragment (#...) is not sent to a server: leave it out".to_owned());
    }
    let percent_encode = "percent-encode it (a space is %20, \u{e4} in UTF-8 %C3%A4)";
    if let Some(other) = path.chars().find(|c| !c.is_ascii()) {
        return Err(format!(
            "{other:?} is not a URI's character: {percent_encode}"
        ));
    }
    path.parse::<http::uri::PathAndQuery>()
        .map_err(|e| format!("not a request path ({e}): {percent_encode}"))?;
    Ok(())
}

/// The URI of a request for `path` to `target` (its path `base_path`): over HTTP/2 the whole
/// URI, over HTTP/1.1 its path (with a `Host` header beside it).
fn request_uri(target: &str, base_path: &str, http2: bool, path: &str) -> Result<Uri, String> {
    if http2 {
        format!("{target}{path}")
    } else {
        format!("{base_path}{path}")
    }
    .parse()
    .map_err(|e| format!("{e}"))
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
        check_path(path).map_err(|e| format!("line {}: path {path:?}: {e}", number + 1))?;
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
/// (Connect)"; its causes say which certificate or address). A cause whose text the error's
/// already holds is not said twice.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let said = error.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
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
    /// Failed requests by what failed them; at most [`MOST_ERROR_LABELS`] labels.
    errors: BTreeMap<String, u64>,
    /// Slots of the rate's schedule due in the measured window and never sent: every
    /// connection was busy until the window closed, or the queue of slots waiting for one
    /// was full.
    unsent: u64,
    /// Requests sent and still in flight when Ctrl-C stopped the run.
    cut: u64,
    /// Latencies above the histograms' top ([`MOST_LATENCY_US`]), recorded as that.
    clamped: u64,
}

/// How a request due in the measured window ended.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    /// Answered, with this status.
    Answered(u16),
    /// No answer: what failed it (a timeout, a refused connection...).
    Failed(String),
    /// A slot of the rate's schedule never sent.
    Unsent,
    /// Sent, and still in flight when Ctrl-C stopped the run.
    Cut,
}

/// The most kinds of error counted apart: the labels are counted in maps and printed one a
/// line, and a cause could hold what differs from one request to the next (a token endpoint's
/// answer with its trace id), so past these, further kinds are counted together
/// ([`OTHER_ERRORS`]).
const MOST_ERROR_LABELS: usize = 32;

/// The label of the errors of kinds past the first [`MOST_ERROR_LABELS`].
const OTHER_ERRORS: &str = "other errors (more kinds than the report lists)";

/// The longest error label kept, in bytes (a longer one is cut, `...` after it).
const MOST_ERROR_LABEL_BYTES: usize = 240;

/// `label` as it is counted in `errors`: cut to [`MOST_ERROR_LABEL_BYTES`], and
/// [`OTHER_ERRORS`] when it is a new kind and `errors` holds as many kinds as it may.
fn error_label(errors: &BTreeMap<String, u64>, mut label: String) -> String {
    if label.len() > MOST_ERROR_LABEL_BYTES {
        let mut end = MOST_ERROR_LABEL_BYTES;
        while !label.is_char_boundary(end) {
            end -= 1;
        }
        label.truncate(end);
        label.push_str("...");
    }
    if errors.len() >= MOST_ERROR_LABELS && !errors.contains_key(&label) {
        return OTHER_ERRORS.to_owned();
    }
    label
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
    /// Sends `request` on this connection, opening it (again) when it is not open, and
    /// counting in `opened` each connection opened.
    async fn send(
        &mut self,
        options: &Options,
        opened: &AtomicU64,
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
                opened.fetch_add(1, Ordering::Relaxed);
            }
            let ready = match self {
                Connection::Http1(sender) => sender.ready().await,
                Connection::Http2(sender) => sender.ready().await,
                Connection::None => unreachable!("opened above"),
            };
            if let Err(e) = ready {
                *self = Connection::None;
                if fresh {
                    return Err(format!("send: {}", with_causes(&e)));
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
                        // (With its causes: hyper's own says only "connection error".)
                        _ => return Err(format!("send: {}", with_causes(&e.into_error()))),
                    }
                }
            }
        }
    }

    /// A new connection to the target: TCP, TLS for an `https://` one, and the HTTP
    /// handshake.
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
                    .map_err(|e| format!("handshake: {}", with_causes(&e)))?;
            tokio::spawn(connection);
            Ok(Connection::Http2(sender))
        } else {
            let (sender, connection) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| format!("handshake: {}", with_causes(&e)))?;
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
    /// Set on Ctrl-C: the schedule stops, and the workers.
    interrupted: std::sync::atomic::AtomicBool,
    /// Set to `true` on Ctrl-C: a request in flight stops waiting for its answer and is
    /// recorded as cut off ([`Outcome::Cut`]); a worker waiting for a slot or a connection
    /// stops.
    stop: tokio::sync::watch::Sender<bool>,
    /// At a fixed rate: the workers whose first connection is not yet open (or failed to
    /// open).
    opening: std::sync::atomic::AtomicUsize,
    /// When the last of them was. Until then, no slot counts as having come with every
    /// connection busy: some were still opening, not busy with requests.
    all_open: std::sync::OnceLock<Instant>,
    /// Connections to the target opened (the first of each worker's, and any again after a
    /// failure).
    opened: AtomicU64,
    /// Requests in flight: sent, not yet answered or failed.
    in_flight: std::sync::atomic::AtomicUsize,
    /// At a fixed rate, over the whole run (warm-up included): the requests sent with half
    /// or fewer of the connections busy (this one included). How long the target took with
    /// them, against [`Shared::full`], tells whether it slowed down as the connections
    /// filled ([`Pace::limit`]).
    light: LoadTally,
    /// The same, of the requests sent with every connection busy.
    full: LoadTally,
    /// The longest any measured request took from sent to answered or failed (µs).
    serving_max_us: AtomicU64,
    /// At a fixed rate: the slots that came due with the queue full, never sent.
    overflow: Mutex<Overflow>,
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

/// Requests sent at some load: how many, their time from sent to answered (or failed) and the
/// connections busy when each was sent (itself included), summed.
#[derive(Default)]
struct LoadTally {
    requests: AtomicU64,
    serving_us: AtomicU64,
    busy: AtomicU64,
}

impl LoadTally {
    /// Counts a request sent with `busy` connections busy that took `serving` µs.
    fn add(&self, busy: usize, serving: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.serving_us.fetch_add(serving, Ordering::Relaxed);
        self.busy.fetch_add(busy as u64, Ordering::Relaxed);
    }

    /// What it counted.
    fn load(&self) -> Load {
        Load {
            requests: self.requests.load(Ordering::Relaxed),
            serving_us: self.serving_us.load(Ordering::Relaxed),
            busy: self.busy.load(Ordering::Relaxed),
        }
    }
}

/// What a [`LoadTally`] counted.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Load {
    requests: u64,
    /// µs from sent to answered or failed, summed.
    serving_us: u64,
    /// The connections busy when each was sent, summed.
    busy: u64,
}

impl Load {
    /// The mean time from sent to answered or failed (µs); `None` without a request.
    fn mean_service_us(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.serving_us as f64 / self.requests as f64)
    }

    /// The mean number of connections busy when one was sent; `None` without a request.
    fn mean_busy(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.busy as f64 / self.requests as f64)
    }
}

/// Some workers' statuses and errors, their latencies, and each measured second's latencies
/// by when the requests were due.
struct Measured {
    tally: Tally,
    /// Every request due in the window, from when it was due (µs): answered ones until their
    /// body ended, failed ones until they failed, unsent slots until the run stopped and those
    /// in flight at Ctrl-C until then (the last three lower bounds).
    latency: Histogram<u64>,
    /// The answered requests' latencies only (any status).
    answered_latency: Histogram<u64>,
    /// At a fixed rate: from when each request was due to when it was sent (µs).
    send_delay: Histogram<u64>,
    /// Each second's share of `latency`, by when the requests were due.
    seconds: Vec<Histogram<u64>>,
    /// The failed requests by the second they were due (also in `seconds`).
    errors_by_second: Vec<u64>,
    /// The unsent slots by the second they were due (also in `seconds`).
    unsent_by_second: Vec<u64>,
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
            unsent_by_second: Vec::new(),
        }
    }
}

/// Adds `count` to `counts[at]`, growing `counts` as needed.
fn count_at(counts: &mut Vec<u64>, at: usize, count: u64) {
    if counts.len() <= at {
        counts.resize(at + 1, 0);
    }
    counts[at] += count;
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
                // (Each shard holds its own kinds: bounded again, together.)
                let label = error_label(&all.tally.errors, error.clone());
                *all.tally.errors.entry(label).or_default() += count;
            }
            all.tally.unsent += worker.tally.unsent;
            all.tally.cut += worker.tally.cut;
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
            for (second, errors) in worker.errors_by_second.iter().enumerate() {
                count_at(&mut all.errors_by_second, second, *errors);
            }
            for (second, unsent) in worker.unsent_by_second.iter().enumerate() {
                count_at(&mut all.unsent_by_second, second, *unsent);
            }
        }
        all
    }

    /// Records a request due in measured second `second` that took `took` µs from when it
    /// was due, and its outcome. Every one is in the latencies; a failed, unsent or cut off
    /// one with the time it waited, a lower bound of what its answer would have taken (a
    /// timeout's at least `--timeout`).
    fn record(&mut self, second: usize, took: u64, outcome: Outcome) {
        self.record_n(second, took, 1, outcome);
    }

    /// [`Measured::record`] for `count` requests alike.
    fn record_n(&mut self, second: usize, took: u64, count: u64, outcome: Outcome) {
        if count == 0 {
            return;
        }
        match outcome {
            Outcome::Answered(status) => {
                *self.tally.statuses.entry(status).or_default() += count;
                let _ = self
                    .answered_latency
                    .record_n(took.min(MOST_LATENCY_US), count);
            }
            Outcome::Failed(error) => {
                let label = error_label(&self.tally.errors, error);
                *self.tally.errors.entry(label).or_default() += count;
                count_at(&mut self.errors_by_second, second, count);
            }
            Outcome::Unsent => {
                self.tally.unsent += count;
                count_at(&mut self.unsent_by_second, second, count);
            }
            Outcome::Cut => self.tally.cut += count,
        }
        if took > MOST_LATENCY_US {
            self.tally.clamped += count;
        }
        // (At most the histograms' top, as `saturating_record` records one.)
        let took = took.min(MOST_LATENCY_US);
        let _ = self.latency.record_n(took, count);
        if self.seconds.len() <= second {
            self.seconds.resize_with(second + 1, plot::second_histogram);
        }
        let _ = self.seconds[second].record_n(took, count);
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

/// The slots of a fixed rate's schedule that came due with the queue of slots waiting for a
/// connection full ([`queue_capacity`]): never sent, so unsent. Each is held, in histograms
/// (their size bounded whatever the rate), as when it was due, from the start of the measured
/// window; when the run ends, [`Overflow::settle`] counts each as an unsent slot still queued
/// then counts: from when it was due until the run ended. (Held as due times, not as times to
/// the window's planned end: a histogram's error grows with what it holds, and the planned end
/// may be an hour away from a run `--requests` or Ctrl-C ended in seconds.)
struct Overflow {
    /// The latest a slot can be due, in µs from the window's start: the histograms' top.
    most: u64,
    /// µs from the window's start to each such slot's due time.
    due: Histogram<u64>,
    /// By measured second (when the slots were due), for the seconds that had any: µs from
    /// that second's start to each slot's due time.
    seconds: Vec<Option<Histogram<u64>>>,
}

impl Overflow {
    /// Holds nothing yet, for a measured window of `window`.
    fn new(window: Duration) -> Self {
        let most = (window.as_micros() as u64).saturating_add(1_000_000);
        Self {
            most,
            due: Histogram::new_with_bounds(1, most, 3).expect("histogram bounds"),
            seconds: Vec::new(),
        }
    }

    /// Holds a slot due `due` µs after the measured window's start.
    fn add(&mut self, due: u64) {
        let due = due.clamp(1, self.most);
        self.due.saturating_record(due);
        let second = (due / 1_000_000) as usize;
        if self.seconds.len() <= second {
            self.seconds.resize_with(second + 1, || None);
        }
        self.seconds[second]
            .get_or_insert_with(|| {
                // Two significant digits, as each second of the timeline has: within 1% of a
                // second.
                Histogram::new_with_bounds(1, 1_000_000, 2).expect("histogram bounds")
            })
            .saturating_record((due % 1_000_000).max(1));
    }

    /// Records its slots into `measured` as unsent, each with a latency from when it was due
    /// until the run ended, `ended` µs after the measured window's start; at least 1 µs. (Each
    /// due time is taken at the high end of its histogram bucket: a lower bound stays one.)
    fn settle(&self, measured: &mut Measured, ended: u64) {
        let took = |due: u64| ended.saturating_sub(due).max(1);
        for value in self.due.iter_recorded() {
            let count = value.count_at_value();
            let took = took(self.due.highest_equivalent(value.value_iterated_to()));
            measured.tally.unsent += count;
            if took > MOST_LATENCY_US {
                measured.tally.clamped += count;
            }
            let _ = measured.latency.record_n(took.min(MOST_LATENCY_US), count);
        }
        for (second, h) in self.seconds.iter().enumerate() {
            let Some(h) = h else { continue };
            if measured.seconds.len() <= second {
                measured
                    .seconds
                    .resize_with(second + 1, plot::second_histogram);
            }
            let start = second as u64 * 1_000_000;
            for value in h.iter_recorded() {
                let count = value.count_at_value();
                let due = start + h.highest_equivalent(value.value_iterated_to());
                let _ = measured.seconds[second].record_n(took(due).min(MOST_LATENCY_US), count);
                count_at(&mut measured.unsent_by_second, second, count);
            }
        }
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
        let measured = self.measures(due);
        if measured {
            self.sent.fetch_add(1, Ordering::Relaxed);
            if self.options.rate.is_some() {
                // How late the request is sent: the wait for a free connection, and the
                // schedule's own lag.
                let late = due.elapsed().as_micros().max(1) as u64;
                let shard = &self.measured[worker % self.measured.len()];
                shard.lock().unwrap().send_delay.saturating_record(late);
            }
        }
        let opened = &self.opened;
        let attempt = async {
            // (Made before the run too, in `finish`: this cannot fail.)
            let options = &self.options;
            let uri = request_uri(&options.target, &options.base_path, options.http2, path)?;
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
            let response = connection.send(&self.options, opened, request).await?;
            let status = response.status().as_u16();
            response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("body: {}", with_causes(&e)))?;
            Ok::<u16, String>(status)
        };
        let sending = Instant::now();
        let busy = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        let outcome = tokio::select! {
            biased;
            outcome = tokio::time::timeout(self.options.timeout, attempt) => match outcome {
                Ok(Ok(status)) => Outcome::Answered(status),
                Ok(Err(error)) => Outcome::Failed(error),
                Err(_) => Outcome::Failed("timeout".to_owned()),
            },
            () = self.stopped() => Outcome::Cut,
        };
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let abandoned = match &outcome {
            Outcome::Cut => true,
            Outcome::Failed(error) => error == "timeout",
            _ => false,
        };
        if abandoned {
            // The connection may still owe an answer: do not reuse it.
            *connection = Connection::None;
        }
        let serving = sending.elapsed().as_micros() as u64;
        let connections = self.options.connections;
        if self.options.rate.is_some() && outcome != Outcome::Cut {
            if busy * 2 <= connections {
                self.light.add(busy, serving);
            } else if busy >= connections {
                self.full.add(busy, serving);
            }
        }
        if measured {
            // (A request cut off by Ctrl-C with its time until then, as its latency.)
            self.serving_us.fetch_add(serving, Ordering::Relaxed);
            self.serving_max_us.fetch_max(serving, Ordering::Relaxed);
            let took = due.elapsed().as_micros().max(1) as u64;
            self.record(worker, due, took, outcome);
        }
    }

    /// Resolves when Ctrl-C stops the run.
    async fn stopped(&self) {
        let mut stop = self.stop.subscribe();
        // (`Err` would mean the sender is gone, which lives as long as `self`: no stop.)
        if stop.wait_for(|stopped| *stopped).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// `future`'s output, or `None` when Ctrl-C stops the run first.
    async fn unless_stopped<T>(&self, future: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            () = self.stopped() => None,
            output = future => Some(output),
        }
    }

    /// At a fixed rate: the first connection of one more worker was opened (or failed to).
    fn one_open(&self) {
        if self.opening.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _ = self.all_open.set(Instant::now());
        }
    }

    /// Whether every worker's first connection was open (or had failed to open) by `at`.
    fn all_open_by(&self, at: Instant) -> bool {
        self.all_open.get().is_some_and(|open| *open <= at)
    }

    /// Whether a request due at `due` is in the measured window.
    fn measures(&self, due: Instant) -> bool {
        due >= self.measuring_from && due < self.stop_at
    }

    /// Records a request due at `due` that took `took` µs from then, and its outcome (see
    /// [`Measured::record`]).
    fn record(&self, worker: usize, due: Instant, took: u64, outcome: Outcome) {
        let second = due.duration_since(self.measuring_from).as_secs() as usize;
        let completed = matches!(outcome, Outcome::Answered(_) | Outcome::Failed(_));
        if matches!(outcome, Outcome::Failed(_)) {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        let shard = &self.measured[worker % self.measured.len()];
        shard.lock().unwrap().record(second, took, outcome);
        if completed {
            self.done.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// At a fixed rate: slot `due` came with the queue full, so is never sent (see
    /// [`Overflow`]). Every connection was busy then (none was waiting for a slot, or it
    /// would have taken one from the queue), once all were open.
    fn overflowed(&self, due: Instant) {
        if !self.measures(due) {
            return;
        }
        if self.all_open_by(due) {
            self.all_busy.fetch_add(1, Ordering::Relaxed);
        }
        let due = due.duration_since(self.measuring_from).as_micros() as u64;
        self.overflow.lock().unwrap().add(due);
    }

    /// With `--requests N`, takes one of the N measured requests for a request due at `due`
    /// (before it is sent, so exactly N are); false when all N are taken.
    fn claim(&self, due: Instant) -> bool {
        match self.options.requests {
            Some(n) if self.measures(due) => self.claimed.fetch_add(1, Ordering::Relaxed) < n,
            _ => true,
        }
    }

    /// Whether the run is over: the measured window closed, `--requests` were all taken,
    /// or Ctrl-C.
    fn finished(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
            || Instant::now() >= self.stop_at
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
    // HTTP/2 without TLS (h2c) is agreed on by no handshake: a server speaking HTTP/1.1 only
    // takes the connection and fails every request ("http2 error"). One connection first
    // says so, as the TLS probe does.
    if options.http2 && options.tls.is_none() {
        if let Err(message) = probe_h2c(&options).await {
            eprintln!("cannot speak HTTP/2 to the target: {message}");
            std::process::exit(2);
        }
    }
    let start = Instant::now();
    let measuring_from = start + options.warmup;
    let stop_at = measuring_from + options.window();
    let (connections, rate, window) = (options.connections, options.rate, options.window());
    let shared = Arc::new(Shared {
        tokens,
        options,
        sequence: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        serving_us: AtomicU64::new(0),
        all_busy: AtomicU64::new(0),
        interrupted: std::sync::atomic::AtomicBool::new(false),
        stop: tokio::sync::watch::Sender::new(false),
        opening: std::sync::atomic::AtomicUsize::new(connections),
        all_open: std::sync::OnceLock::new(),
        opened: AtomicU64::new(0),
        in_flight: std::sync::atomic::AtomicUsize::new(0),
        light: LoadTally::default(),
        full: LoadTally::default(),
        serving_max_us: AtomicU64::new(0),
        overflow: Mutex::new(Overflow::new(window)),
        claimed: AtomicU64::new(0),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        measuring_from,
        stop_at,
        measured: (0..connections.clamp(1, MEASURED_SHARDS))
            .map(|_| Mutex::default())
            .collect(),
    });

    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let progress = tokio::spawn(progress(Arc::clone(&shared), start, terminal));

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
    // is free. The queue holds a bounded number ([`queue_capacity`]); a slot due when it is
    // full is never sent ([`Overflow`]), so that memory stays bounded whatever the rate.
    let capacity = rate.map_or(1, |rate| {
        queue_capacity(rate, shared.options.timeout, connections)
    });
    let (hand, queue) = tokio::sync::mpsc::channel::<Slot>(capacity);
    let queue = Arc::new(tokio::sync::Mutex::new(queue));
    let schedule = match rate {
        Some(rate) => {
            let shared = Arc::clone(&shared);
            Some(std::thread::spawn(move || {
                keep_schedule(&shared, rate, start, &hand)
            }))
        }
        None => {
            // (No schedule: nothing is ever queued.)
            drop(hand);
            None
        }
    };
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..connections {
        let shared = Arc::clone(&shared);
        let queue = Arc::clone(&queue);
        workers.spawn(async move {
            match rate {
                None => closed_loop(&shared, worker).await,
                Some(rate) => open_loop(&shared, worker, rate, start, &queue).await,
            }
        });
    }
    // Every worker ends at most `--timeout` after the measured window; Ctrl-C ends them at
    // once, each recording the request it had in flight.
    let interrupted = tokio::select! {
        _ = async { while workers.join_next().await.is_some() {} } => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    if interrupted {
        shared.interrupted.store(true, Ordering::Relaxed);
        shared.stop.send_replace(true);
        // (Each worker ends at its next await; a second for them all, then they are dropped.)
        let ending = async { while workers.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(1), ending)
            .await
            .is_err()
        {
            workers.abort_all();
        }
    }
    // The schedule has handed out its last slot (the workers ended when the queue closed), or
    // sees Ctrl-C within 100 ms.
    if let Some(schedule) = schedule {
        let _ = tokio::task::spawn_blocking(move || schedule.join()).await;
    }
    let ended = Instant::now();
    // Slots still queued (Ctrl-C stopped the workers first): due, and never sent.
    if let Some(rate) = rate {
        let mut queue = queue.lock().await;
        while let Ok(Slot { i, .. }) = queue.try_recv() {
            let due = slot_due(start, rate, i);
            if shared.measures(due) {
                let took = ended.saturating_duration_since(due).as_micros().max(1);
                shared.record(0, due, took as u64, Outcome::Unsent);
            }
        }
    }
    let cpu_at_end = cpu_times(&shared.options.cpu_of);
    progress.abort();
    if terminal {
        // (The progress line ends where the report starts.)
        eprintln!();
    }
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
    let mut measured = Measured::merged(&shared.measured);
    // The slots that found the queue full: unsent, each counted until the run ended.
    let ended_at = ended
        .saturating_duration_since(shared.measuring_from)
        .as_micros() as u64;
    shared
        .overflow
        .lock()
        .unwrap()
        .settle(&mut measured, ended_at);
    let timeline = {
        // The seconds inside the measured window (a request due at its very end may run on).
        let within = (elapsed.as_secs_f64().ceil() as usize).min(measured.seconds.len());
        plot::timeline(&measured.seconds[..within], &measured.unsent_by_second)
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

/// How often, in seconds, the progress line is written when stderr is not a terminal (a log,
/// a pipe): a line a second would fill a log.
const PLAIN_PROGRESS_SECONDS: u64 = 5;

/// Writes the progress line to stderr until aborted: on a `terminal`, each second over the
/// last (`\r`, and `ESC [K` to clear the rest of the line); elsewhere, a plain line every
/// [`PLAIN_PROGRESS_SECONDS`] seconds, with no escape codes.
async fn progress(shared: Arc<Shared>, start: Instant, terminal: bool) {
    let every = if terminal { 1 } else { PLAIN_PROGRESS_SECONDS };
    let period = Duration::from_secs(every);
    let mut ticks = tokio::time::interval_at((start + period).into(), period);
    let (mut last, mut last_failed) = (0, 0);
    loop {
        ticks.tick().await;
        let done = shared.done.load(Ordering::Relaxed);
        let failed = shared.failed.load(Ordering::Relaxed);
        // The last whole second measured: its p99 and max.
        let recent = Instant::now()
            .checked_duration_since(shared.measuring_from)
            .and_then(|d| (d.as_secs() as usize).checked_sub(1))
            .and_then(|second| Measured::second(&shared.measured, second));
        let failing = failed - last_failed;
        let answered = (done - last).saturating_sub(failing);
        let line = progress_line(
            start.elapsed().as_secs_f64(),
            done,
            (answered, failing, every),
            recent,
        );
        if terminal {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
        (last, last_failed) = (done, failed);
    }
}

/// The progress line at `elapsed` seconds: `done` requests completed so far; `answered` and
/// `failed` of them in the last `seconds` seconds, per second (the failed only when there are
/// any); the last whole measured second's p99 and max (µs), or `-` when it had none (a stalled
/// target, not the last figures).
fn progress_line(
    elapsed: f64,
    done: u64,
    (answered, failed, seconds): (u64, u64, u64),
    recent: Option<(u64, u64)>,
) -> String {
    // (Whole numbers a second, but a few failures in 5 s are not "0 errors/s".)
    let per_second = |count: u64| {
        let rate = count as f64 / seconds.max(1) as f64;
        if rate.fract() == 0.0 || rate >= 10.0 {
            format!("{rate:.0}")
        } else {
            format!("{rate:.1}")
        }
    };
    let errors = if failed > 0 {
        format!("  {} errors/s", per_second(failed))
    } else {
        String::new()
    };
    let latency = recent.map_or("  p99 -  max -".to_owned(), |(p99, max)| {
        format!(
            "  p99 {:.2} ms  max {:.2} ms",
            p99 as f64 / 1000.0,
            max as f64 / 1000.0
        )
    });
    format!(
        "{elapsed:>6.1} s  {done:>8} requests  {:>8} req/s{errors}{latency}",
        per_second(answered)
    )
}

/// Checks that an `http://` target speaks HTTP/2 with prior knowledge (h2c): on a connection
/// of its own, the client's preface and an empty SETTINGS frame, and the server's first frame
/// must be a SETTINGS frame (RFC 9113 §3.4, a server's preface). `Err` says what came
/// instead; a target that cannot be reached, closes at once or says nothing within
/// `--timeout` passes (the run measures that).
async fn probe_h2c(options: &Options) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    let first_bytes = async {
        let mut stream = tokio::net::TcpStream::connect(&options.connect_to)
            .await
            .ok()?;
        stream.write_all(PREFACE).await.ok()?;
        let (mut head, mut chunk) = (Vec::new(), [0u8; 256]);
        while head.len() < 9 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
        Some(head)
    };
    match tokio::time::timeout(options.timeout, first_bytes).await {
        Ok(Some(head)) => h2c_answer(&head),
        _ => Ok(()),
    }
}

/// What the server's first bytes `head` on an h2c connection say (see [`probe_h2c`]).
fn h2c_answer(head: &[u8]) -> Result<(), String> {
    // A frame's head: 3 bytes of length, its type (4: SETTINGS), flags, a 4-byte stream id
    // (0: the connection's).
    if head.is_empty() || head.len() >= 9 && head[3] == 0x4 && head[5..9] == [0, 0, 0, 0] {
        return Ok(());
    }
    let first_line = String::from_utf8_lossy(head);
    let first_line = first_line.lines().next().unwrap_or_default();
    let first_line: String = first_line.chars().take(60).collect();
    let advice = "it does not speak HTTP/2 over plain TCP with prior knowledge (h2c): drop \
                  --http2 (HTTP/1.1), or give an https:// target that agrees to h2 by ALPN";
    if head.starts_with(b"HTTP/") {
        Err(format!(
            "it answered HTTP/2's connection preface in HTTP/1 ({first_line:?}): {advice}"
        ))
    } else {
        Err(format!(
            "its first bytes are no HTTP/2 SETTINGS frame ({first_line:?}): {advice}"
        ))
    }
}

/// A closed-loop worker: on a connection of its own, its next request when the last is
/// answered, until the run is over.
async fn closed_loop(shared: &Shared, worker: usize) {
    let mut connection = Connection::None;
    while !shared.finished() {
        let due = Instant::now();
        if !shared.claim(due) {
            break;
        }
        let i = shared.sequence.fetch_add(1, Ordering::Relaxed);
        shared.one(worker, &mut connection, i, due).await;
        if matches!(connection, Connection::None) {
            // The request failed and took its connection with it (refused, reset, timed out):
            // a short pause before the next, so a dead target is not asked in a tight loop
            // that takes a whole CPU.
            let pause = tokio::time::sleep(Duration::from_millis(5));
            if shared.unless_stopped(pause).await.is_none() {
                break;
            }
        }
    }
}

/// An open-loop worker at `rate`: on a connection of its own, opened before its first slot,
/// each slot of the schedule it takes from `queue`, until the queue closes (or Ctrl-C).
async fn open_loop(
    shared: &Shared,
    worker: usize,
    rate: f64,
    start: Instant,
    queue: &tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Slot>>,
) {
    let mut connection = Connection::None;
    // Open the connection before the first slot (spread over the warm-up), so every
    // connection is held for the whole run.
    let opening = shared
        .options
        .warmup
        .mul_f64(0.5 * worker as f64 / shared.options.connections as f64);
    let opened = shared
        .unless_stopped(async {
            tokio::time::sleep_until((start + opening).into()).await;
            tokio::time::timeout(shared.options.timeout, Connection::open(&shared.options)).await
        })
        .await;
    shared.one_open();
    match opened {
        None => return,
        Some(Ok(Ok(open))) => {
            connection = open;
            shared.opened.fetch_add(1, Ordering::Relaxed);
        }
        // (Tried again, and counted as the target's error, with the first slot.)
        Some(_) => {}
    }
    loop {
        let free_since = Instant::now();
        let next = shared
            .unless_stopped(async { queue.lock().await.recv().await })
            .await;
        let Some(Some(Slot { i, handed })) = next else {
            return;
        };
        let due = slot_due(start, rate, i);
        let handed = start + Duration::from_nanos(handed);
        // Handed out before this worker was free: no connection was (a free one would have
        // been waiting for it), so it waited for this one. Counted as a slot that came with
        // every connection busy once every connection was open: before, some were opening,
        // not busy with requests.
        let waited = handed < free_since;
        if waited && shared.measures(due) && shared.all_open_by(handed) {
            shared.all_busy.fetch_add(1, Ordering::Relaxed);
        }
        // A late request is measured from when it was due (coordinated-omission
        // correction). The slots still waiting for a connection when the window closed are
        // the backlog: each counts, unsent, with the least latency it would have had. (One a
        // waiting worker takes is sent, however late the schedule handed it out.)
        if waited && free_since >= shared.stop_at {
            if shared.measures(due) {
                let took = Instant::now().duration_since(due).as_micros().max(1);
                shared.record(worker, due, took as u64, Outcome::Unsent);
            }
            continue;
        }
        shared.one(worker, &mut connection, i, due).await;
    }
}

/// A slot of a fixed rate's schedule, 16 bytes (the queue may hold a million): its number
/// (it was due at [`slot_due`]), and when it was handed out, in ns from the run's start.
struct Slot {
    i: u64,
    handed: u64,
}

/// When slot `k` of a schedule at `rate` from `start` is due: `start + k / rate`.
fn slot_due(start: Instant, rate: f64, k: u64) -> Instant {
    start + Duration::from_secs_f64(k as f64 / rate)
}

/// The most slots the queue holds past [`queue_capacity`]'s least (4 a connection): 2^20,
/// 16 MiB of slots.
const MOST_QUEUED: usize = 1 << 20;

/// How many slots of a schedule at `rate` may wait in the queue for a free connection: those
/// due in one `timeout` (the backlog of a stall that long, to be sent when it ends), at most
/// [`MOST_QUEUED`], at least 4 a connection.
fn queue_capacity(rate: f64, timeout: Duration, connections: usize) -> usize {
    let due_in_timeout = (rate * timeout.as_secs_f64()).ceil();
    let queued = if due_in_timeout < MOST_QUEUED as f64 {
        due_in_timeout as usize
    } else {
        MOST_QUEUED
    };
    queued.max(connections.saturating_mul(4)).max(1)
}

/// Hands each slot of a fixed rate's schedule, from `start` until the measured window ends, to
/// the workers' queue when it is due: slot `k` is due at `start + k / rate`. A slot due with
/// the queue full is never sent ([`Shared::overflowed`]).
fn keep_schedule(
    shared: &Shared,
    rate: f64,
    start: Instant,
    queue: &tokio::sync::mpsc::Sender<Slot>,
) {
    // (Compared as seconds first: at a rate of 1e-300, slot 1's offset is no `Duration`.)
    let window = shared.stop_at.duration_since(start).as_secs_f64();
    for k in 0u64.. {
        let offset = k as f64 / rate;
        if offset >= window {
            return;
        }
        let due = slot_due(start, rate, k);
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
        let handed = start.elapsed().as_nanos() as u64;
        match queue.try_send(Slot { i: k, handed }) {
            Ok(()) => {}
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => shared.overflowed(due),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
        }
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
    /// The longest of those times (µs).
    serving_max_us: u64,
    /// The send delay's p99 (µs).
    send_delay_p99: u64,
    /// Connections to the target opened in the whole run.
    opened: u64,
    /// Over the whole run, warm-up included: the requests sent with half or fewer of the
    /// connections busy.
    light: Load,
    /// The same, of those sent with every connection busy.
    full: Load,
}

/// What held a fixed rate back, as far as one run can tell ([`Pace::limit`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Limit {
    /// The schedule itself fell behind, with connections free.
    Schedule,
    /// No request due in the measured window was sent: nothing to judge by.
    NothingSent,
    /// The load generator's connections: the target answered about as fast with every
    /// connection busy as with half or fewer, so more connections carry more; about `needed`
    /// would carry the rate.
    Connections { needed: usize },
    /// The target: as the connections filled, its time from sent to answered grew and its
    /// answers a second did not, so more connections would wait at the target.
    Target,
    /// Spells: on average half the connections or fewer were busy, but the target slowed
    /// down or stalled at times and every connection waited on it then; about `needed`
    /// (the rate times the slowest answer) would have sent every request when due.
    Spells { needed: usize },
    /// The run cannot tell the connections from the target (no request sent with few
    /// connections busy to compare with, or a target that slowed as they filled yet
    /// answered more); `suggest` connections would show it.
    Unknown { suggest: usize },
}

impl Limit {
    /// Its name in the JSON report's `limited_by`.
    fn name(self) -> &'static str {
        match self {
            Limit::Schedule => "schedule",
            Limit::NothingSent => "nothing_sent",
            Limit::Connections { .. } => "connections",
            Limit::Target => "target",
            Limit::Spells { .. } => "target_spells",
            Limit::Unknown { .. } => "unknown",
        }
    }
}

/// How much longer the target's mean time from sent to answered may be with every connection
/// busy than with half or fewer, for the connections, not the target, to be the limit: it
/// barely slowed as they filled, so more would carry more.
const SLOWED: f64 = 1.5;

/// How much more the target must have answered a second with every connection busy than with
/// half or fewer for its throughput to have risen with the connections (below it, the target
/// is the limit).
const ROSE: f64 = 1.25;

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

    /// Whether every connection, one request at a time each, was busy when the schedule
    /// needed one: slots never sent, or more than 1% of them due with every connection busy.
    /// (Whose fault, the connections' or the target's, [`Pace::limit`] says.)
    fn connection_limited(&self) -> bool {
        self.unsent > 0 || self.all_busy * 100 > self.scheduled()
    }

    /// The connections busy on average to carry the rate asked, by Little's law: the rate
    /// times the mean time each request holds its connection.
    fn busy_at_rate(&self, service_us: f64) -> f64 {
        self.asked * service_us / 1e6
    }

    /// What held the rate back, if anything did, as far as the run tells.
    ///
    /// With every connection busy, the connections are the limit when the target answered
    /// about as fast with all of them busy as with half or fewer ([`SLOWED`]): more would
    /// carry more. A target whose time from sent to answered grew as they filled while its
    /// answers a second did not rise ([`ROSE`]) is the limit itself: more connections would
    /// wait at the target. When the rate needs half the connections or fewer on average
    /// (Little's law), the waits came in spells of a slower target. Without requests sent at
    /// a light load to compare with, or with a target that slowed yet answered more, the run
    /// cannot tell.
    fn limit(&self) -> Option<Limit> {
        if self.scheduled() == 0 {
            return None;
        }
        if !self.connection_limited() {
            return (self.achieved() < 0.95 * self.asked).then_some(Limit::Schedule);
        }
        let Some(service) = self.mean_service_us() else {
            return Some(Limit::NothingSent);
        };
        let connections = self.connections as f64;
        let busy = self.busy_at_rate(service);
        // (At least twice the connections: a target that cannot keep up then shows it.)
        let suggest = ((busy * 1.25).ceil() as usize).max(2 * self.connections);
        if busy <= connections / 2.0 {
            let needed = self.busy_at_rate(self.serving_max_us as f64).ceil() as usize;
            return Some(Limit::Spells {
                needed: needed.max(self.connections + 1),
            });
        }
        let (Some(light), Some(full)) = (self.light.mean_service_us(), self.full.mean_service_us())
        else {
            return Some(Limit::Unknown { suggest });
        };
        if full < SLOWED * light.max(1.0) {
            return Some(Limit::Connections { needed: suggest });
        }
        let light_throughput = self.light.mean_busy().unwrap_or(1.0) / light.max(1.0);
        let full_throughput = self.full.mean_busy().unwrap_or(connections) / full;
        if full_throughput < ROSE * light_throughput {
            Some(Limit::Target)
        } else {
            Some(Limit::Unknown { suggest })
        }
    }

    /// What the report warns of, if anything: which limit held the rate back (see
    /// [`Pace::limit`]), with the figures it was told by and what to try.
    fn warning(&self) -> Option<String> {
        let limit = self.limit()?;
        let (asked, achieved, n) = (self.asked, self.achieved(), self.connections);
        let ms = |us: f64| us / 1000.0;
        let unsent = if self.unsent > 0 {
            format!(
                ", and {} were never sent (their latency counted until the run stopped: lower \
                 bounds)",
                self.unsent
            )
        } else {
            String::new()
        };
        let waited = format!(
            "all {n} connections were busy (one request at a time each) when {} of {} \
             scheduled requests came due, so those waited for a free connection (send delay \
             p99 {:.1} ms, counted in their latency){unsent}; {achieved:.0} of {asked} req/s \
             sent",
            self.all_busy,
            self.scheduled(),
            ms(self.send_delay_p99 as f64),
        );
        let service = self.mean_service_us().unwrap_or_default();
        let busy = self.busy_at_rate(service);
        let light = self.light.mean_service_us().unwrap_or_default();
        let full = self.full.mean_service_us().unwrap_or_default();
        let light_busy = self.light.mean_busy().unwrap_or_default();
        let compared = format!(
            "{:.1} ms from sent to answered or failed with about {light_busy:.1} of them \
             busy, {:.1} ms with all {n}",
            ms(light),
            ms(full)
        );
        Some(match limit {
            Limit::Schedule => format!(
                "the load generator fell behind its own schedule: {achieved:.0} of {asked} \
                 req/s sent while connections were free (the machine running it may be too \
                 busy)"
            ),
            Limit::NothingSent => {
                let why = if self.opened == 0 {
                    "the target was never reached: no connection to it opened (each waited up \
                     to --timeout to connect)"
                } else {
                    "every connection was busy throughout with requests due before the window \
                     (sent in the warm-up and not answered, or the warm-up's backlog)"
                };
                format!(
                    "none of the {} requests due in the measured window was sent: {why}. \
                     With nothing sent, the run says nothing of the target's speed nor of the \
                     connections it needs",
                    self.scheduled()
                )
            }
            Limit::Connections { needed } => format!(
                "the load generator's connections were the limit, not the target: {waited}. \
                 The target answered about as fast with every connection busy as with half \
                 or fewer ({compared}), so more connections carry more: with its mean of \
                 {:.1} ms from sent to answered (or failed), {asked} req/s keeps about \
                 {busy:.0} connections busy: run with --connections {needed} or more (a \
                 target that cannot keep up then shows it in its latency)",
                ms(service)
            ),
            Limit::Target => {
                // Little's law again: the connections busy over the time each took.
                let light_throughput = light_busy / light.max(1.0) * 1e6;
                let full_throughput =
                    self.full.mean_busy().unwrap_or_default() / full.max(1.0) * 1e6;
                format!(
                    "the target could not keep up at this rate, not the load generator's \
                     connections: {waited}. Its throughput was about {full_throughput:.0}/s \
                     against {asked} req/s asked: as the connections filled, it slowed \
                     ({compared}) and answered no more a second ({light_throughput:.0}/s with \
                     about {light_busy:.1} busy, {full_throughput:.0}/s with all {n}). More \
                     connections would wait at the target, not raise the rate"
                )
            }
            Limit::Spells { needed } => format!(
                "the target slowed down or stalled at times: {waited}. On average its mean \
                 of {:.1} ms from sent to answered keeps about {busy:.1} of the {n} \
                 connections busy at {asked} req/s, but its slowest answer took {:.1} ms, \
                 and while it was that slow every connection waited on it. Those requests' \
                 wait is in their latency, so the percentiles show the spells; for the target \
                 to get every request when due, as independent clients send them, run with \
                 about {needed} connections (the rate times the slowest answer)",
                ms(service),
                ms(self.serving_max_us as f64),
            ),
            Limit::Unknown { suggest } => {
                let why = if self.light.requests == 0 || self.full.requests == 0 {
                    "no request was sent with half or fewer of the connections busy (or none \
                     with all) to compare the target's speed with"
                        .to_owned()
                } else {
                    format!(
                        "the target slowed as the connections filled ({compared}), yet \
                         answered more a second: more connections may raise the rate, by \
                         less than their number"
                    )
                };
                format!(
                    "the rate was not held, and this run cannot tell whether the load \
                     generator's connections or the target were the limit: {waited}; {why}. \
                     At {asked} req/s, the mean of {:.1} ms from sent to answered (or failed) \
                     keeps about {busy:.0} connections busy: run with --connections {suggest}; \
                     if the sent rate then stays near {achieved:.0}/s while that mean grows, \
                     the target is the limit",
                    ms(service)
                )
            }
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
        serving_max_us: shared.serving_max_us.load(Ordering::Relaxed),
        send_delay_p99: send_delay.map_or(0, |(_, p99)| p99),
        opened: shared.opened.load(Ordering::Relaxed),
        light: shared.light.load(),
        full: shared.full.load(),
    });
    let limit = pace.as_ref().and_then(Pace::limit);
    let behind = pace.as_ref().and_then(Pace::warning);
    if let Some(warning) = &behind {
        eprintln!("warning: {warning}");
    }
    // Some latencies counted are only lower bounds: a request never sent, failed or cut off
    // by Ctrl-C counts the time it waited, not what its answer would have taken.
    let lower_bounds = tally.unsent + errors + tally.cut > 0;
    // The requests due and not answered in time to be measured: the unsent, and those cut off.
    // Their latencies are lower bounds that can be far below the real ones (an overloaded
    // run's backlog grows until it stops), so the report says so before its percentiles.
    let lower_bounds_note = (tally.unsent + tally.cut > 0).then(|| {
        let due = total + tally.unsent + tally.cut;
        let cut = if tally.cut > 0 {
            format!("{} were in flight when Ctrl-C stopped the run", tally.cut)
        } else {
            String::new()
        };
        let unsent = if tally.unsent > 0 {
            format!("{} were never sent", tally.unsent)
        } else {
            String::new()
        };
        let which = [unsent, cut]
            .into_iter()
            .filter(|text| !text.is_empty())
            .collect::<Vec<_>>()
            .join(" and ");
        format!(
            "the latency percentiles are lower bounds: of the {due} requests due, {which}, \
             and count only until the run stopped; their real latencies were longer, by how \
             much this run cannot say"
        )
    });
    // A closed loop sends a connection's next request when its last is answered: a request
    // that would have been due during a stall is not sent until it ends, and is not measured
    // as having waited (coordinated omission).
    let closed_loop_note = shared.options.rate.is_none().then_some(
        "closed loop: latencies are not corrected for coordinated omission (each connection \
         sends its next request when its last is answered, so a stall delays the requests \
         instead of showing in their latency: it shows in max, hardly in the percentiles); \
         use --rate for an open loop, which corrects them",
    );
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
            "in_flight_at_stop": tally.cut,
            "latency_clamped": tally.clamped,
            "all_connections_busy": pace.as_ref().map(|p| p.all_busy),
            "connection_limited": pace.as_ref().map(Pace::connection_limited),
            "limited_by": limit.map(Limit::name),
            "mean_service_us": pace.as_ref().and_then(Pace::mean_service_us),
            "slowest_service_us": pace.as_ref().map(|p| p.serving_max_us),
            "service_by_load": pace.as_ref().map(|p| {
                let load = |load: &Load| json!({"requests": load.requests,
                    "mean_service_us": load.mean_service_us(), "mean_busy": load.mean_busy()});
                json!({"half_or_fewer_busy": load(&p.light), "all_busy": load(&p.full)})
            }),
            "warning": behind,
            "failed": !failures.is_empty(),
            "failures": failures,
        });
        // (In two parts: one `json!` of it all is too deep for the macro.)
        let measures = json!({
            "requests_per_second": rate,
            // Every request due: answered, failed, unsent and cut off (the last three lower
            // bounds).
            "latency_us": percentiles(latency),
            "latency_includes": {"answered": answered, "failed": errors, "unsent": tally.unsent,
                "in_flight_at_stop": tally.cut},
            "latencies_are_lower_bounds": lower_bounds,
            "lower_bounds_note": lower_bounds_note,
            "coordinated_omission_corrected": shared.options.rate.is_some(),
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
                    "unsent": s.unsent,
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
        println!(
            "interrupted  (Ctrl-C): the report covers what was measured until then; {} \
             requests in flight were cut off, their latencies counted until then",
            tally.cut
        );
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
    let cut = if tally.cut > 0 {
        format!(", {} in flight at stop", tally.cut)
    } else {
        String::new()
    };
    println!(
        "requests     {scheduled} scheduled, {sent} sent, {total} completed, {} unsent{cut}",
        tally.unsent
    );
    if let Some(warning) = &behind {
        println!("WARNING      {warning}");
    }
    if let Some(note) = &lower_bounds_note {
        println!("LOWER BOUNDS {note}");
    }
    if let Some(note) = closed_loop_note {
        println!("note         {note}");
    }
    let percentiles = |h: &Histogram<u64>| {
        let mut line = String::new();
        for (name, q) in quantiles {
            line.push_str(&format!(" {name} {}", h.value_at_quantile(q)));
        }
        line.push_str(&format!(" max {}", h.max()));
        line
    };
    let cut = if tally.cut > 0 {
        format!(", {} in flight at stop", tally.cut)
    } else {
        String::new()
    };
    println!(
        "latency us  {}  (all {}: {answered} answered, {errors} failed, {} unsent{cut}; \
         failed and unsent counted as lower bounds, until they failed or the run stopped)",
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
        // An empty port is the scheme's (RFC 3986 §3.2.3); user information is not a port.
        assert_eq!(address("http://gateway:/fhir").unwrap(), "gateway:80");
        assert_eq!(address("http://user@gateway:81/").unwrap(), "gateway:81");
        assert_eq!(address("http://[::1]:8080/").unwrap(), "[::1]:8080");
    }

    #[test]
    fn a_port_out_of_range_is_refused_not_sent_to_port_80() {
        // `http` takes these URIs, and `port_u16` reads their port as none: the load went to
        // port 80.
        for (url, port) in [
            ("http://127.0.0.1:99999", "99999"),
            ("http://127.0.0.1:65536/fhir", "65536"),
            ("https://gateway:0", "0"),
            ("http://gateway:80a", "80a"),
            ("http://gateway:-1", "-1"),
            ("http://[::1]:70000/", "70000"),
        ] {
            let error = connect_address(&url.parse().unwrap()).unwrap_err();
            assert!(
                error.contains(&format!("port {port} is not a port (1 to 65535)")),
                "{url}: {error}"
            );
            // At option parsing, with the other checks: exit 2, the target named.
            let error = parse_options(["--target", url].map(str::to_owned))
                .err()
                .unwrap_or_else(|| panic!("{url} taken"));
            let url = url.trim_end_matches('/');
            assert!(
                error.starts_with(&format!("--target {url}: port {port} ")),
                "{error}"
            );
        }
        assert!(parse_options(["--target", "http://127.0.0.1:65535"].map(str::to_owned)).is_ok());
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
    fn paths_a_uri_cannot_carry_are_refused_before_the_run() {
        // Before, `/a b` ran and every request failed: "invalid uri character".
        for (path, said) in [
            ("/a b", "not a request path (invalid uri character)"),
            ("/Patient?name=a b", "not a request path"),
            ("/a<b", "not a request path"),
            (
                "/Patient/\u{e4}",
                "is not a URI's character: percent-encode it",
            ),
            ("/Patient/1#history", "a fragment (#...) is not sent"),
        ] {
            let error = parse(&["--path", path])
                .err()
                .unwrap_or_else(|| panic!("{path:?} taken"));
            assert!(error.starts_with(&format!("--path {path:?}: ")), "{error}");
            assert!(error.contains(said), "{path:?}: {error}");
        }
        for path in ["/Patient/1", "/Patient?name=a%20b&_count=10", "/a{b}"] {
            let o = parse(&["--path", path]).unwrap_or_else(|e| panic!("{path:?}: {e}"));
            for http2 in [false, true] {
                let uri = request_uri(&o.target, &o.base_path, http2, path).unwrap();
                assert!(uri.to_string().ends_with(path), "{uri}");
            }
        }
        // A mix's paths too, by line.
        let error = parse_mix("1 GET /Patient/1\n2 GET /Patient/<1>\n")
            .err()
            .unwrap();
        assert!(
            error.starts_with("line 2: path \"/Patient/<1>\": "),
            "{error}"
        );
        let error = parse_mix("1 GET Patient/1\n").err().unwrap();
        assert!(error.contains("a path starts with /"), "{error}");
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
            measured.record(0, 1_000, Outcome::Answered(200));
        }
        measured.record(1, 10_000_000, Outcome::Failed("timeout".to_owned()));
        measured.record(1, 2_000_000, Outcome::Unsent);
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
        assert_eq!(measured.unsent_by_second, [0, 1]);
        assert_eq!(measured.tally.errors["timeout"], 1);
        assert_eq!(measured.tally.unsent, 1);
        assert_eq!(measured.tally.clamped, 0);
        // Merging the shards keeps both, and counts a latency past the histograms' top.
        let mut other = Measured::default();
        other.record(0, MOST_LATENCY_US + 1, Outcome::Answered(200));
        other.record(2, 3_000_000, Outcome::Unsent);
        let shards = [Mutex::new(measured), Mutex::new(other)];
        let all = Measured::merged(&shards);
        assert_eq!(all.tally.clamped, 1);
        assert_eq!(all.latency.len(), 1002);
        assert_eq!(all.answered_latency.len(), 999);
        assert_eq!(all.unsent_by_second, [0, 1, 1]);
        assert_eq!(all.tally.unsent, 2);
    }

    #[test]
    fn requests_cut_off_by_ctrl_c_count_as_lower_bounds_not_errors() {
        let mut measured = Measured::default();
        measured.record(0, 1_000, Outcome::Answered(200));
        // In flight for 4 s when Ctrl-C stopped the run.
        measured.record(0, 4_000_000, Outcome::Cut);
        assert_eq!(measured.tally.cut, 1);
        assert!(measured.tally.errors.is_empty());
        assert_eq!(measured.tally.unsent, 0);
        assert_eq!(measured.latency.len(), 2);
        assert!(measured.latency.max() >= 4_000_000);
        assert_eq!(measured.answered_latency.len(), 1);
        assert_eq!(measured.seconds[0].len(), 2);
        let all = Measured::merged(&[Mutex::new(measured)]);
        assert_eq!(all.tally.cut, 1);
    }

    #[test]
    fn error_labels_keep_their_causes_and_stay_bounded_in_number() {
        // hyper's "connection error" says what it was only in its source.
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl std::fmt::Display for Wrapper {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("connection error")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        assert_eq!(
            with_causes(&Wrapper(reset)),
            "connection error: reset by peer"
        );
        // A cause whose text the error already says is not said twice.
        #[derive(Debug)]
        struct Says(Wrapper);
        impl std::fmt::Display for Says {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("client error: connection error")
            }
        }
        impl std::error::Error for Says {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        assert_eq!(
            with_causes(&Says(Wrapper(reset))),
            "client error: connection error: reset by peer"
        );
        // Labels that differ request by request (a trace id) end in one "other" count.
        let mut measured = Measured::default();
        for i in 0..100 {
            let label = format!("token endpoint answered 500: trace {i}");
            measured.record(0, 1_000, Outcome::Failed(label));
        }
        assert_eq!(measured.tally.errors.len(), MOST_ERROR_LABELS + 1);
        assert_eq!(
            measured.tally.errors[OTHER_ERRORS],
            100 - MOST_ERROR_LABELS as u64
        );
        assert_eq!(measured.tally.errors.values().sum::<u64>(), 100);
        // A kind already counted is counted as itself, past the bound too.
        measured.record(
            0,
            1_000,
            Outcome::Failed("token endpoint answered 500: trace 0".into()),
        );
        assert_eq!(
            measured.tally.errors["token endpoint answered 500: trace 0"],
            2
        );
        // Shards, each bounded, are bounded again together.
        let mut other = Measured::default();
        for i in 0..40 {
            other.record(0, 1_000, Outcome::Failed(format!("kind {i}")));
        }
        let all = Measured::merged(&[Mutex::new(measured), Mutex::new(other)]);
        assert!(all.tally.errors.len() <= MOST_ERROR_LABELS + 1);
        assert_eq!(all.tally.errors.values().sum::<u64>(), 141);
        // A long label is cut, on a character's boundary.
        let long = "\u{e9}".repeat(MOST_ERROR_LABEL_BYTES);
        let cut = error_label(&BTreeMap::new(), long);
        assert!(
            cut.ends_with("...") && cut.len() <= MOST_ERROR_LABEL_BYTES + 3,
            "{cut}"
        );
    }

    #[test]
    fn slots_the_full_queue_refused_count_unsent_until_the_run_ended() {
        // A 10 s window; three slots refused: due 0.5 s, 0.5 s and 8 s after its start
        // (seconds 0 and 8 of the window).
        let mut overflow = Overflow::new(Duration::from_secs(10));
        overflow.add(500_000);
        overflow.add(500_000);
        overflow.add(8_000_000);
        let mut measured = Measured::default();
        measured.record(0, 1_000, Outcome::Answered(200));
        // The run ended 1.5 s after the window's planned end (a worker's last request).
        overflow.settle(&mut measured, 11_500_000);
        assert_eq!(measured.tally.unsent, 3);
        assert_eq!(measured.unsent_by_second, [2, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(measured.latency.len(), 4);
        let near = |got: u64, want: u64| got.abs_diff(want) <= want / 100;
        // 11 s and 3.5 s: from when each was due until the run ended, no more.
        assert!(
            near(measured.latency.max(), 11_000_000),
            "{}",
            measured.latency.max()
        );
        assert!(near(measured.seconds[8].max(), 3_500_000));
        assert_eq!(measured.seconds[0].len(), 3);
        assert_eq!(measured.answered_latency.len(), 1);
        // Ctrl-C 3 s before the planned end: 0.5 s less than their time until the planned end.
        let mut measured = Measured::default();
        overflow.settle(&mut measured, 7_000_000);
        assert!(
            near(measured.latency.max(), 6_500_000),
            "{}",
            measured.latency.max()
        );
        // A run of hours: a slot due at its start keeps its whole wait (the latencies' top, 600
        // s, then counts it as clamped), not 600 s less the time short of the end.
        let mut overflow = Overflow::new(Duration::from_secs(7200));
        overflow.add(1);
        let mut measured = Measured::default();
        overflow.settle(&mut measured, 200_000_000);
        let got = measured.latency.max();
        assert!(got.abs_diff(200_000_000) <= 4_000_000, "{got}");
        assert_eq!(measured.tally.clamped, 0);
        // A run planned for an hour (`--requests` without `--duration`) ended after 20 s: a slot
        // due at 19 s waited 1 s, one due at 10 s 10 s; not 1 µs (the hour's histogram buckets
        // are wider than the run, and a wait taken as the time to the planned end lost them).
        let mut overflow = Overflow::new(Duration::from_secs(3600));
        overflow.add(19_000_000);
        overflow.add(10_000_000);
        let mut measured = Measured::default();
        overflow.settle(&mut measured, 20_000_000);
        assert!(
            near(measured.latency.min(), 1_000_000),
            "{}",
            measured.latency.min()
        );
        assert!(
            near(measured.latency.max(), 10_000_000),
            "{}",
            measured.latency.max()
        );
        assert!(near(measured.seconds[19].max(), 1_000_000));
        assert!(near(measured.seconds[10].max(), 10_000_000));
    }

    #[test]
    fn the_queue_of_slots_is_bounded_whatever_the_rate() {
        let ten = Duration::from_secs(10);
        // The slots due in one timeout: a stall that long is sent when it ends.
        assert_eq!(queue_capacity(200.0, ten, 4), 2_000);
        // At least 4 a connection; at most 2^20 slots (16 MiB) whatever the rate.
        assert_eq!(queue_capacity(1.0, ten, 16), 64);
        assert_eq!(queue_capacity(1e6, ten, 2), MOST_QUEUED);
        assert_eq!(
            queue_capacity(MOST_RATE, Duration::from_secs(31_536_000), 2),
            MOST_QUEUED
        );
        assert_eq!(queue_capacity(1e-300, ten, 1), 4);
        assert_eq!(std::mem::size_of::<Slot>(), 16);
    }

    #[test]
    fn the_progress_line_has_no_escape_codes_and_counts_failures_apart() {
        let line = progress_line(12.04, 2_345, (1_000, 0, 5), Some((1_234, 5_678)));
        assert_eq!(
            line,
            "  12.0 s      2345 requests       200 req/s  p99 1.23 ms  max 5.68 ms"
        );
        // Two failures in 5 s are not "0 errors/s"; a stalled second says so, not its last
        // figures.
        let line = progress_line(3.0, 10, (0, 2, 5), None);
        assert!(
            line.contains("        0 req/s  0.4 errors/s  p99 -  max -"),
            "{line}"
        );
        assert!(!line.contains('\u{1b}') && !line.contains('\r'), "{line:?}");
    }

    #[test]
    fn an_http1_answer_to_the_h2c_preface_is_named() {
        // A server's preface: an empty SETTINGS frame on stream 0.
        assert!(h2c_answer(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).is_ok());
        assert!(h2c_answer(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]).is_ok());
        // Nothing (closed at once) is measured by the run, not refused here.
        assert!(h2c_answer(b"").is_ok());
        let error =
            h2c_answer(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").unwrap_err();
        assert!(
            error.contains(
                "answered HTTP/2's connection preface in HTTP/1 (\"HTTP/1.1 400 Bad Request\")"
            ),
            "{error}"
        );
        assert!(error.contains("drop --http2"), "{error}");
        let error = h2c_answer(b"\x15\x03\x01\x00\x02\x02\x46\x00\x00").unwrap_err();
        assert!(error.contains("no HTTP/2 SETTINGS frame"), "{error}");
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

    /// 100 req/s asked of 2 connections for 10 s, every request sent, each answered in 5 ms.
    fn pace() -> Pace {
        Pace {
            asked: 100.0,
            seconds: 10.0,
            connections: 2,
            sent: 1000,
            unsent: 0,
            all_busy: 0,
            serving_us: 1000 * 5_000,
            serving_max_us: 9_000,
            send_delay_p99: 100,
            opened: 2,
            light: Load {
                requests: 1000,
                serving_us: 1000 * 5_000,
                busy: 1000,
            },
            full: Load::default(),
        }
    }

    /// `requests` sent with `busy` connections busy each, answered in `ms` each.
    fn load(requests: u64, busy: u64, ms: u64) -> Load {
        Load {
            requests,
            serving_us: requests * ms * 1000,
            busy: requests * busy,
        }
    }

    #[test]
    fn a_rate_the_connections_cannot_carry_is_blamed_on_them() {
        assert_eq!(pace().warning(), None);
        assert_eq!(pace().limit(), None);
        assert!(!pace().connection_limited());
        // 100/s at 50 ms each keeps 5 connections busy: 2 cannot carry it. The target took
        // 50 ms with one busy as with both: it was not the limit.
        let limited = Pace {
            sent: 400,
            unsent: 600,
            all_busy: 990,
            serving_us: 400 * 50_000,
            serving_max_us: 52_000,
            send_delay_p99: 5_000_000,
            light: load(3, 1, 50),
            full: load(450, 2, 51),
            ..pace()
        };
        assert!(limited.connection_limited());
        assert_eq!(limited.limit(), Some(Limit::Connections { needed: 7 }));
        let warning = limited.warning().unwrap();
        for text in [
            "the load generator's connections were the limit, not the target",
            "all 2 connections were busy",
            "990 of 1000 scheduled requests",
            "send delay p99 5000.0 ms",
            "600 were never sent",
            "40 of 100 req/s sent",
            "50.0 ms from sent to answered or failed with about 1.0 of them busy, 51.0 ms with all 2",
            "mean of 50.0 ms",
            "about 5 connections busy",
            "--connections 7 or more",
        ] {
            assert!(warning.contains(text), "{text:?} not in {warning}");
        }
        assert!(!warning.contains("could not keep up"), "{warning}");
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
        };
        assert_eq!(lagging.limit(), Some(Limit::Schedule));
        let lagging = lagging.warning().unwrap();
        assert!(
            lagging.contains("fell behind its own schedule"),
            "{lagging}"
        );
        assert!(lagging.contains("50 of 100 req/s"), "{lagging}");
    }

    #[test]
    fn a_target_that_cannot_keep_up_is_blamed_not_the_connections() {
        // The reviewer's: a target serving one request at a time in 10 ms (100/s), asked 200/s
        // on 16 connections. As they filled, each request waited for the others at the
        // target: 10 ms with one busy, 160 ms with all 16; the answers a second stayed at
        // 100. More connections would only wait longer.
        let saturated = Pace {
            asked: 200.0,
            connections: 16,
            sent: 1000,
            unsent: 1000,
            all_busy: 1990,
            serving_us: 1000 * 160_000,
            serving_max_us: 170_000,
            send_delay_p99: 4_000_000,
            light: load(8, 4, 40),
            full: load(1100, 16, 160),
            ..pace()
        };
        assert!(saturated.connection_limited());
        assert_eq!(saturated.limit(), Some(Limit::Target));
        let warning = saturated.warning().unwrap();
        for text in [
            "the target could not keep up at this rate, not the load generator's connections",
            "Its throughput was about 100/s against 200 req/s asked",
            "40.0 ms from sent to answered or failed with about 4.0 of them busy, 160.0 ms \
             with all 16",
            "(100/s with about 4.0 busy, 100/s with all 16)",
            "More connections would wait at the target, not raise the rate",
        ] {
            assert!(warning.contains(text), "{text:?} not in {warning}");
        }
        assert!(!warning.contains("run with --connections"), "{warning}");
        // Slowed, yet answered more a second: partly the connections; the run cannot say how
        // much more would help.
        let partly = Pace {
            full: load(1100, 16, 80),
            ..saturated
        };
        assert_eq!(partly.limit(), Some(Limit::Unknown { suggest: 40 }));
        let warning = partly.warning().unwrap();
        assert!(warning.contains("this run cannot tell"), "{warning}");
        assert!(warning.contains("yet answered more a second"), "{warning}");
        assert!(warning.contains("run with --connections 40;"), "{warning}");
        // One connection: no lighter load to compare with. Said so, not guessed.
        let alone = Pace {
            connections: 1,
            light: Load::default(),
            ..saturated
        };
        assert_eq!(alone.limit(), Some(Limit::Unknown { suggest: 40 }));
        let warning = alone.warning().unwrap();
        assert!(
            warning.contains("no request was sent with half or fewer of the connections busy"),
            "{warning}"
        );
    }

    #[test]
    fn a_stall_is_told_from_connections_too_few() {
        // The reviewer's: 200/s on 4 connections, a target answering in 0.4 ms but for a 2 s
        // stall. On average 1 connection is busy; in the stall all 4 were, and the slots due
        // then waited. 8 connections would not have carried it: 200/s x 2 s, 400, would.
        let stalled = Pace {
            asked: 200.0,
            connections: 4,
            sent: 2000,
            unsent: 0,
            all_busy: 404,
            serving_us: 2000 * 4_300,
            serving_max_us: 1_998_000,
            send_delay_p99: 1_881_000,
            light: load(1600, 1, 3),
            full: load(400, 4, 5),
            ..pace()
        };
        assert!(stalled.connection_limited());
        assert_eq!(stalled.limit(), Some(Limit::Spells { needed: 400 }));
        let warning = stalled.warning().unwrap();
        for text in [
            "the target slowed down or stalled at times",
            "keeps about 0.9 of the 4 connections busy",
            "its slowest answer took 1998.0 ms",
            "the percentiles show the spells",
            "about 400 connections",
        ] {
            assert!(warning.contains(text), "{text:?} not in {warning}");
        }
    }

    #[test]
    fn with_nothing_sent_no_advice_is_drawn_from_no_data() {
        // The reviewer's: 1,000,000/s on 2 connections; nothing due in the window was sent.
        // Before: "send delay p99 0.0 ms ... keeps about 0 connections busy: run with
        // --connections 4".
        let nothing = Pace {
            asked: 1e6,
            seconds: 5.0,
            sent: 0,
            unsent: 5_000_000,
            all_busy: 5_000_000,
            serving_us: 0,
            serving_max_us: 0,
            send_delay_p99: 0,
            light: load(2, 1, 10),
            full: load(1200, 2, 10),
            ..pace()
        };
        assert_eq!(nothing.limit(), Some(Limit::NothingSent));
        let warning = nothing.warning().unwrap();
        assert!(
            warning.contains("none of the 5000000 requests due in the measured window was sent"),
            "{warning}"
        );
        assert!(
            warning.contains("requests due before the window"),
            "{warning}"
        );
        for nonsense in ["0.0 ms", "about 0", "--connections"] {
            assert!(!warning.contains(nonsense), "{nonsense:?} in {warning}");
        }
        // No connection ever opened: the target was never reached.
        let unreached = Pace {
            opened: 0,
            light: Load::default(),
            full: Load::default(),
            ..nothing
        };
        let warning = unreached.warning().unwrap();
        assert!(
            warning.contains("the target was never reached"),
            "{warning}"
        );
        // Nothing due at all (a rate too low for a slot in the window): nothing to warn of.
        let none_due = Pace {
            sent: 0,
            unsent: 0,
            serving_us: 0,
            ..pace()
        };
        assert_eq!(none_due.warning(), None);
    }
}
