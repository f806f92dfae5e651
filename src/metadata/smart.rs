//! The SMART configuration document (`.well-known/smart-configuration`): the token endpoint,
//! the grant type and the client authentication methods, as JSON whatever the `Accept`.

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use serde_json::{json, Map, Value};

/// What `.well-known/smart-configuration` advertises.
pub(super) struct SmartConfiguration {
    /// The token issuer (`issuer`), where configured.
    pub(super) issuer: Option<String>,
    /// Where the token signing keys are published (`jwks_uri`), where configured.
    pub(super) jwks_uri: Option<String>,
    /// The authorization endpoint, where there is one.
    pub(super) authorize_url: Option<String>,
    /// The token endpoint.
    pub(super) token_url: String,
    /// `scopes_supported`, left out when empty.
    pub(super) scopes_supported: Vec<String>,
    /// `capabilities`.
    pub(super) capabilities: Vec<String>,
    /// `token_endpoint_auth_methods_supported`.
    pub(super) auth_methods: Vec<String>,
    /// `token_endpoint_auth_signing_alg_values_supported`, left out when empty.
    pub(super) auth_signing_algs: Vec<String>,
    /// `introspection_endpoint`, where there is one.
    pub(super) introspection_url: Option<String>,
    /// `revocation_endpoint`, where there is one.
    pub(super) revocation_url: Option<String>,
}

impl SmartConfiguration {
    /// The document, as a response.
    pub(super) fn response(&self) -> Response<Bytes> {
        let mut document = Map::new();
        if let Some(issuer) = &self.issuer {
            document.insert("issuer".into(), json!(issuer));
        }
        if let Some(jwks) = &self.jwks_uri {
            document.insert("jwks_uri".into(), json!(jwks));
        }
        if let Some(authorize) = &self.authorize_url {
            document.insert("authorization_endpoint".into(), json!(authorize));
        }
        document.insert("token_endpoint".into(), json!(self.token_url));
        document.insert(
            "grant_types_supported".into(),
            json!(["client_credentials"]),
        );
        document.insert(
            "token_endpoint_auth_methods_supported".into(),
            json!(self.auth_methods),
        );
        if !self.auth_signing_algs.is_empty() {
            document.insert(
                "token_endpoint_auth_signing_alg_values_supported".into(),
                json!(self.auth_signing_algs),
            );
        }
        if let Some(url) = &self.introspection_url {
            document.insert("introspection_endpoint".into(), json!(url));
        }
        if let Some(url) = &self.revocation_url {
            document.insert("revocation_endpoint".into(), json!(url));
        }
        if !self.scopes_supported.is_empty() {
            document.insert("scopes_supported".into(), json!(self.scopes_supported));
        }
        document.insert("capabilities".into(), json!(self.capabilities));
        let mut response = Response::new(Bytes::from(Value::Object(document).to_string()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::call;
    use super::*;
    use http::{Request, StatusCode};
    use http_body_util::Full;

    #[tokio::test]
    async fn smart_configuration_is_json_whatever_the_accept() {
        let request = Request::get("/.well-known/smart-configuration")
            .header("accept", "application/fhir+xml")
            .header("authorization", "Bearer x")
            .body(Full::default())
            .unwrap();
        let (status, headers, document) = call(request).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(document["token_endpoint"], "https://gw.example/oauth/token");
        assert_eq!(
            document["grant_types_supported"],
            json!(["client_credentials"])
        );
        assert_eq!(
            document["token_endpoint_auth_methods_supported"],
            json!(["client_secret_basic", "client_secret_post"])
        );
        assert_eq!(
            document["jwks_uri"],
            "https://gw.example/.well-known/jwks.json"
        );
        assert_eq!(document["issuer"], "https://gw.example");
        assert_eq!(
            document["capabilities"],
            json!(["client-confidential-symmetric"])
        );
    }
}
