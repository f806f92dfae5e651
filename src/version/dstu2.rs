//! DSTU2's own media types: some DSTU2 servers answer 406 to the STU3+ ones, so the proxy
//! speaks theirs to them (`application/json+fhir` for `application/fhir+json`, the same for
//! XML) and answers the client in the form it asked for.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

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

/// Replaces media type essences in a header's ranges, keeping their parameters.
fn swap_media_types(headers: &mut HeaderMap, name: HeaderName, swaps: &[(&str, &str)]) {
    let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
        return;
    };
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
    if changed {
        if let Ok(value) = HeaderValue::from_str(&ranges.join(", ")) {
            headers.insert(name, value);
        }
    }
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
