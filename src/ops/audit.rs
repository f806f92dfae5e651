//! Audit records: one per request, to a sink of your choice.

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::facts::{Facts, RequestParts};
use super::{shard_count, shard_of_thread};
use crate::auth::{MemoKey, VerifiedClaims};
use crate::interaction::classify_request_path;
use crate::tenant::TenantId;

/// Who asked what of which tenant, and what came of it: one per request.
///
/// Never holds a token, a secret or a body. Serialized (see [`JsonLinesAudit`]) as one JSON
/// object with the fields below by these names; absent values are `null`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AuditRecord {
    /// When the request arrived (`time`, RFC 3339 UTC with milliseconds). The
    /// [`ObserveLayer`](super::ObserveLayer) reads only the monotonic clock then: this is that
    /// instant turned into wall time against a reading of both clocks taken at most about a
    /// second before or after it (a step of the wall clock in between moves it with the step).
    pub time: SystemTime,
    /// The request id (`X-Request-Id`).
    pub request_id: Option<String>,
    /// The client: the token's client, or the one a token request named.
    pub client_id: Option<String>,
    /// The token's issuer.
    pub issuer: Option<String>,
    /// The address the request came from: the one a trusted load balancer named (a
    /// `ForwardedClient` in the request's extensions, what the gateway binary's
    /// `client_address_header` reads), else the connection's peer (a `ClientAddr`, both in
    /// the `proxy` and `token` modules, or axum's `ConnectInfo`); absent when the
    /// server put neither there. The [`ObserveLayer`](super::ObserveLayer) records an
    /// IPv4-mapped IPv6 address as the IPv4 address.
    pub client_address: Option<IpAddr>,
    /// The tenant.
    pub tenant: Option<TenantId>,
    /// The HTTP method.
    pub method: String,
    /// The path.
    pub path: String,
    /// The query string as [`QueryRecording`] says (absent when there was none or when it is
    /// not recorded).
    pub query: Option<String>,
    /// FHIR's name of the interaction (`read`, `search`, ...; see
    /// [`Interaction`](crate::interaction::Interaction)); `token` for a token request; `admin`
    /// for a request under `/admin/` (an admin API's, as the gateway binary's); absent when the
    /// request is none of these.
    pub interaction: Option<&'static str>,
    /// The resource type the path names.
    pub resource_type: Option<String>,
    /// The resource id the path names.
    pub resource_id: Option<String>,
    /// The response status (`499` when the client went away before it).
    pub status: u16,
    /// `ok`, or why a layer refused the request (see [`Refusal`](crate::outcome::Refusal)).
    pub outcome: &'static str,
    /// The upstream's base URL, when the request was routed to one (an in-process tenant's
    /// label). Routed is not reached: a request a layer after the routing refused (its
    /// `outcome` not `ok`: SMART scopes, rate limits, an unsafe path, a body too large by its
    /// length) never reached it; one answered `502` (`exception`) or `504` (`timeout`) was
    /// sent, or tried to be.
    pub upstream: Option<Arc<str>>,
    /// Milliseconds from the request's arrival to its response head.
    pub duration_ms: f64,
}

impl Serialize for AuditRecord {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(16))?;
        map.serialize_entry(
            "time",
            &humantime::format_rfc3339_millis(self.time).to_string(),
        )?;
        map.serialize_entry("request_id", &self.request_id)?;
        map.serialize_entry("client_id", &self.client_id)?;
        map.serialize_entry("issuer", &self.issuer)?;
        map.serialize_entry("client_address", &self.client_address)?;
        map.serialize_entry("tenant", &self.tenant.map(|t| t.to_string()))?;
        map.serialize_entry("method", &self.method)?;
        map.serialize_entry("path", &self.path)?;
        map.serialize_entry("query", &self.query)?;
        map.serialize_entry("interaction", &self.interaction)?;
        map.serialize_entry("resource_type", &self.resource_type)?;
        map.serialize_entry("resource_id", &self.resource_id)?;
        map.serialize_entry("status", &self.status)?;
        map.serialize_entry("outcome", &self.outcome)?;
        map.serialize_entry("upstream", &self.upstream.as_deref())?;
        map.serialize_entry(
            "duration_ms",
            &((self.duration_ms * 1000.0).round() / 1000.0),
        )?;
        map.end()
    }
}

impl AuditRecord {
    /// The record as a FHIR R4 `AuditEvent` (type `rest`, subtype the interaction, the
    /// client as the requesting agent, the resource and the tenant as entities, the request id
    /// in an extension), for a sink that stores audit events in a FHIR server.
    ///
    /// ```
    /// # use std::time::SystemTime;
    /// use tower_fhir::ops::AuditRecord;
    ///
    /// fn store(record: &AuditRecord) {
    ///     let event = record.to_audit_event();
    ///     assert_eq!(event["resourceType"], "AuditEvent");
    ///     // POST it to your audit repository's `AuditEvent` endpoint.
    /// }
    /// ```
    pub fn to_audit_event(&self) -> serde_json::Value {
        let action = match (self.interaction, self.method.as_str()) {
            (Some("create"), _) => "C",
            (Some("update" | "patch"), _) => "U",
            (Some("delete"), _) => "D",
            (Some("read" | "vread" | "search" | "history" | "capabilities"), _) => "R",
            (_, "GET" | "HEAD") => "R",
            _ => "E",
        };
        let outcome = match self.status {
            0..=399 => "0",
            400..=499 => "4",
            _ => "8",
        };
        let mut event = serde_json::json!({
            "resourceType": "AuditEvent",
            "type": {
                "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
                "code": "rest",
                "display": "RESTful Operation"
            },
            "action": action,
            "recorded": humantime::format_rfc3339_millis(self.time).to_string(),
            "outcome": outcome,
            "outcomeDesc": format!("{} {}", self.status, self.outcome),
            "agent": [{
                "requestor": true,
                "who": {"identifier": {"system": self.issuer, "value": self.client_id}},
            }],
            "source": {
                "observer": {"display": "tower-fhir gateway"},
                "type": [{
                    "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                    "code": "3",
                    "display": "Web Server"
                }]
            },
            "entity": [],
        });
        if let Some(address) = self.client_address {
            // `2`: an IP address (http://hl7.org/fhir/network-type).
            event["agent"][0]["network"] =
                serde_json::json!({"address": address.to_string(), "type": "2"});
        }
        if let Some(interaction) = self.interaction.filter(|i| *i != "token") {
            event["subtype"] = serde_json::json!([{
                "system": "http://hl7.org/fhir/restful-interaction",
                "code": interaction
            }]);
        }
        if let Some(id) = &self.request_id {
            event["extension"] = serde_json::json!([{
                "url": "urn:tower-fhir:request-id",
                "valueString": id
            }]);
        }
        let entities = event["entity"].as_array_mut().expect("made above");
        let what = match (&self.resource_type, &self.resource_id) {
            (Some(ty), Some(id)) => Some(format!("{ty}/{id}")),
            (Some(ty), None) => Some(ty.clone()),
            _ => None,
        };
        if let Some(what) = what {
            entities.push(serde_json::json!({
                "what": {"reference": what},
                "query": self.query.as_ref().map(|q| base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD, q)),
            }));
        }
        if let Some(tenant) = self.tenant {
            entities.push(serde_json::json!({
                "what": {"identifier": {"system": "urn:tower-fhir:tenant", "value": tenant.to_string()}},
                "description": "tenant",
            }));
        }
        event
    }
}

impl AuditRecord {
    /// Appends the record as one line of JSON (the same object as its `Serialize` form, and a
    /// newline), written by hand: the audit log writes one per request.
    pub fn write_json_line(&self, out: &mut Vec<u8>) {
        Line {
            time: self.time,
            request_id: self.request_id.as_deref(),
            request_id_clean: false,
            client_id: self.client_id.as_deref(),
            issuer: self.issuer.as_deref(),
            who_json: None,
            client_address: self.client_address,
            classified: false,
            tenant: self.tenant,
            method: &self.method,
            path: &self.path,
            query: match &self.query {
                Some(query) => LineQuery::Text(query),
                None => LineQuery::Absent,
            },
            interaction: self.interaction,
            resource_type: self.resource_type.as_deref(),
            resource_id: self.resource_id.as_deref(),
            status: self.status,
            outcome: self.outcome,
            upstream: self.upstream.as_deref(),
            shared_upstream: None,
            duration_ms: self.duration_ms,
        }
        .write(out, &mut LineCache::default());
    }
}

/// An audit record's fields, borrowed: what [`AuditRecord::write_json_line`] and the audit
/// log (from an [`AuditDraft`]) write alike.
struct Line<'a> {
    time: SystemTime,
    request_id: Option<&'a str>,
    /// Whether the request id is known to need no escape (see [`RequestParts`]; an
    /// [`AuditRecord`]'s may hold anything).
    request_id_clean: bool,
    client_id: Option<&'a str>,
    issuer: Option<&'a str>,
    /// `client_id` and `issuer` as their JSON values, `"client_id":...,"issuer":...`, when
    /// they were rendered once for the token (see [`Who`]).
    who_json: Option<&'a [u8]>,
    client_address: Option<IpAddr>,
    /// Whether `method`, `interaction`, `resource_type` and `resource_id` are the request's
    /// parsed method and what [`classify`](crate::interaction::classify) found, which need no escape (an [`AuditRecord`]'s
    /// may hold anything).
    classified: bool,
    tenant: Option<TenantId>,
    method: &'a str,
    path: &'a str,
    query: LineQuery<'a>,
    interaction: Option<&'static str>,
    resource_type: Option<&'a str>,
    resource_id: Option<&'a str>,
    status: u16,
    outcome: &'static str,
    upstream: Option<&'a str>,
    /// The upstream as the facts share it, when they do: its JSON string is then cached (see
    /// [`LineCache`]).
    shared_upstream: Option<&'a Arc<str>>,
    duration_ms: f64,
}

/// The `query` field: as recorded, or the names still to be picked from the query string.
enum LineQuery<'a> {
    Absent,
    Text(&'a str),
    /// A non-empty query string whose parameter names are recorded (see
    /// [`QueryRecording::Names`]).
    NamesOf(&'a str),
}

impl Line<'_> {
    fn write(&self, out: &mut Vec<u8>, cache: &mut LineCache) {
        out.reserve(384 + self.path.len());
        out.extend_from_slice(b"{\"time\":\"");
        push_time_cached(out, self.time, cache);
        out.extend_from_slice(b"\",\"request_id\":");
        match self.request_id {
            Some(id) if self.request_id_clean => push_clean(out, id),
            id => push_opt_str(out, id),
        }
        match self.who_json {
            Some(who) => out.extend_from_slice(who),
            None => push_who(out, self.client_id, self.issuer),
        }
        out.extend_from_slice(b",\"client_address\":");
        match self.client_address {
            Some(address) => out.extend_from_slice(cache.address_json(address)),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"tenant\":");
        match self.tenant {
            Some(tenant) => out.extend_from_slice(cache.tenant_json(tenant)),
            None => out.extend_from_slice(b"null"),
        }
        // Pushes a field that needs no escape when classified.
        let push_field = |out: &mut Vec<u8>, value: Option<&str>| match value {
            Some(value) if self.classified => push_clean(out, value),
            value => push_opt_str(out, value),
        };
        out.extend_from_slice(b",\"method\":");
        // A parsed method is a token (RFC 9110 §5.6.2): nothing in it needs an escape.
        push_field(out, Some(self.method));
        out.extend_from_slice(b",\"path\":");
        push_str(out, self.path);
        out.extend_from_slice(b",\"query\":");
        match self.query {
            LineQuery::Absent => out.extend_from_slice(b"null"),
            LineQuery::Text(query) => push_str(out, query),
            LineQuery::NamesOf(query) => {
                out.push(b'"');
                push_names(out, query);
                out.push(b'"');
            }
        }
        // The interaction is one of the crate's names; a classified type and id are a FHIR
        // type (letters and digits) and a FHIR id (letters, digits, `-`, `.`).
        out.extend_from_slice(b",\"interaction\":");
        push_field(out, self.interaction);
        out.extend_from_slice(b",\"resource_type\":");
        push_field(out, self.resource_type);
        out.extend_from_slice(b",\"resource_id\":");
        push_field(out, self.resource_id);
        out.extend_from_slice(b",\"status\":");
        match self.status {
            100..=999 => out.extend_from_slice(&[
                b'0' + (self.status / 100) as u8,
                b'0' + (self.status / 10 % 10) as u8,
                b'0' + (self.status % 10) as u8,
            ]),
            status => push_u64(out, u64::from(status)),
        }
        out.extend_from_slice(b",\"outcome\":");
        match self.outcome {
            "ok" => out.extend_from_slice(b"\"ok\""),
            outcome => push_str(out, outcome),
        }
        out.extend_from_slice(b",\"upstream\":");
        match self.shared_upstream {
            Some(upstream) => out.extend_from_slice(cache.upstream_json(upstream)),
            None => push_opt_str(out, self.upstream),
        }
        out.extend_from_slice(b",\"duration_ms\":");
        // Microseconds, written as milliseconds with three decimals.
        let micros = (self.duration_ms.max(0.0) * 1000.0).round() as u64;
        push_u64(out, micros / 1000);
        out.push(b'.');
        let fraction = micros % 1000;
        out.extend_from_slice(&[
            b'0' + (fraction / 100) as u8,
            b'0' + (fraction / 10 % 10) as u8,
            b'0' + (fraction % 10) as u8,
        ]);
        out.extend_from_slice(b"}\n");
    }
}

/// `,"client_id":...,"issuer":...`.
fn push_who(out: &mut Vec<u8>, client_id: Option<&str>, issuer: Option<&str>) {
    out.extend_from_slice(b",\"client_id\":");
    push_opt_str(out, client_id);
    out.extend_from_slice(b",\"issuer\":");
    push_opt_str(out, issuer);
}

/// A JSON string of text known to need no escape (checked in debug builds).
fn push_clean(out: &mut Vec<u8>, value: &str) {
    debug_assert!(!needs_escape(value.as_bytes()), "{value:?} needs an escape");
    out.push(b'"');
    out.extend_from_slice(value.as_bytes());
    out.push(b'"');
}

/// An IP address as a JSON string (nothing in one needs an escape). IPv4, what nearly every
/// record holds, without the formatter; IPv6 through its `Display`.
fn push_address(out: &mut Vec<u8>, address: IpAddr) {
    out.push(b'"');
    match address {
        IpAddr::V4(v4) => crate::client_addr::write_ipv4(v4, |b| out.push(b)),
        IpAddr::V6(v6) => {
            // (Writing to a `Vec` cannot fail.)
            let _ = write!(out, "{v6}");
        }
    }
    out.push(b'"');
}

fn push_opt_str(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(value) => push_str(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string: quotes, `"` and `\` escaped, control characters as `\u00XX`.
fn push_str(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    push_escaped(out, value);
    out.push(b'"');
}

/// A byte of eight, every byte `n`.
const ONES: u64 = u64::MAX / 255;
/// Each byte's high bit.
const HIGH: u64 = ONES * 0x80;

/// Nonzero when a byte of `word` is below `n` (n <= 128), zero when none is: the high bit of the
/// lowest such byte is set, and bytes above it may be set too (a borrow), so read it only as
/// "any" or "the first".
fn below(word: u64, n: u8) -> u64 {
    word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH
}

/// Nonzero when a byte of `word` is `byte`, as [`below`] says.
fn equal(word: u64, byte: u8) -> u64 {
    below(word ^ (ONES * u64::from(byte)), 1)
}

/// Whether any byte of `bytes` is one `flag` marks, eight bytes at a time (`flag` is nonzero
/// for a little-endian word holding such a byte, zero otherwise), and `byte` says of one byte
/// alone (for fewer than eight).
fn any_flagged(bytes: &[u8], flag: impl Fn(u64) -> u64, byte: impl Fn(u8) -> bool) -> bool {
    let word = |chunk: &[u8]| u64::from_le_bytes(chunk.try_into().expect("eight bytes"));
    if bytes.len() < 8 {
        return bytes.iter().any(|&b| byte(b));
    }
    let mut found = 0;
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        found |= flag(word(chunk));
    }
    if !chunks.remainder().is_empty() {
        // The last eight bytes again, overlapping what was checked.
        found |= flag(word(&bytes[bytes.len() - 8..]));
    }
    found != 0
}

/// Whether every byte is printable ASCII (a space to `~`) but `"` and `\`: text that
/// `HeaderValue::to_str` takes and that needs no escape in a JSON string.
pub(super) fn is_plain_ascii(bytes: &[u8]) -> bool {
    // Bytes from 0x80 on have their high bit set; 0x7f (DEL) is a control character.
    !any_flagged(
        bytes,
        |word| {
            below(word, 0x20)
                | (word & HIGH)
                | equal(word, 0x7f)
                | equal(word, b'"')
                | equal(word, b'\\')
        },
        |b| !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\',
    )
}

/// Whether any byte needs an escape in a JSON string (`"`, `\`, a control character).
fn needs_escape(bytes: &[u8]) -> bool {
    any_flagged(
        bytes,
        |word| below(word, 0x20) | equal(word, b'"') | equal(word, b'\\'),
        |b| b < 0x20 || b == b'"' || b == b'\\',
    )
}

/// The contents of a JSON string, escaped as [`push_str`] says.
fn push_escaped(out: &mut Vec<u8>, value: &str) {
    let bytes = value.as_bytes();
    // Most values need no escape: one scan, one copy.
    if !needs_escape(bytes) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'"' || b == b'\\' || b < 0x20 {
            out.extend_from_slice(&bytes[start..i]);
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                _ => {
                    const HEX: &[u8; 16] = b"0123456789abcdef";
                    out.extend_from_slice(b"\\u00");
                    out.push(HEX[usize::from(b >> 4)]);
                    out.push(HEX[usize::from(b & 0xf)]);
                }
            }
            start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

/// The parameter names of a query string joined by `&`, exactly as [`QueryRecording::apply`]
/// keeps them (a separator only once something was kept, so a leading empty name leaves no
/// `&`), escaped as [`push_str`] says: one pass over the query, each name copied at once.
///
/// Split by hand, a byte at a time: on these short pairs, two `memchr`s a pair (each setting
/// up its vectors) cost more than the bytes they pass over.
fn push_names(out: &mut Vec<u8>, query: &str) {
    let bytes = query.as_bytes();
    let clean = !needs_escape(bytes);
    // Whether anything was kept yet (a name or a separator), as `apply`'s `!names.is_empty()`.
    let mut kept = false;
    let mut at = 0;
    while at < bytes.len() {
        // One pair, from `at` to the next `&`; its name ends at its first `=`.
        let mut name_end = at;
        while name_end < bytes.len() && bytes[name_end] != b'&' && bytes[name_end] != b'=' {
            name_end += 1;
        }
        let mut end = name_end;
        while end < bytes.len() && bytes[end] != b'&' {
            end += 1;
        }
        if end > at {
            if kept {
                out.push(b'&');
            }
            kept |= name_end > at;
            if clean {
                out.extend_from_slice(&bytes[at..name_end]);
            } else {
                push_escaped(out, &query[at..name_end]);
            }
        }
        at = end + 1;
    }
}

fn push_u64(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, UTC, with no cache (what the cached text must equal).
#[cfg(test)]
fn push_time(out: &mut Vec<u8>, time: SystemTime) {
    push_time_cached(out, time, &mut LineCache::default());
}

/// What the last line written had, kept by the audit log's writer, as records come many to a
/// second and mostly for few tenants: the second's text (`YYYY-MM-DDTHH:MM:SS.`) and the
/// tenant's JSON string.
#[derive(Default)]
pub(crate) struct LineCache {
    secs: Option<u64>,
    text: Vec<u8>,
    tenant: Option<(TenantId, [u8; TENANT_JSON])>,
    /// The upstream held (so that its address is not another's while cached) and its JSON
    /// string.
    upstream: Option<(Arc<str>, Vec<u8>)>,
    /// The client address and its JSON string.
    address: Option<(IpAddr, Vec<u8>)>,
    /// The clocks the writer read last, against which drafts' start times become wall times.
    clock: Option<Clock>,
}

/// The wall clock and the monotonic clock, read together: a request's start (an [`Instant`])
/// is turned into its record's wall time against them, so a request reads only the monotonic
/// clock. The audit log's writer reads both for each buffer every turn, and a line's thread
/// again when they are more than a second old.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    wall: SystemTime,
    at: Instant,
}

impl Clock {
    /// Both clocks now.
    pub(crate) fn now() -> Self {
        Self::at(Instant::now())
    }

    /// The wall clock now, paired with `at`, an instant just read.
    pub(crate) fn at(at: Instant) -> Self {
        Self {
            wall: SystemTime::now(),
            at,
        }
    }

    /// The wall time of `instant`.
    fn wall_time(self, instant: Instant) -> SystemTime {
        match instant.checked_duration_since(self.at) {
            Some(after) => self.wall.checked_add(after),
            None => self.wall.checked_sub(self.at.duration_since(instant)),
        }
        .unwrap_or(self.wall)
    }
}

/// A tenant id as a JSON string: a hyphenated UUID in quotes.
const TENANT_JSON: usize = uuid::fmt::Hyphenated::LENGTH + 2;

impl LineCache {
    /// `tenant` as a JSON string, from the cache when it is the last line's.
    fn tenant_json(&mut self, tenant: TenantId) -> &[u8] {
        if self.tenant.is_none_or(|(cached, _)| cached != tenant) {
            let mut json = [b'"'; TENANT_JSON];
            uuid::Uuid::from_bytes(*tenant.as_bytes())
                .hyphenated()
                .encode_lower(&mut json[1..TENANT_JSON - 1]);
            self.tenant = Some((tenant, json));
        }
        let (_, json) = self.tenant.as_ref().expect("cached above");
        json
    }

    /// `address` as a JSON string, from the cache when it is the last line's (most come
    /// from a few load balancers or clients).
    fn address_json(&mut self, address: IpAddr) -> &[u8] {
        let (cached, json) = self.address.get_or_insert_with(|| (address, Vec::new()));
        // (Empty: made just now. A JSON string never is.)
        if *cached != address || json.is_empty() {
            json.clear();
            push_address(json, address);
            *cached = address;
        }
        json
    }

    /// `upstream` as a JSON string, from the cache when it is the last line's (the same
    /// allocation, as the routing shares one per upstream).
    fn upstream_json(&mut self, upstream: &Arc<str>) -> &[u8] {
        if self
            .upstream
            .as_ref()
            .is_none_or(|(cached, _)| !Arc::ptr_eq(cached, upstream))
        {
            let mut json = Vec::with_capacity(upstream.len() + 2);
            push_str(&mut json, upstream);
            self.upstream = Some((Arc::clone(upstream), json));
        }
        let (_, json) = self.upstream.as_ref().expect("cached above");
        json
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, UTC, the second's text from `cache` when it is the same.
fn push_time_cached(out: &mut Vec<u8>, time: SystemTime, cache: &mut LineCache) {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    if cache.secs != Some(secs) {
        let text = &mut cache.text;
        text.clear();
        let (year, month, day) = civil_from_days((secs / 86_400) as i64);
        let of_day = secs % 86_400;
        let two = |out: &mut Vec<u8>, n: u64| {
            out.extend_from_slice(&[b'0' + (n / 10) as u8, b'0' + (n % 10) as u8])
        };
        push_u64(text, year.max(0) as u64);
        text.push(b'-');
        two(text, u64::from(month));
        text.push(b'-');
        two(text, u64::from(day));
        text.push(b'T');
        two(text, of_day / 3600);
        text.push(b':');
        two(text, of_day / 60 % 60);
        text.push(b':');
        two(text, of_day % 60);
        text.push(b'.');
        cache.secs = Some(secs);
    }
    out.extend_from_slice(&cache.text);
    let millis = since.subsec_millis();
    out.extend_from_slice(&[
        b'0' + (millis / 100) as u8,
        b'0' + (millis / 10 % 10) as u8,
        b'0' + (millis % 10) as u8,
        b'Z',
    ]);
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// How an audit record keeps the query string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueryRecording {
    /// As it came, but for the values of parameters that carry credentials
    /// (`access_token`, `client_secret`, `client_assertion`, ...), recorded as `REDACTED`.
    Full,
    /// The parameter names only, values dropped (`name&birthdate`): what was searched by,
    /// not for whom. The default.
    #[default]
    Names,
    /// Not at all.
    None,
}

impl QueryRecording {
    /// `full`, `names` or `none`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "full" => Some(Self::Full),
            "names" => Some(Self::Names),
            "none" => Some(Self::None),
            _ => None,
        }
    }

    /// The query as recorded.
    pub fn apply(self, query: Option<&str>) -> Option<String> {
        let query = query.filter(|q| !q.is_empty())?;
        match self {
            Self::Full => Some(redact_secrets(query).into_owned()),
            Self::None => None,
            Self::Names => {
                let mut names = String::with_capacity(query.len());
                for pair in query.split('&').filter(|pair| !pair.is_empty()) {
                    if !names.is_empty() {
                        names.push('&');
                    }
                    names.push_str(pair.split('=').next().unwrap_or(""));
                }
                Some(names)
            }
        }
    }
}

/// Query parameters whose values are credentials: [`QueryRecording::Full`] records their
/// names with the value `REDACTED`.
/// (Not `code`: FHIR searches by it.) Names outside the list are recorded as sent: keep
/// credentials out of URLs, or record the names only ([`QueryRecording::Names`]).
const SECRET_PARAMETERS: [&str; 31] = [
    "access_token",
    "refresh_token",
    "id_token",
    "token",
    "jwt",
    "client_secret",
    "client_assertion",
    "assertion",
    "code_verifier",
    "password",
    "passwd",
    "pwd",
    "subject_token",
    "actor_token",
    "api_key",
    "apikey",
    "api-key",
    "x-api-key",
    "key",
    "secret",
    "authorization",
    "auth",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
    "x-goog-signature",
    "session",
    "sessionid",
    "sid",
];

/// The query string with the value of each [`SECRET_PARAMETERS`] parameter (its name
/// percent-decoded, `+` a space, any case, Unicode's case mappings to ASCII letters included,
/// white space around it ignored, as lenient servers read names) replaced by `REDACTED`; borrowed when it has none. Pairs are split at `&` and at `;`
/// (which some servers also take between parameters).
fn redact_secrets(query: &str) -> std::borrow::Cow<'_, str> {
    let secret = |name: &str| {
        SECRET_PARAMETERS
            .iter()
            .any(|secret| crate::auth::is_parameter(name, secret))
    };
    let has_secret = |pair: &str| pair.split_once('=').is_some_and(|(name, _)| secret(name));
    if !query.split(['&', ';']).any(has_secret) {
        return std::borrow::Cow::Borrowed(query);
    }
    let mut redacted = String::with_capacity(query.len());
    let mut rest = query;
    loop {
        let end = rest.find(['&', ';']).unwrap_or(rest.len());
        let pair = &rest[..end];
        match pair.split_once('=') {
            Some((name, _)) if secret(name) => {
                redacted.push_str(name);
                redacted.push_str("=REDACTED");
            }
            _ => redacted.push_str(pair),
        }
        // The separator as it was.
        match rest[end..].chars().next() {
            Some(separator) => {
                redacted.push(separator);
                rest = &rest[end + 1..];
            }
            None => break,
        }
    }
    std::borrow::Cow::Owned(redacted)
}

/// Paths that are the token endpoint's (recorded as interaction `token`): tokens, secret
/// rotation, introspection and revocation.
const TOKEN_PATHS: [&str; 4] = [
    "/oauth/token",
    "/oauth/clients/",
    "/oauth/introspect",
    "/oauth/revoke",
];

/// Paths under this are an admin API's (the gateway binary's): recorded as interaction
/// `admin`.
const ADMIN_PATHS: &str = "/admin/";

/// What an audit record says of the request's method and path.
struct Described<'a> {
    interaction: Option<&'static str>,
    resource_type: Option<&'a str>,
    resource_id: Option<&'a str>,
}

/// What the record says of a request to `path`, as sent: the token endpoint's and the admin
/// API's paths are matched as sent (as they are routed), a FHIR path as the upstream reads it
/// ([`canonical_path`]).
fn describe<'a>(method: &http::Method, path: &'a str, canonical: &'a str) -> Described<'a> {
    let token = TOKEN_PATHS
        .iter()
        .any(|p| path == *p || (p.ends_with('/') && path.starts_with(p)));
    let interaction = if token {
        Some("token")
    } else if path.starts_with(ADMIN_PATHS) {
        Some("admin")
    } else {
        None
    };
    if interaction.is_some() {
        return Described {
            interaction,
            resource_type: None,
            resource_id: None,
        };
    }
    // The path of a `Uri` (and `canonical_path` decodes no `?` or `#` into it): no query, no
    // fragment, so not searched for either. A `HEAD` is the `GET` it mirrors, and
    // `Patient/[id]/*` a compartment search, as the scope checks take them; DSTU2 asked for
    // the server's statement with `OPTIONS [base]`.
    let mut classified = classify_request_path(method, canonical);
    if *method == http::Method::OPTIONS && canonical.trim_matches('/').is_empty() {
        classified.interaction = Some(crate::interaction::Interaction::Capabilities);
    }
    Described {
        interaction: classified.interaction.map(|i| i.as_str()),
        resource_type: classified.resource_type,
        resource_id: classified.resource_id,
    }
}

/// The path as the upstream reads it, for classifying: runs of slashes merged (as the proxy
/// merges them) and percent-encoded bytes decoded (`/%50atient/%31` is `Patient/1` to a FHIR
/// server). Borrowed when there is nothing to change, or when a decoded byte would be a `/`,
/// `\`, `?`, `#` or NUL, or not UTF-8 (paths the proxy refuses; left unclassified).
fn canonical_path(path: &str) -> std::borrow::Cow<'_, str> {
    // One plain pass over the (short) path: `str::contains("//")` runs a two-way search and
    // `memchr2` sets up vectors, each well over a hundred instructions a path.
    let mut previous = 0;
    let plain = path.bytes().all(|byte| {
        let plain = byte != b'%' && !(byte == b'/' && previous == b'/');
        previous = byte;
        plain
    });
    if plain {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut canonical = String::with_capacity(path.len());
    for segment in path.split('/').filter(|segment| !segment.is_empty()) {
        let Ok(decoded) = percent_encoding::percent_decode_str(segment).decode_utf8() else {
            return std::borrow::Cow::Borrowed(path);
        };
        if decoded.contains(['/', '\\', '?', '#', '\0']) {
            return std::borrow::Cow::Borrowed(path);
        }
        canonical.push('/');
        canonical.push_str(&decoded);
    }
    if canonical.is_empty() {
        canonical.push('/');
    }
    std::borrow::Cow::Owned(canonical)
}

/// The client and issuer a token's claims name, read from the claims once per token (the
/// claims of a cached token are shared by all its requests) instead of once per record.
struct Who {
    client_id: Option<Box<str>>,
    issuer: Option<Box<str>>,
    /// Both as the audit line has them: `,"client_id":...,"issuer":...`.
    json: Box<[u8]>,
}

fn who(claims: &VerifiedClaims) -> Arc<Who> {
    static KEY: OnceLock<MemoKey> = OnceLock::new();
    let key = *KEY.get_or_init(MemoKey::unique);
    claims.memoized(key, |claims| {
        let mut json = Vec::new();
        push_who(&mut json, claims.client_id(), claims.issuer());
        Arc::new(Who {
            client_id: claims.client_id().map(Box::from),
            issuer: claims.issuer().map(Box::from),
            json: json.into_boxed_slice(),
        })
    })
}

/// An audit record as the [`ObserveLayer`](super::ObserveLayer) has it when the response is
/// ready: the request's parts and facts, nothing copied, classified or formatted yet.
/// [`JsonLinesAudit`] writes its JSON line straight from it; any other sink gets the
/// [`AuditRecord`] made of it.
pub(crate) struct AuditDraft {
    parts: RequestParts,
    facts: Facts,
    status: u16,
    outcome: &'static str,
    duration: Duration,
    query: QueryRecording,
}

impl AuditDraft {
    /// The draft of a request.
    pub(crate) fn new(
        parts: RequestParts,
        facts: Facts,
        status: u16,
        outcome: &'static str,
        duration: Duration,
        query: QueryRecording,
    ) -> Self {
        Self {
            parts,
            facts,
            status,
            outcome,
            duration,
            query,
        }
    }

    /// Calls `f` with the record's fields, borrowed from the request's parts and facts.
    fn with_line<R>(&self, clock: Clock, f: impl FnOnce(&Line<'_>) -> R) -> R {
        let (parts, facts) = (&self.parts, &self.facts);
        {
            let who = facts.claims.as_ref().map(who);
            let path = parts.path();
            let canonical = canonical_path(path);
            let described = describe(&parts.method, path, &canonical);
            let full = match (self.query, parts.query()) {
                (QueryRecording::Full, Some(query)) => Some(redact_secrets(query)),
                _ => None,
            };
            let query = match (self.query, parts.query()) {
                (QueryRecording::Full, Some(_)) => {
                    LineQuery::Text(full.as_deref().unwrap_or_default())
                }
                (QueryRecording::Names, Some(query)) => LineQuery::NamesOf(query),
                _ => LineQuery::Absent,
            };
            f(&Line {
                time: clock.wall_time(parts.start),
                request_id: parts.request_id(),
                request_id_clean: parts.request_id_is_clean(),
                client_id: facts
                    .client
                    .as_deref()
                    .or_else(|| who.as_ref()?.client_id.as_deref()),
                issuer: facts
                    .issuer
                    .as_deref()
                    .or_else(|| who.as_ref()?.issuer.as_deref()),
                // The token's rendering, unless the client or issuer was set by hand.
                who_json: who
                    .as_ref()
                    .filter(|_| facts.client.is_none() && facts.issuer.is_none())
                    .map(|who| &*who.json),
                client_address: parts.client_address,
                classified: true,
                tenant: facts.tenant,
                method: parts.method.as_str(),
                path,
                query,
                interaction: described.interaction,
                resource_type: described.resource_type,
                resource_id: described.resource_id,
                status: self.status,
                outcome: self.outcome,
                upstream: facts.upstream.as_deref(),
                shared_upstream: facts.upstream.as_ref(),
                duration_ms: self.duration.as_secs_f64() * 1000.0,
            })
        }
    }

    /// Appends the record's JSON line, as [`AuditRecord::write_json_line`] writes it, its time
    /// read against the cache's clock (read now when it has none).
    pub(crate) fn write_json_line(&self, out: &mut Vec<u8>, cache: &mut LineCache) {
        let clock = *cache.clock.get_or_insert_with(Clock::now);
        self.with_line(clock, |line| line.write(out, cache));
    }

    /// The record, its strings copied, its time read against `clock`.
    pub(crate) fn into_record(self, clock: Clock) -> AuditRecord {
        let upstream = self.facts.upstream.clone();
        self.with_line(clock, |line| AuditRecord {
            time: line.time,
            request_id: line.request_id.map(str::to_owned),
            client_id: line.client_id.map(str::to_owned),
            issuer: line.issuer.map(str::to_owned),
            client_address: line.client_address,
            tenant: line.tenant,
            method: line.method.to_owned(),
            path: line.path.to_owned(),
            query: match line.query {
                LineQuery::Absent => None,
                LineQuery::Text(query) => Some(query.to_owned()),
                LineQuery::NamesOf(query) => QueryRecording::Names.apply(Some(query)),
            },
            interaction: line.interaction,
            resource_type: line.resource_type.map(str::to_owned),
            resource_id: line.resource_id.map(str::to_owned),
            status: line.status,
            outcome: line.outcome,
            upstream,
            duration_ms: line.duration_ms,
        })
    }
}

/// Where audit records go. `record` is called on the request path as each response is
/// ready: it must not block (queue the record and return).
pub trait AuditSink: Send + Sync + 'static {
    /// Takes one record.
    fn record(&self, record: AuditRecord);
}

impl<F> AuditSink for F
where
    F: Fn(AuditRecord) + Send + Sync + 'static,
{
    fn record(&self, record: AuditRecord) {
        self(record)
    }
}

/// How many records [`JsonLinesAudit`] holds while its writer catches up.
pub const DEFAULT_AUDIT_QUEUE: usize = 65_536;

/// How many bytes of lines [`JsonLinesAudit`] holds while its writer catches up (64 MiB): a
/// record's path comes from its client, so records alone do not bound them.
pub const DEFAULT_AUDIT_BYTES: usize = 64 << 20;

/// The most records a [`JsonLinesAudit`] can be given to hold (its capacity is lowered to it):
/// half what [`Lines::waiting`]'s record bits count, so the few threads that pass the check at
/// once cannot carry it over.
const MAX_AUDIT_QUEUE: usize = 1 << 23;

/// [`Lines::waiting`] holds records in its high bits, bytes in these.
const BYTES_BITS: u32 = 40;
const BYTES_MASK: u64 = (1 << BYTES_BITS) - 1;

/// What [`Lines::waiting`] counts for `records` records of `bytes` bytes.
fn waiting(records: usize, bytes: usize) -> u64 {
    ((records as u64) << BYTES_BITS) | (bytes as u64 & BYTES_MASK)
}

/// How long the writer sleeps between turns.
const WRITER_NAP: Duration = Duration::from_millis(20);

/// A record written longer than this after it was ready counts as delayed.
const DELAYED_AFTER: Duration = Duration::from_secs(1);

/// Writes audit records as JSON lines, one object per line, to a file (appended) or stdout,
/// from a thread of its own.
///
/// A record's line is made on the thread that has the record (for a request, when its
/// response is ready, while its parts are still in that CPU's cache) and appended to a buffer
/// of that thread's own (twice as many buffers as CPUs, rounded up to a power of two, so a
/// worker thread per CPU has one to itself; each is locked only to append a line, and by the
/// writer to take it). The writer thread takes the buffers whole every 20 ms, writes and
/// flushes them; no request ever waits for it or has to wake it. Lines of different threads
/// may reach the file out of time order by up to that turn; each carries its time. At most [`DEFAULT_AUDIT_QUEUE`] records
/// (or the capacity given to [`writer`](Self::writer)), and [`DEFAULT_AUDIT_BYTES`] of lines
/// ([`max_waiting_bytes`](Self::max_waiting_bytes)), wait to be written. When the writer
/// falls behind (a slow disk), records wait in the buffers: one written more than a second
/// after its request counts in `tower_fhir_audit_records_delayed_total`. When that many
/// records or bytes are waiting already, when a write fails (a full disk), or when the writer thread
/// has ended (a panic in the `Write` it was given), the record is dropped: never silently,
/// each one counts in `tower_fhir_audit_records_dropped_total` and drops are logged at `error`
/// (at most once a second, with the count). A write that fails part-way (the disk filled)
/// loses only the records it did not write whole; a line it cut short is ended with a newline
/// before anything else is written, so the records after it stand on lines of their own.
/// Requests are never held up by the audit log.
///
/// Given to [`ObserveLayer::audit`](super::ObserveLayer::audit) as it is, the audit log takes
/// more than records: the request's parts and what the layers learned, and writes the line
/// straight from them (the same line as [`AuditRecord::write_json_line`]), so no record is
/// made for it. Dropping the log writes what is waiting, then closes: it waits 10 s at most for
/// that (a disk that hangs would keep a process from exiting), then logs at `error` how many
/// records were still waiting and returns. A file log is rotated by
/// renaming the file, then [`AuditReopener::reopen`] (see [`reopener`](Self::reopener)). Its
/// writer also looks once a second whether the file at the path is still the one it writes
/// to, and opens a new one there if not: renamed, it logs a `warn`; deleted, it counts the
/// records written since its last look (lost with the file) as dropped, logged at `error`.
///
/// ```
/// use tower_fhir::ops::JsonLinesAudit;
///
/// let dir = std::env::temp_dir().join(format!("audit-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("audit.jsonl");
/// let audit = JsonLinesAudit::file(&path).unwrap();
/// assert_eq!(audit.dropped(), 0);
/// drop(audit); // writes what is waiting, then closes
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
pub struct JsonLinesAudit {
    lines: Arc<Lines>,
    counts: Arc<Counts>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// A file log's path, to open it again (see [`reopener`](Self::reopener)).
    reopen: Option<Arc<Reopen>>,
    /// How long dropping it waits for the writer ([`CLOSING_WAIT`]).
    closing_wait: Duration,
}

/// A file log's path, and the file opened there again, until the writer switches to it.
struct Reopen {
    path: PathBuf,
    /// Whether the path was a symbolic link when the log was opened: only then is one
    /// followed when the path is opened again (see [`open_log`]).
    link: bool,
    next: Mutex<Option<File>>,
    switched: Condvar,
}

impl Reopen {
    /// The writer's side: the file to write to from now on, if one was opened.
    fn take(&self) -> Option<File> {
        let file = self
            .next
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()?;
        self.switched.notify_all();
        tracing::info!(path = %self.path.display(), "audit log reopened");
        Some(file)
    }
}

/// Once a second, whether the file at a file log's path is still the one written to: a log
/// file deleted, or moved without a reopen, is not written to for more than a second.
struct FileWatch {
    path: PathBuf,
    /// Whether a symbolic link at the path is followed (it was one when the log began).
    link: bool,
    /// The file written to (another handle to it).
    open: Option<File>,
    checked: Instant,
    /// [`Counts::written`] at the last check.
    written: u64,
}

impl FileWatch {
    fn new(path: &Path, link: bool, file: &File) -> Self {
        Self {
            path: path.to_path_buf(),
            link,
            open: file.try_clone().ok(),
            checked: Instant::now(),
            written: 0,
        }
    }

    /// The writer now writes to `file`.
    fn follow(&mut self, file: &File) {
        self.open = file.try_clone().ok();
    }

    /// A file opened anew at the path, when the one written to is no longer there (deleted:
    /// the records written since the last check, a second's at most, are counted as dropped
    /// and logged at `error`; moved: logged at `warn`, nothing lost).
    fn check(&mut self, counts: &Counts) -> Option<File> {
        if self.checked.elapsed() < Duration::from_secs(1) {
            return None;
        }
        self.checked = Instant::now();
        let written = counts.written.load(Ordering::Relaxed);
        let since = written.saturating_sub(std::mem::replace(&mut self.written, written));
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let open = self.open.as_ref()?;
            if crate::persist::is_file_at(open, &self.path) {
                return None;
            }
            let open = open.metadata().ok()?;
            let path = self.path.display();
            let deleted = open.nlink() == 0;
            if deleted {
                counts.dropped_many(since, "the audit log file was deleted while written to");
            }
            let file = match open_log(&self.path, self.link) {
                Ok(file) => file,
                Err(error) => {
                    tracing::error!(%path, %error, "the audit log file is gone and a new one cannot be opened at its path (a symbolic link put there since the start is not followed)");
                    return None;
                }
            };
            if deleted {
                tracing::error!(
                    %path,
                    at_most = since,
                    "the audit log file was deleted: the records written to it in the last second are lost; writing to a new file at its path"
                );
            } else {
                tracing::warn!(%path, "the audit log file was moved without a reopen; writing to a new file at its path");
            }
            self.follow(&file);
            Some(file)
        }
        #[cfg(not(unix))]
        {
            let _ = since;
            None
        }
    }
}

/// How long [`AuditReopener::reopen`] waits for the writer to switch files.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// Opens a file audit log: appended to, created if absent (mode 0600 on Unix). A symbolic
/// link at `path` is followed only when `follow` (on Unix): opened again after a rotation or
/// a move, a path that was no link when the log began must not have become one (planted by
/// someone who may write to its directory, to have the records appended to a file of their
/// choosing).
fn open_log(path: &Path, follow: bool) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
        if !follow {
            options.custom_flags(libc::O_NOFOLLOW);
        }
    }
    #[cfg(not(unix))]
    let _ = follow;
    options.open(path)
}

/// Opens a file [`JsonLinesAudit`] again at its path and has its writer switch to it: what
/// log rotation needs (rename the file, then reopen). Cloned freely; from
/// [`JsonLinesAudit::reopener`].
///
/// ```
/// use tower_fhir::ops::JsonLinesAudit;
///
/// let dir = std::env::temp_dir().join(format!("audit-reopen-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("audit.jsonl");
/// let audit = JsonLinesAudit::file(&path).unwrap();
/// let reopener = audit.reopener().expect("a file log");
/// // Rotate: move the file aside, then reopen; later lines go to a new file at `path`.
/// std::fs::rename(&path, dir.join("audit.jsonl.1")).unwrap();
/// reopener.reopen().unwrap();
/// assert!(path.exists());
/// # drop(audit);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// ```
#[derive(Clone)]
pub struct AuditReopener {
    reopen: Arc<Reopen>,
    lines: Arc<Lines>,
    writer: Option<std::thread::Thread>,
}

impl AuditReopener {
    /// The log's path, as given to [`JsonLinesAudit::file`].
    pub fn path(&self) -> &Path {
        &self.reopen.path
    }

    /// Opens the log's path again (appended to, created if absent, mode 0600 on Unix) and
    /// returns once the writer writes there (it logs `audit log reopened` at `info` as it
    /// switches): from then on nothing more is written to the file it wrote to before, so a
    /// rotated file can be compressed or shipped. Lines still waiting go to the new file. A
    /// line a failed write had cut short in the old file is ended there if it can be.
    ///
    /// # Errors
    ///
    /// The path cannot be opened (the log goes on in the file it had); the writer has stopped;
    /// or it did not switch within 5 s (a write stalled on the disk, `ErrorKind::TimedOut`),
    /// in which case it switches once that write ends.
    pub fn reopen(&self) -> std::io::Result<()> {
        let stopped = || std::io::Error::other("the audit log's writer has stopped");
        let writer = match &self.writer {
            Some(writer) if self.lines.alive.load(Ordering::Acquire) => writer,
            _ => return Err(stopped()),
        };
        let file = open_log(&self.reopen.path, self.reopen.link)?;
        let mut next = self
            .reopen
            .next
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *next = Some(file);
        writer.unpark();
        let deadline = Instant::now() + REOPEN_WAIT;
        while next.is_some() {
            if !self.lines.alive.load(Ordering::Acquire) {
                *next = None;
                return Err(stopped());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the audit log's writer is still writing (a stalled disk?): it switches files when that write ends",
                ));
            }
            // (Woken when the writer switches; the slices also catch a writer that ended.)
            let slice = (deadline - now).min(Duration::from_millis(50));
            next = self
                .reopen
                .switched
                .wait_timeout(next, slice)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        Ok(())
    }
}

impl fmt::Debug for AuditReopener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditReopener")
            .field("path", &self.reopen.path)
            .finish_non_exhaustive()
    }
}

/// The lines waiting for the writer, in buffers the request threads write to.
struct Lines {
    shards: Box<[Mutex<Shard>]>,
    /// Records (the high bits) and their bytes (the low [`BYTES_BITS`]) in the buffers or
    /// being written: at most `capacity` records and, but for the line that passes it,
    /// `max_bytes`. One counter, so a record costs one atomic add.
    waiting: AtomicU64,
    capacity: usize,
    max_bytes: AtomicU64,
    /// Set when the log is dropped: the writer writes what is left and ends.
    closing: AtomicBool,
    /// Cleared when the writer thread ends, whether closed or not (a panic in the `Write` it
    /// was given), or could not be started: records are then dropped and counted, not kept
    /// for nobody.
    alive: AtomicBool,
}

/// One buffer of lines, and what its thread's lines had last (see [`LineCache`]).
#[derive(Default)]
struct Shard {
    lines: Vec<u8>,
    /// When each line's record was ready, to count the ones written late.
    ready: Vec<Instant>,
    cache: LineCache,
}

#[derive(Default)]
struct Counts {
    dropped: AtomicU64,
    /// Records written (and flushed) to the output.
    written: AtomicU64,
    delayed: AtomicU64,
    /// Drops not yet logged.
    unlogged: AtomicU64,
    /// When a drop was last logged (milliseconds since `start`), to log at most once a second.
    last_log_ms: AtomicU64,
    start: std::sync::OnceLock<Instant>,
}

impl Counts {
    fn dropped(&self, why: &str) {
        self.dropped_many(1, why);
    }

    fn dropped_many(&self, count: u64, why: &str) {
        if count == 0 {
            return;
        }
        self.dropped.fetch_add(count, Ordering::Relaxed);
        self.unlogged.fetch_add(count, Ordering::Relaxed);
        metrics::counter!("tower_fhir_audit_records_dropped_total").increment(count);
        self.log_drops(why, false);
    }

    /// Logs the drops not logged yet, at most once a second unless `now`: the writer calls it
    /// at each turn, so drops that came within a second of the last logged ones are logged a
    /// second later with their count, not only when another drop comes.
    fn log_drops(&self, why: &str, now: bool) {
        if self.unlogged.load(Ordering::Relaxed) == 0 {
            return;
        }
        let start = *self.start.get_or_init(Instant::now);
        let at = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.last_log_ms.load(Ordering::Relaxed);
        if (now || last == 0 || at.saturating_sub(last) >= 1000)
            && self
                .last_log_ms
                .compare_exchange(last, at.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let count = self.unlogged.swap(0, Ordering::Relaxed);
            if count > 0 {
                tracing::error!(count, reason = why, "audit records dropped");
            }
        }
    }
}

impl JsonLinesAudit {
    /// Appends to the file at `path` (created if absent, mode 0600 on Unix). For log
    /// rotation, [`reopener`](Self::reopener) opens the path again; so does the writer, within
    /// a second, when it finds the file moved or deleted. Opened again, the path is not
    /// followed through a symbolic link (on Unix) unless it was one now: a link put there since
    /// (by someone who may write to the directory) is refused, and the records go on to the
    /// file they were going to.
    pub fn file(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        // (`/dev/stdout`, or a path an operator links to another disk: followed, then and
        // at every reopen.)
        let link = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
        let file = open_log(&path, true)?;
        let reopen = Arc::new(Reopen {
            path,
            link,
            next: Mutex::new(None),
            switched: Condvar::new(),
        });
        let next = Arc::clone(&reopen);
        let mut watch = FileWatch::new(&reopen.path, reopen.link, &file);
        let mut audit = Self::start(file, DEFAULT_AUDIT_QUEUE, move |counts: &Counts| match next
            .take()
        {
            Some(file) => {
                watch.follow(&file);
                Some(file)
            }
            None => watch.check(counts),
        });
        audit.reopen = Some(reopen);
        Ok(audit)
    }

    /// Writes to standard output.
    pub fn stdout() -> Self {
        Self::writer(std::io::stdout(), DEFAULT_AUDIT_QUEUE)
    }

    /// Writes to any writer, with at most `capacity` records waiting. Each buffer of lines is
    /// written, then `out` is flushed; when the flush fails its lines count as dropped, even
    /// if a writer that buffers (a `BufWriter`) writes them later.
    pub fn writer(out: impl Write + Send + 'static, capacity: usize) -> Self {
        Self::start(out, capacity, |_: &Counts| None)
    }

    /// Starts the writer thread on `out`, which switches to what `next` gives when it does.
    fn start<W: Write + Send + 'static>(
        out: W,
        capacity: usize,
        next: impl FnMut(&Counts) -> Option<W> + Send + 'static,
    ) -> Self {
        let lines = Arc::new(Lines {
            shards: (0..shard_count(256)).map(|_| Mutex::default()).collect(),
            waiting: AtomicU64::new(0),
            capacity: capacity.clamp(1, MAX_AUDIT_QUEUE),
            max_bytes: AtomicU64::new(DEFAULT_AUDIT_BYTES as u64),
            closing: AtomicBool::new(false),
            alive: AtomicBool::new(true),
        });
        let counts = Arc::new(Counts::default());
        let writer = std::thread::Builder::new()
            .name("tower-fhir-audit".into())
            .spawn({
                let lines = Arc::clone(&lines);
                let counts = Arc::clone(&counts);
                move || write_lines(out, next, &lines, &counts)
            })
            .ok();
        if writer.is_none() {
            // No thread to write: every record is dropped and counted.
            lines.alive.store(false, Ordering::Release);
        }
        Self {
            lines,
            counts,
            writer,
            reopen: None,
            closing_wait: CLOSING_WAIT,
        }
    }

    /// What opens a file log again at its path, for log rotation (`None` for standard output
    /// or a writer given to [`writer`](Self::writer)).
    pub fn reopener(&self) -> Option<AuditReopener> {
        Some(AuditReopener {
            reopen: Arc::clone(self.reopen.as_ref()?),
            lines: Arc::clone(&self.lines),
            writer: self.writer.as_ref().map(|writer| writer.thread().clone()),
        })
    }

    /// Holds at most `max_bytes` of lines waiting to be written (default
    /// [`DEFAULT_AUDIT_BYTES`]; at least one line): past it, records are dropped and counted as
    /// past the record bound are.
    pub fn max_waiting_bytes(self, max_bytes: usize) -> Self {
        let max = (max_bytes as u64).clamp(1, BYTES_MASK >> 1);
        self.lines.max_bytes.store(max, Ordering::Relaxed);
        self
    }

    /// How many records were dropped so far (too many waiting, or a write failed).
    pub fn dropped(&self) -> u64 {
        self.counts.dropped.load(Ordering::Relaxed)
    }

    /// How many records were written more than a second after their request.
    pub fn delayed(&self) -> u64 {
        self.counts.delayed.load(Ordering::Relaxed)
    }

    /// Appends a line (`write` makes it) for a record ready at `ready` to this thread's
    /// buffer, unless too many are waiting already or the writer is gone.
    fn append(&self, ready: Instant, write: impl FnOnce(&mut Vec<u8>, &mut LineCache)) {
        let lines = &*self.lines;
        if !lines.alive.load(Ordering::Acquire) {
            self.counts.dropped("the audit log writer stopped");
            return;
        }
        // (Threads that pass this check at once may each add one more.)
        let held = lines.waiting.load(Ordering::Relaxed);
        if (held >> BYTES_BITS) as usize >= lines.capacity {
            self.counts
                .dropped("the audit log is behind: too many records wait to be written");
            return;
        }
        if held & BYTES_MASK >= lines.max_bytes.load(Ordering::Relaxed) {
            self.counts
                .dropped("the audit log is behind: too many bytes of records wait to be written");
            return;
        }
        let shard = &lines.shards[shard_of_thread(lines.shards.len())];
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        let Shard {
            lines: buffer,
            ready: times,
            cache,
        } = &mut *shard;
        // The clocks the line's time is read against: the writer's, unless it has not read
        // them for a second (blocked on a stalled disk or pipe).
        if cache
            .clock
            .is_none_or(|clock| ready.saturating_duration_since(clock.at) > DELAYED_AFTER)
        {
            cache.clock = Some(Clock::now());
        }
        // A line cut short by a panic is taken back, not left for the next one to follow.
        let from = buffer.len();
        let mut line = Unfinished { buffer, from };
        write(line.buffer, cache);
        line.from = usize::MAX;
        times.push(ready);
        let bytes = line.buffer.len() - from;
        lines
            .waiting
            .fetch_add(waiting(1, bytes), Ordering::Relaxed);
    }

    /// Writes the line of a draft the [`ObserveLayer`](super::ObserveLayer) made, for a
    /// response ready at `at`.
    pub(crate) fn draft(&self, at: Instant, draft: AuditDraft) {
        self.append(at, |out, cache| draft.write_json_line(out, cache));
    }
}

/// A line being written to a buffer: cut back to where it began unless finished
/// (`from == usize::MAX`).
struct Unfinished<'a> {
    buffer: &'a mut Vec<u8>,
    from: usize,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.from != usize::MAX {
            self.buffer.truncate(self.from);
        }
    }
}

/// Marks the writer gone when its thread ends, even by a panic, and counts as dropped the
/// records still waiting then (none when it ends closed, having written them all).
struct WriterEnds<'a> {
    lines: &'a Lines,
    counts: &'a Counts,
}

impl Drop for WriterEnds<'_> {
    fn drop(&mut self) {
        self.lines.alive.store(false, Ordering::Release);
        let left = self.lines.waiting.swap(0, Ordering::AcqRel) >> BYTES_BITS;
        self.counts
            .dropped_many(left, "the audit log writer stopped");
        // Whatever is not logged yet, at once: nothing logs after the writer.
        self.counts.log_drops("the audit log writer stopped", true);
    }
}

/// The writer thread: every [`WRITER_NAP`], takes each buffer that has lines (leaving an
/// empty one), writes and flushes it, and counts its late records; until the log is closed,
/// then once more.
fn write_lines<W: Write>(
    mut out: W,
    mut next: impl FnMut(&Counts) -> Option<W>,
    lines: &Lines,
    counts: &Counts,
) {
    let _ends = WriterEnds { lines, counts };
    let mut taken = Vec::new();
    let mut times = Vec::new();
    // Late records not yet logged, and when that was last logged (at most once a second).
    let mut late_unlogged = 0u64;
    let mut last_late_log: Option<Instant> = None;
    // Whether the output ends in a line a failed write cut short.
    let mut torn = false;
    loop {
        if let Some(file) = next(counts) {
            // Reopened: the old output's last line is ended there, if torn and it can be.
            end_torn_line(&mut out, &mut torn);
            out = file;
            torn = false;
        }
        let closing = lines.closing.load(Ordering::Acquire);
        for shard in &lines.shards {
            {
                let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                // The clocks its next lines' times are read against (see `Clock`), kept
                // fresh, as the wall clock may be slewed or set.
                shard.cache.clock = Some(Clock::now());
                if shard.ready.is_empty() {
                    continue;
                }
                std::mem::swap(&mut shard.lines, &mut taken);
                std::mem::swap(&mut shard.ready, &mut times);
            }
            let whole = match write_whole_lines(&mut out, &taken, &mut torn) {
                Ok(()) => times.len(),
                Err(whole) => {
                    counts.dropped_many(
                        times.len().saturating_sub(whole) as u64,
                        "the audit log could not be written",
                    );
                    whole.min(times.len())
                }
            };
            counts.written.fetch_add(whole as u64, Ordering::Relaxed);
            // Late: written (the write may take long) more than a second after ready, so
            // ready before the cut-off (compared, not subtracted, record by record).
            let late = Instant::now()
                .checked_sub(DELAYED_AFTER)
                .map_or(0, |cutoff| {
                    times[..whole]
                        .iter()
                        .filter(|&&ready| ready < cutoff)
                        .count()
                }) as u64;
            if late > 0 {
                counts.delayed.fetch_add(late, Ordering::Relaxed);
                metrics::counter!("tower_fhir_audit_records_delayed_total").increment(late);
                late_unlogged += late;
            }
            lines
                .waiting
                .fetch_sub(waiting(times.len(), taken.len()), Ordering::Relaxed);
            // (A burst's buffer is let go rather than kept.)
            taken.clear();
            taken.shrink_to(KEPT_BUFFER);
            times.clear();
            times.shrink_to(KEPT_BUFFER / 256);
        }
        // What fell behind or was lost since the last turn, logged at most once a second
        // with how many (and whatever is left when closing).
        if late_unlogged > 0
            && (closing
                || last_late_log.is_none_or(|at: Instant| at.elapsed() >= Duration::from_secs(1)))
        {
            tracing::error!(
                count = late_unlogged,
                "the audit log is behind: records written more than a second after their request"
            );
            late_unlogged = 0;
            last_late_log = Some(Instant::now());
        }
        counts.log_drops("the audit log fell behind or could not be written", closing);
        if closing {
            end_torn_line(&mut out, &mut torn);
            break;
        }
        std::thread::park_timeout(WRITER_NAP);
    }
}

/// Ends a line a failed write cut short, if `torn` and `out` takes the newline now.
fn end_torn_line(out: &mut impl Write, torn: &mut bool) {
    if *torn && write_some(out, b"\n").0 == 1 {
        *torn = false;
    }
    let _ = out.flush();
}

/// Writes `lines` (whole lines) to `out` and flushes it. When a write fails (a full disk),
/// or the flush does, returns how many of the lines reached it whole: those before the failed
/// write, none when the flush failed (what it held may be lost).
///
/// A write can fail part-way through a line, which then stays in the output cut short. `torn`
/// says so: the next call ends that line with a newline before anything else (and writes
/// nothing while it cannot), so the records after it are never joined to the fragment.
fn write_whole_lines(out: &mut impl Write, lines: &[u8], torn: &mut bool) -> Result<(), usize> {
    if *torn {
        end_torn_line(out, torn);
        if *torn {
            return Err(0);
        }
    }
    let (written, result) = write_some(out, lines);
    if result.is_ok() {
        return out.flush().map_err(|_| 0);
    }
    let written = &lines[..written];
    *torn = written.last().is_some_and(|&last| last != b'\n');
    Err(memchr::memchr_iter(b'\n', written).count())
}

/// Writes as much of `bytes` as `out` takes: how many bytes it took, and the error that
/// stopped it short.
fn write_some(out: &mut impl Write, bytes: &[u8]) -> (usize, std::io::Result<()>) {
    let mut written = 0;
    while written < bytes.len() {
        match out.write(&bytes[written..]) {
            Ok(0) => return (written, Err(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return (written, Err(error)),
        }
    }
    (written, Ok(()))
}

/// The bytes of a buffer the writer keeps between turns.
const KEPT_BUFFER: usize = 1 << 20;

impl AuditSink for JsonLinesAudit {
    fn record(&self, record: AuditRecord) {
        self.append(Instant::now(), |out, _| record.write_json_line(out));
    }
}

/// How long dropping a [`JsonLinesAudit`] waits for its writer to write what is left.
const CLOSING_WAIT: Duration = Duration::from_secs(10);

impl Drop for JsonLinesAudit {
    fn drop(&mut self) {
        // The writer writes what is waiting, then ends: waited for, but not for ever (a
        // disk that hangs, say, would keep the process from exiting).
        self.lines.closing.store(true, Ordering::Release);
        if let Some(writer) = self.writer.take() {
            writer.thread().unpark();
            let until = Instant::now() + self.closing_wait;
            while !writer.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if writer.is_finished() {
                let _ = writer.join();
            } else {
                let waiting = self.lines.waiting.load(Ordering::Acquire) >> BYTES_BITS;
                tracing::error!(
                    waiting,
                    wait = ?self.closing_wait,
                    "the audit log's writer has not finished writing: the records still waiting are lost if the process exits now"
                );
            }
        }
    }
}

impl fmt::Debug for JsonLinesAudit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonLinesAudit")
            .field("dropped", &self.dropped())
            .field("delayed", &self.delayed())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::RequestFacts;
    use std::sync::Mutex;

    /// The `count` of each `error` event logged while `f` runs on this thread.
    fn error_counts(f: impl FnOnce()) -> Vec<u64> {
        use tracing::field::{Field, Visit};
        struct Counted(Arc<Mutex<Vec<u64>>>);
        struct Count(Option<u64>);
        impl Visit for Count {
            fn record_u64(&mut self, field: &Field, value: u64) {
                if field.name() == "count" {
                    self.0 = Some(value);
                }
            }
            fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
        }
        impl tracing::Subscriber for Counted {
            fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, event: &tracing::Event<'_>) {
                if *event.metadata().level() == tracing::Level::ERROR {
                    let mut count = Count(None);
                    event.record(&mut count);
                    self.0.lock().unwrap().extend(count.0);
                }
            }
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }
        let seen = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(Counted(Arc::clone(&seen)), f);
        let seen = seen.lock().unwrap().clone();
        seen
    }

    #[test]
    fn drops_within_a_second_of_the_last_logged_are_logged_with_their_count() {
        let counts = Counts::default();
        let logged = error_counts(|| {
            // The first drop is logged at once; the 9,999 after it within the second are not
            // yet, and the writer's turns log them once the second has passed.
            counts.dropped("full");
            counts.dropped_many(9_999, "full");
            counts.log_drops("behind", false);
            std::thread::sleep(Duration::from_millis(1_050));
            counts.log_drops("behind", false);
            counts.log_drops("behind", false);
        });
        assert_eq!(logged, [1, 9_999]);
        assert_eq!(counts.dropped.load(Ordering::Relaxed), 10_000);
        // When closing, what is left is logged at once.
        let logged = error_counts(|| {
            counts.dropped_many(5, "full");
            counts.log_drops("closing", true);
        });
        assert_eq!(logged, [5]);
    }

    pub(crate) fn record() -> AuditRecord {
        AuditRecord {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            request_id: Some("r-1".into()),
            client_id: Some("app".into()),
            issuer: Some("https://gw.example".into()),
            client_address: Some(IpAddr::from([192, 0, 2, 7])),
            tenant: TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").ok(),
            method: "GET".into(),
            path: "/Patient/1".into(),
            query: None,
            interaction: Some("read"),
            resource_type: Some("Patient".into()),
            resource_id: Some("1".into()),
            status: 200,
            outcome: "ok",
            upstream: Some(Arc::from("http://fhir.example/r4")),
            duration_ms: 1.23456,
        }
    }

    #[test]
    fn a_record_is_one_json_object_with_every_field() {
        let json = serde_json::to_value(record()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "time": "2023-11-14T22:13:20.123Z", "request_id": "r-1", "client_id": "app",
                "issuer": "https://gw.example", "client_address": "192.0.2.7",
                "tenant": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
                "method": "GET", "path": "/Patient/1", "query": null, "interaction": "read",
                "resource_type": "Patient", "resource_id": "1", "status": 200, "outcome": "ok",
                "upstream": "http://fhir.example/r4", "duration_ms": 1.235
            })
        );
    }

    #[test]
    fn addresses_are_written_as_their_text() {
        for address in [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "192.0.2.7",
            "::1",
            "2001:db8::7",
            "::ffff:1.2.3.4",
        ] {
            let ip: IpAddr = address.parse().unwrap();
            let mut out = Vec::new();
            push_address(&mut out, ip);
            assert_eq!(String::from_utf8(out).unwrap(), format!("\"{ip}\""));
        }
    }

    #[test]
    fn a_record_becomes_an_audit_event() {
        let mut read = record();
        read.query = Some("_elements=name".into());
        let event = read.to_audit_event();
        assert_eq!(event["action"], "R");
        assert_eq!(event["outcome"], "0");
        assert_eq!(event["subtype"][0]["code"], "read");
        assert_eq!(event["recorded"], "2023-11-14T22:13:20.123Z");
        assert_eq!(event["agent"][0]["who"]["identifier"]["value"], "app");
        assert_eq!(
            event["agent"][0]["network"],
            serde_json::json!({"address": "192.0.2.7", "type": "2"})
        );
        assert_eq!(event["entity"][0]["what"]["reference"], "Patient/1");
        assert_eq!(event["entity"][0]["query"], "X2VsZW1lbnRzPW5hbWU=");
        assert_eq!(
            event["entity"][1]["what"]["identifier"]["value"],
            "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f"
        );
        assert_eq!(event["extension"][0]["valueString"], "r-1");
        let mut refused = record();
        refused.method = "DELETE".into();
        refused.interaction = Some("delete");
        refused.status = 403;
        refused.outcome = "forbidden";
        let event = refused.to_audit_event();
        assert_eq!(
            (event["action"].as_str(), event["outcome"].as_str()),
            (Some("D"), Some("4"))
        );
        assert_eq!(event["outcomeDesc"], "403 forbidden");
    }

    #[test]
    fn the_hand_written_line_is_the_serialized_record() {
        let mut records = vec![record()];
        let mut odd = record();
        odd.path = "/Patient/\"a\\b\"\n\t\u{1}é".into();
        odd.query = Some("name=Ren\u{e9}e&x=\u{7f}".into());
        odd.request_id = None;
        odd.tenant = None;
        odd.upstream = None;
        odd.client_address = Some("2001:db8::7".parse().unwrap());
        odd.duration_ms = 0.0004;
        // A record made by hand may hold anything, in every field.
        odd.method = "G\"ET\n".into();
        odd.interaction = Some("re\\ad");
        odd.resource_type = Some("Pa\"tient".into());
        odd.resource_id = Some("\u{1}".into());
        odd.outcome = "o\"k";
        records.push(odd);
        let mut slow = record();
        slow.duration_ms = 12_345.678_9;
        slow.client_address = None;
        slow.time = SystemTime::UNIX_EPOCH + Duration::from_millis(951_782_400_007); // 2000-02-29
        records.push(slow);
        for record in records {
            let mut line = Vec::new();
            record.write_json_line(&mut line);
            assert_eq!(line.last(), Some(&b'\n'));
            let written: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(
                written,
                serde_json::to_value(&record).unwrap(),
                "{}",
                String::from_utf8_lossy(&line)
            );
        }
        // The exact bytes, escapes included: `"` and `\` escaped, control characters as `\n`,
        // `\r`, `\t` or `\u00XX` (also U+0008 and U+000C), DEL and non-ASCII as they are,
        // the duration with three decimals.
        let mut exact = record();
        exact.request_id = Some("r\"1\\".into());
        exact.client_id = Some("a\u{0}\u{8}\u{c}\u{1f}\r\n\t".into());
        exact.issuer = Some("https://idp/\u{e9}\u{4e2d}\u{1f600}\u{7f}".into());
        exact.tenant = None;
        exact.path = "/Patient/\u{e9}".into();
        exact.query = Some("a=\u{1}".into());
        exact.resource_id = Some("\u{e9}".into());
        exact.upstream = None;
        exact.duration_ms = 0.0004;
        let mut line = Vec::new();
        exact.write_json_line(&mut line);
        let expected = concat!(
            r#"{"time":"2023-11-14T22:13:20.123Z","request_id":"r\"1\\","#,
            r#""client_id":"a\u0000\u0008\u000c\u001f\r\n\t","#,
            "\"issuer\":\"https://idp/\u{e9}\u{4e2d}\u{1f600}\u{7f}\",",
            r#""client_address":"192.0.2.7","tenant":null,"method":"GET","#,
            "\"path\":\"/Patient/\u{e9}\",",
            r#""query":"a=\u0001","interaction":"read","resource_type":"Patient","#,
            "\"resource_id\":\"\u{e9}\",",
            r#""status":200,"outcome":"ok","upstream":null,"duration_ms":0.000}"#,
            "\n"
        );
        assert_eq!(String::from_utf8(line.clone()).unwrap(), expected);
        let written: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(written, serde_json::to_value(&exact).unwrap());
        let mut cache = LineCache::default();
        for days in [-1, 0, 59, 60, 365, 10_956, 11_016, 20_000, 2_932_896] {
            let time = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * days.max(0) as u64);
            // The same second again, and the next (the second's text cached, then not).
            for time in [
                time,
                time + Duration::from_millis(999),
                time + Duration::from_millis(1_001),
            ] {
                let mut out = Vec::new();
                push_time(&mut out, time);
                let mut cached = Vec::new();
                push_time_cached(&mut cached, time, &mut cache);
                assert_eq!(out, cached);
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    humantime::format_rfc3339_millis(time).to_string()
                );
            }
        }
    }

    /// The start of the drafts' requests, at the wall time of [`record`]'s (with [`clock`]).
    fn start() -> Instant {
        static START: OnceLock<Instant> = OnceLock::new();
        *START.get_or_init(Instant::now)
    }

    fn clock() -> Clock {
        Clock {
            wall: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            at: start(),
        }
    }

    /// A draft of a request from `::ffff:198.51.100.4` (recorded as `198.51.100.4`).
    fn draft(method: &str, uri: &str, query: QueryRecording, fill: impl FnOnce()) -> AuditDraft {
        draft_from(
            Some("::ffff:198.51.100.4".parse().unwrap()),
            method,
            uri,
            query,
            fill,
        )
    }

    fn draft_from(
        client_address: Option<IpAddr>,
        method: &str,
        uri: &str,
        query: QueryRecording,
        fill: impl FnOnce(),
    ) -> AuditDraft {
        let parts = RequestParts::new(
            start(),
            method.parse().unwrap(),
            client_address,
            &uri.parse().unwrap(),
            Some(&http::HeaderValue::from_static("r-1")),
        );
        let mut facts = Facts::default();
        RequestFacts::watching(&mut facts, fill);
        AuditDraft::new(
            parts,
            facts,
            200,
            "ok",
            Duration::from_micros(1_234_567),
            query,
        )
    }

    #[test]
    fn a_draft_writes_the_line_of_the_record_it_makes() {
        let tenant = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
        let claims = |json: serde_json::Value| {
            VerifiedClaims::assume_verified(json.as_object().unwrap().clone()).unwrap()
        };
        let token = claims(serde_json::json!({"exp": 1, "azp": "app", "iss": "https://idp"}));
        let drafts = [
            draft(
                "GET",
                "/Patient/7?name=Smith&birthdate=ge1970&&flag",
                QueryRecording::Names,
                || {
                    RequestFacts::set_claims(&token);
                    RequestFacts::set_tenant(tenant);
                    RequestFacts::set_upstream(&Arc::from("http://fhir.example/r4"));
                },
            ),
            draft(
                "GET",
                "/Observation?code=%22x%22&a=b",
                QueryRecording::Full,
                || RequestFacts::set_claims(&token),
            ),
            draft("POST", "/Patient/_search?", QueryRecording::Full, || {}),
            draft("DELETE", "/Patient/1?x=y", QueryRecording::None, || {}),
            draft("POST", "/oauth/token", QueryRecording::Names, || {
                RequestFacts::set_client_id("by \"hand\"\n");
                RequestFacts::set_claims(&claims(serde_json::json!({"exp": 1, "sub": "s"})));
            }),
            // A token naming a client and an issuer that need escapes (rendered once a token).
            draft("GET", "/Patient/1", QueryRecording::Names, || {
                RequestFacts::set_claims(&claims(serde_json::json!(
                    {"exp": 1, "client_id": "a\"p\\p\n\u{1}", "iss": "https://idp/\"x"}
                )));
            }),
            draft("GET", "/a/b/c/d/e/f/g?&&", QueryRecording::Names, || {}),
            draft(
                "GET",
                "/Patient?=x&a==b&&c&%22d\\=e&",
                QueryRecording::Names,
                || {},
            ),
            draft("GET", "/Patient?a%5C=1&b", QueryRecording::Names, || {}),
            draft(
                "PATCH",
                "http://gw.example/Patient/1",
                QueryRecording::Names,
                || {},
            ),
            draft_from(
                Some("2001:db8::1:0:0:7".parse().unwrap()),
                "GET",
                "/Patient/1",
                QueryRecording::Names,
                || {},
            ),
            draft_from(None, "GET", "/Patient/1", QueryRecording::Names, || {}),
        ];
        for draft in drafts {
            let mut line = Vec::new();
            let mut cache = LineCache {
                clock: Some(clock()),
                ..LineCache::default()
            };
            draft.write_json_line(&mut line, &mut cache);
            let record = draft.into_record(clock());
            let mut expected = Vec::new();
            record.write_json_line(&mut expected);
            assert_eq!(
                String::from_utf8_lossy(&line),
                String::from_utf8_lossy(&expected)
            );
            let written: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(written, serde_json::to_value(&record).unwrap());
        }
        let full = draft(
            "GET",
            "/Patient/1?access_token=eyJ.secret.sig&_elements=id",
            QueryRecording::Full,
            || {},
        );
        let mut line = Vec::new();
        full.write_json_line(&mut line, &mut LineCache::default());
        let line = String::from_utf8(line).unwrap();
        assert!(!line.contains("secret"), "{line}");
        assert!(
            line.contains(r#""query":"access_token=REDACTED&_elements=id""#),
            "{line}"
        );
        let names = draft(
            "GET",
            "/Patient?name=a&_count=1",
            QueryRecording::Names,
            || {},
        );
        let record = names.into_record(clock());
        assert_eq!(record.query.as_deref(), Some("name&_count"));
        assert_eq!(
            record.client_address,
            Some(IpAddr::from([198, 51, 100, 4])),
            "an IPv4-mapped address recorded as the IPv4 one"
        );
        assert_eq!(record.interaction, Some("search"));
        assert_eq!(record.resource_type.as_deref(), Some("Patient"));
        let token = draft("POST", "/oauth/token", QueryRecording::Names, || {
            RequestFacts::set_claims(&claims(
                serde_json::json!({"exp": 1, "client_id": "c", "iss": "i"}),
            ));
        })
        .into_record(clock());
        assert_eq!(token.interaction, Some("token"));
        assert_eq!(token.client_id.as_deref(), Some("c"));
        assert_eq!(token.issuer.as_deref(), Some("i"));
        assert_eq!(token.duration_ms, 1_234.567);
        // Introspection and revocation are the token endpoint's too.
        for path in ["/oauth/introspect", "/oauth/revoke"] {
            let record = draft("POST", path, QueryRecording::Names, || {}).into_record(clock());
            assert_eq!(record.interaction, Some("token"), "{path}");
            assert_eq!(record.resource_type, None, "{path}");
        }
    }

    #[test]
    fn a_start_becomes_its_wall_time_against_the_clocks() {
        let at = Instant::now() + Duration::from_secs(60);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let clock = Clock { wall, at };
        let ms = Duration::from_millis;
        assert_eq!(clock.wall_time(at), wall);
        assert_eq!(clock.wall_time(at + ms(5)), wall + ms(5));
        assert_eq!(clock.wall_time(at - ms(7)), wall - ms(7));
    }

    #[test]
    fn the_cached_tenant_and_upstream_texts_follow_the_line() {
        let mut cache = LineCache::default();
        let a = TenantId::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").unwrap();
        let b = TenantId::parse("00000000-0000-4000-8000-00000000000b").unwrap();
        for tenant in [a, a, b, a, b, b] {
            assert_eq!(
                cache.tenant_json(tenant),
                format!("\"{tenant}\"").as_bytes()
            );
        }
        let a: Arc<str> = Arc::from("http://a.example/fhir");
        let b: Arc<str> = Arc::from("http://b.example/\"fhir\"");
        let a_again: Arc<str> = Arc::from("http://a.example/fhir");
        for (upstream, json) in [
            (&a, r#""http://a.example/fhir""#),
            (&a, r#""http://a.example/fhir""#),
            (&b, r#""http://b.example/\"fhir\"""#),
            (&a_again, r#""http://a.example/fhir""#),
            (&b, r#""http://b.example/\"fhir\"""#),
        ] {
            assert_eq!(cache.upstream_json(upstream), json.as_bytes());
        }
        let ip = |text: &str| text.parse::<IpAddr>().unwrap();
        for address in [
            ip("192.0.2.7"),
            ip("192.0.2.7"),
            ip("10.0.0.1"),
            ip("2001:db8::1"),
            ip("2001:db8::1"),
            ip("::ffff:10.0.0.1"),
            ip("10.0.0.1"),
            ip("255.255.255.255"),
            ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            ip("0.0.0.0"),
        ] {
            assert_eq!(
                cache.address_json(address),
                format!("\"{address}\"").as_bytes()
            );
        }
    }

    #[test]
    fn one_cache_writes_each_draft_as_its_record_whatever_its_id_and_address() {
        let ids: [Option<&[u8]>; 10] = [
            Some(b"r-1"),
            Some(b"0f6c2e8a-3b4c-4d5e-9f1a-2b3c4d5e6f70"),
            Some(b"a\"b"),
            Some(b"a-quote\"in-a-longer-id"),
            Some(b"a-tab\tin-a-longer-id"),
            Some(b"a-backslash\\in-a-longer-id"),
            Some(b"~ !#$%&'()*+,/:;<=>?@[]^`{|}"),
            Some(b"caf\xe9"),
            Some(b""),
            None,
        ];
        let addresses = [
            Some("192.0.2.7"),
            Some("192.0.2.7"),
            Some("198.51.100.4"),
            Some("2001:db8::1"),
            None,
            Some("::ffff:192.0.2.7"),
            Some("2001:db8::2"),
        ];
        let mut cache = LineCache {
            clock: Some(clock()),
            ..LineCache::default()
        };
        for id in ids {
            for address in addresses {
                let parts = RequestParts::new(
                    start(),
                    http::Method::GET,
                    address.map(|a| a.parse().unwrap()),
                    &"/Patient/1?name=x".parse().unwrap(),
                    id.map(|id| http::HeaderValue::from_bytes(id).unwrap())
                        .as_ref(),
                );
                let draft = AuditDraft::new(
                    parts,
                    Facts::default(),
                    200,
                    "ok",
                    Duration::from_millis(3),
                    QueryRecording::Names,
                );
                let mut line = Vec::new();
                draft.write_json_line(&mut line, &mut cache);
                let record = draft.into_record(clock());
                let mut expected = Vec::new();
                record.write_json_line(&mut expected);
                assert_eq!(
                    String::from_utf8_lossy(&line),
                    String::from_utf8_lossy(&expected),
                    "{id:?} {address:?}"
                );
                let written: serde_json::Value = serde_json::from_slice(&line).unwrap();
                let text = id.and_then(|id| std::str::from_utf8(id).ok());
                assert_eq!(written["request_id"].as_str(), text, "{id:?}");
            }
        }
    }

    #[test]
    fn the_escape_scan_finds_every_byte_that_needs_one() {
        for len in 0..24 {
            for at in 0..len {
                for special in [b'"', b'\\', 0, 0x1f, b'\n', b'a', 0x7f, 0xc3] {
                    let mut bytes = vec![b'x'; len];
                    bytes[at] = special;
                    let naive = bytes.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
                    assert_eq!(needs_escape(&bytes), naive, "{bytes:?}");
                }
            }
        }
    }

    #[test]
    fn the_plain_scan_takes_what_to_str_takes_and_needs_no_escape() {
        for len in 0..24 {
            for at in 0..len {
                for special in [
                    b'"', b'\\', 0, 0x1f, b'\t', b' ', b'~', b'a', 0x7f, 0x80, 0xc3, 0xff,
                ] {
                    let mut bytes = vec![b'x'; len];
                    bytes[at] = special;
                    let naive = bytes
                        .iter()
                        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
                    assert_eq!(is_plain_ascii(&bytes), naive, "{bytes:?}");
                    let as_header = http::HeaderValue::from_bytes(&bytes)
                        .ok()
                        .and_then(|value| value.to_str().ok().map(str::to_owned))
                        .is_some_and(|text| !needs_escape(text.as_bytes()));
                    assert_eq!(is_plain_ascii(&bytes), as_header, "{bytes:?}");
                }
            }
        }
        assert!(is_plain_ascii(b""));
        let printable: Vec<u8> = (0x20..0x7f).filter(|&b| b != b'"' && b != b'\\').collect();
        assert!(is_plain_ascii(&printable));
    }

    #[test]
    fn paths_are_classified_as_the_upstream_reads_them() {
        let get = http::Method::GET;
        for path in [
            "/Patient/123",
            "/Patient//123",
            "//Patient/123/",
            "/Patient/%31%32%33",
            "/%50atient/123",
        ] {
            let canonical = canonical_path(path);
            let described = describe(&get, path, &canonical);
            assert_eq!(
                (
                    described.interaction,
                    described.resource_type,
                    described.resource_id
                ),
                (Some("read"), Some("Patient"), Some("123")),
                "{path}"
            );
        }
        for (path, canonical) in [
            ("/Patient/1", "/Patient/1"),
            ("//", "/"),
            ("/Patient/a%2Fb", "/Patient/a%2Fb"),
            ("/Patient/%2e%2e", "/Patient/.."),
            ("/Patient/%FF", "/Patient/%FF"),
            ("/a%00", "/a%00"),
        ] {
            assert_eq!(canonical_path(path), canonical, "{path}");
        }
        // The token endpoint's and the admin API's paths as sent, as they are routed: a FHIR
        // request cannot pass for one by its spelling.
        let post = http::Method::POST;
        for (path, interaction) in [
            ("/oauth/token", Some("token")),
            ("//oauth/token", None),
            ("/admin/clients/x", Some("admin")),
            ("//admin/clients/x", None),
            ("/%61dmin/tenants", None),
        ] {
            let canonical = canonical_path(path);
            let described = describe(&post, path, &canonical);
            assert_eq!(described.interaction, interaction, "{path}");
        }
    }

    #[test]
    fn heads_compartments_and_dstu2s_options_are_named_as_fhir_names_them() {
        for (method, path, interaction) in [
            (http::Method::HEAD, "/Patient", Some("search")),
            (http::Method::HEAD, "/Patient/1", Some("read")),
            (http::Method::HEAD, "/Patient/1/_history/2", Some("vread")),
            (http::Method::HEAD, "/Patient/1/_history", Some("history")),
            (http::Method::HEAD, "/metadata", Some("capabilities")),
            (http::Method::GET, "/Patient/1/*", Some("search")),
            (http::Method::GET, "/Patient/1/Observation", Some("search")),
            (http::Method::OPTIONS, "/", Some("capabilities")),
            (http::Method::OPTIONS, "/Patient", None),
        ] {
            let canonical = canonical_path(path);
            let described = describe(&method, path, &canonical);
            assert_eq!(described.interaction, interaction, "{method} {path}");
        }
    }

    #[test]
    fn query_recording() {
        let q = Some("name=Smith&birthdate=ge1970&_count=10&flag");
        assert_eq!(QueryRecording::Full.apply(q).as_deref(), q);
        assert_eq!(
            QueryRecording::Names.apply(q).as_deref(),
            Some("name&birthdate&_count&flag")
        );
        assert_eq!(QueryRecording::None.apply(q), None);
        assert_eq!(QueryRecording::Names.apply(Some("")), None);
        // Credentials are not recorded, whatever the case or escapes of their names.
        // (See also `paths_are_classified_as_the_upstream_reads_them`.)
        let q = Some("code=x&access_token=eyJ.a.b&ACCESS%5Ftoken=c&client_secret=s3&n&api_key=k");
        assert_eq!(
            QueryRecording::Full.apply(q).as_deref(),
            Some(
                "code=x&access_token=REDACTED&ACCESS%5Ftoken=REDACTED&client_secret=REDACTED&n&api_key=REDACTED"
            )
        );
        let q = Some(";access_token=a&access_token%20=b&Key=c&secret=d&Authorization=e&keyword=f");
        assert_eq!(
            QueryRecording::Full.apply(q).as_deref(),
            Some(
                ";access_token=REDACTED&access_token%20=REDACTED&Key=REDACTED&secret=REDACTED&Authorization=REDACTED&keyword=f"
            )
        );
        // Names a lenient server trims: a `+` (a space) or a tab around them.
        let q = Some("access_token+=a&+client_secret=b&access_token%09=c&access%2Btoken=d");
        assert_eq!(
            QueryRecording::Full.apply(q).as_deref(),
            Some(
                "access_token+=REDACTED&+client_secret=REDACTED&access_token%09=REDACTED&access%2Btoken=d"
            )
        );
        // Unicode's case mappings to ASCII letters (the Kelvin sign, the long s).
        let q = Some("access_to%E2%84%AAen=a&client_%C5%BFecret=b&toke%C3%B1=c");
        assert_eq!(
            QueryRecording::Full.apply(q).as_deref(),
            Some("access_to%E2%84%AAen=REDACTED&client_%C5%BFecret=REDACTED&toke%C3%B1=c")
        );
        // Upper-casing's `ß`, control characters around a name, arrays, PHP's `.` for `_`.
        let q = Some("acce%C3%9F_token=a&access_token%00=b&access_token[]=c&client.secret=d&e=f");
        assert_eq!(
            QueryRecording::Full.apply(q).as_deref(),
            Some("acce%C3%9F_token=REDACTED&access_token%00=REDACTED&access_token[]=REDACTED&client.secret=REDACTED&e=f")
        );
        // Signed URLs' and sessions' names, and pairs after a `;`.
        let q = Some("_count=1;access_token=a&X-Amz-Signature=b;sig=c&session=d&name=e;f=g");
        assert_eq!(
            QueryRecording::Full.apply(q).as_deref(),
            Some(
                "_count=1;access_token=REDACTED&X-Amz-Signature=REDACTED;sig=REDACTED&session=REDACTED&name=e;f=g"
            )
        );
        assert_eq!(QueryRecording::parse("names"), Some(QueryRecording::Names));
        assert_eq!(QueryRecording::parse("all"), None);
    }

    #[test]
    fn the_line_keeps_the_names_the_record_keeps() {
        for query in [
            "a",
            "&",
            "&&a",
            "a=&=b",
            "=x&y",
            "a&b=",
            "a=b=c&d",
            "a\"b=1&\\=2&\u{1}",
            "a&&b&",
            "name=Smith&birthdate=ge1970&_count=10&flag",
            "=&=",
            "x=1&&&y=2&z",
        ] {
            let mut line = b"\"".to_vec();
            push_names(&mut line, query);
            line.push(b'"');
            let names: String = serde_json::from_slice(&line).unwrap();
            assert_eq!(
                Some(names),
                QueryRecording::Names.apply(Some(query)),
                "{query:?}"
            );
        }
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn records_are_written_one_per_line() {
        let out = Shared::default();
        let audit = JsonLinesAudit::writer(out.clone(), 16);
        for _ in 0..3 {
            audit.record(record());
        }
        drop(audit);
        let written = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = written.lines().collect();
        assert_eq!(lines.len(), 3);
        for line in lines {
            let json: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(json["path"], "/Patient/1");
        }
    }

    #[test]
    fn records_from_many_threads_are_all_written_whole_and_soon() {
        let out = Shared::default();
        let audit = Arc::new(JsonLinesAudit::writer(out.clone(), 100_000));
        // One record reaches the output within the writer's turn, the log still open.
        audit.record(record());
        let started = Instant::now();
        while out.0.lock().unwrap().is_empty() {
            assert!(started.elapsed() < Duration::from_secs(5), "not written");
            std::thread::sleep(Duration::from_millis(5));
        }
        let threads: Vec<_> = (0..8)
            .map(|thread| {
                let audit = Arc::clone(&audit);
                std::thread::spawn(move || {
                    for i in 0..1_000 {
                        let mut record = record();
                        record.path = format!("/Patient/{thread}-{i}");
                        audit.record(record);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(audit.dropped(), 0);
        drop(Arc::into_inner(audit).expect("the threads are done"));
        let written = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let mut paths: Vec<String> = written
            .lines()
            .map(|line| {
                let json: serde_json::Value = serde_json::from_str(line).unwrap();
                json["path"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(paths.len(), 8_001);
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), 8_001, "each record once");
    }

    /// A writer that panics.
    struct Panics;
    impl Write for Panics {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            panic!("a broken sink (this panic is the test's)")
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn when_the_writer_thread_dies_every_record_is_dropped_and_counted() {
        let audit = JsonLinesAudit::writer(Panics, 100);
        audit.record(record());
        let started = Instant::now();
        while audit.lines.alive.load(Ordering::Acquire) {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the writer lives on"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        for _ in 0..5 {
            audit.record(record());
        }
        assert_eq!(
            audit.dropped(),
            6,
            "the one being written and the five after"
        );
        assert_eq!(
            audit.lines.waiting.load(Ordering::Relaxed),
            0,
            "records and bytes"
        );
    }

    #[test]
    fn a_line_cut_short_by_a_panic_is_taken_back() {
        let out = Shared::default();
        let audit = JsonLinesAudit::writer(out.clone(), 16);
        let cut = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            audit.append(Instant::now(), |line, _| {
                line.extend_from_slice(b"{\"half\":");
                panic!("while writing a line (this panic is the test's)");
            });
        }));
        assert!(cut.is_err());
        audit.record(record());
        let counts = Arc::clone(&audit.counts);
        drop(audit);
        let written = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(written.lines().count(), 1, "{written}");
        let _: serde_json::Value = serde_json::from_str(written.trim_end()).unwrap();
        assert_eq!(counts.dropped.load(Ordering::Relaxed), 0);
    }

    /// A writer whose first write takes longer than a record may wait.
    struct Slow(bool);
    impl Write for Slow {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if !self.0 {
                self.0 = true;
                std::thread::sleep(DELAYED_AFTER + Duration::from_millis(200));
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn records_that_wait_behind_a_slow_disk_are_counted_late_not_lost() {
        // The writer stalls writing the first record: the next ones wait behind it.
        let mut big = record();
        big.path = format!("/Patient/{}", "x".repeat(70 * 1024));
        let audit = JsonLinesAudit::writer(Slow(false), 16);
        audit.record(big);
        std::thread::sleep(Duration::from_millis(100));
        for _ in 0..3 {
            audit.record(record());
        }
        let counts = Arc::clone(&audit.counts);
        drop(audit);
        assert_eq!(counts.dropped.load(Ordering::Relaxed), 0);
        assert!(
            counts.delayed.load(Ordering::Relaxed) >= 3,
            "{}",
            counts.delayed.load(Ordering::Relaxed)
        );
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tower-fhir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn paths_in(file: &Path) -> Vec<String> {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(|line| {
                let json: serde_json::Value = serde_json::from_str(line).unwrap();
                json["path"].as_str().unwrap().to_owned()
            })
            .collect()
    }

    /// `paths` are `count` records' paths, no two alike.
    fn assert_each_once(mut paths: Vec<String>, count: usize) {
        assert_eq!(paths.len(), count, "{paths:?}");
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), count, "a record written twice");
    }

    fn record_at(path: &str) -> AuditRecord {
        AuditRecord {
            path: path.to_owned(),
            ..record()
        }
    }

    #[test]
    fn a_line_cut_short_is_ended_when_the_log_closes() {
        let mut line = Vec::new();
        record().write_json_line(&mut line);
        let disk = Filling::default();
        disk.0.lock().unwrap().1 = Some(line.len() + 10);
        let audit = JsonLinesAudit::writer(disk.clone(), 16);
        audit.record(record());
        audit.record(record());
        let started = Instant::now();
        while audit.dropped() < 1 {
            assert!(started.elapsed() < Duration::from_secs(5), "not dropped");
            std::thread::sleep(Duration::from_millis(5));
        }
        disk.0.lock().unwrap().1 = None;
        drop(audit);
        let written = disk.0.lock().unwrap().0.clone();
        assert_eq!(
            written.len(),
            line.len() + 11,
            "{:?}",
            String::from_utf8_lossy(&written)
        );
        assert_eq!(written.last(), Some(&b'\n'));
    }

    #[test]
    fn a_rotated_file_log_is_reopened_and_every_record_is_in_one_file_once() {
        let dir = scratch_dir("audit-rotate");
        let (path, rotated) = (dir.join("audit.jsonl"), dir.join("audit.jsonl.1"));
        let audit = JsonLinesAudit::file(&path).unwrap();
        let reopener = audit.reopener().expect("a file log can be reopened");
        assert_eq!(reopener.path(), path);
        for n in 0..50 {
            audit.record(record_at(&format!("/before/{n}")));
        }
        std::fs::rename(&path, &rotated).unwrap();
        reopener.reopen().unwrap();
        // From here on the rotated file is left alone.
        let rotated_len = std::fs::metadata(&rotated).unwrap().len();
        for n in 0..50 {
            audit.record(record_at(&format!("/after/{n}")));
        }
        drop(audit);
        assert_eq!(std::fs::metadata(&rotated).unwrap().len(), rotated_len);
        let (old, new) = (paths_in(&rotated), paths_in(&path));
        assert!(new.iter().any(|p| p == "/after/0"), "{new:?}");
        assert!(old.iter().all(|p| p.starts_with("/before/")), "{old:?}");
        assert_each_once(old.into_iter().chain(new).collect(), 100);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reopen_that_cannot_open_the_path_leaves_the_log_in_its_file() {
        let dir = scratch_dir("audit-reopen-fails");
        let (path, kept) = (dir.join("logs/audit.jsonl"), dir.join("audit.jsonl"));
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        let audit = JsonLinesAudit::file(&path).unwrap();
        let reopener = audit.reopener().unwrap();
        // The file moved out and its directory gone: nothing can be created at the path.
        std::fs::rename(&path, &kept).unwrap();
        std::fs::remove_dir(dir.join("logs")).unwrap();
        let error = reopener.reopen().unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::NotFound, "{error}");
        audit.record(record_at("/still"));
        drop(audit);
        assert_eq!(paths_in(&kept), ["/still"]);
        // A closed log has no writer to switch.
        std::fs::create_dir_all(dir.join("logs")).unwrap();
        assert!(reopener.reopen().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A link planted at the path (by someone who may write to its directory) is not
    /// followed when the log is opened again; a path that was a link when the log began is.
    #[cfg(unix)]
    #[test]
    fn a_link_planted_at_the_path_is_not_followed_when_the_log_is_opened_again() {
        let dir = scratch_dir("audit-planted-link");
        let (path, moved, victim) = (
            dir.join("audit.jsonl"),
            dir.join("moved.jsonl"),
            dir.join("victim"),
        );
        std::fs::write(&victim, "untouched\n").unwrap();
        let audit = JsonLinesAudit::file(&path).unwrap();
        let reopener = audit.reopener().unwrap();
        std::fs::rename(&path, &moved).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let error = reopener.reopen().unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ELOOP), "{error}");
        // Nor by the watch that finds the file moved (once a second).
        for at in 0..15 {
            audit.record(record_at(&format!("/after/{at}")));
            std::thread::sleep(Duration::from_millis(100));
        }
        drop(audit);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched\n");
        assert_eq!(paths_in(&moved).len(), 15);

        // The operator's own link (to another disk, say) is followed, at start and after.
        let (linked, target, rotated) = (
            dir.join("linked.jsonl"),
            dir.join("target.jsonl"),
            dir.join("target.jsonl.1"),
        );
        std::os::unix::fs::symlink(&target, &linked).unwrap();
        let audit = JsonLinesAudit::file(&linked).unwrap();
        audit.record(record_at("/before"));
        let reopener = audit.reopener().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        std::fs::rename(&target, &rotated).unwrap();
        reopener.reopen().unwrap();
        audit.record(record_at("/after"));
        drop(audit);
        assert_eq!(paths_in(&rotated), ["/before"]);
        assert_eq!(paths_in(&target), ["/after"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A writer stuck on a full pipe: `reopen` gives up waiting after 5 s with `TimedOut`,
    /// and the writer switches once its write ends.
    #[cfg(unix)]
    #[test]
    fn a_reopen_behind_a_stalled_write_times_out_and_switches_later() {
        use std::io::Read;
        let dir = scratch_dir("audit-reopen-stalled");
        let pipe = dir.join("audit.pipe");
        let made = std::process::Command::new("mkfifo").arg(&pipe).status();
        assert!(made.as_ref().is_ok_and(|s| s.success()), "mkfifo: {made:?}");
        // Opening a pipe to write waits for a reader: open both ends at once.
        let reader = std::thread::spawn({
            let pipe = pipe.clone();
            move || std::fs::File::open(pipe).unwrap()
        });
        let audit = JsonLinesAudit::file(&pipe).unwrap();
        let mut reader = reader.join().unwrap();
        // More than the pipe holds (64 KiB), nobody reading: the writer blocks in its write.
        for n in 0..400 {
            audit.record(record_at(&format!("/stalled/{n}")));
        }
        std::thread::sleep(Duration::from_millis(100));
        // The pipe moved aside: reopening makes a file at its path.
        std::fs::rename(&pipe, dir.join("audit.pipe.old")).unwrap();
        let reopener = audit.reopener().unwrap();
        let started = Instant::now();
        let reopened = reopener.reopen();
        let waited = started.elapsed();
        assert_eq!(
            reopened.unwrap_err().kind(),
            std::io::ErrorKind::TimedOut,
            "waited {waited:?}"
        );
        assert!(waited >= REOPEN_WAIT, "{waited:?}");
        // The pipe drained, the stalled write ends and the writer switches: a later record
        // goes to the new file.
        let drain = std::thread::spawn(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).unwrap();
            all
        });
        let started = Instant::now();
        loop {
            audit.record(record_at("/later"));
            std::thread::sleep(Duration::from_millis(20));
            if paths_in(&pipe).iter().any(|p| p == "/later") {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "never switched"
            );
        }
        drop(audit);
        let piped = String::from_utf8(drain.join().unwrap()).unwrap();
        assert!(
            !piped.contains("/later"),
            "a record after the switch went to the pipe"
        );
        // Every stalled record is in one of the two, once.
        let stalled: Vec<String> = piped
            .lines()
            .map(|line| {
                serde_json::from_str::<serde_json::Value>(line).unwrap()["path"].to_string()
            })
            .chain(paths_in(&pipe).into_iter().map(|p| format!("{p:?}")))
            .filter(|p| p.contains("/stalled/"))
            .collect();
        assert_each_once(stalled, 400);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_a_file_log_has_a_reopener() {
        assert!(JsonLinesAudit::writer(Vec::new(), 4).reopener().is_none());
        assert!(JsonLinesAudit::stdout().reopener().is_none());
    }

    /// A disk with `room` bytes left (`None`: no limit): a write past it is cut short, and
    /// the next one fails, as a full disk's.
    #[derive(Clone, Default)]
    struct Filling(Arc<Mutex<(Vec<u8>, Option<usize>)>>);
    impl Write for Filling {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut disk = self.0.lock().unwrap();
            let (written, room) = &mut *disk;
            let take = match room {
                Some(0) => return Err(std::io::ErrorKind::StorageFull.into()),
                Some(room) => buf.len().min(*room),
                None => buf.len(),
            };
            written.extend_from_slice(&buf[..take]);
            if let Some(room) = room {
                *room -= take;
            }
            Ok(take)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_disk_that_fills_mid_line_loses_only_the_records_it_cut_and_the_next_line_starts_anew() {
        let record_of = |n: u32| {
            let mut record = record();
            record.path = format!("/Patient/{n}");
            record
        };
        let mut first = Vec::new();
        record_of(1).write_json_line(&mut first);
        let disk = Filling::default();
        // Room for the first line and ten bytes of the second.
        disk.0.lock().unwrap().1 = Some(first.len() + 10);
        let audit = JsonLinesAudit::writer(disk.clone(), 16);
        for n in 1..=3 {
            audit.record(record_of(n));
        }
        let started = Instant::now();
        while audit.dropped() < 2 {
            assert!(started.elapsed() < Duration::from_secs(5), "not dropped");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Space is freed; the log goes on.
        disk.0.lock().unwrap().1 = None;
        for n in 4..=5 {
            audit.record(record_of(n));
        }
        let counts = Arc::clone(&audit.counts);
        drop(audit);
        assert_eq!(
            counts.dropped.load(Ordering::Relaxed),
            2,
            "the second and third"
        );
        let written = String::from_utf8(disk.0.lock().unwrap().0.clone()).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 4, "{written}");
        assert_eq!(lines[0].as_bytes(), &first[..first.len() - 1]);
        assert_eq!(
            lines[1].len(),
            10,
            "the second line cut short, then ended: {written}"
        );
        assert!(serde_json::from_str::<serde_json::Value>(lines[1]).is_err());
        for (line, n) in lines[2..].iter().zip(4..) {
            let json: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(json["path"], format!("/Patient/{n}"));
        }
    }

    /// A writer that blocks until told to go on, then fails every write.
    struct Stuck(Arc<(Mutex<bool>, std::sync::Condvar)>);
    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            let (go, ready) = &*self.0;
            let mut go = go.lock().unwrap();
            while !*go {
                go = ready.wait(go).unwrap();
            }
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(std::io::Error::other("disk full"))
        }
    }

    #[test]
    fn a_full_queue_and_a_failing_disk_drop_records_and_count_them() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        // The writer buffers, then blocks in its first flush: the queue (2) fills up.
        let audit = JsonLinesAudit::writer(Stuck(Arc::clone(&gate)), 2);
        let started = Instant::now();
        let mut sent = 0u64;
        while audit.dropped() == 0 && started.elapsed() < Duration::from_secs(5) {
            audit.record(record());
            sent += 1;
        }
        assert!(audit.dropped() > 0, "a full queue drops records");
        let queued_or_buffered = sent - audit.dropped();
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        let counts = Arc::clone(&audit.counts);
        drop(audit);
        // Every record that was not written is counted: the disk took none.
        assert_eq!(
            counts.dropped.load(Ordering::Relaxed),
            sent,
            "{queued_or_buffered} more"
        );
    }

    #[test]
    fn dropping_the_log_waits_for_a_stuck_writer_a_while_not_for_ever_and_says_so() {
        let buffer = crate::testing::LogBuffer::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(buffer.writer())
            .finish();
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let mut audit = JsonLinesAudit::writer(Stuck(Arc::clone(&gate)), 100);
        audit.closing_wait = Duration::from_millis(300);
        for _ in 0..3 {
            audit.record(record());
        }
        let dropping = Instant::now();
        tracing::subscriber::with_default(subscriber, || drop(audit));
        let took = dropping.elapsed();
        assert!(took < Duration::from_secs(5), "{took:?}");
        let logged = buffer.take();
        assert!(logged.contains("has not finished writing"), "{logged}");
        assert!(logged.contains("ERROR"), "{logged}");
        // (The writer thread, released, ends.)
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    #[test]
    fn the_bytes_waiting_are_bounded_too() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        // Records with 60 KB paths (what any client can send) behind a stuck writer: at most
        // 1 MiB of them are held, far fewer than the record bound.
        let audit =
            JsonLinesAudit::writer(Stuck(Arc::clone(&gate)), 100_000).max_waiting_bytes(1 << 20);
        let long = format!("/Patient/{}", "a".repeat(60_000));
        for _ in 0..100 {
            audit.record(record_at(&long));
        }
        let held = audit.lines.waiting.load(Ordering::Relaxed);
        let (records, bytes) = (held >> BYTES_BITS, held & BYTES_MASK);
        assert!(bytes <= (1 << 20) + 61_000, "{bytes} bytes held");
        assert!(records < 20, "{records} records held");
        assert_eq!(
            audit.dropped(),
            100 - records,
            "the rest are dropped and counted"
        );
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    /// Records until `path` holds one of them, for at most 5 s.
    fn record_until_written(audit: &JsonLinesAudit, path: &Path, name: &str) -> bool {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            audit.record(record_at(name));
            std::thread::sleep(Duration::from_millis(50));
            if paths_in(path).iter().any(|p| p == name) {
                return true;
            }
        }
        false
    }

    #[cfg(unix)]
    #[test]
    fn a_deleted_or_moved_log_file_is_not_written_to_for_long() {
        let dir = scratch_dir("audit-deleted");
        let path = dir.join("audit.jsonl");
        let audit = JsonLinesAudit::file(&path).unwrap();
        assert!(record_until_written(&audit, &path, "/before"));
        // Deleted: within a second or so a new file is at the path, and the records written to
        // the deleted one meanwhile are counted as dropped.
        std::fs::remove_file(&path).unwrap();
        audit.record(record_at("/lost"));
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            record_until_written(&audit, &path, "/after-delete"),
            "the deleted file is still written to"
        );
        assert!(audit.dropped() >= 1, "the lost records are not counted");
        let dropped = audit.dropped();
        // Moved without a reopen: the moved file keeps what it had, a new one takes the rest,
        // and nothing counts as lost.
        let moved = dir.join("audit.jsonl.1");
        std::fs::rename(&path, &moved).unwrap();
        assert!(
            record_until_written(&audit, &path, "/after-move"),
            "the moved file is still written to"
        );
        assert!(paths_in(&moved).iter().any(|p| p == "/after-delete"));
        assert_eq!(audit.dropped(), dropped);
        drop(audit);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
