//! Reading a token request: the Content-Type, the form body, and the client's credentials
//! (HTTP Basic or form fields, RFC 6749 §2.3.1).

use std::collections::HashMap;
use std::future::Future;
use std::task::Poll;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Limited};
use percent_encoding::percent_decode_str;

use super::assertion::{Assertions, ASSERTION_TYPE};
use super::client;
use super::error::{ErrorCode, TokenError};

/// How the client authenticated.
pub(super) enum Credentials {
    /// `Authorization: Basic`.
    Basic { id: String, secret: String },
    /// `client_id` and `client_secret` in the form.
    Post { id: String, secret: String },
    /// A `private_key_jwt` assertion (`client_assertion_type`, `client_assertion`), and the
    /// client it names.
    Assertion { id: String, assertion: String },
}

/// Refuses a method other than `POST`: `405` with `Allow: POST`; `refusal` says so.
pub(super) fn post_only(method: &Method, refusal: &'static str) -> Result<(), TokenError> {
    if method == Method::POST {
        return Ok(());
    }
    Err(TokenError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::InvalidRequest,
        refusal,
    )
    .with_header(header::ALLOW, HeaderValue::from_static("POST")))
}

/// How much of a request body the token endpoint reads, and for how long it waits for it.
#[derive(Debug, Clone, Copy)]
pub(super) struct BodyBounds {
    /// Larger bodies get 413.
    pub(super) max_bytes: usize,
    /// A body not all arrived by then gets 408.
    pub(super) timeout: std::time::Duration,
}

/// The form a route of the token endpoint takes: `POST` only ([`post_only`] with `refusal`),
/// a form Content-Type, the body read whole within `bounds`; and the request's parts.
pub(super) async fn posted_form<B>(
    request: http::Request<B>,
    refusal: &'static str,
    bounds: BodyBounds,
) -> Result<(http::request::Parts, HashMap<String, String>), TokenError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    post_only(request.method(), refusal)?;
    check_content_type(request.headers())?;
    let (parts, body) = request.into_parts();
    let form = read_form(&parts.headers, body, bounds).await?;
    Ok((parts, form))
}

/// Refuses a request whose Content-Type is not `application/x-www-form-urlencoded` (400
/// without one, or with more than one, which a proxy in front may read otherwise; 415 with
/// another).
pub(super) fn check_content_type(headers: &HeaderMap) -> Result<(), TokenError> {
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let Some(value) = values.next() else {
        return Err(TokenError::bad_request(
            "Content-Type application/x-www-form-urlencoded is required",
        ));
    };
    if values.next().is_some() {
        return Err(TokenError::bad_request(
            "The request has more than one Content-Type",
        ));
    }
    if is_form(value) {
        Ok(())
    } else {
        Err(TokenError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::InvalidRequest,
            "Content-Type must be application/x-www-form-urlencoded",
        ))
    }
}

/// Whether a `Content-Type` is `application/x-www-form-urlencoded` (any parameters).
fn is_form(value: &HeaderValue) -> bool {
    let value = value.as_bytes();
    let end = value.iter().position(|&b| b == b';').unwrap_or(value.len());
    value[..end]
        .trim_ascii()
        .eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
}

/// The form parameters of a request body within `bounds` (413 above its size, 408 when it has
/// not all arrived in its time, with `Connection: close`), each at most once (RFC 6749 §3.2).
///
/// The time bound keeps a client that sends a few bytes now and then (a slow-body attack)
/// from holding a connection and a request for ever.
pub(super) async fn read_form<B>(
    headers: &HeaderMap,
    body: B,
    bounds: BodyBounds,
) -> Result<HashMap<String, String>, TokenError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let too_large = || {
        // (Counted as the `BodyLimitLayer` in front counts those over its own limit.)
        metrics::counter!("tower_fhir_body_too_large_total").increment(1);
        TokenError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::InvalidRequest,
            "The request body is too large",
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > bounds.max_bytes as u64) {
        return Err(too_large());
    }
    let too_slow = || {
        TokenError::new(
            StatusCode::REQUEST_TIMEOUT,
            ErrorCode::InvalidRequest,
            "The request body did not arrive in time",
        )
        .with_header(header::CONNECTION, HeaderValue::from_static("close"))
    };
    let mut read = std::pin::pin!(Limited::new(body, bounds.max_bytes).collect());
    // A body that has come with its head (as most do) is read without arming a timer.
    let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
    let read = match first {
        Poll::Ready(read) => read,
        Poll::Pending => match tokio::time::timeout(bounds.timeout, read).await {
            Ok(read) => read,
            Err(_) => return Err(too_slow()),
        },
    };
    let bytes = match read {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        // A `BodyTimeoutLayer` in front gave up first.
        Err(err) if crate::ops::is_body_timeout(&*err) => return Err(too_slow()),
        Err(_) => {
            return Err(TokenError::bad_request(
                "The request body could not be read",
            ))
        }
    };
    let mut form = HashMap::new();
    for (name, value) in form_urlencoded::parse(&bytes) {
        // RFC 6749 §3.2: parameters must not be repeated.
        if form.insert(name.into_owned(), value.into_owned()).is_some() {
            return Err(TokenError::bad_request("A parameter is repeated"));
        }
    }
    Ok(form)
}

/// The client's credentials, from `Authorization: Basic` or the form (not both), with a valid
/// client id. `challenge` is the `WWW-Authenticate: Basic` value of a 401.
pub(super) fn credentials(
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    challenge: &HeaderValue,
) -> Result<Credentials, TokenError> {
    let credentials = given_credentials(headers, form, challenge)?;
    let (Credentials::Basic { id, .. }
    | Credentials::Post { id, .. }
    | Credentials::Assertion { id, .. }) = &credentials;
    // Checked before it is looked up, counted or logged: no control characters (forged
    // log lines) and no 8 KB ids (a throttle entry each).
    if !client::is_client_id(id) {
        return Err(TokenError::bad_request(
            "The client_id is not a valid client identifier",
        ));
    }
    Ok(credentials)
}

fn given_credentials(
    headers: &HeaderMap,
    form: &HashMap<String, String>,
    challenge: &HeaderValue,
) -> Result<Credentials, TokenError> {
    // Two would be read one way here and maybe another way by a proxy in front.
    if headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(TokenError::bad_request(
            "More than one Authorization header",
        ));
    }
    let form_secret = form.get("client_secret");
    let form_id = form.get("client_id");
    let assertion_type = form.get("client_assertion_type");
    let assertion = form.get("client_assertion");
    if assertion_type.is_some() || assertion.is_some() {
        if form_secret.is_some() || headers.contains_key(header::AUTHORIZATION) {
            return Err(TokenError::bad_request(
                "Use one client authentication method, not both",
            ));
        }
        let (Some(assertion_type), Some(assertion)) = (assertion_type, assertion) else {
            return Err(TokenError::bad_request(
                "client_assertion and client_assertion_type go together",
            ));
        };
        if assertion_type != ASSERTION_TYPE {
            return Err(TokenError::bad_request(
                "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ));
        }
        // Whose keys to verify it with; nothing about it is trusted yet.
        let failed = || TokenError::invalid_client("Client authentication failed", None);
        let id = Assertions::claimed_client(assertion).ok_or_else(failed)?;
        if form_id.is_some_and(|form_id| *form_id != id) {
            return Err(failed());
        }
        return Ok(Credentials::Assertion {
            id,
            assertion: assertion.clone(),
        });
    }
    match headers.get(header::AUTHORIZATION) {
        Some(value) => {
            if form_secret.is_some() {
                return Err(TokenError::bad_request(
                    "Use one client authentication method, not both",
                ));
            }
            let (id, secret) = parse_basic(value)
                .map_err(|problem| TokenError::invalid_client(problem, Some(challenge)))?;
            if form_id.is_some_and(|form_id| *form_id != id) {
                return Err(TokenError::bad_request(
                    "client_id does not match the authenticated client",
                ));
            }
            Ok(Credentials::Basic { id, secret })
        }
        None => match (form_id, form_secret) {
            (Some(id), Some(secret)) => Ok(Credentials::Post {
                id: id.clone(),
                secret: secret.clone(),
            }),
            _ => Err(TokenError::invalid_client(
                "Client authentication is missing",
                Some(challenge),
            )),
        },
    }
}

/// `Authorization: Basic` with the id and secret form-urlencoded first (RFC 6749 §2.3.1); what
/// is wrong with it otherwise.
fn parse_basic(value: &HeaderValue) -> Result<(String, String), &'static str> {
    const MALFORMED: &str = "Malformed Basic authentication";
    let value = value.to_str().map_err(|_| MALFORMED)?;
    let value = value.trim();
    let (scheme, encoded) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("basic") {
        // A client sending its access token here, say.
        return Err(
            "The token endpoint authenticates clients with the Basic scheme \
                    (client_id:client_secret), a client_secret or a client_assertion in the \
                    form; the Authorization header names another scheme",
        );
    }
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| MALFORMED)?;
    let decoded = String::from_utf8(decoded).map_err(|_| MALFORMED)?;
    let (id, secret) = decoded.split_once(':').ok_or(MALFORMED)?;
    let id = form_decode(id).ok_or(MALFORMED)?;
    if id.is_empty() {
        return Err(MALFORMED);
    }
    Ok((id, form_decode(secret).ok_or(MALFORMED)?))
}

/// Decodes one application/x-www-form-urlencoded value: `+` is a space, `%XY` the byte with
/// the hex digits XY. A `%` not followed by two hex digits, or bytes that are not UTF-8, make
/// it `None`. Not `form_urlencoded::parse`: that would split a value containing `&` or `=`
/// (and keeps a malformed escape as it is).
fn form_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let escapes_well_formed = memchr::memchr_iter(b'%', bytes).all(|at| {
        bytes
            .get(at + 1..at + 3)
            .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    if !escapes_well_formed {
        return None;
    }
    // Split on `+` first: an escaped `%2B` is a plus, not a space.
    let mut decoded = Vec::with_capacity(bytes.len());
    for (n, part) in text.split('+').enumerate() {
        if n > 0 {
            decoded.push(b' ');
        }
        decoded.extend(percent_decode_str(part));
    }
    String::from_utf8(decoded).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_decoded() {
        let raw = format!("Basic {}", STANDARD.encode("my%3Aapp:s%2Bcret+x%26y"));
        let parsed = parse_basic(&HeaderValue::from_str(&raw).unwrap()).unwrap();
        assert_eq!(parsed, ("my:app".to_owned(), "s+cret x&y".to_owned()));
        // Another scheme (an access token sent here) is said to be one.
        for other in ["Bearer abc", "Bearer", "Digest x=1"] {
            let problem = parse_basic(&HeaderValue::from_static(other)).unwrap_err();
            assert!(problem.contains("another scheme"), "{other}: {problem}");
        }
        for malformed in ["Basic !!!", "Basic", "Basic Og==", "basic YXBw"] {
            let problem = parse_basic(&HeaderValue::from_static(malformed)).unwrap_err();
            assert_eq!(problem, "Malformed Basic authentication", "{malformed}");
        }
        assert_eq!(form_decode("%zz"), None);
    }

    #[test]
    fn malformed_escapes_are_refused_not_decoded() {
        // `u8::from_str_radix` takes a sign: a hand-written decoder read `%+5` as 0x05.
        for text in [
            "%+5", "%-5", "a%+5b", "%+f", "%zz", "%", "%4", "x%", "%%41", "%4%41",
        ] {
            assert_eq!(form_decode(text), None, "{text:?}");
        }
        let raw = format!("Basic {}", STANDARD.encode("app%+5:secret"));
        assert!(parse_basic(&HeaderValue::from_str(&raw).unwrap()).is_err());
        let raw = format!("Basic {}", STANDARD.encode("app:se%-5cret"));
        assert!(parse_basic(&HeaderValue::from_str(&raw).unwrap()).is_err());
    }

    #[test]
    fn well_formed_values_decode() {
        for (text, decoded) in [
            ("", ""),
            ("plain", "plain"),
            ("a+b", "a b"),
            ("%2B%2b", "++"),
            ("%41%7e", "A~"),
            ("%E2%82%AC+%e2%82%ac", "\u{20ac} \u{20ac}"),
            ("100%25", "100%"),
        ] {
            assert_eq!(form_decode(text).as_deref(), Some(decoded), "{text:?}");
        }
        // Escapes must make UTF-8.
        assert_eq!(form_decode("%ff"), None);
        assert_eq!(form_decode("%E2%82"), None);
    }

    #[test]
    fn content_type_must_be_a_form() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            check_content_type(&headers).map_err(|e| e.status)
        };
        assert_eq!(with("application/x-www-form-urlencoded"), Ok(()));
        assert_eq!(
            with("Application/X-WWW-Form-Urlencoded ; charset=utf-8"),
            Ok(())
        );
        assert_eq!(
            with("application/json"),
            Err(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        assert_eq!(
            check_content_type(&HeaderMap::new()).map_err(|e| e.status),
            Err(StatusCode::BAD_REQUEST)
        );
        let mut two = HeaderMap::new();
        for value in ["application/x-www-form-urlencoded", "application/json"] {
            two.append(header::CONTENT_TYPE, HeaderValue::from_static(value));
        }
        let refused = check_content_type(&two).unwrap_err();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert_eq!(refused.code, ErrorCode::InvalidRequest);
    }
}
