//! RFC 6749 §5.2 error responses.

use std::fmt;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Empty;

use crate::body::ResponseBody;

/// The body of every token endpoint response.
pub type TokenResponseBody = ResponseBody<Empty<Bytes>>;

/// An RFC 6749 §5.2 `error` code (plus the two HTTP-level refusals the endpoint adds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A parameter is missing, repeated, malformed, or the request is not a form POST.
    InvalidRequest,
    /// Client authentication failed (unknown client, wrong secret, none, revoked client).
    InvalidClient,
    /// The grant type is not `client_credentials`.
    UnsupportedGrantType,
    /// The scope names no tenant, a tenant the client is not entitled to, more than one
    /// tenant, or a scope the client may not have.
    InvalidScope,
    /// Too many failed authentications for this client id from this address: retry after
    /// `Retry-After`.
    TemporarilyUnavailable,
    /// The gateway could not answer (client store or signing failed); details are logged.
    ServerError,
    /// The authenticated client may not do this (revoke another client's token).
    UnauthorizedClient,
}

impl ErrorCode {
    /// The code as it appears in the JSON `error` member.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidClient => "invalid_client",
            Self::UnsupportedGrantType => "unsupported_grant_type",
            Self::InvalidScope => "invalid_scope",
            Self::TemporarilyUnavailable => "temporarily_unavailable",
            Self::ServerError => "server_error",
            Self::UnauthorizedClient => "unauthorized_client",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal: the status, the RFC 6749 error and a description safe to show the client.
#[derive(Debug, Clone)]
pub(crate) struct TokenError {
    pub(crate) status: StatusCode,
    pub(crate) code: ErrorCode,
    pub(crate) description: &'static str,
    pub(crate) extra_headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl TokenError {
    pub(crate) fn new(status: StatusCode, code: ErrorCode, description: &'static str) -> Self {
        Self {
            status,
            code,
            description,
            extra_headers: Vec::new(),
        }
    }

    pub(crate) fn bad_request(description: &'static str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            description,
        )
    }

    pub(crate) fn invalid_scope(description: &'static str) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidScope,
            description,
        )
    }

    /// 401 `invalid_client`; with `challenge` (the `WWW-Authenticate: Basic` value) when the
    /// client used HTTP Basic or sent no credentials (RFC 6749 §5.2).
    pub(crate) fn invalid_client(
        description: &'static str,
        challenge: Option<&HeaderValue>,
    ) -> Self {
        let error = Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::InvalidClient,
            description,
        );
        match challenge {
            Some(challenge) => error.with_header(header::WWW_AUTHENTICATE, challenge.clone()),
            None => error,
        }
    }

    pub(crate) fn server_error() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::ServerError,
            "The token endpoint could not answer",
        )
    }

    /// `503` (`temporarily_unavailable`, `Retry-After: 1`): nothing is wrong with the
    /// request, and what stopped it may pass.
    pub(crate) fn unavailable(description: &'static str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::TemporarilyUnavailable,
            description,
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
    }

    /// The client store could not answer (a database down, a disk failing).
    pub(crate) fn store_unavailable() -> Self {
        Self::unavailable("The client store cannot be reached; retry shortly")
    }

    pub(crate) fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.extra_headers.push((name, value));
        self
    }

    pub(crate) fn into_response(self) -> Response<TokenResponseBody> {
        let body = serde_json::json!({
            "error": self.code.as_str(),
            "error_description": self.description,
        });
        let mut response = json_response(self.status, &body);
        for (name, value) in self.extra_headers {
            response.headers_mut().insert(name, value);
        }
        response
            .extensions_mut()
            .insert(crate::outcome::Refusal(self.code.as_str()));
        response
    }
}

/// A JSON response with the no-store headers RFC 6749 §5.1 asks for, and
/// `X-Content-Type-Options: nosniff`.
pub(crate) fn json_response(
    status: StatusCode,
    body: &serde_json::Value,
) -> Response<TokenResponseBody> {
    crate::outcome::oauth_json(status, body).map(ResponseBody::full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn errors_are_rfc6749_json_and_never_cached() {
        let response = TokenError::invalid_scope("no tenant").into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["error"], "invalid_scope");
        assert_eq!(json["error_description"], "no tenant");
    }
}
