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
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Any body: no panic, and a rewrite only ever replaces the base inside URL values.
        #[test]
        fn bundles_rewrite_without_panics(noise in ".{0,120}", links in 0usize..4) {
            let r = BaseRewriter::new("http://ehr/fhir".into(), "https://gw".into());
            let mut body = String::from("{\"resourceType\":\"Bundle\",\"link\":[");
            for i in 0..links {
                if i > 0 { body.push(','); }
                body.push_str(&format!("{{\"url\":\"http://ehr/fhir/Patient/{i}\"}}"));
            }
            body.push_str("],\"note\":");
            body.push_str(&serde_json::to_string(&noise).unwrap());
            body.push('}');
            let _ = r.bundle(noise.as_bytes());
            match r.bundle(body.as_bytes()) {
                Some(out) => {
                    let out: serde_json::Value = serde_json::from_slice(&out).unwrap();
                    for i in 0..links {
                        prop_assert_eq!(out["link"][i]["url"].as_str().unwrap(), format!("https://gw/Patient/{i}"));
                    }
                    prop_assert_eq!(out["note"].as_str().unwrap(), noise.as_str());
                }
                None => prop_assert_eq!(links, 0),
            }
        }
    }
}
