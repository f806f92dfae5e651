//! The gateway's CapabilityStatements: generated ones, and upstream ones with the gateway's
//! security section and base put in.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Map, Value};

use crate::body::ResponseBody;
use crate::outcome::{IssueType, OperationOutcome};
use crate::version::FhirVersion;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The SMART extension naming the OAuth endpoints in a CapabilityStatement's security section.
pub(super) const OAUTH_URIS: &str =
    "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris";
/// The largest upstream CapabilityStatement read; real ones are well under a megabyte.
pub(super) const MAX_STATEMENT_BYTES: usize = 8 * 1024 * 1024;
/// The most JSON values (objects, arrays, strings, numbers...) an upstream CapabilityStatement
/// may hold to be read as one; real ones hold tens of thousands. Counted before the statement
/// is parsed into a tree, which costs some 30 times its bytes when it is made of tiny values
/// (8 MiB of `0,` took 270 MiB).
pub(super) const MAX_STATEMENT_VALUES: usize = 250_000;

/// What the gateway writes into CapabilityStatements.
pub(super) struct Statements {
    /// The gateway's base URL: `implementation.url`.
    pub(super) public_base: String,
    /// The token endpoint named in the security section.
    pub(super) token_url: String,
    /// The authorization endpoint named in the security section, where there is one.
    pub(super) authorize_url: Option<String>,
    /// The generated statements' `software.name`.
    pub(super) software: String,
    /// The release of a statement that names none, or of a generated one when none was
    /// negotiated.
    pub(super) default_version: FhirVersion,
}

impl Statements {
    fn security(&self, version: FhirVersion) -> Value {
        let system = match version {
            FhirVersion::Dstu2 | FhirVersion::Stu3 => {
                "http://hl7.org/fhir/restful-security-service"
            }
            _ => "http://terminology.hl7.org/CodeSystem/restful-security-service",
        };
        let mut uris = vec![json!({"url": "token", "valueUri": self.token_url})];
        if let Some(authorize) = &self.authorize_url {
            uris.push(json!({"url": "authorize", "valueUri": authorize}));
        }
        json!({
            "extension": [{"url": OAUTH_URIS, "extension": uris}],
            "service": [
                {"coding": [{"system": system, "code": "OAuth"}], "text": "OAuth 2.0 client credentials"},
                {"coding": [{"system": system, "code": "SMART-on-FHIR"}]}
            ],
            "description": "Send a bearer token from the token endpoint; its scope names the tenant."
        })
    }

    /// The gateway's own statement for `version` (DSTU2: a `Conformance`).
    pub(super) fn generated(&self, version: FhirVersion) -> Value {
        let resource_type = if version == FhirVersion::Dstu2 {
            "Conformance"
        } else {
            "CapabilityStatement"
        };
        let mut statement = json!({
            "resourceType": resource_type,
            "status": "active",
            "date": "2026-01-01",
            "kind": "instance",
            "software": {"name": self.software, "version": env!("CARGO_PKG_VERSION")},
            "implementation": {"description": "Multi-tenant FHIR gateway", "url": self.public_base},
            "fhirVersion": version.release(),
            "format": ["json", "xml"],
            "rest": [{"mode": "server", "security": self.security(version)}]
        });
        if matches!(version, FhirVersion::Dstu2 | FhirVersion::Stu3) {
            statement["acceptUnknown"] = json!("both");
        }
        statement
    }

    /// Puts the gateway's security section and base into a CapabilityStatement; returns its
    /// release.
    pub(super) fn secure(&self, statement: &mut Map<String, Value>) -> FhirVersion {
        let version = statement
            .get("fhirVersion")
            .and_then(Value::as_str)
            .and_then(FhirVersion::parse)
            .unwrap_or(self.default_version);
        let security = self.security(version);
        match statement.get_mut("rest").and_then(Value::as_array_mut) {
            Some(rests) if !rests.is_empty() => {
                for rest in rests.iter_mut().filter_map(Value::as_object_mut) {
                    merge_security(rest, &security);
                }
            }
            _ => {
                statement.insert(
                    "rest".into(),
                    json!([{"mode": "server", "security": security}]),
                );
            }
        }
        let implementation = statement
            .entry("implementation")
            .or_insert_with(|| json!({"description": "Multi-tenant FHIR gateway"}));
        if let Some(implementation) = implementation.as_object_mut() {
            implementation.insert("url".into(), json!(self.public_base));
        }
        version
    }

    /// The upstream's CapabilityStatement with the gateway's security section and base.
    pub(super) async fn secure_upstream_statement<B>(
        &self,
        response: Response<B>,
    ) -> Response<ResponseBody<B>>
    where
        B: Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (mut parts, body) = response.into_parts();
        let bytes = match read_statement(body).await {
            Ok(bytes) => bytes,
            Err(unreadable) => return unreadable.map(ResponseBody::full),
        };
        if !within_values(without_bom(&bytes), MAX_STATEMENT_VALUES) {
            tracing::warn!(
                bytes = bytes.len(),
                "the upstream CapabilityStatement holds more than {MAX_STATEMENT_VALUES} JSON values: 502"
            );
            return OperationOutcome::error(
                IssueType::TooLong,
                "The tenant's CapabilityStatement is too large to read",
            )
            .to_response(StatusCode::BAD_GATEWAY)
            .map(ResponseBody::full);
        }
        let Some(mut statement) = json_statement(&bytes) else {
            if plain_json(&parts.headers) && !another_resource(&bytes) {
                // Sent as JSON and uncompressed, yet no JSON statement (cut short, another
                // resource): passed on, it would give the client whatever security section the
                // upstream wrote (its own OAuth endpoints), which is the rewrite's point.
                tracing::warn!(
                    bytes = bytes.len(),
                    "the upstream's JSON answer to metadata is no CapabilityStatement: 502"
                );
                return OperationOutcome::error(
                    IssueType::Invalid,
                    "The tenant's CapabilityStatement could not be read as JSON",
                )
                .to_response(StatusCode::BAD_GATEWAY)
                .map(ResponseBody::full);
            }
            // Not a JSON statement (XML, say, or compressed): passed on as it came, its length
            // the bytes'. The capability cache keeps none of these.
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            return Response::from_parts(parts, ResponseBody::full(bytes));
        };
        self.secure(&mut statement);
        let body = Bytes::from(Value::Object(statement).to_string());
        // Written anew: the upstream's digests and strong `ETag` name other bytes.
        crate::body::remove_digests(&mut parts.headers, true);
        parts.headers.remove(header::CONTENT_LENGTH);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        Response::from_parts(parts, ResponseBody::full(body))
    }
}

/// Whether `bytes` is JSON of at most `max` values, or not JSON at all (which is no tree to
/// build); counted without building one.
pub(super) fn within_values(bytes: &[u8], max: usize) -> bool {
    use serde::de::DeserializeSeed;
    let left = std::cell::Cell::new(max);
    let mut json = serde_json::Deserializer::from_slice(bytes);
    match ValueCount(&left).deserialize(&mut json) {
        Ok(()) => true,
        // Not JSON: XML, say, passed on as it came, never parsed.
        Err(_) => left.get() > 0,
    }
}

/// Counts the JSON values it is given down from a number, and fails at the one past it.
struct ValueCount<'a>(&'a std::cell::Cell<usize>);

impl ValueCount<'_> {
    fn one<E: serde::de::Error>(&self) -> Result<(), E> {
        match self.0.get() {
            0 => Err(E::custom("too many values")),
            left => {
                self.0.set(left - 1);
                Ok(())
            }
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for ValueCount<'_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, json: D) -> Result<(), D::Error> {
        json.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for ValueCount<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.one()
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.one()
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.one()
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.one()
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        self.one()
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.one()
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        self.one()?;
        while items.next_element_seed(ValueCount(self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        self.one()?;
        while entries.next_key::<serde::de::IgnoredAny>()?.is_some() {
            entries.next_value_seed(ValueCount(self.0))?;
        }
        Ok(())
    }
}

/// Whether `bytes` is a JSON resource other than a statement: `metadata?mode=terminology`'s
/// `TerminologyCapabilities` (IBM's FHIR server, Ontoserver), an `OperationOutcome`. Such a
/// resource has no security section to rewrite, and passes as it came.
fn another_resource(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "resourceType", borrow)]
        resource_type: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_slice::<Typed<'_>>(without_bom(bytes)).is_ok_and(|typed| {
        typed
            .resource_type
            .is_some_and(|ty| ty != "CapabilityStatement" && ty != "Conformance")
    })
}

/// `bytes` without a leading UTF-8 byte order mark, which some servers (.NET ones) put before
/// their JSON and JSON parsers refuse (RFC 8259 lets a parser ignore it).
fn without_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// The JSON CapabilityStatement (DSTU2: `Conformance`) in `bytes`, after a byte order mark if
/// there is one: what the gateway rewrites (and the only statement the capability cache
/// keeps). `None` for anything else (XML, another resource, compressed bytes, a statement of
/// more than [`MAX_STATEMENT_VALUES`] values): passed on as it came, unless it was sent as
/// uncompressed JSON ([`plain_json`]), which is a 502.
pub(super) fn json_statement(bytes: &[u8]) -> Option<Map<String, Value>> {
    let bytes = without_bom(bytes);
    if !within_values(bytes, MAX_STATEMENT_VALUES) {
        return None;
    }
    let Ok(Value::Object(statement)) = serde_json::from_slice::<Value>(bytes) else {
        return None;
    };
    let kind = statement.get("resourceType").and_then(Value::as_str);
    matches!(kind, Some("CapabilityStatement" | "Conformance")).then_some(statement)
}

/// Whether a `Content-Type` is a JSON one (`application/fhir+json`, DSTU2's
/// `application/json+fhir`, or `application/json`, any parameters).
pub(super) fn is_json(content_type: &HeaderValue) -> bool {
    let value = content_type.as_bytes();
    let end = value.iter().position(|b| *b == b';').unwrap_or(value.len());
    let media = value[..end].trim_ascii();
    [
        b"application/fhir+json".as_slice(),
        b"application/json+fhir",
        b"application/json",
    ]
    .iter()
    .any(|json| media.eq_ignore_ascii_case(json))
}

/// Whether a response's headers say its body is JSON ([`is_json`]) as it is: no
/// `Content-Encoding` but `identity`. Such a body the gateway can read, and rewrites.
pub(super) fn plain_json(headers: &http::HeaderMap) -> bool {
    let identity = headers
        .get(header::CONTENT_ENCODING)
        .is_none_or(|e| e.as_bytes().eq_ignore_ascii_case(b"identity"));
    identity && headers.get(header::CONTENT_TYPE).is_some_and(is_json)
}

/// A statement of `version` as a response: JSON, with its release's media type.
pub(super) fn respond(statement: &Value, version: FhirVersion) -> Response<Bytes> {
    typed(statement.to_string(), version.json_media_type(), version)
}

/// A generated statement as FHIR XML, for clients that ask for XML (see [`to_xml`]).
pub(super) fn respond_xml(statement: &Value, version: FhirVersion) -> Response<Bytes> {
    typed(to_xml(statement), version.xml_media_type(), version)
}

/// `body` as `media_type` with the release's `fhirVersion` parameter, varying by `Accept`
/// (which chose the release and the format) and `Authorization` (these are the answers
/// without a token: with one, the tenant's own statement is served), so that a shared cache
/// gives it to no client that asked otherwise.
fn typed(body: String, media_type: &str, version: FhirVersion) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(body));
    let media_type = format!("{media_type}; fhirVersion={}", version.mime_code());
    if let Ok(value) = HeaderValue::from_str(&media_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    crate::version::vary_on(response.headers_mut(), &["Accept", "Authorization"]);
    response
}

/// The order FHIR's XML gives the elements of a generated statement (the same in DSTU2,
/// STU3 and R4 for those it holds; XML, unlike JSON, fixes the order). Only the generated
/// statements are written as XML: a test checks that this lists every member they hold.
const XML_ORDER: &[&str] = &[
    "extension",
    "status",
    "date",
    "kind",
    "software",
    "implementation",
    "name",
    "version",
    "service",
    "coding",
    "system",
    "code",
    "text",
    "description",
    "url",
    "fhirVersion",
    "acceptUnknown",
    "format",
    "rest",
    "mode",
    "security",
    "valueUri",
];

/// A generated statement (JSON, as [`Statements::generated`] makes it) in FHIR's XML form:
/// the resource type as the root element in the FHIR namespace, a primitive as an element with
/// a `value` attribute, an array as repeated elements, an extension's `url` as an attribute,
/// members in FHIR's order ([`XML_ORDER`]).
pub(super) fn to_xml(statement: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>");
    let root = statement
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("CapabilityStatement");
    out.push('<');
    out.push_str(root);
    out.push_str(" xmlns=\"http://hl7.org/fhir\">");
    if let Some(members) = statement.as_object() {
        write_members(&mut out, members, &["resourceType"]);
    }
    out.push_str("</");
    out.push_str(root);
    out.push('>');
    out
}

fn write_members(out: &mut String, members: &Map<String, Value>, skip: &[&str]) {
    let mut ordered: Vec<(&String, &Value)> = members
        .iter()
        .filter(|(name, _)| !skip.contains(&name.as_str()))
        .collect();
    ordered.sort_by_key(|(name, _)| {
        XML_ORDER
            .iter()
            .position(|known| known == name)
            .unwrap_or(XML_ORDER.len())
    });
    for (name, value) in ordered {
        match value {
            Value::Array(items) => {
                for item in items {
                    write_element(out, name, item);
                }
            }
            value => write_element(out, name, value),
        }
    }
}

fn write_element(out: &mut String, name: &str, value: &Value) {
    out.push('<');
    out.push_str(name);
    match value {
        Value::Object(members) => {
            // An extension's `url` is an attribute.
            let url = (name == "extension")
                .then(|| members.get("url").and_then(Value::as_str))
                .flatten();
            if let Some(url) = url {
                out.push_str(" url=\"");
                escape_attribute(out, url);
                out.push('"');
            }
            out.push('>');
            write_members(out, members, if url.is_some() { &["url"] } else { &[] });
            out.push_str("</");
            out.push_str(name);
            out.push('>');
        }
        Value::String(text) => {
            out.push_str(" value=\"");
            escape_attribute(out, text);
            out.push_str("\"/>");
        }
        other => {
            out.push_str(" value=\"");
            escape_attribute(out, &other.to_string());
            out.push_str("\"/>");
        }
    }
}

/// Escapes `text` for a double-quoted XML attribute; characters XML 1.0 cannot carry at all
/// become U+FFFD.
fn escape_attribute(out: &mut String, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            // Kept as themselves, these would be read back as spaces.
            '\t' => out.push_str("&#x9;"),
            '\n' => out.push_str("&#xA;"),
            '\r' => out.push_str("&#xD;"),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
}

/// An upstream CapabilityStatement's bytes, up to the limit; or the 502 that says it could
/// not be read.
pub(super) async fn read_statement<B>(body: B) -> Result<Bytes, Response<Bytes>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match Limited::new(body, MAX_STATEMENT_BYTES).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => {
            tracing::warn!(%error, "could not read the upstream CapabilityStatement");
            Err(OperationOutcome::error(
                IssueType::Exception,
                "The tenant's CapabilityStatement could not be read",
            )
            .to_response(StatusCode::BAD_GATEWAY))
        }
    }
}

/// Puts the gateway's service and oauth-uris into a `rest` entry's security, keeping the
/// upstream's other security extensions.
fn merge_security(rest: &mut Map<String, Value>, ours: &Value) {
    let security = rest.entry("security").or_insert_with(|| json!({}));
    let Some(security) = security.as_object_mut() else {
        rest.insert("security".into(), ours.clone());
        return;
    };
    let mut extensions: Vec<Value> = security
        .get("extension")
        .and_then(Value::as_array)
        .map(|e| {
            e.iter()
                .filter(|x| x["url"] != OAUTH_URIS)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    extensions.extend(ours["extension"].as_array().cloned().unwrap_or_default());
    security.insert("extension".into(), Value::Array(extensions));
    security.insert("service".into(), ours["service"].clone());
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{call, get};
    use super::*;
    use http::Request;
    use http_body_util::{BodyExt, Full};

    #[test]
    fn only_json_statements_are_statements_the_gateway_rewrites() {
        assert!(json_statement(br#"{"resourceType":"CapabilityStatement"}"#).is_some());
        assert!(json_statement(br#"{"resourceType":"Conformance"}"#).is_some());
        for other in [
            br#"<CapabilityStatement xmlns="http://hl7.org/fhir"/>"#.as_slice(),
            br#"{"resourceType":"OperationOutcome"}"#,
            br#"["CapabilityStatement"]"#,
            b"\x1f\x8b\x08\x00",
            b"",
        ] {
            assert!(json_statement(other).is_none(), "{other:?}");
        }
        for json in [
            "application/fhir+json",
            "application/json+fhir; fhirVersion=1.0",
            " Application/JSON ;charset=utf-8",
        ] {
            assert!(is_json(&HeaderValue::from_str(json).unwrap()), "{json}");
        }
        for other in [
            "application/fhir+xml",
            "application/xml+fhir",
            "text/html",
            "",
        ] {
            assert!(!is_json(&HeaderValue::from_str(other).unwrap()), "{other}");
        }
    }

    #[tokio::test]
    async fn generated_statements_follow_the_negotiated_release() {
        let mut request = get("/metadata");
        request.extensions_mut().insert(FhirVersion::Dstu2);
        let (_, headers, statement) = call(request).await;
        assert_eq!(statement["resourceType"], "Conformance");
        assert_eq!(statement["fhirVersion"], "1.0.2");
        assert_eq!(
            headers["content-type"],
            "application/json+fhir; fhirVersion=1.0"
        );
        let (_, _, statement) = call(get("/metadata")).await;
        assert_eq!(statement["resourceType"], "CapabilityStatement");
        assert_eq!(
            statement["implementation"]["url"],
            "https://gw.example/fhir"
        );
        let uris = &statement["rest"][0]["security"]["extension"][0]["extension"];
        assert_eq!(
            uris[0],
            json!({"url": "token", "valueUri": "https://gw.example/oauth/token"})
        );
        assert_eq!(
            uris[1],
            json!({"url": "authorize", "valueUri": "https://gw.example/oauth/authorize"})
        );
        assert_eq!(
            statement["rest"][0]["security"]["service"][0]["coding"][0]["code"],
            "OAuth"
        );
    }

    #[test]
    fn values_are_counted_without_a_tree() {
        assert!(within_values(b"[1,2,3]", 4));
        assert!(!within_values(b"[1,2,3]", 3));
        // Keys are not values; objects, arrays, strings, null and booleans are.
        assert!(within_values(br#"{"a":[null,true,"x"],"b":{}}"#, 6));
        assert!(!within_values(br#"{"a":[null,true,"x"],"b":{}}"#, 5));
        // What is not JSON has no tree to build: passed as it came.
        assert!(within_values(
            br#"<CapabilityStatement xmlns="http://hl7.org/fhir"/>"#,
            1
        ));
        let many = format!(
            r#"{{"resourceType":"CapabilityStatement","x":[{}0]}}"#,
            "0,".repeat(MAX_STATEMENT_VALUES)
        );
        assert!(!within_values(many.as_bytes(), MAX_STATEMENT_VALUES));
        assert!(json_statement(many.as_bytes()).is_none());
    }

    fn statements(software: &str) -> Statements {
        Statements {
            public_base: "https://gw.example/fhir".into(),
            token_url: "https://gw.example/oauth/token".into(),
            authorize_url: Some("https://gw.example/oauth/authorize".into()),
            software: software.into(),
            default_version: FhirVersion::R4,
        }
    }

    #[test]
    fn a_generated_statement_in_xml_follows_fhirs_order() {
        let xml = to_xml(&statements("gw").generated(FhirVersion::R4));
        let system = "http://terminology.hl7.org/CodeSystem/restful-security-service";
        let expected = format!(
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?>"#,
                r#"<CapabilityStatement xmlns="http://hl7.org/fhir">"#,
                r#"<status value="active"/><date value="2026-01-01"/><kind value="instance"/>"#,
                r#"<software><name value="gw"/><version value="{version}"/></software>"#,
                r#"<implementation><description value="Multi-tenant FHIR gateway"/>"#,
                r#"<url value="https://gw.example/fhir"/></implementation>"#,
                r#"<fhirVersion value="4.0.1"/><format value="json"/><format value="xml"/>"#,
                r#"<rest><mode value="server"/><security>"#,
                r#"<extension url="{oauth}">"#,
                r#"<extension url="token"><valueUri value="https://gw.example/oauth/token"/></extension>"#,
                r#"<extension url="authorize"><valueUri value="https://gw.example/oauth/authorize"/></extension>"#,
                r#"</extension>"#,
                r#"<service><coding><system value="{system}"/><code value="OAuth"/></coding>"#,
                r#"<text value="OAuth 2.0 client credentials"/></service>"#,
                r#"<service><coding><system value="{system}"/><code value="SMART-on-FHIR"/></coding></service>"#,
                r#"<description value="Send a bearer token from the token endpoint; its scope names the tenant."/>"#,
                r#"</security></rest></CapabilityStatement>"#
            ),
            version = env!("CARGO_PKG_VERSION"),
            oauth = OAUTH_URIS,
            system = system,
        );
        assert_eq!(xml, expected);

        // DSTU2: a Conformance, acceptUnknown before format.
        let xml = to_xml(&statements("gw").generated(FhirVersion::Dstu2));
        assert!(
            xml.contains(r#"<Conformance xmlns="http://hl7.org/fhir"><status "#),
            "{xml}"
        );
        assert!(
            xml.contains(
                r#"<fhirVersion value="1.0.2"/><acceptUnknown value="both"/><format value="json"/>"#
            ),
            "{xml}"
        );
        assert!(xml.ends_with("</Conformance>"), "{xml}");
    }

    #[test]
    fn every_member_of_a_generated_statement_has_its_place_in_the_xml_order() {
        fn check(value: &Value) {
            match value {
                Value::Object(members) => {
                    for (name, value) in members {
                        assert!(
                            name == "resourceType" || XML_ORDER.contains(&name.as_str()),
                            "{name} has no place in XML_ORDER"
                        );
                        check(value);
                    }
                }
                Value::Array(items) => items.iter().for_each(check),
                _ => {}
            }
        }
        for version in FhirVersion::ALL {
            check(&statements("gw").generated(version));
        }
    }

    #[test]
    fn xml_attributes_are_escaped() {
        let xml = to_xml(&statements("a & b <\"c\">\tline\nnext\u{1}").generated(FhirVersion::R4));
        let expected =
            "<name value=\"a &amp; b &lt;&quot;c&quot;&gt;&#x9;line&#xA;next\u{FFFD}\"/>";
        assert!(xml.contains(expected), "{xml}");
    }

    #[tokio::test]
    async fn an_upstream_statement_of_too_many_values_is_a_502_not_a_tree() {
        let statements = Statements {
            public_base: "https://gw.example".into(),
            token_url: "https://gw.example/oauth/token".into(),
            authorize_url: None,
            software: "test".into(),
            default_version: FhirVersion::R4,
        };
        let many = format!(
            r#"{{"resourceType":"CapabilityStatement","x":[{}0]}}"#,
            "0,".repeat(MAX_STATEMENT_VALUES)
        );
        let response = Response::new(Full::new(Bytes::from(many)));
        let answer = statements.secure_upstream_statement(response).await;
        assert_eq!(answer.status(), StatusCode::BAD_GATEWAY);
    }

    /// Some .NET servers begin their JSON with a UTF-8 byte order mark.
    #[tokio::test]
    async fn a_statement_after_a_byte_order_mark_is_read_and_rewritten() {
        let json = br#"{"resourceType":"CapabilityStatement","fhirVersion":"4.0.1","rest":[{"mode":"server","security":{"extension":[{"url":"http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris","extension":[{"url":"token","valueUri":"http://ehr.internal/token"}]}]}}]}"#;
        let with_bom = [b"\xEF\xBB\xBF".as_slice(), json].concat();
        assert_eq!(json_statement(&with_bom), json_statement(json));
        assert!(json_statement(&with_bom).is_some());
        // Its values are counted as any statement's.
        let many = format!(
            "\u{feff}{{\"resourceType\":\"CapabilityStatement\",\"x\":[{}0]}}",
            "0,".repeat(MAX_STATEMENT_VALUES)
        );
        assert!(json_statement(many.as_bytes()).is_none());
        let answer = statements("gw")
            .secure_upstream_statement(Response::new(Full::new(Bytes::from(many))))
            .await;
        assert_eq!(answer.status(), StatusCode::BAD_GATEWAY);
        // Rewritten, without the mark.
        let mut response = Response::new(Full::new(Bytes::from(with_bom)));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/fhir+json; charset=utf-8"),
        );
        let answer = statements("gw").secure_upstream_statement(response).await;
        assert_eq!(answer.status(), StatusCode::OK);
        let body = answer.into_body().collect().await.unwrap().to_bytes();
        let statement: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            statement["rest"][0]["security"]["extension"][0]["extension"][0]["valueUri"],
            "https://gw.example/oauth/token"
        );
    }

    /// A JSON-typed answer that is no JSON statement would reach the client with whatever
    /// security section the upstream wrote, the rewrite being the point: a 502. Another type
    /// (XML) or a compressed body passes as it came.
    #[tokio::test]
    async fn a_json_answer_that_is_no_statement_is_a_502() {
        let typed =
            |content_type: &'static str, encoding: Option<&'static str>, body: &'static str| {
                let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                if let Some(encoding) = encoding {
                    response
                        .headers_mut()
                        .insert(header::CONTENT_ENCODING, HeaderValue::from_static(encoding));
                }
                response
            };
        let cut = r#"{"resourceType":"CapabilityStatement","rest":[{"security":{"extension":[{"url":"token","valueUri":"http://ehr.internal/token"}"#;
        for (content_type, encoding, body) in [
            ("application/fhir+json", None, cut),
            ("application/json+fhir; fhirVersion=1.0", None, "not json"),
            ("application/json", Some("identity"), r#"{"rest":[]}"#),
            ("application/fhir+json", None, r#"["CapabilityStatement"]"#),
            ("application/fhir+json", None, ""),
        ] {
            let answer = statements("gw")
                .secure_upstream_statement(typed(content_type, encoding, body))
                .await;
            assert_eq!(
                answer.status(),
                StatusCode::BAD_GATEWAY,
                "{content_type} {body}"
            );
            let body = answer.into_body().collect().await.unwrap().to_bytes();
            let outcome: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(outcome["resourceType"], "OperationOutcome");
        }
        for (content_type, encoding, body) in [
            ("application/fhir+xml", None, "<CapabilityStatement/>"),
            ("application/fhir+json", Some("gzip"), "\u{1f}\u{8b}"),
            // `metadata?mode=terminology` (IBM's FHIR server, Ontoserver): no security section.
            (
                "application/fhir+json",
                None,
                r#"{"resourceType":"TerminologyCapabilities","status":"active"}"#,
            ),
        ] {
            let answer = statements("gw")
                .secure_upstream_statement(typed(content_type, encoding, body))
                .await;
            assert_eq!(answer.status(), StatusCode::OK, "{content_type}");
            let passed = answer.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(passed, body.as_bytes(), "passed as it came");
        }
    }

    #[tokio::test]
    async fn a_rewritten_statement_loses_the_digests_and_strong_etag_of_the_upstreams_bytes() {
        let statements = Statements {
            public_base: "https://gw.example".into(),
            token_url: "https://gw.example/oauth/token".into(),
            authorize_url: None,
            software: "test".into(),
            default_version: FhirVersion::R4,
        };
        let upstream = |etag: &'static str| {
            let mut response = Response::new(Full::new(Bytes::from_static(
                br#"{"resourceType":"CapabilityStatement","fhirVersion":"4.0.1","rest":[{"mode":"server"}]}"#,
            )));
            for (name, value) in [
                ("content-digest", "sha-256=:AAAA:"),
                ("repr-digest", "sha-256=:AAAA:"),
                ("digest", "SHA-256=AAAA"),
                ("content-md5", "AAAA"),
                ("etag", etag),
            ] {
                response
                    .headers_mut()
                    .insert(name, HeaderValue::from_static(value));
            }
            response
        };
        let answer = statements
            .secure_upstream_statement(upstream("\"abc\""))
            .await;
        for gone in [
            "content-digest",
            "repr-digest",
            "digest",
            "content-md5",
            "etag",
        ] {
            assert!(!answer.headers().contains_key(gone), "{gone}");
        }
        // A weak ETag names the statement's version, not its bytes: kept.
        let answer = statements
            .secure_upstream_statement(upstream("W/\"3\""))
            .await;
        assert_eq!(answer.headers()["etag"], "W/\"3\"");
    }

    #[tokio::test]
    async fn the_upstream_statement_gets_the_gateways_security_and_base() {
        let request = Request::get("/metadata")
            .header("authorization", "Bearer x")
            .body(Full::default())
            .unwrap();
        let (status, _, statement) = call(request).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            statement["fhirVersion"], "3.0.1",
            "the upstream's release stays"
        );
        assert_eq!(
            statement["implementation"]["url"],
            "https://gw.example/fhir"
        );
        let extensions = statement["rest"][0]["security"]["extension"]
            .as_array()
            .unwrap();
        let oauth: Vec<_> = extensions
            .iter()
            .filter(|e| e["url"] == OAUTH_URIS)
            .collect();
        assert_eq!(
            oauth.len(),
            1,
            "the upstream's oauth-uris replaced: {extensions:?}"
        );
        assert_eq!(
            oauth[0]["extension"][0]["valueUri"],
            "https://gw.example/oauth/token"
        );
        assert!(extensions
            .iter()
            .any(|e| e["url"] == "http://example.org/other"));
        assert_eq!(
            statement["rest"][0]["security"]["service"][0]["coding"][0]["code"],
            "OAuth"
        );
    }
}
