//! Which FHIR interaction a request is, from its method and path alone.
//!
//! FHIR's RESTful API names each kind of request an *interaction*: `read`, `vread`, `update`,
//! `patch`, `delete`, `history`, `create`, `search`, `capabilities`, `batch`/`transaction`
//! and `operation` (`$name`). [`classify`] tells them apart from the method and the path
//! relative to the FHIR base, with the resource type and id the path names. Audit records
//! and metrics use it; so can an authorization check.
//!
//! ```
//! use http::Method;
//! use tower_fhir::interaction::{classify, Interaction};
//!
//! let read = classify(&Method::GET, "/Patient/123");
//! assert_eq!(read.interaction, Some(Interaction::Read));
//! assert_eq!(read.resource_type, Some("Patient"));
//! assert_eq!(read.resource_id, Some("123"));
//!
//! let search = classify(&Method::POST, "/Observation/_search");
//! assert_eq!(search.interaction, Some(Interaction::Search));
//!
//! let op = classify(&Method::POST, "/Patient/123/$everything");
//! assert_eq!(op.interaction, Some(Interaction::Operation));
//! assert_eq!(op.operation, Some("everything"));
//!
//! // Not a FHIR URL: no interaction.
//! assert_eq!(classify(&Method::GET, "/patient/../x").interaction, None);
//! ```
//!
//! A `POST` of a Bundle to the base is a `batch` or a `transaction` according to the Bundle's
//! `type`, which is in the body: [`classify`] reads no body and calls both
//! [`Interaction::Batch`].

use std::fmt;

use http::Method;

/// A FHIR RESTful interaction, by FHIR's name for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Interaction {
    /// `GET [type]/[id]`.
    Read,
    /// `GET [type]/[id]/_history/[vid]`.
    Vread,
    /// `PUT [type]/[id]`, or a conditional `PUT [type]?...`.
    Update,
    /// `PATCH [type]/[id]`, or a conditional `PATCH [type]?...`.
    Patch,
    /// `DELETE [type]/[id]`, or a conditional `DELETE [type]?...`.
    Delete,
    /// `GET _history`, `[type]/_history` or `[type]/[id]/_history`.
    History,
    /// `POST [type]`.
    Create,
    /// `GET [type]`, `GET`/`POST [type]/_search`, at the system level too, and compartment
    /// searches (`GET [type]/[id]/[type]`).
    Search,
    /// `GET metadata`.
    Capabilities,
    /// `POST` of a Bundle to the base (a `batch` or a `transaction`: see the module docs).
    Batch,
    /// A `transaction` Bundle (never returned by [`classify`], which reads no body).
    Transaction,
    /// `$name` at the system, type or instance level.
    Operation,
}

impl Interaction {
    /// FHIR's name: `read`, `vread`, `update`, `patch`, `delete`, `history`, `create`,
    /// `search`, `capabilities`, `batch`, `transaction` or `operation`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Vread => "vread",
            Self::Update => "update",
            Self::Patch => "patch",
            Self::Delete => "delete",
            Self::History => "history",
            Self::Create => "create",
            Self::Search => "search",
            Self::Capabilities => "capabilities",
            Self::Batch => "batch",
            Self::Transaction => "transaction",
            Self::Operation => "operation",
        }
    }
}

impl fmt::Display for Interaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`classify`] found: the interaction (`None` when the request is not a FHIR
/// interaction), and the resource type, id and operation name the path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Classified<'a> {
    /// The interaction, if the method and path make one.
    pub interaction: Option<Interaction>,
    /// The resource type in the path (`Patient`).
    pub resource_type: Option<&'a str>,
    /// The resource id in the path.
    pub resource_id: Option<&'a str>,
    /// The operation's name without its `$`, for [`Interaction::Operation`].
    pub operation: Option<&'a str>,
}

/// Classifies a request by its method and its path relative to the FHIR base (`/Patient/1`,
/// or `Patient/1`; the query string, if given, is ignored).
pub fn classify<'a>(method: &Method, path: &'a str) -> Classified<'a> {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    classify_path(method, &path[..end])
}

/// [`classify`] of a path with no query string or fragment (a [`Uri`](http::Uri)'s `path()`).
pub(crate) fn classify_path<'a>(method: &Method, path: &'a str) -> Classified<'a> {
    debug_assert!(
        !path.contains(['?', '#']),
        "{path:?} has a query or fragment"
    );
    let path = &path[path.bytes().position(|b| b != b'/').unwrap_or(path.len())..];
    let path = path.strip_suffix('/').unwrap_or(path);
    let Some((segments, count)) = segments(path) else {
        return Classified::default();
    };
    let mut found = Classified::default();
    found.interaction = match &segments[..count] {
        [] => match *method {
            Method::GET => Some(Interaction::Search),
            Method::POST => Some(Interaction::Batch),
            _ => None,
        },
        ["metadata"] => (*method == Method::GET).then_some(Interaction::Capabilities),
        ["_history"] => (*method == Method::GET).then_some(Interaction::History),
        ["_search"] => search(method),
        [op] if op.starts_with('$') => operation(&mut found, op),
        [ty] if is_type(ty) => {
            found.resource_type = Some(ty);
            match *method {
                Method::GET => Some(Interaction::Search),
                Method::POST => Some(Interaction::Create),
                Method::PUT => Some(Interaction::Update),
                Method::PATCH => Some(Interaction::Patch),
                Method::DELETE => Some(Interaction::Delete),
                _ => None,
            }
        }
        [ty, rest @ ..] if is_type(ty) => {
            found.resource_type = Some(ty);
            typed(&mut found, method, rest)
        }
        _ => None,
    };
    found
}

/// The interaction a request is, as its scopes are checked and its audit record names it: as
/// [`classify`] finds it, a `HEAD` as the `GET` it mirrors (a search's and a history's too,
/// which [`classify`] does not take), and `[type]/[id]/*`, a compartment search of every type
/// (FHIR's `Patient/[id]/*`).
pub(crate) fn classify_request<'p>(method: &Method, path: &'p str) -> Classified<'p> {
    let end = path.find(['?', '#']).unwrap_or(path.len());
    classify_request_path(method, &path[..end])
}

/// [`classify_request`] of a path with no query string or fragment (a [`Uri`](http::Uri)'s
/// `path()`, as the audit log classifies it): the path is not searched for either.
pub(crate) fn classify_request_path<'p>(method: &Method, path: &'p str) -> Classified<'p> {
    let method = if *method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    let found = classify_path(method, path);
    if found.interaction.is_some() || *method != Method::GET {
        return found;
    }
    let path = path.strip_suffix('/').unwrap_or(path);
    let Some(compartment) = path.strip_suffix("/*") else {
        return found;
    };
    match classify_path(method, compartment) {
        found @ Classified {
            interaction: Some(Interaction::Read),
            ..
        } => Classified {
            interaction: Some(Interaction::Search),
            ..found
        },
        _ => found,
    }
}

/// The path's `/`-separated segments (none for an empty path), or `None` past six: no FHIR URL
/// has more than five (`[type]/[id]/_history/[vid]/$op`), and no allocation is needed.
///
/// Split by hand: `str::split` searches for a `char`, several times slower on these short
/// paths, and the audit log's writer classifies every request.
fn segments(path: &str) -> Option<([&str; 6], usize)> {
    let mut segments = [""; 6];
    let mut count = 0;
    if path.is_empty() {
        return Some((segments, 0));
    }
    let bytes = path.as_bytes();
    let mut start = 0;
    loop {
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'/')
            .map_or(bytes.len(), |at| start + at);
        *segments.get_mut(count)? = &path[start..end];
        count += 1;
        if end == bytes.len() {
            return Some((segments, count));
        }
        start = end + 1;
    }
}

/// The interaction of `[type]/...`, `rest` being what follows the type.
fn typed<'a>(found: &mut Classified<'a>, method: &Method, rest: &[&'a str]) -> Option<Interaction> {
    match rest {
        ["_search"] => search(method),
        ["_history"] => (*method == Method::GET).then_some(Interaction::History),
        [op] if op.starts_with('$') => operation(found, op),
        [id, tail @ ..] if is_id(id) => {
            found.resource_id = Some(id);
            match tail {
                [] => match *method {
                    Method::GET | Method::HEAD => Some(Interaction::Read),
                    Method::PUT => Some(Interaction::Update),
                    Method::PATCH => Some(Interaction::Patch),
                    Method::DELETE => Some(Interaction::Delete),
                    _ => None,
                },
                ["_history"] => (*method == Method::GET).then_some(Interaction::History),
                ["_history", vid] if is_id(vid) => {
                    (*method == Method::GET).then_some(Interaction::Vread)
                }
                ["_history", vid, op] if is_id(vid) && op.starts_with('$') => operation(found, op),
                [op] if op.starts_with('$') => operation(found, op),
                [compartment] if is_type(compartment) => {
                    (*method == Method::GET).then_some(Interaction::Search)
                }
                _ => None,
            }
        }
        _ => None,
    }
}

fn search(method: &Method) -> Option<Interaction> {
    matches!(*method, Method::GET | Method::POST).then_some(Interaction::Search)
}

fn operation<'a>(found: &mut Classified<'a>, segment: &'a str) -> Option<Interaction> {
    let name = &segment[1..];
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !valid {
        return None;
    }
    found.operation = Some(name);
    Some(Interaction::Operation)
}

/// A resource type name: a capital letter, then letters and digits.
fn is_type(segment: &str) -> bool {
    let mut bytes = segment.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_uppercase()) && bytes.all(|b| b.is_ascii_alphanumeric())
}

/// A FHIR id: 1-64 of `[A-Za-z0-9-.]`.
fn is_id(segment: &str) -> bool {
    (1..=64).contains(&segment.len())
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && segment != "."
        && segment != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(method: Method, path: &str) -> Option<&'static str> {
        classify(&method, path).interaction.map(Interaction::as_str)
    }

    #[test]
    fn every_interaction_is_named() {
        let cases = [
            (Method::GET, "/Patient/1", Some("read")),
            (Method::HEAD, "/Patient/1", Some("read")),
            (Method::GET, "/Patient/1/_history/2", Some("vread")),
            (Method::PUT, "/Patient/1", Some("update")),
            (Method::PUT, "/Patient?identifier=x", Some("update")),
            (Method::PATCH, "/Patient/1", Some("patch")),
            (Method::DELETE, "/Patient/1", Some("delete")),
            (Method::DELETE, "/Patient?identifier=x", Some("delete")),
            (Method::GET, "/_history", Some("history")),
            (Method::GET, "/Patient/_history", Some("history")),
            (Method::GET, "/Patient/1/_history", Some("history")),
            (Method::POST, "/Patient", Some("create")),
            (Method::GET, "/Patient?name=x", Some("search")),
            (Method::POST, "/Patient/_search", Some("search")),
            (Method::GET, "/", Some("search")),
            (Method::POST, "/_search", Some("search")),
            (Method::GET, "/Patient/1/Observation", Some("search")),
            (Method::GET, "/metadata", Some("capabilities")),
            (Method::POST, "/", Some("batch")),
            (Method::POST, "", Some("batch")),
            (Method::POST, "/$convert", Some("operation")),
            (Method::GET, "/Patient/$match", Some("operation")),
            (Method::GET, "/Patient/1/$everything", Some("operation")),
            (
                Method::POST,
                "/Patient/1/_history/2/$meta",
                Some("operation"),
            ),
        ];
        for (method, path, expected) in cases {
            assert_eq!(of(method.clone(), path), expected, "{method} {path}");
        }
    }

    #[test]
    fn segments_are_what_split_makes() {
        for path in [
            "",
            "a",
            "a/b",
            "a//b",
            "/",
            "//",
            "a/",
            "Patient/1/_history/2/$meta",
            "a/b/c/d/e/f",
            "a/b/c/d/e/f/g",
            "//////",
            "/////",
            "é/ü",
            "a/b/c/d/e/",
        ] {
            let split: Vec<&str> = path.split('/').collect();
            let expected = if path.is_empty() {
                Some(Vec::new())
            } else {
                (split.len() <= 6).then_some(split)
            };
            let found = segments(path).map(|(segments, count)| segments[..count].to_vec());
            assert_eq!(found, expected, "{path:?}");
        }
    }

    #[test]
    fn what_is_not_fhir_is_none() {
        for (method, path) in [
            (Method::GET, "/patient/1"),
            (Method::GET, "/Patient/../Group/1"),
            (Method::GET, "/Patient/1/2/3/4/5"),
            (Method::POST, "/Patient/1/_history/2/$meta/x"),
            (Method::POST, "/a/b/c/d/e/f/g/h"),
            (Method::POST, "/Patient/1"),
            (Method::DELETE, "/metadata"),
            (Method::GET, "/Patient/$"),
            (Method::GET, "/Patient/a%2Fb"),
            (Method::GET, "/Patient/1/_history/x y"),
            (Method::PUT, "/"),
        ] {
            assert_eq!(of(method.clone(), path), None, "{method} {path}");
        }
    }

    #[test]
    fn the_path_only_entry_answers_as_classify_request_does() {
        let paths = [
            "",
            "/",
            "//",
            "/*",
            "*",
            "/Patient",
            "/Patient/",
            "Patient/1",
            "/Patient/1",
            "/Patient/1/",
            "/Patient/1/*",
            "/Patient/1/*/",
            "/Patient/1/**",
            "/Patient/*",
            "/Patient/1/*/*",
            "/Patient/1/_history/*",
            "/Patient/1/Observation",
            "/Patient/1/_history/2",
            "/Patient/1/_history/2/$meta",
            "/Patient/$match",
            "/$convert",
            "/metadata",
            "/_history",
            "/_search",
            "/Patient/_search",
            "//Patient//1",
            "/patient/1",
            "/Patient/a%2Fb",
            "/Patient/%31",
            "/Patient/1 2",
            "/Patient/é",
            "/Patiënt/1/*",
            "/Patient/../Group/1",
            "/Patient/\"1\\",
            "/Patient/1/2/3/4/5",
            "/a/b/c/d/e/f/g/h",
            "/admin/tenants",
        ];
        let methods = [
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ];
        for method in &methods {
            for path in paths {
                let found = classify_request_path(method, path);
                assert_eq!(classify_request(method, path), found, "{method} {path:?}");
                // With a query or a fragment, which only `classify_request` takes: the same
                // answer, whatever they hold.
                for tail in ["?", "?x=1", "?a=/*", "#f", "#/*", "?q#f"] {
                    let full = format!("{path}{tail}");
                    assert_eq!(classify_request(method, &full), found, "{method} {full:?}");
                }
            }
        }
        // What the compartment search and a read are, by either entry.
        let get = |path| classify_request_path(&Method::GET, path).interaction;
        assert_eq!(get("/Patient/1/*"), Some(Interaction::Search));
        assert_eq!(get("/Patient/1/*/"), Some(Interaction::Search));
        assert_eq!(get("/Patient/1"), Some(Interaction::Read));
        assert_eq!(
            classify_request_path(&Method::HEAD, "/Patient/1/*").interaction,
            Some(Interaction::Search)
        );
        assert_eq!(
            classify_request_path(&Method::DELETE, "/Patient/1/*").interaction,
            classify(&Method::DELETE, "/Patient/1/*").interaction
        );
    }

    #[test]
    fn type_id_and_operation_are_taken_from_the_path() {
        let found = classify(&Method::GET, "/Observation/abc-1.2/_history/7?x=1");
        assert_eq!(found.interaction, Some(Interaction::Vread));
        assert_eq!(found.resource_type, Some("Observation"));
        assert_eq!(found.resource_id, Some("abc-1.2"));
        let op = classify(&Method::POST, "Patient/$match");
        assert_eq!(op.resource_type, Some("Patient"));
        assert_eq!(op.resource_id, None);
        assert_eq!(op.operation, Some("match"));
        let too_long = "a".repeat(65);
        assert_eq!(
            classify(&Method::GET, &format!("/Patient/{too_long}")).interaction,
            None
        );
    }
}
