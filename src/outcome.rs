//! FHIR `OperationOutcome` error bodies, shared by every layer.
//!
//! Every rejection the gateway makes (a missing token, an unknown tenant, an upstream that
//! timed out) is answered with an HTTP status and an `OperationOutcome` that says what went
//! wrong in words a client developer can act on. This module builds those bodies by hand:
//! no Rust FHIR crate models the resource small enough to be worth the dependency.
//!
//! ```
//! use http::StatusCode;
//! use tower_fhir::outcome::{IssueType, OperationOutcome};
//!
//! let outcome = OperationOutcome::error(IssueType::Login, "The access token expired");
//! let response = outcome.to_response(StatusCode::UNAUTHORIZED);
//! assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(response.headers()["content-type"], "application/fhir+json");
//!
//! let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
//! assert_eq!(json["resourceType"], "OperationOutcome");
//! assert_eq!(json["issue"][0]["severity"], "error");
//! assert_eq!(json["issue"][0]["code"], "login");
//! assert_eq!(json["issue"][0]["diagnostics"], "The access token expired");
//! ```

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use serde::Serialize;

/// The media type of FHIR JSON from STU3 on, used for error bodies until a layer negotiates
/// another release.
pub const FHIR_JSON: &str = "application/fhir+json";

/// How bad an [`Issue`] is (FHIR `IssueSeverity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Severity {
    /// The request failed and cannot be retried as it is.
    Fatal,
    /// The request failed.
    Error,
    /// The request succeeded, with a caveat.
    Warning,
    /// For information only.
    Information,
}

impl Severity {
    /// FHIR's code for the severity: `fatal`, `error`, `warning` or `information`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fatal => "fatal",
            Self::Error => "error",
            Self::Warning => "warning",
            Self::Information => "information",
        }
    }
}

/// What kind of problem an [`Issue`] is (FHIR `IssueType`, the codes the gateway uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum IssueType {
    /// Content invalid against the specification or a profile.
    Invalid,
    /// A structural problem in the content (syntax).
    Structure,
    /// A required element is missing.
    Required,
    /// An element value is invalid.
    Value,
    /// An authentication or authorization problem.
    Security,
    /// The client needs to authenticate (again).
    Login,
    /// The user or system is not recognised.
    Unknown,
    /// The credentials or session expired.
    Expired,
    /// The client is not allowed to do this.
    Forbidden,
    /// Processing failed.
    Processing,
    /// The interaction, media type or version is not supported.
    NotSupported,
    /// The resource or tenant was not found.
    NotFound,
    /// The content was too long.
    TooLong,
    /// An internal or upstream failure.
    Exception,
    /// An upstream did not answer in time.
    Timeout,
    /// The client is sending too much; slow down.
    Throttled,
    /// A temporary problem: try again later.
    Transient,
    /// Some information was not returned, by the access rules (a written resource the token
    /// may not read).
    Suppressed,
}

impl IssueType {
    /// FHIR's code for the type: `invalid`, `security`, `throttled`, ...
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Structure => "structure",
            Self::Required => "required",
            Self::Value => "value",
            Self::Security => "security",
            Self::Login => "login",
            Self::Unknown => "unknown",
            Self::Expired => "expired",
            Self::Forbidden => "forbidden",
            Self::Processing => "processing",
            Self::NotSupported => "not-supported",
            Self::NotFound => "not-found",
            Self::TooLong => "too-long",
            Self::Exception => "exception",
            Self::Timeout => "timeout",
            Self::Throttled => "throttled",
            Self::Transient => "transient",
            Self::Suppressed => "suppressed",
        }
    }
}

/// Why a layer answered a request itself instead of passing it on: a response extension on
/// every answer built by [`OperationOutcome::to_response`] (the issue's code), by the bearer
/// layer (the RFC 6750 error code, `invalid_token` say) and by the token endpoint (the RFC 6749
/// error code). Audit records and metrics report it as the request's `outcome`; a response
/// without one (the upstream's, or a successful token) is `ok`.
///
/// ```
/// use http::StatusCode;
/// use tower_fhir::outcome::{IssueType, OperationOutcome, Refusal};
///
/// let response = OperationOutcome::error(IssueType::Throttled, "slow down")
///     .to_response(StatusCode::TOO_MANY_REQUESTS);
/// assert_eq!(response.extensions().get::<Refusal>(), Some(&Refusal("throttled")));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Refusal(pub &'static str);

/// One problem reported in an [`OperationOutcome`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Issue {
    /// How bad the problem is.
    pub severity: Severity,
    /// What kind of problem it is.
    pub code: IssueType,
    /// A human-readable explanation, safe to show to the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<String>,
}

/// A FHIR `OperationOutcome` resource: a list of issues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "resourceType", rename = "OperationOutcome")]
pub struct OperationOutcome {
    /// The issues; FHIR requires at least one.
    #[serde(rename = "issue")]
    pub issues: Vec<Issue>,
}

impl OperationOutcome {
    /// An outcome with one `error` issue of the given type and diagnostics.
    pub fn error(code: IssueType, diagnostics: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, diagnostics)
    }

    /// An outcome with one issue.
    pub fn new(severity: Severity, code: IssueType, diagnostics: impl Into<String>) -> Self {
        Self {
            issues: vec![Issue {
                severity,
                code,
                diagnostics: Some(diagnostics.into()),
            }],
        }
    }

    /// The outcome as FHIR JSON.
    pub fn to_json(&self) -> Bytes {
        // Serializing plain enums and strings into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// The outcome as FHIR XML.
    ///
    /// ```
    /// use tower_fhir::outcome::{IssueType, OperationOutcome};
    ///
    /// let xml = OperationOutcome::error(IssueType::NotFound, "No \"Patient/1\" <here>").to_xml();
    /// assert_eq!(
    ///     xml,
    ///     "<OperationOutcome xmlns=\"http://hl7.org/fhir\"><issue><severity value=\"error\"/>\
    ///      <code value=\"not-found\"/><diagnostics value=\"No &quot;Patient/1&quot; &lt;here&gt;\"/>\
    ///      </issue></OperationOutcome>"
    /// );
    /// ```
    pub fn to_xml(&self) -> Bytes {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(b"<OperationOutcome xmlns=\"http://hl7.org/fhir\">");
        for issue in &self.issues {
            out.extend_from_slice(b"<issue><severity value=\"");
            out.extend_from_slice(issue.severity.as_str().as_bytes());
            out.extend_from_slice(b"\"/><code value=\"");
            out.extend_from_slice(issue.code.as_str().as_bytes());
            out.extend_from_slice(b"\"/>");
            if let Some(diagnostics) = &issue.diagnostics {
                out.extend_from_slice(b"<diagnostics value=\"");
                xml_escape_attribute(&mut out, diagnostics);
                out.extend_from_slice(b"\"/>");
            }
            out.extend_from_slice(b"</issue>");
        }
        out.extend_from_slice(b"</OperationOutcome>");
        Bytes::from(out)
    }

    /// An HTTP response with this outcome as an `application/fhir+json` body (not to be
    /// stored by a cache, nor read as another type: `Cache-Control: no-store`,
    /// `X-Content-Type-Options: nosniff`), and the first issue's code as its [`Refusal`].
    /// The response keeps the outcome in its extensions too: behind a
    /// [`VersionNegotiationLayer`](crate::version::VersionNegotiationLayer), a client that
    /// prefers XML gets it in FHIR XML.
    pub fn to_response(&self, status: StatusCode) -> Response<Bytes> {
        let mut response = Response::new(self.to_json());
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        if let Some(issue) = self.issues.first() {
            response
                .extensions_mut()
                .insert(Refusal(issue.code.as_str()));
        }
        response.extensions_mut().insert(Written(self.clone()));
        response
    }
}

/// The outcome a response made by [`OperationOutcome::to_response`] holds as JSON, in its
/// extensions: the version negotiation layer writes it again in XML for a client that asks
/// for XML.
#[derive(Debug, Clone)]
pub(crate) struct Written(pub(crate) OperationOutcome);

/// `response` (an outcome [`OperationOutcome::to_response`] made, whatever its body now) with
/// the outcome in XML, in `media_type`; `None` when it was not made so.
pub(crate) fn in_xml<B>(
    response: &Response<B>,
    media_type: &'static str,
) -> Option<(Bytes, HeaderValue)> {
    let Written(outcome) = response.extensions().get::<Written>()?;
    Some((outcome.to_xml(), HeaderValue::from_static(media_type)))
}

/// Writes `text` as an XML attribute value (either quote), escaped; a character XML 1.0 cannot
/// carry at all (a control character but tab and line breaks, U+FFFE, U+FFFF) becomes U+FFFD.
pub(crate) fn xml_escape_attribute(out: &mut Vec<u8>, text: &str) {
    for c in text.chars() {
        match c {
            '&' => out.extend_from_slice(b"&amp;"),
            '<' => out.extend_from_slice(b"&lt;"),
            '>' => out.extend_from_slice(b"&gt;"),
            '"' => out.extend_from_slice(b"&quot;"),
            '\'' => out.extend_from_slice(b"&apos;"),
            // Written raw, a tab or a line break would be read back as a space.
            '\t' => out.extend_from_slice(b"&#x9;"),
            '\n' => out.extend_from_slice(b"&#xA;"),
            '\r' => out.extend_from_slice(b"&#xD;"),
            c if (c as u32) < 0x20 || c == '\u{FFFE}' || c == '\u{FFFF}' => {
                out.extend_from_slice("\u{FFFD}".as_bytes());
            }
            c => {
                let mut utf8 = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
}

/// A JSON response with the no-store headers RFC 6749 §5.1 asks of the OAuth endpoints
/// (`Cache-Control: no-store`, `Pragma: no-cache`), and `X-Content-Type-Options: nosniff`: the
/// form of their errors (§5.2), also when a layer in front of them refuses a request.
pub(crate) fn oauth_json(status: StatusCode, body: &serde_json::Value) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(serde_json::to_vec(body).unwrap_or_default()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn its_response_is_not_stored_nor_sniffed() {
        let response =
            OperationOutcome::error(IssueType::NotFound, "no").to_response(StatusCode::NOT_FOUND);
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        assert_eq!(
            response.headers()[header::X_CONTENT_TYPE_OPTIONS],
            "nosniff"
        );
        assert_eq!(response.headers()[header::CONTENT_TYPE], FHIR_JSON);
    }

    #[test]
    fn serializes_in_fhir_shape() {
        let outcome = OperationOutcome::new(Severity::Fatal, IssueType::NotSupported, "no");
        let json: serde_json::Value = serde_json::from_slice(&outcome.to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "fatal", "code": "not-supported", "diagnostics": "no"}]
            })
        );
    }

    #[test]
    fn diagnostics_are_escaped_json() {
        let outcome = OperationOutcome::error(IssueType::Invalid, "a \"quoted\"\n<value>");
        let json: serde_json::Value = serde_json::from_slice(&outcome.to_json()).unwrap();
        assert_eq!(json["issue"][0]["diagnostics"], "a \"quoted\"\n<value>");
    }

    #[test]
    fn response_has_status_and_media_type() {
        let response = OperationOutcome::error(IssueType::Transient, "later")
            .to_response(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], FHIR_JSON);
        assert_eq!(
            response.extensions().get::<Refusal>(),
            Some(&Refusal("transient"))
        );
    }

    #[test]
    fn severities_agree_with_the_serialized_form() {
        for severity in [
            Severity::Fatal,
            Severity::Error,
            Severity::Warning,
            Severity::Information,
        ] {
            assert_eq!(serde_json::to_value(severity).unwrap(), severity.as_str());
        }
    }

    #[test]
    fn its_xml_escapes_what_xml_cannot_carry_raw_and_names_every_issue() {
        let mut outcome = OperationOutcome::error(IssueType::Invalid, "a & b\t'c'\n");
        outcome.issues.push(Issue {
            severity: Severity::Warning,
            code: IssueType::Throttled,
            diagnostics: None,
        });
        assert_eq!(
            outcome.to_xml(),
            "<OperationOutcome xmlns=\"http://hl7.org/fhir\"><issue><severity value=\"error\"/>\
             <code value=\"invalid\"/><diagnostics value=\"a &amp; b&#x9;&apos;c&apos;&#xA;\"/>\
             </issue><issue><severity value=\"warning\"/><code value=\"throttled\"/></issue>\
             </OperationOutcome>"
        );
        // The response keeps the outcome, to be written in XML where a client asks for it.
        let response = outcome.to_response(StatusCode::BAD_REQUEST);
        let (xml, media_type) = in_xml(&response, "application/fhir+xml").unwrap();
        assert_eq!(xml, outcome.to_xml());
        assert_eq!(media_type, "application/fhir+xml");
        assert!(in_xml(&Response::new(()), "application/fhir+xml").is_none());
        // What XML 1.0 cannot carry at all, even as a reference, is replaced.
        let odd = OperationOutcome::error(IssueType::Invalid, "a\u{1}b\u{0}c\u{FFFE}d é");
        let xml = String::from_utf8(odd.to_xml().to_vec()).unwrap();
        assert!(
            xml.contains("<diagnostics value=\"a\u{FFFD}b\u{FFFD}c\u{FFFD}d é\"/>"),
            "{xml}"
        );
    }

    #[test]
    fn codes_agree_with_the_serialized_form() {
        for code in [
            IssueType::Invalid,
            IssueType::NotSupported,
            IssueType::TooLong,
            IssueType::Throttled,
            IssueType::NotFound,
        ] {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, code.as_str());
        }
    }
}
