//! Rewriting the upstream's base URL to the gateway's, so links lead back through the gateway.
//!
//! Done on the bytes rather than by re-serializing JSON: everything but the rewritten URLs
//! stays exactly as the upstream sent it (key order, spacing, numbers).

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

/// Rewrites URLs under `from` (the upstream base) to `to` (the gateway's public base).
#[derive(Debug, Clone)]
pub(crate) struct BaseRewriter {
    from: Arc<str>,
    to: Arc<str>,
}

impl BaseRewriter {
    pub(crate) fn new(from: Arc<str>, to: Arc<str>) -> Self {
        Self { from, to }
    }

    /// The URL with its upstream base replaced, or `None` when it is not under that base.
    pub(crate) fn url(&self, url: &str) -> Option<String> {
        let rest = url.strip_prefix(&*self.from)?;
        at_boundary(rest.as_bytes()).then(|| format!("{}{rest}", self.to))
    }

    /// A FHIR JSON Bundle with `link[].url` and `entry[].fullUrl` (any `"url"` or `"fullUrl"`
    /// value) under the upstream base rewritten; `None` when the body is not a JSON Bundle or
    /// holds nothing to rewrite.
    pub(crate) fn bundle(&self, body: &[u8]) -> Option<Bytes> {
        #[derive(Deserialize)]
        struct Probe<'a> {
            #[serde(rename = "resourceType", borrow)]
            resource_type: Option<std::borrow::Cow<'a, str>>,
        }
        // Cheap tests first: most responses are no Bundle (its searcher is built once), or
        // hold no upstream URL.
        let from = self.from.as_bytes();
        find_bundle(body)?;
        find(body, from)?;
        let probe: Probe<'_> = serde_json::from_slice(body).ok()?;
        if probe.resource_type.as_deref() != Some("Bundle") {
            return None;
        }
        let mut out: Vec<u8> = Vec::new();
        let mut copied = 0;
        let mut search = 0;
        while let Some(found) = find(&body[search..], from) {
            let value = search + found;
            let after = value + from.len();
            search = after;
            // A JSON string value starting with the base, after a `"url":` or `"fullUrl":` key.
            let Some(start) = value.checked_sub(1).filter(|&quote| body[quote] == b'"') else {
                continue;
            };
            if !at_boundary(&body[after..]) || !follows_url_key(&body[..start]) {
                continue;
            }
            out.extend_from_slice(&body[copied..value]);
            out.extend_from_slice(self.to.as_bytes());
            copied = after;
        }
        if copied == 0 {
            return None;
        }
        out.extend_from_slice(&body[copied..]);
        Some(Bytes::from(out))
    }
}

/// Whether what follows the base ends it: a path, a query, the end of the string.
fn at_boundary(rest: &[u8]) -> bool {
    matches!(rest.first(), None | Some(b'/' | b'?' | b'"' | b'#'))
}

/// Whether `before` ends with `"url":` or `"fullUrl":` (with optional whitespace).
fn follows_url_key(before: &[u8]) -> bool {
    let trimmed = trim_end(before);
    let Some(trimmed) = trimmed.strip_suffix(b":") else {
        return false;
    };
    let trimmed = trim_end(trimmed);
    trimmed.ends_with(b"\"url\"") || trimmed.ends_with(b"\"fullUrl\"")
}

fn trim_end(mut bytes: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t' | b'\r' | b'\n'] = bytes {
        bytes = rest;
    }
    bytes
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(haystack, needle)
}

/// `"Bundle"`, searched for in every JSON response: its searcher is built once.
fn find_bundle(haystack: &[u8]) -> Option<usize> {
    static BUNDLE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"Bundle\""));
    BUNDLE.find(haystack)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewriter() -> BaseRewriter {
        BaseRewriter::new(
            "http://ehr:9001/fhir/r3".into(),
            "https://gw.example".into(),
        )
    }

    #[test]
    fn rewrites_urls_under_the_base_only() {
        let r = rewriter();
        assert_eq!(
            r.url("http://ehr:9001/fhir/r3/Patient/1").unwrap(),
            "https://gw.example/Patient/1"
        );
        assert_eq!(
            r.url("http://ehr:9001/fhir/r3?_getpages=x").unwrap(),
            "https://gw.example?_getpages=x"
        );
        assert_eq!(
            r.url("http://ehr:9001/fhir/r3").unwrap(),
            "https://gw.example"
        );
        assert_eq!(r.url("http://ehr:9001/fhir/r30/Patient"), None);
        assert_eq!(r.url("http://other/fhir/r3/Patient"), None);
    }

    #[test]
    fn rewrites_bundle_links_and_full_urls_leaving_the_rest_byte_for_byte() {
        let body = br#"{"resourceType":"Bundle","type":"searchset","total":2,
 "link":[{"relation":"self","url":"http://ehr:9001/fhir/r3/Patient?family=x"},
         {"relation":"next", "url" : "http://ehr:9001/fhir/r3?_getpages=abc&_getpagesoffset=10"}],
 "entry":[{"fullUrl":"http://ehr:9001/fhir/r3/Patient/1","resource":{"resourceType":"Patient","id":"1",
   "text":{"div":"see http://ehr:9001/fhir/r3/Patient/1"},
   "extension":[{"url":"http://hl7.org/fhir/ext","valueDecimal":1.50}]}}]}"#;
        let out = rewriter().bundle(body).unwrap();
        let expected = String::from_utf8_lossy(body)
            .replace(
                "\"url\":\"http://ehr:9001/fhir/r3",
                "\"url\":\"https://gw.example",
            )
            .replace(
                "\"url\" : \"http://ehr:9001/fhir/r3",
                "\"url\" : \"https://gw.example",
            )
            .replace(
                "\"fullUrl\":\"http://ehr:9001/fhir/r3",
                "\"fullUrl\":\"https://gw.example",
            );
        assert_eq!(String::from_utf8_lossy(&out), expected);
        assert!(String::from_utf8_lossy(&out).contains("see http://ehr:9001/fhir/r3/Patient/1"));
        assert!(String::from_utf8_lossy(&out).contains("1.50"));
    }

    #[test]
    fn leaves_other_bodies_alone() {
        let r = rewriter();
        assert!(r
            .bundle(br#"{"resourceType":"Patient","url":"http://ehr:9001/fhir/r3/x"}"#)
            .is_none());
        assert!(r.bundle(b"not json").is_none());
        assert!(r
            .bundle(br#"{"resourceType":"Bundle","link":[]}"#)
            .is_none());
    }
}

#[cfg(test)]
mod properties {
    //! Bodies built from what upstream Bundles hold (the upstream base, `"url"`/`"fullUrl"` and
    //! other keys, JSON whitespace, the base inside text and escaped markup), each with the
    //! body the gateway must send on, byte for byte.

    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::HashMap;

    const FROM: &str = "http://ehr:9001/fhir/r3";
    const TO: &str = "https://gw.example";

    fn rewriter() -> BaseRewriter {
        BaseRewriter::new(FROM.into(), TO.into())
    }

    fn select(items: &[&'static str]) -> impl Strategy<Value = &'static str> {
        prop::sample::select(items.to_vec())
    }

    /// What becomes of one occurrence of the upstream base in a Bundle.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    enum Fate {
        /// Starts a `"url"` or `"fullUrl"` string value, followed by a path, query, fragment or
        /// the value's end: rewritten.
        Rewritten,
        /// Starts the string value of another key: kept.
        OtherKey,
        /// Starts a value, but continues the base's last segment (`.../r30`, `...:8080`): kept.
        NotAtBoundary,
        /// Further inside a string (`see http://...`, a query parameter): kept.
        InsideText,
        /// Right after an escaped quote inside a string (`href=\"...`, `\"url\":\"...`): kept.
        AfterEscapedQuote,
    }

    /// The fate of each occurrence of the base in a string value (JSON text, escapes and all).
    fn fates(value: &str, url_key: bool) -> Vec<Fate> {
        value
            .match_indices(FROM)
            .map(|(at, _)| {
                if at > 0 {
                    return if value[..at].ends_with("\\\"") {
                        Fate::AfterEscapedQuote
                    } else {
                        Fate::InsideText
                    };
                }
                let boundary = matches!(
                    value[FROM.len()..].bytes().next(),
                    None | Some(b'/' | b'?' | b'#')
                );
                match (boundary, url_key) {
                    (false, _) => Fate::NotAtBoundary,
                    (true, true) => Fate::Rewritten,
                    (true, false) => Fate::OtherKey,
                }
            })
            .collect()
    }

    /// The string value, as JSON text, with its leading base rewritten when `fates` says so.
    fn rewritten(value: &str, fates: &[Fate]) -> String {
        match fates.first() {
            Some(Fate::Rewritten) => format!("{TO}{}", &value[FROM.len()..]),
            _ => value.to_owned(),
        }
    }

    /// A string value as JSON text: under the base, near it, or holding it further in.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => select(&[
                "", "/", "/Patient/1", "/Patient/1/_history/2", "/Patient?family=x&_count=10",
                "?_getpages=abc&_getpagesoffset=10", "#p",
            ])
            .prop_map(|rest| format!("{FROM}{rest}")),
            1 => select(&["0/Patient/1", "-old/Patient", ".json", "%2FPatient", ":8080/Patient"])
                .prop_map(|rest| format!("{FROM}{rest}")),
            3 => prop::sample::select(vec![
                format!("see {FROM}/Patient/1"),
                format!("{FROM}/Patient?next={FROM}/x"),
                format!("<a href=\\\"{FROM}/Patient/1\\\">Patient 1</a>"),
                format!("\\\"url\\\": \\\"{FROM}/Patient/1\\\""),
                format!("\\\"fullUrl\\\":\\\"{FROM}\\\""),
                "http://ehr:9001/fhir".to_owned(),
                "https://ehr:9001/fhir/r3/Patient/1".to_owned(),
                "HTTP://EHR:9001/fhir/r3/Patient/1".to_owned(),
                "Patient/1".to_owned(),
                "urn:uuid:6f1c0b4e-2d9a-4c7e-9b1a-3e5f7a9c2d4b".to_owned(),
                format!("{TO}/Patient/1"),
            ]),
        ]
    }

    /// JSON text as the upstream sends it and as it must leave the gateway, with the fates
    /// of the base in it.
    #[derive(Debug, Clone, Default)]
    struct Json {
        sent: String,
        expected: String,
        fates: Vec<Fate>,
    }

    impl Json {
        fn same(text: &str) -> Self {
            Self {
                sent: text.to_owned(),
                expected: text.to_owned(),
                fates: Vec::new(),
            }
        }

        fn join(open: &str, items: Vec<Json>, close: &str) -> Self {
            let mut joined = Self::same(open);
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    joined.sent.push(',');
                    joined.expected.push(',');
                }
                joined.sent.push_str(&item.sent);
                joined.expected.push_str(&item.expected);
                joined.fates.extend(item.fates);
            }
            joined.sent.push_str(close);
            joined.expected.push_str(close);
            joined
        }

        fn object(members: Vec<Json>) -> Self {
            Self::join("{", members, "}")
        }

        /// `"key":` and a value that is no string.
        fn member(key: &str, value: Json) -> Self {
            Self::join(&format!("\"{key}\":"), vec![value], "")
        }
    }

    /// A member with a string value (and whitespace around it), under a URL key or another.
    fn string_member() -> impl Strategy<Value = Json> {
        let key = prop_oneof![
            3 => select(&["url", "fullUrl"]),
            2 => select(&[
                "reference", "div", "system", "valueUri", "URL", "fullurl", "Url", "myurl",
                "fullUrl2", "link",
            ]),
        ];
        let space = || select(&["", " ", "  ", "\n    ", "\t", "\r\n"]);
        (space(), key, space(), space(), value()).prop_map(|(lead, key, before, after, value)| {
            let fates = fates(&value, key == "url" || key == "fullUrl");
            let head = format!("{lead}\"{key}\"{before}:{after}\"");
            Json {
                sent: format!("{head}{value}\""),
                expected: format!("{head}{}\"", rewritten(&value, &fates)),
                fates,
            }
        })
    }

    /// An object of fixed members, then generated ones.
    fn object(fixed: Vec<Json>, members: Vec<Json>) -> Json {
        Json::object(fixed.into_iter().chain(members).collect())
    }

    /// A Bundle with `link`s, `entry`s (each with a resource) and members of its own; mostly a
    /// Bundle, else a resource holding the same.
    fn body() -> impl Strategy<Value = (&'static str, Json)> {
        let members = |most: usize| prop::collection::vec(string_member(), 0..=most);
        let entry = (
            select(&["Patient", "Observation", "Bundle"]),
            members(2),
            members(3),
        );
        (
            prop_oneof![6 => Just("Bundle"), 1 => Just("Patient"), 1 => Just("Parameters")],
            any::<bool>(),
            prop::collection::vec(members(2), 0..3),
            prop::collection::vec(entry, 0..3),
            members(2),
        )
            .prop_map(|(resource_type, type_first, links, entries, own)| {
                let type_of = |name: &str| Json::same(&format!("\"resourceType\":\"{name}\""));
                let links = links
                    .into_iter()
                    .map(|members| object(vec![Json::same("\"relation\":\"next\"")], members))
                    .collect();
                let entries = entries
                    .into_iter()
                    .map(|(inner_type, members, resource)| {
                        let resource = object(vec![type_of(inner_type)], resource);
                        object(vec![Json::member("resource", resource)], members)
                    })
                    .collect();
                let mut fixed = vec![
                    Json::same("\"type\":\"searchset\""),
                    Json::member("link", Json::join("[", links, "]")),
                    Json::member("entry", Json::join("[", entries, "]")),
                ];
                // Servers put `resourceType` first, but JSON does not require it.
                if type_first {
                    fixed.insert(0, type_of(resource_type));
                } else {
                    fixed.push(type_of(resource_type));
                }
                (resource_type, object(fixed, own))
            })
    }

    /// What the rewriter must answer for a body: the rewritten bytes, or `None` (no Bundle,
    /// or nothing under the base in a URL value).
    fn expected((resource_type, body): &(&str, Json)) -> Option<String> {
        (*resource_type == "Bundle" && body.fates.contains(&Fate::Rewritten))
            .then(|| body.expected.clone())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Exactly the `"url"`/`"fullUrl"` values under the base are rewritten, and every
        /// other byte is as sent.
        #[test]
        fn bundles_rewrite_exactly_their_url_values(case in body()) {
            let sent = &case.1.sent;
            prop_assert!(serde_json::from_str::<serde_json::Value>(sent).is_ok(), "{}", sent);
            let out = rewriter()
                .bundle(sent.as_bytes())
                .map(|out| String::from_utf8(out.to_vec()).unwrap());
            prop_assert_eq!(out, expected(&case));
        }

        /// A URL (a `Location`, say) is rewritten when it starts with the base at a boundary.
        #[test]
        fn urls_are_rewritten_only_under_the_base(value in value()) {
            let fates = fates(&value, true);
            let expected = (fates.first() == Some(&Fate::Rewritten))
                .then(|| rewritten(&value, &fates));
            prop_assert_eq!(rewriter().url(&value), expected);
        }

        /// Any text (with the base and URL keys in it) in a Bundle's string: no panic, the
        /// links rewritten, the text kept.
        #[test]
        fn text_holding_the_base_is_kept(
            pieces in prop::collection::vec(
                prop_oneof![
                    Just(FROM.to_owned()), Just("\"url\":".to_owned()),
                    Just("\"fullUrl\" : ".to_owned()), Just("\"".to_owned()),
                    Just("\\".to_owned()), Just("/".to_owned()), ".{0,10}",
                ],
                0..12,
            ),
            links in 0usize..4,
        ) {
            let noise: String = pieces.concat();
            let r = rewriter();
            let mut body = String::from("{\"resourceType\":\"Bundle\",\"link\":[");
            for i in 0..links {
                if i > 0 { body.push(','); }
                body.push_str(&format!("{{\"url\":\"{FROM}/Patient/{i}\"}}"));
            }
            body.push_str("],\"note\":");
            body.push_str(&serde_json::to_string(&noise).unwrap());
            body.push('}');
            let _ = r.bundle(noise.as_bytes());
            match r.bundle(body.as_bytes()) {
                Some(out) => {
                    let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
                    for i in 0..links {
                        let url = out["link"][i]["url"].as_str().unwrap();
                        prop_assert_eq!(url, format!("{TO}/Patient/{i}"));
                    }
                    prop_assert_eq!(out["note"].as_str().unwrap(), noise.as_str());
                }
                None => prop_assert_eq!(links, 0),
            }
        }
    }

    /// The generated bodies reach every path of [`BaseRewriter::bundle`]: counts over a fixed
    /// sample (`--nocapture` shows them).
    #[test]
    fn the_generated_bodies_reach_every_path() {
        let mut runner = TestRunner::deterministic();
        let strategy = body();
        let mut fates: HashMap<Fate, usize> = HashMap::new();
        let (mut rewritten, mut nothing_to_rewrite, mut no_bundle) = (0, 0, 0);
        const SAMPLE: usize = 256;
        for _ in 0..SAMPLE {
            let case = strategy.new_tree(&mut runner).unwrap().current();
            let (resource_type, body) = &case;
            let holds_base = !body.fates.is_empty();
            match (*resource_type == "Bundle", expected(&case).is_some()) {
                (true, true) => rewritten += 1,
                (true, false) if holds_base => nothing_to_rewrite += 1,
                (false, _) if holds_base => no_bundle += 1,
                _ => {}
            }
            if *resource_type == "Bundle" {
                for fate in &body.fates {
                    *fates.entry(*fate).or_default() += 1;
                }
            }
        }
        eprintln!(
            "of {SAMPLE} bodies: {rewritten} rewritten, {nothing_to_rewrite} Bundles holding the \
             base with nothing to rewrite, {no_bundle} other resources holding it; occurrences \
             of the base in Bundles: {fates:?}"
        );
        assert!(rewritten >= SAMPLE / 4, "{rewritten}");
        assert!(nothing_to_rewrite >= 5, "{nothing_to_rewrite}");
        assert!(no_bundle >= 10, "{no_bundle}");
        for fate in [
            Fate::Rewritten,
            Fate::OtherKey,
            Fate::NotAtBoundary,
            Fate::InsideText,
            Fate::AfterEscapedQuote,
        ] {
            assert!(
                fates.get(&fate).copied().unwrap_or(0) >= 50,
                "{fate:?}: {fates:?}"
            );
        }
    }
}
