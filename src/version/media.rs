//! Media types and ranges as FHIR uses them: `fhirVersion` parameters, q-values, `_format`.

use super::FhirVersion;

/// What a media range or type says about the FHIR release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Named {
    /// No `fhirVersion` parameter.
    Nothing,
    /// A release this crate knows.
    Version(FhirVersion),
    /// A `fhirVersion` this crate does not know (or two that disagree).
    Unknown,
}

/// The body format a media type stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Json,
    Xml,
    /// `*/*`, `application/*` and other types that take either.
    Any,
    /// Anything else (`text/html`, ...).
    Other,
}

/// One media range of `Accept`, or a `Content-Type`, or a `_format` value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MediaRange {
    pub(crate) essence: String,
    pub(crate) named: Named,
    pub(crate) q: f32,
}

impl MediaRange {
    pub(crate) fn format(&self) -> Format {
        match self.essence.as_str() {
            "application/fhir+json"
            | "application/json+fhir"
            | "application/json"
            | "text/json" => Format::Json,
            "application/fhir+xml" | "application/xml+fhir" | "application/xml" | "text/xml" => {
                Format::Xml
            }
            "*/*" | "application/*" => Format::Any,
            _ => Format::Other,
        }
    }
}

/// Parses one media type or range; `None` when it is not one.
pub(crate) fn parse_media(text: &str) -> Option<MediaRange> {
    let mime: mime::Mime = without_optional_whitespace(text).parse().ok()?;
    let mut named = Named::Nothing;
    let mut q = 1.0;
    for (name, value) in mime.params() {
        match name.as_str() {
            "fhirversion" => {
                let version =
                    FhirVersion::parse(value.as_str()).map_or(Named::Unknown, Named::Version);
                named = match named {
                    Named::Nothing => version,
                    same if same == version => same,
                    _ => Named::Unknown,
                };
            }
            "q" => {
                q = value
                    .as_str()
                    .parse::<f32>()
                    .ok()
                    .filter(|q| (0.0..=1.0).contains(q))
                    .unwrap_or(1.0)
            }
            _ => {}
        }
    }
    Some(MediaRange {
        essence: mime.essence_str().to_owned(),
        named,
        q,
    })
}

/// Parses an `Accept` value: the ranges that parse, best first (stable for equal q);
/// ranges with `q=0` are dropped.
pub(crate) fn parse_accept(value: &str) -> Vec<MediaRange> {
    let mut ranges: Vec<MediaRange> = split_list(value)
        .filter_map(parse_media)
        .filter(|range| range.q > 0.0)
        .collect();
    ranges.sort_by(|a, b| b.q.total_cmp(&a.q));
    ranges
}

/// Parses a `_format` value: `json`, `xml`, or a media type (possibly with `fhirVersion`).
pub(crate) fn parse_format(value: &str) -> Option<MediaRange> {
    let value = value.trim();
    let essence = match value.to_ascii_lowercase().as_str() {
        "json" => "application/fhir+json",
        "xml" => "application/fhir+xml",
        "html" | "text/html" => "text/html",
        _ => return parse_media(value),
    };
    Some(MediaRange {
        essence: essence.to_owned(),
        named: Named::Nothing,
        q: 1.0,
    })
}

/// `type/subtype ; name = value` as `type/subtype;name=value`: RFC 9110 allows whitespace
/// around `;` and real clients send it, but the `mime` crate refuses it.
fn without_optional_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for (i, part) in split_on(text, ';').into_iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        match part.split_once('=') {
            Some((name, value)) if i > 0 => {
                out.push_str(name.trim());
                out.push('=');
                out.push_str(value.trim());
            }
            _ => out.push_str(part.trim()),
        }
    }
    out
}

/// Splits a comma-separated header list, leaving commas inside quoted strings alone.
pub(crate) fn split_list(value: &str) -> impl Iterator<Item = &str> {
    split_on(value, ',')
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// Splits on `separator` outside quoted strings.
fn split_on(value: &str, separator: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn versions(accept: &str) -> Vec<(String, Named)> {
        parse_accept(accept)
            .into_iter()
            .map(|r| (r.essence, r.named))
            .collect()
    }

    #[test]
    fn real_world_accept_headers() {
        // HAPI FHIR's DSTU2 client.
        let hapi_dstu2 = "application/xml+fhir;q=1.0, application/json+fhir;q=1.0";
        assert_eq!(parse_accept(hapi_dstu2).len(), 2);
        // HAPI FHIR's STU3 client.
        let hapi_stu3 = "application/fhir+xml;q=1.0, application/fhir+json;q=1.0, application/xml+fhir;q=0.9, application/json+fhir;q=0.9";
        let ranges = parse_accept(hapi_stu3);
        assert_eq!(ranges[0].essence, "application/fhir+xml");
        assert_eq!(ranges[3].essence, "application/json+fhir");
        // A browser.
        let browser =
            "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8";
        let ranges = parse_accept(browser);
        assert_eq!(ranges.last().unwrap().format(), Format::Any);
        assert!(ranges.iter().all(|r| r.named == Named::Nothing));
    }

    #[test]
    fn fhir_version_parameters_in_odd_case_and_spacing() {
        assert_eq!(
            versions("Application/FHIR+JSON ;  FHIRVersion = \"4.0\" ; q = 0.5, application/fhir+json;fhirVersion=3.0"),
            [
                ("application/fhir+json".to_owned(), Named::Version(FhirVersion::Stu3)),
                ("application/fhir+json".to_owned(), Named::Version(FhirVersion::R4)),
            ]
        );
        assert_eq!(
            versions("application/fhir+json; fhirVersion=9.9")[0].1,
            Named::Unknown
        );
        assert_eq!(
            versions("application/fhir+json; fhirVersion=3.0; fhirVersion=4.0")[0].1,
            Named::Unknown
        );
        assert_eq!(
            versions("application/fhir+json; fhirVersion=4.0.1")[0].1,
            Named::Version(FhirVersion::R4)
        );
    }

    #[test]
    fn q_values_order_and_zero_drops() {
        let ranges = parse_accept("a/b;q=0.1, c/d, e/f;q=0, g/h;q=0.5, i/j;q=banana");
        let order: Vec<_> = ranges.iter().map(|r| r.essence.as_str()).collect();
        assert_eq!(order, ["c/d", "i/j", "g/h", "a/b"]);
    }

    #[test]
    fn garbage_never_panics() {
        for garbage in [
            "",
            ",,,",
            ";;",
            "/",
            "a/",
            "\"",
            "application/fhir+json; fhirVersion=\"3.0",
            "\u{0}",
            "*/*;q=",
            "x/y;fhirVersion",
        ] {
            let _ = parse_accept(garbage);
            let _ = parse_media(garbage);
            let _ = parse_format(garbage);
        }
    }

    #[test]
    fn format_shorthands() {
        assert_eq!(parse_format("json").unwrap().format(), Format::Json);
        assert_eq!(parse_format("XML").unwrap().format(), Format::Xml);
        let range = parse_format("application/fhir+json;fhirVersion=1.0").unwrap();
        assert_eq!(range.named, Named::Version(FhirVersion::Dstu2));
    }

    #[test]
    fn quoted_commas_do_not_split() {
        let parts: Vec<_> = split_list("a/b; x=\"1,2\", c/d").collect();
        assert_eq!(parts, ["a/b; x=\"1,2\"", "c/d"]);
    }
}
