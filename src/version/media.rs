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

/// One media range of `Accept`, or a `Content-Type`, or a `_format` value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MediaRange {
    pub(crate) essence: String,
    pub(crate) named: Named,
    pub(crate) q: f32,
}

/// Parses one media type or range; `None` when it is not one.
///
/// By hand rather than with the `mime` crate, which was tried: it refuses the whitespace
/// around `;` that RFC 9110 allows and real clients send, and allocates per parameter on a
/// path every request takes.
pub(crate) fn parse_media(text: &str) -> Option<MediaRange> {
    let (essence, named, q) = parse_parts(text)?;
    Some(MediaRange {
        essence: essence.to_ascii_lowercase(),
        named,
        q,
    })
}

/// A media range's essence (as written), named release and q-value, without allocating.
pub(crate) fn parse_parts(text: &str) -> Option<(&str, Named, f32)> {
    let mut parts = text.split(';');
    let essence = parts.next()?.trim();
    let (kind, subtype) = essence.split_once('/')?;
    if !is_token(kind) || !is_token(subtype) {
        return None;
    }
    let mut named = Named::Nothing;
    let mut q = 1.0;
    for parameter in parts {
        let (name, value) = parameter.split_once('=')?;
        let (name, value) = (name.trim(), value.trim());
        if !is_token(name) {
            return None;
        }
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        if name.eq_ignore_ascii_case("fhirversion") {
            let version = FhirVersion::parse(value).map_or(Named::Unknown, Named::Version);
            named = match named {
                Named::Nothing => version,
                same if same == version => same,
                _ => Named::Unknown,
            };
        } else if name.eq_ignore_ascii_case("q") {
            q = value
                .parse::<f32>()
                .ok()
                .filter(|q| (0.0..=1.0).contains(q))
                .unwrap_or(1.0);
        }
    }
    Some((essence, named, q))
}

/// The media range clients send to name a release, recognised without parsing: exactly
/// `application/fhir+json; fhirVersion=X.Y` or `application/json+fhir; fhirVersion=X.Y`
/// (with or without the space) and a MIME code this crate knows. `None` sends the value to
/// [`parse_parts`], which agrees wherever this answers (a property test checks).
pub(crate) fn exact_named_json(value: &[u8]) -> Option<FhirVersion> {
    let rest = value
        .strip_prefix(b"application/fhir+json;")
        .or_else(|| value.strip_prefix(b"application/json+fhir;"))?;
    let rest = rest.strip_prefix(b" ").unwrap_or(rest);
    let code = rest.strip_prefix(b"fhirVersion=")?;
    FhirVersion::ALL
        .into_iter()
        .find(|v| v.mime_code().as_bytes() == code)
}

/// RFC 9110 `token`.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether a header value may name a release at all (a quick test before parsing): it holds
/// `fhirversion` in any case.
pub(crate) fn mentions_version(value: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"fhirversion";
    // Find each `v`/`V` fast, then compare around it.
    memchr::memchr2_iter(b'v', b'V', value).any(|at| {
        at >= 4
            && value
                .get(at - 4..at - 4 + NEEDLE.len())
                .is_some_and(|window| window.eq_ignore_ascii_case(NEEDLE))
    })
}

/// Whether a header value may ask for XML (a quick test before parsing): it holds `xml` in
/// any case.
pub(crate) fn mentions_xml(value: &[u8]) -> bool {
    memchr::memchr2_iter(b'x', b'X', value).any(|at| {
        value
            .get(at..at + 3)
            .is_some_and(|window| window.eq_ignore_ascii_case(b"xml"))
    })
}

/// Whether a media type's essence (lower case) is one FHIR reads as XML.
pub(crate) fn is_xml_type(essence: &str) -> bool {
    matches!(
        essence,
        "application/fhir+xml" | "application/xml+fhir" | "application/xml" | "text/xml"
    )
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

/// Splits a comma-separated header list, leaving commas inside quoted strings alone.
pub(crate) fn split_list(value: &str) -> impl Iterator<Item = &str> {
    split_on(value, ',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// Splits on `separator` outside quoted strings.
fn split_on(value: &str, separator: char) -> SplitOutsideQuotes<'_> {
    SplitOutsideQuotes {
        rest: Some(value),
        separator,
    }
}

/// The iterator of [`split_on`]: no allocation, it runs on every request's `Accept`.
struct SplitOutsideQuotes<'a> {
    rest: Option<&'a str>,
    separator: char,
}

impl<'a> Iterator for SplitOutsideQuotes<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let value = self.rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in value.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                c if c == self.separator && !quoted => {
                    self.rest = Some(&value[i + c.len_utf8()..]);
                    return Some(&value[..i]);
                }
                _ => {}
            }
        }
        self.rest = None;
        Some(value)
    }
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
        assert_eq!(ranges.last().unwrap().essence, "*/*");
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
        assert_eq!(
            parse_format("json").unwrap().essence,
            "application/fhir+json"
        );
        assert_eq!(parse_format("XML").unwrap().essence, "application/fhir+xml");
        let range = parse_format("application/fhir+json;fhirVersion=1.0").unwrap();
        assert_eq!(range.named, Named::Version(FhirVersion::Dstu2));
    }

    #[test]
    fn mentions_xml_in_any_case() {
        assert!(mentions_xml(b"application/fhir+xml"));
        assert!(mentions_xml(b"TEXT/XML;q=0.5"));
        assert!(mentions_xml(b"x, application/xMl"));
        assert!(!mentions_xml(b"application/fhir+json, */*;q=0.1"));
        assert!(!mentions_xml(b"application/x-ml, xm"));
        assert!(!mentions_xml(b""));
    }

    #[test]
    fn mentions_version_in_any_case() {
        assert!(mentions_version(b"application/fhir+json; fhirVersion=3.0"));
        assert!(mentions_version(b"x/y;FHIRVERSION=4.0"));
        assert!(!mentions_version(b"application/fhir+json;q=0.9, */*"));
        assert!(!mentions_version(b"v"));
        assert!(!mentions_version(b"fhirversio"));
    }

    #[test]
    fn exact_named_json_reads_the_common_forms_only() {
        for version in FhirVersion::ALL {
            for form in [
                "application/fhir+json; fhirVersion=",
                "application/fhir+json;fhirVersion=",
                "application/json+fhir; fhirVersion=",
                "application/json+fhir;fhirVersion=",
            ] {
                let value = format!("{form}{}", version.mime_code());
                assert_eq!(exact_named_json(value.as_bytes()), Some(version), "{value}");
            }
        }
        // Anything else is left to the parser.
        for other in [
            "application/fhir+json",
            "application/fhir+json; fhirVersion=3.0.2",
            "application/fhir+json; fhirVersion=9.9",
            "application/fhir+json; fhirVersion=3.0; q=0.5",
            "application/fhir+json; fhirVersion=3.0, */*",
            "application/fhir+json; fhirVersion=\"3.0\"",
            "application/fhir+json;  fhirVersion=3.0",
            "Application/FHIR+JSON; fhirVersion=3.0",
            "application/fhir+xml; fhirVersion=3.0",
        ] {
            assert_eq!(exact_named_json(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn quoted_commas_do_not_split() {
        let parts: Vec<_> = split_list("a/b; x=\"1,2\", c/d").collect();
        assert_eq!(parts, ["a/b; x=\"1,2\"", "c/d"]);
    }
}

#[cfg(test)]
mod properties {
    //! Header values built from the pieces clients send (FHIR media types in any case,
    //! `fhirVersion` and other parameters, quoting, whitespace, lists), weighted so that many
    //! are the exact form [`exact_named_json`] answers and many more miss it by one piece.

    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    fn select(items: &[&'static str]) -> impl Strategy<Value = &'static str> {
        prop::sample::select(items.to_vec())
    }

    /// A parameter name: `fhirVersion` mostly, else in another case or spacing, else another
    /// name (some of them close).
    fn name() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            6 => Just("fhirVersion"),
            1 => select(&[
                "fhirversion", "FHIRVERSION", "FhirVersion", "fhirVersion ", " fhirVersion",
                "xfhirVersion",
            ]),
            1 => select(&["q", "charset", "fhirVersio", "fhir-version", "fhirVersi0n"]),
        ]
    }

    fn equals() -> impl Strategy<Value = &'static str> {
        prop_oneof![6 => Just("="), 1 => select(&[" =", "= ", " = ", ""])]
    }

    /// A parameter value: a release's MIME code mostly, else another version spelling, a
    /// quoted string (closed or not), a q-value, another parameter's value.
    fn value() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            6 => select(&["1.0", "3.0", "4.0", "4.3", "5.0"]),
            1 => select(&[
                "4.0.1", "3.0.2", "1.0.2", "4.3.0", "5.0.0-snapshot1", "\"4.0\"", "\"4.0", "4.0\"",
                "9.9", "", "0.5", "0", "1", "R4", "dstu2", "utf-8", "\"a,b\"", "\"a\\\"b\"",
                "\"x;fhirVersion=3.0\"", "4.0 ",
            ]),
        ]
    }

    /// One media range: each piece the fast path's form six times in seven, else a near miss.
    fn range() -> impl Strategy<Value = String> {
        let essence = prop_oneof![
            6 => select(&["application/fhir+json", "application/json+fhir"]),
            1 => select(&[
                "Application/FHIR+JSON", "application/fhir+xml", "application/xml+fhir", "*/*",
                "application/*", "text/html", "x/y", "application", " application/fhir+json", "",
            ]),
        ];
        let separator = prop_oneof![
            6 => select(&[";", "; "]),
            1 => select(&[" ;", ";  ", " ; ", ";\t", ""]),
        ];
        let rest = prop_oneof![
            6 => Just(""),
            1 => select(&[
                "; q=0.5", ";q=0", "; q=1", "; charset=utf-8", "; fhirVersion=3.0",
                ";fhirversion=4.0", " ", ";", "x",
            ]),
        ];
        (essence, separator, name(), equals(), value(), rest).prop_map(|pieces| {
            let (essence, separator, name, equals, value, rest) = pieces;
            format!("{essence}{separator}{name}{equals}{value}{rest}")
        })
    }

    /// A parameter alone, as a misguided client may send it (and `fhirVersion` at the very
    /// start of a value).
    fn bare_parameter() -> impl Strategy<Value = String> {
        (name(), equals(), value())
            .prop_map(|(name, equals, value)| format!("{name}{equals}{value}"))
    }

    /// An `Accept` or `Content-Type` value: one range mostly, else a list.
    fn header() -> impl Strategy<Value = String> {
        let list = prop::collection::vec((range(), select(&[",", ", ", " , ", ",,"])), 2..4)
            .prop_map(|ranges| {
                let mut value = String::new();
                for (i, (range, comma)) in ranges.into_iter().enumerate() {
                    if i > 0 {
                        value.push_str(comma);
                    }
                    value.push_str(&range);
                }
                value
            });
        prop_oneof![6 => range(), 2 => list, 1 => bare_parameter()]
    }

    /// The form [`exact_named_json`] documents, checked piece by piece.
    fn is_exact_form(value: &str) -> bool {
        let Some(rest) = ["application/fhir+json;", "application/json+fhir;"]
            .into_iter()
            .find_map(|essence| value.strip_prefix(essence))
        else {
            return false;
        };
        let rest = rest.strip_prefix(' ').unwrap_or(rest);
        rest.strip_prefix("fhirVersion=")
            .is_some_and(|code| FhirVersion::ALL.iter().any(|v| v.mime_code() == code))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// No header value makes the parsers panic, and what they return is sane.
        #[test]
        fn any_header_parses_without_panic(value in ".{0,200}") {
            for range in parse_accept(&value) {
                prop_assert!(range.q > 0.0 && range.q <= 1.0);
            }
            let _ = parse_media(&value);
            let _ = parse_format(&value);
            if let Some(version) = exact_named_json(value.as_bytes()) {
                prop_assert_eq!(parse_parts(&value).map(|(_, named, q)| (named, q)),
                    Some((Named::Version(version), 1.0)));
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The shortcuts agree with the parser: [`exact_named_json`] answers exactly for its
        /// documented form, and then the parser reads one range naming the same release with
        /// q=1; [`mentions_version`] is a case-insensitive search for `fhirversion`, and where
        /// it finds none the parser finds no release either (so skipping the parse is sound).
        #[test]
        fn the_fast_paths_agree_with_the_parser(value in header()) {
            let bytes = value.as_bytes();
            let parsed: Vec<_> = split_list(&value).map(parse_parts).collect();
            prop_assert_eq!(exact_named_json(bytes).is_some(), is_exact_form(&value));
            if let Some(version) = exact_named_json(bytes) {
                let essence = value.split(';').next().unwrap();
                prop_assert_eq!(&parsed, &vec![Some((essence, Named::Version(version), 1.0))]);
                let ranges = parse_accept(&value);
                prop_assert_eq!(ranges.len(), 1);
                prop_assert_eq!(ranges[0].named, Named::Version(version));
            }
            let mentions = mentions_version(bytes);
            prop_assert_eq!(mentions, value.to_ascii_lowercase().contains("fhirversion"));
            if !mentions {
                for (_, named, _) in parsed.iter().flatten() {
                    prop_assert_eq!(*named, Named::Nothing);
                }
            }
            for range in parse_accept(&value) {
                prop_assert!(range.q > 0.0 && range.q <= 1.0);
            }
            let _ = parse_media(&value);
            let _ = parse_format(&value);
        }
    }

    /// The generated values reach both sides of both shortcuts: counts over a fixed sample
    /// (`--nocapture` shows them).
    #[test]
    fn the_generated_headers_reach_the_fast_paths() {
        let mut runner = TestRunner::deterministic();
        let strategy = header();
        const SAMPLE: usize = 512;
        let (mut exact, mut near_miss, mut parsed_release, mut unmentioned) = (0, 0, 0, 0);
        for _ in 0..SAMPLE {
            let value = strategy.new_tree(&mut runner).unwrap().current();
            let names_release = split_list(&value)
                .filter_map(parse_parts)
                .any(|(_, named, _)| matches!(named, Named::Version(_)));
            if exact_named_json(value.as_bytes()).is_some() {
                exact += 1;
            } else if mentions_version(value.as_bytes()) {
                near_miss += 1;
                parsed_release += usize::from(names_release);
            } else {
                unmentioned += 1;
            }
        }
        eprintln!(
            "of {SAMPLE} values: {exact} in the fast path's form, {near_miss} mentioning \
             fhirVersion otherwise ({parsed_release} of them naming a release the parser \
             reads), {unmentioned} not mentioning it"
        );
        assert!(exact >= SAMPLE / 8, "{exact}");
        assert!(near_miss >= SAMPLE / 4, "{near_miss}");
        assert!(parsed_release >= SAMPLE / 8, "{parsed_release}");
        assert!(unmentioned >= SAMPLE / 20, "{unmentioned}");
    }
}
