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
        let Some(mut statement) = json_statement(&bytes) else {
            // Not a JSON statement (XML, say): passed on as it came. The capability cache
            // keeps none of these.
            return Response::from_parts(parts, ResponseBody::full(bytes));
        };
        self.secure(&mut statement);
        let body = Bytes::from(Value::Object(statement).to_string());
        parts.headers.remove(header::CONTENT_LENGTH);
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        Response::from_parts(parts, ResponseBody::full(body))
    }
}

/// The JSON CapabilityStatement (DSTU2: `Conformance`) in `bytes`: what the gateway rewrites
/// (and the only statement the capability cache keeps). `None` for anything else (XML, another
/// resource, compressed bytes), which is passed on as it came.
pub(super) fn json_statement(bytes: &[u8]) -> Option<Map<String, Value>> {
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

/// A statement of `version` as a response: JSON, with its release's media type.
pub(super) fn respond(statement: &Value, version: FhirVersion) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(statement.to_string()));
    let media_type = format!(
        "{}; fhirVersion={}",
        version.json_media_type(),
        version.mime_code()
    );
    if let Ok(value) = HeaderValue::from_str(&media_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
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
    use http_body_util::Full;

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
