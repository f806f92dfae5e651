//! The upstream request target: the client's path under the upstream's base path, the query
//! byte for byte, and nothing that could step out of the base.

use http::uri::{PathAndQuery, Uri};
use percent_encoding::percent_decode;

use crate::route::UpstreamBase;

/// Why a request path cannot be forwarded; safe to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UnsafePath(pub(crate) &'static str);

/// The path and query to send upstream for a request whose target is `target`: the base path
/// in front (the origin form an HTTP/1.1 request line carries; [`absolute`] adds the rest).
///
/// Only the path and query of `target` are used: an absolute-form target
/// (`GET http://other/...`) cannot change the destination. Dot segments (also percent-encoded,
/// also with `;` parameters, as in `..;`, and the look-alikes some servers trim to one: `...`,
/// `.. `), a `%` that does not begin a percent-encoded byte (IIS reads `%u002e` as `.`),
/// encoded slashes or backslashes inside a segment, and encoded NULs are refused: they could
/// lead out of the tenant's base path on the upstream; and so are path parameters (any `;`),
/// which some upstreams drop before routing. Runs of slashes are merged (`//host/x`
/// would be a network path to some upstreams).
pub(crate) fn upstream_path(base: &UpstreamBase, target: &Uri) -> Result<PathAndQuery, UnsafePath> {
    let path = target.path();
    if let Some(why) = not_a_path(path) {
        return Err(why);
    }
    let scanned = scan(path.as_bytes());
    check_segments(path, &scanned)?;
    let merged;
    let path = if scanned.double_slash {
        // Empty segments name nothing in FHIR, and a path that begins `//` is a network path
        // to some upstreams (Node's `new URL(target, base)`): runs of slashes are merged, as
        // nginx's `merge_slashes` does.
        merged = merge_slashes(path);
        merged.as_str()
    } else {
        path
    };
    let query = target.query();
    let mut joined =
        String::with_capacity(base.path().len() + path.len() + query.map_or(0, |q| q.len() + 1));
    joined.push_str(base.path());
    if path.is_empty() || path == "/" {
        joined.push('/');
    } else {
        if !path.starts_with('/') {
            joined.push('/');
        }
        joined.push_str(path);
    }
    if let Some(query) = query {
        joined.push('?');
        joined.push_str(query);
    }
    PathAndQuery::try_from(joined)
        .map_err(|_| UnsafePath("The request path is not a valid URI path"))
}

/// Why a request whose target has `path` names no resource, if it does not: the asterisk
/// form (`OPTIONS *` asks of the server, not of a resource: under a base path it would become
/// one, `/fhir/*`) and the authority form (`host:port`, for `CONNECT` alone; its path is
/// empty, and would become the base's). An origin- or absolute-form target's path begins
/// with `/`.
pub(crate) fn not_a_path(path: &str) -> Option<UnsafePath> {
    if path.starts_with('/') {
        return None;
    }
    Some(UnsafePath(match path {
        "*" => {
            "The request target * asks of the server itself (as OPTIONS *), not of a FHIR \
                resource: it is not forwarded"
        }
        "" => {
            "The request target names a host and port but no path (the authority form, \
               which only CONNECT uses): send the resource's path"
        }
        _ => "The request target is not a path",
    }))
}

/// The whole URI on the upstream for a request whose target is `target`.
#[cfg(test)]
pub(crate) fn upstream_uri(base: &UpstreamBase, target: &Uri) -> Result<Uri, UnsafePath> {
    absolute(base, upstream_path(base, target)?)
}

/// `path` on the upstream: its scheme and authority in front.
pub(crate) fn absolute(base: &UpstreamBase, path: PathAndQuery) -> Result<Uri, UnsafePath> {
    Uri::builder()
        .scheme(base.scheme().clone())
        .authority(base.authority().clone())
        .path_and_query(path)
        .build()
        .map_err(|_| UnsafePath("The request path is not a valid URI path"))
}

/// `path` with each run of slashes made one.
fn merge_slashes(path: &str) -> String {
    let mut merged = String::with_capacity(path.len());
    for c in path.chars() {
        if c != '/' || !merged.ends_with('/') {
            merged.push(c);
        }
    }
    merged
}

/// What one pass over a path's bytes found: what the checks and the merging of slashes need
/// to know, each of which took a pass of its own.
#[derive(Default)]
struct Scanned {
    beyond_ascii: bool,
    semicolon: bool,
    /// A `%`, `.` or `\`: what a dangerous segment needs.
    special: bool,
    double_slash: bool,
}

/// Each byte's class for [`scan`]: 0 nothing to note.
static CLASSES: [u8; 256] = {
    let mut classes = [0u8; 256];
    classes[b'%' as usize] = 1;
    classes[b'.' as usize] = 1;
    classes[b'\\' as usize] = 1;
    classes[b'/' as usize] = 2;
    classes[b';' as usize] = 3;
    let mut high = 0x80;
    while high < 256 {
        classes[high] = 4;
        high += 1;
    }
    classes
};

fn scan(path: &[u8]) -> Scanned {
    let mut scanned = Scanned::default();
    let mut after_slash = false;
    for &byte in path {
        match CLASSES[usize::from(byte)] {
            0 => {}
            1 => scanned.special = true,
            2 => {
                scanned.double_slash |= after_slash;
                after_slash = true;
                continue;
            }
            3 => scanned.semicolon = true,
            _ => scanned.beyond_ascii = true,
        }
        after_slash = false;
    }
    scanned
}

fn check_segments(path: &str, scanned: &Scanned) -> Result<(), UnsafePath> {
    // Bytes beyond ASCII sent as they are (the request line's parser takes them): a fullwidth
    // `．．` is `..` to a server that normalises Unicode. A FHIR path has no use for them.
    if scanned.beyond_ascii {
        return Err(UnsafePath(
            "Bytes beyond ASCII are not allowed in the request path",
        ));
    }
    // Path parameters (`/Patient;x=1/1`): servlet containers and Spring drop them before
    // routing, so such an upstream serves `Patient/1` for what the gateway, its SMART checks
    // and its audit record read as no FHIR interaction at all. FHIR's names and ids hold no
    // `;` (an encoded one, `%3B`, stays data to those servers).
    if scanned.semicolon {
        return Err(UnsafePath(
            "Path parameters (a ; in the path) are not allowed in the request path",
        ));
    }
    // Most paths hold none of the bytes a dangerous segment needs.
    if !scanned.special {
        return Ok(());
    }
    for raw in path.split('/') {
        if !raw.contains('%') && !raw.contains('.') && !raw.contains('\\') {
            continue;
        }
        check_escapes(raw.as_bytes())?;
        let decoded = percent_decode(raw.as_bytes()).collect::<Vec<u8>>();
        check_segment(&decoded)?;
        // An upstream that decodes twice (or three times) would see `%252e%252e` as `..`; a
        // FHIR path has no use for an encoded `%`.
        if decoded.contains(&b'%') {
            return Err(UnsafePath(
                "An encoded % is not allowed in the request path",
            ));
        }
        // Nor for bytes beyond ASCII: an overlong `%c0%ae` is `.` to a lax UTF-8 decoder, a
        // fullwidth `%ef%bc%8e` to a server that normalises Unicode.
        if !decoded.is_ascii() {
            return Err(UnsafePath(
                "Encoded bytes beyond ASCII are not allowed in the request path",
            ));
        }
    }
    Ok(())
}

/// Refuses a `%` not followed by two hex digits: servers differ on what it means (IIS reads
/// `%u002e` as `.`).
fn check_escapes(segment: &[u8]) -> Result<(), UnsafePath> {
    for at in memchr::memchr_iter(b'%', segment) {
        let escape = segment.get(at + 1..at + 3);
        if !escape.is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
            return Err(UnsafePath(
                "A % in the request path must begin a percent-encoded byte (% and two hex digits)",
            ));
        }
    }
    Ok(())
}

/// Refuses a decoded segment holding a slash, backslash or NUL, or naming `.` or `..` (or
/// nothing but dots and spaces).
fn check_segment(decoded: &[u8]) -> Result<(), UnsafePath> {
    if decoded.contains(&b'/') || decoded.contains(&b'\\') {
        return Err(UnsafePath(
            "Encoded slashes are not allowed in the request path",
        ));
    }
    if decoded.contains(&0) {
        return Err(UnsafePath(
            "Encoded NUL bytes are not allowed in the request path",
        ));
    }
    // `..;jsessionid` is `..` to some servlet containers, and `..%3f` or `..%23` to a server
    // that decodes the path and parses it again; Windows servers trim a segment's trailing
    // dots and spaces (`...`, `.. ` are `..` there, or nothing), Java's `trim()` every
    // control character (`..%09`); a server that decodes a path as a form reads `+` as a
    // space (`..+`). FHIR's names and ids hold no `+`.
    let name = decoded
        .split(|&b| matches!(b, b';' | b'?' | b'#'))
        .next()
        .unwrap_or_default();
    if !name.is_empty() && name.iter().all(|&b| b == b'.' || b == b'+' || b <= b' ') {
        return Err(UnsafePath(
            "Dot segments are not allowed in the request path",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(base: &str, target: &str) -> Result<String, UnsafePath> {
        let base = UpstreamBase::parse(base).unwrap();
        upstream_uri(&base, &target.parse().unwrap()).map(|u| u.to_string())
    }

    #[test]
    fn joins_under_the_base_path_keeping_the_query_byte_for_byte() {
        assert_eq!(
            join("http://ehr:9001/fhir/r3", "/Patient/123").unwrap(),
            "http://ehr:9001/fhir/r3/Patient/123"
        );
        assert_eq!(
            join(
                "http://ehr:9001/fhir",
                "/Observation?patient=1&category=vital-signs&_sort:desc=date"
            )
            .unwrap(),
            "http://ehr:9001/fhir/Observation?patient=1&category=vital-signs&_sort:desc=date"
        );
        assert_eq!(
            join(
                "http://ehr:9001/fhir",
                "/Patient?family:contains=O%27Brien&name=a%20b&x=%2F"
            )
            .unwrap(),
            "http://ehr:9001/fhir/Patient?family:contains=O%27Brien&name=a%20b&x=%2F"
        );
        assert_eq!(
            join("http://ehr:9001/fhir", "/").unwrap(),
            "http://ehr:9001/fhir/"
        );
        assert_eq!(
            join("http://ehr:9001", "/metadata").unwrap(),
            "http://ehr:9001/metadata"
        );
        assert_eq!(
            join("http://ehr:9001/fhir", "/Patient/a.b").unwrap(),
            "http://ehr:9001/fhir/Patient/a.b"
        );
    }

    #[test]
    fn an_absolute_form_target_cannot_change_the_destination() {
        assert_eq!(
            join("http://ehr:9001/fhir", "http://evil.example/Patient/1").unwrap(),
            "http://ehr:9001/fhir/Patient/1"
        );
    }

    #[test]
    fn ordinary_fhir_paths_pass_as_they_are() {
        for (target, forwarded) in [
            ("/Patient/", "http://ehr:9001/fhir/Patient/"),
            (
                "/Patient/a.b-1/_history/2",
                "http://ehr:9001/fhir/Patient/a.b-1/_history/2",
            ),
            ("/Binary/x%20y", "http://ehr:9001/fhir/Binary/x%20y"),
            (
                "/Patient?name=%zz&x=..",
                "http://ehr:9001/fhir/Patient?name=%zz&x=..",
            ),
        ] {
            assert_eq!(join("http://ehr:9001/fhir", target).unwrap(), forwarded);
        }
    }

    #[test]
    fn one_pass_finds_what_each_check_needs() {
        let flags = |path: &str| {
            let s = scan(path.as_bytes());
            (s.beyond_ascii, s.semicolon, s.special, s.double_slash)
        };
        assert_eq!(flags("/Patient/123"), (false, false, false, false));
        assert_eq!(flags("/Patient/a.b"), (false, false, true, false));
        assert_eq!(flags("/Patient/%41"), (false, false, true, false));
        assert_eq!(flags("/a\\b"), (false, false, true, false));
        assert_eq!(flags("/a//b"), (false, false, false, true));
        assert_eq!(flags("//"), (false, false, false, true));
        assert_eq!(flags("/a/./b/"), (false, false, true, false));
        assert_eq!(flags("/a/.//b"), (false, false, true, true));
        assert_eq!(flags("/a;b"), (false, true, false, false));
        assert_eq!(flags("/\u{e9}"), (true, false, false, false));
    }

    #[test]
    fn path_parameters_are_refused_and_an_encoded_semicolon_is_data() {
        for target in [
            "/Patient;name=x/1",
            "/Patient/1;x",
            "/;/Patient/1",
            "/Patient/1/_history;v=2",
        ] {
            assert_eq!(
                join("http://ehr:9001/fhir", target),
                Err(UnsafePath(
                    "Path parameters (a ; in the path) are not allowed in the request path"
                )),
                "{target}"
            );
        }
        assert_eq!(
            join("http://ehr:9001/fhir", "/Binary/a%3Bb?x=1;2").unwrap(),
            "http://ehr:9001/fhir/Binary/a%3Bb?x=1;2"
        );
    }

    #[test]
    fn asterisk_and_authority_targets_are_no_path_to_forward() {
        let base = UpstreamBase::parse("http://ehr:9001/fhir").unwrap();
        for (target, says) in [("*", "OPTIONS *"), ("ehr:9002", "only CONNECT uses")] {
            let target: Uri = target.parse().unwrap();
            let refused = upstream_path(&base, &target).unwrap_err();
            assert!(refused.0.contains(says), "{target}: {}", refused.0);
        }
        assert_eq!(Uri::from_static("ehr:9002").path(), "");
        // An absolute-form target's path is never empty.
        assert_eq!(Uri::from_static("http://ehr:9002").path(), "/");
        assert!(not_a_path("/").is_none());
    }

    #[test]
    fn runs_of_slashes_are_merged() {
        assert_eq!(
            join("http://ehr:9001", "//evil.example/x").unwrap(),
            "http://ehr:9001/evil.example/x"
        );
        assert_eq!(
            join("http://ehr:9001/fhir", "//Patient//1?a=b//c").unwrap(),
            "http://ehr:9001/fhir/Patient/1?a=b//c"
        );
    }

    #[test]
    fn traversal_is_refused_in_every_spelling() {
        for target in [
            "/../other/Patient",
            "/Patient/../../other",
            "/Patient/./1",
            "/%2e%2e/other",
            "/%2E%2E/other",
            "/.%2e/other",
            "/Patient/%2e",
            "/Patient%2F..%2Fother",
            "/Patient%2f1",
            "/..;/other",
            "/Patient/..%3Bx/y",
            "/Patient%5c..%5cother",
            "/Patient%00",
            "/Patient\\..\\other",
            // Encoded twice, for an upstream that decodes twice.
            "/%252e%252e/other",
            "/%252E./other",
            "/Patient%252f..%252fother",
            "/Patient%255c..",
            "/Patient%2500",
            // Look-alikes that some servers read as `..`, and network paths.
            "/%u002e%u002e/other",
            "/Patient/%u002E",
            "/..%20/other",
            "/..+/other",
            "/.+./other",
            "/..%2b/other",
            "/.../other",
            "/%2e%2e%2e/other",
            "/Patient/.%20",
            "/Patient/%2",
            "/Patient/%zz",
            "/%25u002e%25u002e/other",
            // Encoded three times; trimmed as control characters; cut at a `?` or `#` that a
            // server decoding and parsing the path again would see; overlong UTF-8 and a
            // fullwidth full stop.
            "/%25252e%25252e/other",
            "/..%09/other",
            "/..%0d/other",
            "/..%0a/other",
            "/..%3f/other",
            "/..%23/other",
            "/..%253f/other",
            "/%c0%ae%c0%ae/other",
            "/%ef%bc%8e%ef%bc%8e/other",
            // The same, not encoded.
            "/\u{ff0e}\u{ff0e}/other",
            "/Patient/\u{ff0e}\u{ff0e}/\u{ff0e}\u{ff0e}/other/Patient/1",
            "/Patient/caf\u{e9}",
        ] {
            assert!(
                join("http://ehr:9001/fhir/tenant-a", target).is_err(),
                "{target}"
            );
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Whatever the client's target, a forwarded request stays under the tenant's base path
        /// on the tenant's host, with no segment that decodes to `.` or `..`.
        #[test]
        fn forwarded_paths_never_leave_the_base(
            segments in proptest::collection::vec(
                prop_oneof![
                    Just("..".to_owned()), Just(".".to_owned()), Just("%2e".to_owned()), Just("%2E%2e".to_owned()),
                    Just("%2f".to_owned()), Just("%5C".to_owned()), Just(";".to_owned()), Just("Patient".to_owned()),
                    Just("..;x".to_owned()), Just("...".to_owned()), Just("..%20".to_owned()), Just("%u002e".to_owned()), Just("%252e".to_owned()), Just("%252E%252e".to_owned()), Just("%252f".to_owned()), Just("%255c".to_owned()), Just("\u{ff0e}\u{ff0e}".to_owned()), Just("".to_owned()), "[a-zA-Z0-9._~%\u{e9}\u{ff0e}-]{0,6}",
                ],
                0..8,
            ),
            query in proptest::option::of("[a-zA-Z0-9=&:_.%-]{0,12}"),
        ) {
            let base = UpstreamBase::parse("http://ehr:9001/fhir/tenant-a").unwrap();
            let mut target = format!("/{}", segments.join("/"));
            if let Some(query) = &query {
                target.push('?');
                target.push_str(query);
            }
            let Ok(uri) = target.parse::<Uri>() else { return Ok(()) };
            if let Ok(forwarded) = upstream_uri(&base, &uri) {
                prop_assert_eq!(forwarded.authority().unwrap().as_str(), "ehr:9001");
                let path = forwarded.path();
                prop_assert!(path.starts_with("/fhir/tenant-a/"), "{}", path);
                prop_assert!(!path.contains("//"), "{}", path);
                // Nothing a server that normalises Unicode could read as a dot.
                prop_assert!(path.is_ascii(), "{}", path);
                for segment in path.split('/') {
                    // Decoded once (as it should be) or twice (as some servers do).
                    let once = percent_decode(segment.as_bytes()).collect::<Vec<u8>>();
                    let twice = percent_decode(&once).collect::<Vec<u8>>();
                    for decoded in [once, twice] {
                        let name = decoded.split(|&b| b == b';').next().unwrap_or_default();
                        prop_assert!(
                            name.is_empty() || !name.iter().all(|&b| b == b'.' || b == b' '),
                            "{}", path
                        );
                        prop_assert!(!decoded.contains(&b'/') && !decoded.contains(&b'\\'), "{}", path);
                    }
                }
                prop_assert_eq!(forwarded.query(), uri.query());
            }
        }
    }
}
