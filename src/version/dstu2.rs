//! DSTU2's own media types: some DSTU2 servers answer 406 to the STU3+ ones, so the proxy
//! speaks theirs to them (`application/json+fhir` for `application/fhir+json`, the same for
//! XML) and answers the client in the form it asked for.

use http::header::{self, Entry as HeaderEntry, HeaderMap, HeaderName, HeaderValue};

use super::media::split_list;

/// The STU3+ media types and their DSTU2 forms.
const DSTU2_MEDIA_TYPES: [(&str, &str); 2] = [
    ("application/fhir+json", "application/json+fhir"),
    ("application/fhir+xml", "application/xml+fhir"),
];

/// The DSTU2 media types and their STU3+ forms: [`DSTU2_MEDIA_TYPES`] the other way round.
const CURRENT_MEDIA_TYPES: [(&str, &str); 2] = [
    (DSTU2_MEDIA_TYPES[0].1, DSTU2_MEDIA_TYPES[0].0),
    (DSTU2_MEDIA_TYPES[1].1, DSTU2_MEDIA_TYPES[1].0),
];

/// Which form of the FHIR media types a client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AskedForm {
    /// The STU3+ form (`application/fhir+json`).
    Current,
    /// Whatever the upstream answers.
    Upstreams,
}

/// Which form of the media types a request's `Accept` asks for: the STU3+ one if any of its
/// ranges names an STU3+ FHIR media type.
pub(crate) fn asked_form(headers: &HeaderMap) -> AskedForm {
    let current = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(split_list)
        .filter_map(|range| range.split(';').next())
        .any(|essence| {
            DSTU2_MEDIA_TYPES
                .iter()
                .any(|(new, _)| essence.trim().eq_ignore_ascii_case(new))
        });
    if current {
        AskedForm::Current
    } else {
        AskedForm::Upstreams
    }
}

/// Puts a request's `Accept` and `Content-Type` in DSTU2's media types.
pub(crate) fn request_to_dstu2(headers: &mut HeaderMap) {
    for name in [header::ACCEPT, header::CONTENT_TYPE] {
        swap_media_types(headers, name, &DSTU2_MEDIA_TYPES);
    }
}

/// Puts a DSTU2 response's `Content-Type` back in the STU3+ media types.
pub(crate) fn response_from_dstu2(headers: &mut HeaderMap) {
    swap_media_types(headers, header::CONTENT_TYPE, &CURRENT_MEDIA_TYPES);
}

/// Replaces media type essences in a header's ranges, keeping their parameters: in every
/// value of the header, each in its place (a client may send `Accept` as several lines; the
/// upstream gets them all). A value that is not text, or has nothing to swap, stays as it is.
fn swap_media_types(headers: &mut HeaderMap, name: HeaderName, swaps: &[(&str, &str)]) {
    let HeaderEntry::Occupied(mut entry) = headers.entry(name) else {
        return;
    };
    // Nothing to swap (a client speaking DSTU2's types already): nothing is written.
    if !entry.iter().any(|value| names_any(value, swaps)) {
        return;
    }
    let values: Vec<HeaderValue> = entry
        .iter()
        .map(|value| swapped(value, swaps).unwrap_or_else(|| value.clone()))
        .collect();
    let mut values = values.into_iter();
    if let Some(first) = values.next() {
        // `insert` drops the other values; each is appended again, in order.
        entry.insert(first);
        for value in values {
            entry.append(value);
        }
    }
}

/// Whether one of `value`'s ranges has an essence `swaps` replaces (read without allocating).
fn names_any(value: &HeaderValue, swaps: &[(&str, &str)]) -> bool {
    let Ok(value) = value.to_str() else {
        return false;
    };
    split_list(value).any(|range| {
        let essence = range.split(';').next().unwrap_or_default().trim();
        swaps
            .iter()
            .any(|(from, _)| essence.eq_ignore_ascii_case(from))
    })
}

/// `value` with the essences `swaps` names replaced, parameters kept; `None` when there is
/// nothing to swap (or it is not text).
fn swapped(value: &HeaderValue, swaps: &[(&str, &str)]) -> Option<HeaderValue> {
    let value = value.to_str().ok()?;
    let mut changed = false;
    let ranges: Vec<String> = split_list(value)
        .map(|range| {
            let (essence, params) = range
                .split_once(';')
                .map_or((range, None), |(e, p)| (e, Some(p)));
            match swaps
                .iter()
                .find(|(from, _)| essence.trim().eq_ignore_ascii_case(from))
            {
                Some((_, to)) => {
                    changed = true;
                    params.map_or_else(|| (*to).to_owned(), |p| format!("{to};{p}"))
                }
                None => range.to_owned(),
            }
        })
        .collect();
    if !changed {
        return None;
    }
    HeaderValue::from_str(&ranges.join(", ")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testing::headers;

    #[test]
    fn dstu2_media_types_swap_keeping_parameters() {
        let mut h = headers(&[
            (
                "accept",
                "application/fhir+json; q=1.0, application/xml+fhir;q=0.9, */*;q=0.1",
            ),
            ("content-type", "application/fhir+json;charset=utf-8"),
        ]);
        assert_eq!(asked_form(&h), AskedForm::Current);
        swap_media_types(&mut h, header::ACCEPT, &DSTU2_MEDIA_TYPES);
        swap_media_types(&mut h, header::CONTENT_TYPE, &DSTU2_MEDIA_TYPES);
        assert_eq!(
            h["accept"],
            "application/json+fhir; q=1.0, application/xml+fhir;q=0.9, */*;q=0.1"
        );
        assert_eq!(h["content-type"], "application/json+fhir;charset=utf-8");
        assert_eq!(
            asked_form(&headers(&[("accept", "application/json+fhir")])),
            AskedForm::Upstreams
        );
        assert_eq!(asked_form(&HeaderMap::new()), AskedForm::Upstreams);
    }

    #[test]
    fn every_value_is_swapped_in_order() {
        let mut h = HeaderMap::new();
        for value in [
            "application/fhir+json; fhirVersion=1.0",
            "text/plain;q=0.2",
            "application/fhir+xml;q=0.5, application/fhir+json;q=0.4",
        ] {
            h.append(header::ACCEPT, HeaderValue::from_static(value));
        }
        // A value that is not text is kept as it is, in its place.
        h.append(header::ACCEPT, HeaderValue::from_bytes(b"x/\xff").unwrap());
        h.append(
            header::ACCEPT,
            HeaderValue::from_static("application/fhir+xml"),
        );
        request_to_dstu2(&mut h);
        let accept: Vec<&[u8]> = h
            .get_all(header::ACCEPT)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        assert_eq!(
            accept,
            [
                b"application/json+fhir; fhirVersion=1.0".as_slice(),
                b"text/plain;q=0.2",
                b"application/xml+fhir;q=0.5, application/json+fhir;q=0.4",
                b"x/\xff",
                b"application/xml+fhir",
            ]
        );
        // Nothing to swap: the values stay, untouched.
        let mut h = HeaderMap::new();
        h.append(header::ACCEPT, HeaderValue::from_static("text/plain"));
        h.append(header::ACCEPT, HeaderValue::from_static("*/*;q=0.1"));
        request_to_dstu2(&mut h);
        let accept: Vec<_> = h.get_all(header::ACCEPT).iter().collect();
        assert_eq!(accept, ["text/plain", "*/*;q=0.1"]);
    }

    #[test]
    fn a_request_goes_to_dstu2_and_its_response_comes_back() {
        let mut h = headers(&[
            ("accept", "application/fhir+xml;q=0.5"),
            ("content-type", "application/fhir+json"),
        ]);
        request_to_dstu2(&mut h);
        assert_eq!(h["accept"], "application/xml+fhir;q=0.5");
        assert_eq!(h["content-type"], "application/json+fhir");
        response_from_dstu2(&mut h);
        assert_eq!(h["content-type"], "application/fhir+json");
        assert_eq!(
            h["accept"], "application/xml+fhir;q=0.5",
            "only Content-Type"
        );
    }
}
