//! The response side of version negotiation: the response future, which labels FHIR
//! responses with the `fhirVersion` they were served in.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderValue};
use http::Response;
use pin_project_lite::pin_project;

use super::media::{exact_named_json, mentions_version};
use super::FhirVersion;
use crate::body::ResponseBody;

pin_project! {
    /// Response future of [`VersionNegotiation`](super::VersionNegotiation).
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        // `xml`: the client prefers XML, so an outcome the gateway made is written in XML.
        Inner { #[pin] future: F, version: Option<FhirVersion>, xml: bool },
        // Boxed: a rare path, and the future stays small to move through the layers.
        Answered { response: Option<Box<Response<Bytes>>> },
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner {
                future,
                version,
                xml,
            } => {
                let mut response = ready!(future.poll(cx))?;
                let served = response
                    .extensions()
                    .get::<FhirVersion>()
                    .copied()
                    .or(*version);
                let xml = if *xml {
                    outcome_in_xml(&mut response, served)
                } else {
                    None
                };
                if let Some(served) = served {
                    label(response.headers_mut(), served);
                    // `Accept` chose the release, and with it the tenant's server: a cache must
                    // not answer a request naming another release with this one.
                    vary_by_accept(response.headers_mut());
                }
                Poll::Ready(Ok(match xml {
                    Some(xml) => response.map(|_| ResponseBody::full(xml)),
                    None => response.map(ResponseBody::inner),
                }))
            }
            StateProj::Answered { response } => {
                let response = response.take().expect("polled after completion");
                Poll::Ready(Ok((*response).map(ResponseBody::full)))
            }
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F> ResponseFuture<F> {
    /// The inner service's response, to be labelled with the release the response's own
    /// extensions name, else with `version` (the negotiated one).
    /// With `xml`, an outcome the gateway made is written in XML.
    pub(super) fn inner(future: F, version: Option<FhirVersion>, xml: bool) -> Self {
        Self {
            state: State::Inner {
                future,
                version,
                xml,
            },
        }
    }

    /// A response of the layer's own (a refusal, `$versions`), as it is.
    pub(super) fn answered(response: Response<Bytes>) -> Self {
        Self {
            state: State::Answered {
                response: Some(Box::new(response)),
            },
        }
    }
}

/// For a response holding an outcome the gateway made ([`OperationOutcome::to_response`]),
/// the outcome in XML, in release `served`'s XML media type (STU3's without one); its headers
/// made to say so (and that `Accept` chose the form). `None`, and `response` untouched, for
/// any other response: an upstream's answer is never rewritten.
///
/// [`OperationOutcome::to_response`]: crate::outcome::OperationOutcome::to_response
pub(super) fn outcome_in_xml<B>(
    response: &mut Response<B>,
    served: Option<FhirVersion>,
) -> Option<Bytes> {
    let media_type = served.map_or("application/fhir+xml", FhirVersion::xml_media_type);
    let (xml, content_type) = crate::outcome::in_xml(response, media_type)?;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, content_type);
    if headers.contains_key(header::CONTENT_LENGTH) {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(xml.len()));
    }
    vary_by(headers, ACCEPT);
    Some(xml)
}

/// Adds `fhirVersion` to a FHIR media type that lacks it.
pub(crate) fn label(headers: &mut HeaderMap, version: FhirVersion) {
    // One lookup; inserting through the entry drops any further values, as `insert` does.
    let Entry::Occupied(mut entry) = headers.entry(header::CONTENT_TYPE) else {
        return;
    };
    let current = entry.get();
    // Labelled already in the common exact form (by the proxy, say): nothing to read further.
    if exact_named_json(current.as_bytes()).is_some() {
        return;
    }
    // The common, bare media types have static labelled forms: no parsing, no allocation.
    if let Some(value) = static_label(current.as_bytes(), version) {
        entry.insert(value);
        return;
    }
    if mentions_version(current.as_bytes()) {
        return;
    }
    let Ok(text) = current.to_str() else {
        return;
    };
    let essence = text.split(';').next().unwrap_or_default().trim();
    let fhir_type = [
        "application/fhir+json",
        "application/json+fhir",
        "application/fhir+xml",
        "application/xml+fhir",
    ]
    .iter()
    .any(|t| essence.eq_ignore_ascii_case(t));
    if !fhir_type {
        return;
    }
    let mut labelled = String::with_capacity(text.len() + 18);
    labelled.push_str(text);
    labelled.push_str("; fhirVersion=");
    labelled.push_str(version.mime_code());
    if let Ok(value) = HeaderValue::from_str(&labelled) {
        entry.insert(value);
    }
}

/// `Accept`, as a `Vary` field.
const ACCEPT: HeaderValue = HeaderValue::from_static("Accept");

/// [`vary_by`] `Accept`, with the common case first: the bearer layer's own `Vary:
/// Authorization` alone, made one value (no second header line to write).
fn vary_by_accept(headers: &mut HeaderMap) {
    if let Entry::Occupied(mut occupied) = headers.entry(header::VARY) {
        if occupied.get().as_bytes() == b"Authorization" && occupied.iter().nth(1).is_none() {
            occupied.insert(HeaderValue::from_static("Authorization, Accept"));
            return;
        }
    }
    vary_by(headers, ACCEPT);
}

/// Adds `field` (a header name) to a response's `Vary` unless it varies by it (or by
/// everything) already: one look-up where the response has no `Vary` of its own, an added
/// value where it has one.
pub(crate) fn vary_by(headers: &mut HeaderMap, field: HeaderValue) {
    match headers.entry(header::VARY) {
        Entry::Vacant(vacant) => {
            vacant.insert(field);
        }
        Entry::Occupied(mut occupied) => {
            let name = field.as_bytes();
            let varies = occupied.iter().any(|value| {
                value.as_bytes().split(|b| *b == b',').any(|listed| {
                    let listed = listed.trim_ascii();
                    listed == b"*" || listed.eq_ignore_ascii_case(name)
                })
            });
            if !varies {
                occupied.append(field);
            }
        }
    }
}

/// Adds each of `fields` to the `Vary` of a response, merged with what it names already: one
/// `Vary` value after, its own fields first, none twice (compared ignoring case). A `Vary: *`
/// (which varies on everything) is left as it is; a value that is not text is kept, and the
/// fields are added beside it.
pub(crate) fn vary_on(headers: &mut HeaderMap, fields: &[&str]) {
    let mut named: Vec<&str> = Vec::new();
    let mut unreadable = Vec::new();
    let existing: Vec<HeaderValue> = headers.get_all(header::VARY).iter().cloned().collect();
    for value in &existing {
        let Ok(text) = value.to_str() else {
            unreadable.push(value.clone());
            continue;
        };
        for field in text.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            if field == "*" {
                return;
            }
            if !named.iter().any(|n| n.eq_ignore_ascii_case(field)) {
                named.push(field);
            }
        }
    }
    for field in fields {
        if !named.iter().any(|n| n.eq_ignore_ascii_case(field)) {
            named.push(field);
        }
    }
    let Ok(merged) = HeaderValue::from_str(&named.join(", ")) else {
        return;
    };
    headers.insert(header::VARY, merged);
    for value in unreadable {
        headers.append(header::VARY, value);
    }
}

/// `application/fhir+json; fhirVersion=X` and the like, for a bare FHIR JSON media type,
/// built at compile time.
fn static_label(content_type: &[u8], version: FhirVersion) -> Option<HeaderValue> {
    macro_rules! labels {
        ($media:literal) => {
            match version {
                FhirVersion::Dstu2 => {
                    const { HeaderValue::from_static(concat!($media, "; fhirVersion=1.0")) }
                }
                FhirVersion::Stu3 => {
                    const { HeaderValue::from_static(concat!($media, "; fhirVersion=3.0")) }
                }
                FhirVersion::R4 => {
                    const { HeaderValue::from_static(concat!($media, "; fhirVersion=4.0")) }
                }
                FhirVersion::R4B => {
                    const { HeaderValue::from_static(concat!($media, "; fhirVersion=4.3")) }
                }
                FhirVersion::R5 => {
                    const { HeaderValue::from_static(concat!($media, "; fhirVersion=5.0")) }
                }
            }
        };
    }
    match content_type {
        b"application/fhir+json" => Some(labels!("application/fhir+json")),
        b"application/json+fhir" => Some(labels!("application/json+fhir")),
        b"application/fhir+json;charset=UTF-8" => {
            Some(labels!("application/fhir+json;charset=UTF-8"))
        }
        b"application/json+fhir;charset=UTF-8" => {
            Some(labels!("application/json+fhir;charset=UTF-8"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_labels_match_the_built_ones() {
        for version in FhirVersion::ALL {
            for media in [
                "application/fhir+json",
                "application/json+fhir;charset=UTF-8",
            ] {
                assert_eq!(
                    static_label(media.as_bytes(), version).unwrap(),
                    format!("{media}; fhirVersion={}", version.mime_code())
                );
            }
        }
    }

    #[test]
    fn vary_is_merged_without_repeats() {
        let vary = |existing: &[&'static str]| {
            let mut headers = HeaderMap::new();
            for value in existing {
                headers.append(header::VARY, HeaderValue::from_static(value));
            }
            vary_on(&mut headers, &["Accept", "Authorization"]);
            let values: Vec<_> = headers.get_all(header::VARY).iter().cloned().collect();
            values
        };
        assert_eq!(vary(&[]), ["Accept, Authorization"]);
        assert_eq!(vary(&["accept"]), ["accept, Authorization"]);
        assert_eq!(
            vary(&["Origin, accept", "AUTHORIZATION"]),
            ["Origin, accept, AUTHORIZATION"]
        );
        assert_eq!(vary(&["*"]), ["*"]);
        assert_eq!(
            vary(&["Accept-Language"]),
            ["Accept-Language, Accept, Authorization"]
        );
        let mut headers = HeaderMap::new();
        headers.insert(header::VARY, HeaderValue::from_bytes(b"x-\xff").unwrap());
        vary_on(&mut headers, &["Accept"]);
        let values: Vec<_> = headers.get_all(header::VARY).iter().cloned().collect();
        assert_eq!(values.len(), 2);
        assert_eq!(values[0], "Accept");
    }

    #[test]
    fn labels_only_unlabelled_fhir_media_types() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json+fhir;charset=UTF-8"),
        );
        label(&mut headers, FhirVersion::Dstu2);
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "application/json+fhir;charset=UTF-8; fhirVersion=1.0"
        );
        label(&mut headers, FhirVersion::R4);
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "application/json+fhir;charset=UTF-8; fhirVersion=1.0"
        );
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        label(&mut headers, FhirVersion::R4);
        assert_eq!(headers[header::CONTENT_TYPE], "text/html");
    }
}
