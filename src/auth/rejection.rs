//! Why a request was refused, and the RFC 6750 response that says so.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::outcome::{IssueType, OperationOutcome, Refusal};

/// What kind of rejection (RFC 6750 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectionKind {
    /// No bearer credentials (none at all, or another scheme such as `Basic`): 401 with a
    /// bare challenge and no error code.
    MissingToken,
    /// A malformed `Authorization` header (two of them, an empty or oversized token,
    /// characters outside `b64token`): 400 `invalid_request`.
    InvalidRequest,
    /// A token that failed verification (signature, algorithm, key, expiry, issuer,
    /// audience): 401 `invalid_token`.
    InvalidToken,
    /// The keys to verify with cannot be fetched: 503.
    KeysUnavailable,
    /// The revoked tokens' list may be missing revocations made elsewhere for longer than it
    /// may ([`RevokedTokens::set_max_staleness`](super::RevokedTokens::set_max_staleness)):
    /// 503, whatever the token.
    RevocationsStale,
}

/// A refused request: its kind and a description that is safe to show to the client.
///
/// Descriptions never contain the token, key material or claim values.
#[derive(Clone)]
pub struct Rejection {
    kind: RejectionKind,
    description: &'static str,
    realm: Arc<str>,
}

impl Rejection {
    pub(crate) fn new(kind: RejectionKind, description: &'static str, realm: Arc<str>) -> Self {
        Self {
            kind,
            description,
            realm,
        }
    }

    /// The kind of rejection.
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// A description of the problem, safe to show.
    pub fn description(&self) -> &'static str {
        self.description
    }

    /// The HTTP status: 400, 401 or 503.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            RejectionKind::MissingToken | RejectionKind::InvalidToken => StatusCode::UNAUTHORIZED,
            RejectionKind::InvalidRequest => StatusCode::BAD_REQUEST,
            RejectionKind::KeysUnavailable | RejectionKind::RevocationsStale => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The RFC 6750 error code, if the kind has one.
    pub fn error_code(&self) -> Option<&'static str> {
        match self.kind {
            RejectionKind::MissingToken
            | RejectionKind::KeysUnavailable
            | RejectionKind::RevocationsStale => None,
            RejectionKind::InvalidRequest => Some("invalid_request"),
            RejectionKind::InvalidToken => Some("invalid_token"),
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750 §3).
    pub fn www_authenticate(&self) -> HeaderValue {
        let mut challenge = format!("Bearer realm=\"{}\"", self.realm);
        if let Some(code) = self.error_code() {
            // Descriptions are fixed strings without `"` or `\`, as §3 requires.
            challenge.push_str(&format!(
                ", error=\"{code}\", error_description=\"{}\"",
                self.description
            ));
        }
        HeaderValue::from_str(&challenge).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
    }

    /// The default response: the status, the challenge, and an `OperationOutcome`.
    pub fn to_response(&self) -> Response<Bytes> {
        let issue = match self.kind {
            RejectionKind::MissingToken => IssueType::Login,
            RejectionKind::InvalidRequest => IssueType::Invalid,
            RejectionKind::InvalidToken => IssueType::Security,
            RejectionKind::KeysUnavailable | RejectionKind::RevocationsStale => {
                IssueType::Transient
            }
        };
        let mut response =
            OperationOutcome::error(issue, self.description).to_response(self.status());
        let headers = response.headers_mut();
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        } else {
            headers.insert(header::WWW_AUTHENTICATE, self.www_authenticate());
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let reason = match self.kind {
            RejectionKind::MissingToken => "missing_token",
            RejectionKind::KeysUnavailable => "keys_unavailable",
            RejectionKind::RevocationsStale => "revocations_stale",
            RejectionKind::InvalidRequest => "invalid_request",
            RejectionKind::InvalidToken => "invalid_token",
        };
        response.extensions_mut().insert(Refusal(reason));
        response
    }
}

impl fmt::Debug for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejection")
            .field("kind", &self.kind)
            .field("description", &self.description)
            .finish()
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejection(kind: RejectionKind) -> Rejection {
        Rejection::new(kind, "The access token expired", Arc::from("fhir"))
    }

    #[test]
    fn missing_token_has_a_bare_challenge() {
        let response = rejection(RejectionKind::MissingToken).to_response();
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"fhir\""
        );
    }

    #[test]
    fn invalid_token_names_the_error() {
        let response = rejection(RejectionKind::InvalidToken).to_response();
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.headers()[header::WWW_AUTHENTICATE],
            "Bearer realm=\"fhir\", error=\"invalid_token\", error_description=\"The access token expired\""
        );
        let json: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(json["resourceType"], "OperationOutcome");
        assert_eq!(json["issue"][0]["code"], "security");
    }

    #[test]
    fn statuses_follow_rfc_6750() {
        assert_eq!(rejection(RejectionKind::InvalidRequest).status(), 400);
        let unavailable = rejection(RejectionKind::KeysUnavailable).to_response();
        assert_eq!(unavailable.status(), 503);
        assert!(unavailable.headers().contains_key(header::RETRY_AFTER));
        let stale = rejection(RejectionKind::RevocationsStale).to_response();
        assert_eq!(stale.status(), 503);
        assert_eq!(stale.headers()[header::RETRY_AFTER], "5");
        assert!(!stale.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(
            stale.extensions().get::<Refusal>().map(|r| r.0),
            Some("revocations_stale")
        );
        let json: serde_json::Value = serde_json::from_slice(stale.body()).unwrap();
        assert_eq!(json["issue"][0]["code"], "transient");
    }
}
