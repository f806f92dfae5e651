//! SMART resource scopes, v1 and v2, and what a token's scopes grant together.

use std::borrow::Cow;
use std::fmt;

use serde_json::Value;

use crate::auth::VerifiedClaims;

/// What a scope allows on a resource type: SMART v2's `c`, `r`, `u`, `d`, `s`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(u8);

impl Permissions {
    /// `c`: create.
    pub const CREATE: Self = Self(1);
    /// `r`: read, vread, instance history.
    pub const READ: Self = Self(2);
    /// `u`: update and patch.
    pub const UPDATE: Self = Self(4);
    /// `d`: delete.
    pub const DELETE: Self = Self(8);
    /// `s`: search, type and system history.
    pub const SEARCH: Self = Self(16);
    /// Everything: `cruds`, v1's `*`.
    pub const ALL: Self = Self(31);
    /// Nothing.
    pub const NONE: Self = Self(0);

    /// Whether every permission of `other` is in `self`.
    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    /// Both together.
    #[must_use]
    pub fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    /// Whether there is none.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The SMART v2 letters, in `cruds` order.
    pub fn letters(self) -> String {
        "cruds"
            .chars()
            .zip([
                Self::CREATE,
                Self::READ,
                Self::UPDATE,
                Self::DELETE,
                Self::SEARCH,
            ])
            .filter(|(_, p)| self.contains(*p))
            .map(|(c, _)| c)
            .collect()
    }

    /// The v2 permissions a v2 suffix (`rs`, `cruds`; letters in that order, each once) or a
    /// v1 one (`read`, `write`, `*`) names.
    fn parse(text: &str) -> Option<Self> {
        match text {
            // v1: read is read and search; write is create, update and delete.
            "read" => return Some(Self::READ.union(Self::SEARCH)),
            "write" => return Some(Self::CREATE.union(Self::UPDATE).union(Self::DELETE)),
            "*" => return Some(Self::ALL),
            _ => {}
        }
        let mut order = "cruds".chars();
        let mut permissions = Self::NONE;
        for letter in text.chars() {
            // Each letter once, in `cruds` order.
            order.by_ref().find(|c| *c == letter)?;
            permissions = permissions.union(match letter {
                'c' => Self::CREATE,
                'r' => Self::READ,
                'u' => Self::UPDATE,
                'd' => Self::DELETE,
                _ => Self::SEARCH,
            });
        }
        (!permissions.is_empty()).then_some(permissions)
    }
}

impl fmt::Debug for Permissions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Permissions({})", self.letters())
    }
}

/// Whose data a scope opens: SMART's `patient/`, `user/` and `system/` contexts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScopeContext {
    /// `patient/`: the data of the patient in the token's `patient` claim.
    Patient,
    /// `user/`: whatever the user may see (the FHIR server decides which; the gateway lets
    /// through what the scope's type and permissions allow).
    User,
    /// `system/`: a backend service's access, no user or patient.
    System,
}

impl ScopeContext {
    /// `patient`, `user` or `system`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Patient => "patient",
            Self::User => "user",
            Self::System => "system",
        }
    }
}

/// One SMART resource scope: `system/Patient.rs`, `user/Observation.cruds`, `patient/*.read`,
/// `system/Observation.rs?category=laboratory`.
///
/// ```
/// use tower_fhir::smart::{Permissions, ResourceScope, ScopeContext};
///
/// let scope = ResourceScope::parse("system/Observation.rs?category=laboratory").unwrap();
/// assert_eq!(scope.context(), ScopeContext::System);
/// assert_eq!(scope.resource_type(), Some("Observation"));
/// assert!(scope.permissions().contains(Permissions::SEARCH));
/// assert_eq!(scope.query(), [("category".to_owned(), "laboratory".to_owned())]);
/// // v1: `read` is read and search.
/// let v1 = ResourceScope::parse("patient/*.read").unwrap();
/// assert_eq!(v1.resource_type(), None, "every type");
/// assert_eq!(v1.permissions().letters(), "rs");
/// // Not resource scopes: a tenant id, `openid`, letters out of order.
/// assert!(ResourceScope::parse("4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f").is_none());
/// assert!(ResourceScope::parse("openid").is_none());
/// assert!(ResourceScope::parse("system/Patient.sr").is_none());
/// // A query that narrows nothing: no value, or a parameter that shapes the answer only.
/// assert!(ResourceScope::parse("system/Observation.rs?category").is_none());
/// assert!(ResourceScope::parse("system/Patient.rs?_count=1").is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceScope {
    context: ScopeContext,
    /// `None` for `*`.
    resource_type: Option<Box<str>>,
    permissions: Permissions,
    /// A v2 scope's query, decoded: each parameter and its one value.
    query: Vec<(String, String)>,
}

impl ResourceScope {
    /// Parses a scope; `None` when it is not a SMART resource scope. A granular scope's query
    /// must narrow what the scope allows: each parameter with a value (servers ignore an empty
    /// one), and one at least that selects, not only shapes or adds to an answer (`_count`,
    /// `_sort`, `_format`, `_elements`, `_summary`, `_total`, `_include`, `_contained`, ...):
    /// under a scope of those alone a token would read and search the whole type.
    pub fn parse(scope: &str) -> Option<Self> {
        let (context, rest) = scope.split_once('/')?;
        let context = match context {
            "patient" => ScopeContext::Patient,
            "user" => ScopeContext::User,
            "system" => ScopeContext::System,
            _ => return None,
        };
        let (rest, query) = match rest.split_once('?') {
            Some((rest, query)) => (rest, Some(query)),
            None => (rest, None),
        };
        let (resource_type, permissions) = rest.rsplit_once('.')?;
        let resource_type = match resource_type {
            "*" => None,
            ty if is_type(ty) => Some(Box::from(ty)),
            _ => return None,
        };
        let v1 = matches!(permissions, "read" | "write" | "*");
        let permissions = Permissions::parse(permissions)?;
        let query = match query {
            // Only v2 scopes take a query, and it names at least one parameter.
            Some(_) if v1 => return None,
            Some(query) => {
                let pairs = parse_query(query).ok()?;
                let valued = pairs.iter().all(|(_, value)| !value.is_empty());
                let narrows = pairs
                    .iter()
                    .any(|(name, _)| !adds_to_an_answer(name) && !shapes_an_answer(name));
                if !valued || !narrows {
                    return None;
                }
                pairs
                    .into_iter()
                    .map(|(name, value)| (name.into_owned(), value.into_owned()))
                    .collect()
            }
            None => Vec::new(),
        };
        Some(Self {
            context,
            resource_type,
            permissions,
            query,
        })
    }

    /// The context: `patient/`, `user/` or `system/`.
    pub fn context(&self) -> ScopeContext {
        self.context
    }

    /// The resource type; `None` for `*`.
    pub fn resource_type(&self) -> Option<&str> {
        self.resource_type.as_deref()
    }

    /// What it allows.
    pub fn permissions(&self) -> Permissions {
        self.permissions
    }

    /// A granular v2 scope's query (`?category=laboratory`), decoded; empty for the others.
    pub fn query(&self) -> &[(String, String)] {
        &self.query
    }

    /// Whether everything this scope allows, `wider` allows too: the same context, a type
    /// `wider` covers, permissions `wider` holds, and every parameter of `wider`'s query
    /// present with the same value in this one's, and no other that may add to a search's
    /// answer rather than narrow it (`_contained`, `_containedType`, `_include`,
    /// `_revinclude`, `_query`, `_mdm`, `_cascade`, with any modifier).
    ///
    /// ```
    /// use tower_fhir::smart::ResourceScope;
    ///
    /// let scope = |s| ResourceScope::parse(s).unwrap();
    /// assert!(scope("system/Patient.r").within(&scope("system/*.rs")));
    /// assert!(scope("system/Observation.rs?category=laboratory").within(&scope("system/Observation.read")));
    /// assert!(!scope("system/Observation.rs").within(&scope("system/Observation.rs?category=laboratory")));
    /// assert!(!scope("user/Patient.r").within(&scope("system/Patient.r")));
    /// assert!(!scope("system/Patient.rs").within(&scope("system/Patient.r")));
    /// ```
    pub fn within(&self, wider: &ResourceScope) -> bool {
        self.context == wider.context
            && wider.covers(self.resource_type())
            && wider.permissions.contains(self.permissions)
            && wider
                .query
                .iter()
                .all(|pair| self.query.iter().any(|own| own == pair))
            && self
                .query
                .iter()
                .all(|pair| wider.query.contains(pair) || !adds_to_an_answer(&pair.0))
    }

    /// Whether it covers `resource_type` (`None`: every type, which only `*` covers).
    pub(crate) fn covers(&self, resource_type: Option<&str>) -> bool {
        match (&self.resource_type, resource_type) {
            (None, _) => true,
            (Some(own), Some(ty)) => **own == *ty,
            (Some(_), None) => false,
        }
    }
}

/// Whether a search parameter only shapes a search's answer (how many, in what order, in
/// what form, what of each resource), whatever the value: it selects nothing.
fn shapes_an_answer(name: &str) -> bool {
    named(
        name,
        &[
            "_count",
            "_sort",
            "_format",
            "_elements",
            "_summary",
            "_total",
            "_pretty",
            "_maxresults",
            "_graph",
            "_score",
            "_offset",
            "_page",
            "_getpages",
        ],
    )
}

/// Whether a parameter's name, its modifiers aside, is one of `names` in any case (a server
/// may ignore case: `_CONTAINED` is `_contained` there).
fn named(name: &str, names: &[&str]) -> bool {
    let name = name.split(':').next().unwrap_or(name);
    names.iter().any(|known| name.eq_ignore_ascii_case(known))
}

/// Whether a search parameter may add to a search's answer rather than narrow it: contained
/// resources or their containers, included ones, a named query's, the records of linked
/// patients (HAPI's `_mdm`), cascaded deletes.
fn adds_to_an_answer(name: &str) -> bool {
    named(
        name,
        &[
            "_contained",
            "_containedType",
            "_include",
            "_revinclude",
            "_query",
            "_mdm",
            "_cascade",
        ],
    )
}

/// What a token's scopes grant: its SMART resource scopes, and the patient its `patient/`
/// scopes are about.
///
/// Scopes come from `scope` (space-separated, or an array) and `scp` (a string or an array,
/// as Microsoft Entra issues them); anything that is not a resource scope (the tenant id,
/// `openid`, `launch/patient`) grants nothing here.
///
/// A scope that looks like a resource scope and does not parse (`system/patient.rs`,
/// `system/Patient.sr`, Entra's dotted `patient.Patient.read`) grants nothing either, but it
/// makes the grants restricted ([`is_empty`](Self::is_empty) is false): a typo must not turn
/// a client meant to read one type into one with tenant-wide access.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grants {
    scopes: Vec<ResourceScope>,
    patient: Option<Box<str>>,
    unreadable: Vec<Box<str>>,
    narrowed: bool,
}

/// The claim ([`NARROWED_CLAIM`]` = true`) the token endpoint puts in a token whose resource
/// scopes a client registered without any asked for
/// ([`scopeless_clients_may_narrow`](crate::token::TokenEndpointBuilder::scopeless_clients_may_narrow)):
/// they narrow the tenant-wide access such a client has where tokens without resource scopes
/// are accepted, and grant nothing where they are not. A [`SmartScopeLayer`] with
/// [`require_smart_scopes(true)`](super::SmartScopeBuilder::require_smart_scopes) refuses the
/// token (`403`, `insufficient_scope`), whenever and wherever it was issued: a replica or a
/// start with the setting off, or another gateway whose tokens this one trusts.
///
/// [`SmartScopeLayer`]: super::SmartScopeLayer
pub const NARROWED_CLAIM: &str = "tower_fhir_narrowed";

/// Whether `scope` looks like a SMART resource scope: `patient/`, `user/` or `system/` (in any
/// case) followed by something, or the dotted `context.type.permissions` form (lower-case
/// context, permissions `read`, `write`, `*` or `cruds` letters).
pub(crate) fn looks_like_resource_scope(scope: &str) -> bool {
    let context = |text: &str| {
        ["patient", "user", "system"]
            .iter()
            .any(|c| text.eq_ignore_ascii_case(c))
    };
    if let Some((head, rest)) = scope.split_once('/') {
        return context(head) && !rest.is_empty();
    }
    // The dotted form (`patient.Patient.read`, `user.all.rs`): lower-case context, SMART
    // permissions last (Microsoft Graph's `User.Read.All` is not one).
    let scope = scope.split_once('?').map_or(scope, |(scope, _)| scope);
    let mut parts = scope.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("patient" | "user" | "system"), Some(ty), Some(permissions), None) => {
            !ty.is_empty()
                && (matches!(permissions, "read" | "write" | "*")
                    || (!permissions.is_empty()
                        && permissions.bytes().all(|b| b"cruds".contains(&b))))
        }
        _ => false,
    }
}

/// The resource scopes among `scopes`, and those that look like one and do not parse.
fn read_scopes<'a>(scopes: impl Iterator<Item = &'a str>) -> (Vec<ResourceScope>, Vec<Box<str>>) {
    let mut read = Vec::new();
    let mut unreadable = Vec::new();
    for scope in scopes {
        match ResourceScope::parse(scope) {
            Some(parsed) => read.push(parsed),
            None if looks_like_resource_scope(scope) => unreadable.push(Box::from(scope)),
            None => {}
        }
    }
    (read, unreadable)
}

impl Grants {
    /// The grants of these verified claims.
    pub fn of(claims: &VerifiedClaims) -> Self {
        let scp: Vec<&str> = match claims.get("scp") {
            Some(Value::String(text)) => text.split(' ').collect(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .flat_map(|text| text.split(' '))
                .collect(),
            _ => Vec::new(),
        };
        let (scopes, unreadable) = read_scopes(claims.scopes().chain(scp));
        let patient = match claims.get("patient") {
            Some(Value::String(id)) if !id.is_empty() => Some(Box::from(id.as_str())),
            _ => None,
        };
        Self {
            scopes,
            patient,
            unreadable,
            // Any value but `false` (a claim of another type is not read as absent).
            narrowed: claims
                .get(NARROWED_CLAIM)
                .is_some_and(|value| *value != Value::Bool(false)),
        }
    }

    /// Grants from scopes alone (and the patient of `patient/` scopes), for tests and
    /// services that check by other means.
    pub fn from_scopes<'a>(
        scopes: impl IntoIterator<Item = &'a str>,
        patient: Option<&str>,
    ) -> Self {
        let (scopes, unreadable) = read_scopes(scopes.into_iter());
        Self {
            scopes,
            patient: patient.filter(|p| !p.is_empty()).map(Box::from),
            unreadable,
            narrowed: false,
        }
    }

    /// The resource scopes.
    pub fn scopes(&self) -> &[ResourceScope] {
        &self.scopes
    }

    /// The `patient` claim: the patient `patient/` scopes are about.
    pub fn patient(&self) -> Option<&str> {
        self.patient.as_deref()
    }

    /// The scopes that look like resource scopes and do not parse: they grant nothing.
    pub fn unreadable(&self) -> &[Box<str>] {
        &self.unreadable
    }

    /// Whether the token has no SMART resource scope at all (not even one that does not
    /// parse): then the tenant alone decides, unless SMART scopes are required.
    pub fn is_empty(&self) -> bool {
        self.scopes.is_empty() && self.unreadable.is_empty()
    }

    /// Whether the token says ([`NARROWED_CLAIM`]) its resource scopes narrow a tenant-wide
    /// client's access rather than grant it: nothing where SMART scopes are required.
    pub fn narrowed(&self) -> bool {
        self.narrowed
    }
}

/// A resource type name: a capital letter, then letters and digits.
pub(crate) fn is_type(segment: &str) -> bool {
    let mut bytes = segment.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_uppercase()) && bytes.all(|b| b.is_ascii_alphanumeric())
}

/// A search parameter and its value, decoded (borrowed from the query when nothing needed
/// decoding).
pub(crate) type Param<'a> = (Cow<'a, str>, Cow<'a, str>);

/// Why a query string (or a form) cannot be checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Unreadable {
    /// A name or value is not UTF-8 once decoded.
    NotUtf8,
    /// A parameter name (decoded) is not one FHIR could define.
    Name(String),
    /// A `;` as it is, which some servers take to separate parameters as `&` does.
    Semicolon,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotUtf8 => f.write_str("is not UTF-8 form data"),
            Self::Semicolon => f.write_str(
                "holds a ; as it is, which some servers read as a separator between parameters \
                 and others as part of a value: send it percent-encoded (%3B)",
            ),
            Self::Name(name) => write!(
                f,
                "names a parameter {name:?} that no FHIR server defines (a name, its modifiers \
                 and chains are letters, digits and _ - . : only): servers differ on what it is"
            ),
        }
    }
}

/// A query string's parameters, percent- and `+`-decoded.
///
/// # Errors
///
/// A name or value that is not UTF-8; a name that is not a FHIR parameter name with its
/// modifiers and chains (letters, digits, `_`, `-`, `.`, `:`), which a server may read as
/// another: HAPI strips a leading `?` (`??_include=*` is an `_include`); a `;` as it is,
/// which some servers take for `&` (`name=x;_include=*`).
pub(crate) fn parse_query(query: &str) -> Result<Vec<Param<'_>>, Unreadable> {
    if query.contains(';') {
        return Err(Unreadable::Semicolon);
    }
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = decode(name).ok_or(Unreadable::NotUtf8)?;
            let value = decode(value).ok_or(Unreadable::NotUtf8)?;
            if !is_parameter_name(&name) {
                return Err(Unreadable::Name(name.into_owned()));
            }
            Ok((name, value))
        })
        .collect()
}

/// A search parameter's name as FHIR spells one, with its modifiers, chains and reverse
/// chains (`_include:iterate`, `subject:Patient.name`, `_has:Observation:patient:code`).
pub(crate) fn is_parameter_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

fn decode(text: &str) -> Option<Cow<'_, str>> {
    if !text.contains(['%', '+']) {
        return Some(Cow::Borrowed(text));
    }
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|text| Cow::Owned(text.into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(value: serde_json::Value) -> VerifiedClaims {
        let mut value = value;
        value["exp"] = json!(4_000_000_000u64);
        VerifiedClaims::assume_verified(value.as_object().unwrap().clone()).unwrap()
    }

    #[test]
    fn v2_and_v1_scopes_parse() {
        let cases = [
            (
                "system/Patient.rs",
                ScopeContext::System,
                Some("Patient"),
                "rs",
            ),
            (
                "user/Observation.cruds",
                ScopeContext::User,
                Some("Observation"),
                "cruds",
            ),
            ("patient/*.r", ScopeContext::Patient, None, "r"),
            ("system/*.read", ScopeContext::System, None, "rs"),
            (
                "user/Encounter.write",
                ScopeContext::User,
                Some("Encounter"),
                "cud",
            ),
            (
                "patient/Condition.*",
                ScopeContext::Patient,
                Some("Condition"),
                "cruds",
            ),
            (
                "system/Observation.cu",
                ScopeContext::System,
                Some("Observation"),
                "cu",
            ),
        ];
        for (text, context, ty, letters) in cases {
            let scope = ResourceScope::parse(text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(scope.context(), context, "{text}");
            assert_eq!(scope.resource_type(), ty, "{text}");
            assert_eq!(scope.permissions().letters(), letters, "{text}");
            assert!(scope.query().is_empty());
        }
    }

    #[test]
    fn what_is_not_a_resource_scope_grants_nothing() {
        for text in [
            "openid",
            "fhirUser",
            "launch/patient",
            "offline_access",
            "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
            "system/Patient",
            "system/Patient.",
            "system/Patient.x",
            "system/Patient.rr",
            "system/Patient.sr",
            "system/patient.rs",
            "system/Pat-ient.rs",
            "admin/Patient.rs",
            "system/Patient.read?category=x",
            "system/Observation.rs?",
            "system/Observation.rs?%ff=x",
        ] {
            assert_eq!(ResourceScope::parse(text), None, "{text}");
        }
    }

    #[test]
    fn granular_queries_are_decoded() {
        let scope = ResourceScope::parse(
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category%7Claboratory",
        )
        .unwrap();
        assert_eq!(
            scope.query(),
            [(
                "category".to_owned(),
                "http://terminology.hl7.org/CodeSystem/observation-category|laboratory".to_owned()
            )]
        );
    }

    #[test]
    fn grants_read_scope_and_scp_in_every_form() {
        let grants = Grants::of(&claims(json!({
            "scope": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f system/Patient.rs openid",
            "scp": ["user/Observation.r", "patient/*.read"],
            "patient": "123"
        })));
        let texts: Vec<_> = grants
            .scopes()
            .iter()
            .map(|s| (s.context().as_str(), s.resource_type()))
            .collect();
        assert_eq!(
            texts,
            [
                ("system", Some("Patient")),
                ("user", Some("Observation")),
                ("patient", None)
            ]
        );
        assert_eq!(grants.patient(), Some("123"));
        let entra = Grants::of(&claims(
            json!({"scp": "system/Patient.r system/Encounter.r"}),
        ));
        assert_eq!(entra.scopes().len(), 2);
        assert!(Grants::of(&claims(
            json!({"scope": "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f"})
        ))
        .is_empty());
        assert!(
            Grants::of(&claims(json!({"scope": ["system/Patient.rs"]})))
                .scopes()
                .len()
                == 1
        );
    }

    #[test]
    fn a_parameter_that_adds_to_an_answer_is_no_narrowing() {
        let scope = |s: &str| ResourceScope::parse(s).unwrap();
        let registered = scope("system/Observation.rs?category=laboratory");
        assert!(scope("system/Observation.rs?category=laboratory&code=x").within(&registered));
        // Each of these brings in what the registered scope's search would not (containers,
        // included resources, linked patients' records, a named query's, cascaded deletes).
        for wider in [
            "_contained=true",
            "_containedType=container",
            "_include=Observation:patient",
            "_revinclude:iterate=Provenance:target",
            "_query=everything",
            "_mdm=true",
            "_cascade=delete",
            // In another case, as a server that ignores case reads them.
            "_CONTAINED=true",
            "_containedtype=container",
            "_Include=Observation:patient",
            "_REVINCLUDE:iterate=Provenance:target",
            "_Cascade=delete",
        ] {
            let asked = scope(&format!(
                "system/Observation.rs?category=laboratory&{wider}"
            ));
            assert!(!asked.within(&registered), "{wider}");
        }
        // One the registered scope holds itself is no addition.
        let contained = scope("system/Observation.rs?category=lab&_contained=false");
        assert!(
            scope("system/Observation.rs?category=lab&_contained=false&code=x").within(&contained)
        );
    }

    #[test]
    fn a_query_that_narrows_nothing_is_no_granular_scope() {
        for query in [
            "category",
            "category=",
            "category=lab&code=",
            "_count=1",
            "_sort=date&_count=10",
            "_format=json",
            "_elements=id",
            "_summary=true",
            "_include=Observation:patient",
            "_contained=false",
            "_total=accurate",
            "_COUNT=1",
            "_INCLUDE=Observation:patient",
        ] {
            let scope = format!("system/Observation.rs?{query}");
            assert!(ResourceScope::parse(&scope).is_none(), "{scope}");
        }
        for query in [
            "category=lab",
            "category=lab&_count=10",
            "_tag=http://x%7Cy",
            "_has:Observation:patient:code=1234",
            "code:not=x",
        ] {
            let scope = format!("system/Observation.rs?{query}");
            assert!(ResourceScope::parse(&scope).is_some(), "{scope}");
        }
    }
}
