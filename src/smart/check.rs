//! What a request needs, and whether a token's grants cover it.

use http::Method;
use serde_json::Value;

use super::scope::{
    is_parameter_name, is_type, parse_query, Grants, Param, Permissions, ResourceScope,
    ScopeContext,
};
pub(crate) use crate::interaction::classify_request as interaction_of;
use crate::interaction::{Classified, Interaction};

/// Why a request is refused: what it needed and no scope granted, with the scopes that would
/// have sufficed (for `WWW-Authenticate: Bearer error="insufficient_scope", scope="..."`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    /// Scopes that would have sufficed, space-separated, each once.
    pub(crate) sufficient: Vec<String>,
    /// The OperationOutcome's diagnostics.
    pub(crate) diagnostics: String,
    /// The request cannot be checked as it is written (a Bundle that is not JSON, a query
    /// that is not UTF-8): `400`, not a missing scope.
    pub(crate) malformed: bool,
}

impl Refused {
    pub(crate) fn new(diagnostics: impl Into<String>) -> Self {
        Self {
            sufficient: Vec::new(),
            diagnostics: diagnostics.into(),
            malformed: false,
        }
    }

    /// A request that cannot be checked as it is written.
    pub(crate) fn malformed(diagnostics: impl Into<String>) -> Self {
        Self {
            malformed: true,
            ..Self::new(diagnostics)
        }
    }

    fn suggest(mut self, scope: String) -> Self {
        if !self.sufficient.contains(&scope) {
            self.sufficient.push(scope);
        }
        self
    }
}

/// A request the scopes allow, and how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Allowed {
    /// Allowed only by its search parameters (a search narrowed to the token's patient, one
    /// carrying a granular scope's parameters): the FHIR server must not ignore any of them
    /// (`Prefer: handling=strict`), or it would search more than was checked.
    pub(crate) by_parameters: bool,
}

impl Allowed {
    /// Both allowed: by parameters if either is.
    pub(crate) fn and(self, other: Self) -> Self {
        Self {
            by_parameters: self.by_parameters || other.by_parameters,
        }
    }
}

/// How a scope covers a need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coverage {
    /// By what the request names (its type, its path).
    Outright,
    /// Only by its search parameters.
    ByParameters,
}

/// Whose data a need touches, as far as the request says before it is forwarded: what
/// `patient/` scopes are checked against.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    /// `[type]/[id]` (and its history and operations).
    Instance { ty: &'a str, id: &'a str },
    /// A search within a compartment (`Patient/[id]/Observation`), or `Patient/[id]/$everything`.
    Compartment { ty: &'a str, id: &'a str },
    /// A search of a type by its parameters.
    Search { ty: &'a str },
    /// A resource a search includes (`_include`, `_revinclude`): its type, and the parameter
    /// of a plain `_include` (no `:iterate`) by `patient` or `subject`, through which it is
    /// whom a search narrowed by that parameter names; and the type searched.
    Included {
        ty: &'a str,
        via: Option<&'a str>,
        searched: &'a str,
    },
    /// Anything else: a create, system-level searches and history, type history. Whose data
    /// it is cannot be told before forwarding.
    Undecidable,
}

/// One permission a request needs on one resource type (`None`: every type).
#[derive(Debug, Clone, Copy)]
struct Need<'a> {
    resource_type: Option<&'a str>,
    permission: Permissions,
    target: Target<'a>,
}

/// What checks a request: the grants and the request's search parameters.
pub(crate) struct Check<'g> {
    grants: &'g Grants,
}

impl<'g> Check<'g> {
    pub(crate) fn new(grants: &'g Grants) -> Self {
        Self { grants }
    }

    /// Checks a request given its method, path (relative to the FHIR base) and search
    /// parameters (the query's, plus a form `_search` body's).
    pub(crate) fn request(
        &self,
        method: &Method,
        path: &str,
        params: &[Param<'_>],
    ) -> Result<Allowed, Refused> {
        self.classified(method, path, interaction_of(method, path), params)
    }

    /// [`request`](Self::request), the request classified already.
    pub(crate) fn classified(
        &self,
        method: &Method,
        path: &str,
        found: Classified<'_>,
        params: &[Param<'_>],
    ) -> Result<Allowed, Refused> {
        let Some(interaction) = found.interaction else {
            return Err(Refused::new(
                "The request is not a FHIR interaction that SMART scopes can be checked against",
            ));
        };
        let ty = found.resource_type;
        let id = found.resource_id;
        let get = *method == Method::GET || *method == Method::HEAD;
        // Each need is checked as it is found: no list of them is kept.
        let mut refused: Option<Refused> = None;
        let mut allowed = Allowed::default();
        let mut need = |resource_type, permission, target| {
            let need = Need {
                resource_type,
                permission,
                target,
            };
            let coverage = self.covered(&need, params);
            if coverage == Some(Coverage::ByParameters) {
                allowed.by_parameters = true;
            }
            if coverage.is_none() {
                let missing = refused.take().unwrap_or_else(|| {
                    Refused::new(format!(
                        "The token's scopes do not allow {} {}{}",
                        interaction.as_str(),
                        describe(ty, id),
                        self.unreadable_note()
                    ))
                });
                refused = Some(missing.suggest(self.sufficient(&need)));
            }
        };
        // `_cascade=delete` (HAPI's, R5's) deletes with the resource whatever refers to it: of
        // any type, anyone's.
        if params.iter().any(|(name, value)| cascades(name, value)) {
            need(None, Permissions::DELETE, Target::Undecidable);
        }
        // The type a compartment search (`Patient/[id]/Observation`) searches: the last
        // segment (`None` for `*`, every type).
        let compartment_searched = match (interaction, ty, id) {
            (Interaction::Search, Some(_), Some(_)) => path
                .split(['?', '#'])
                .next()
                .unwrap_or("")
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .filter(|t| is_type(t)),
            _ => None,
        };
        match interaction {
            Interaction::Capabilities => return Ok(Allowed::default()),
            Interaction::Read | Interaction::Vread => {
                let (ty, id) = (ty.unwrap_or_default(), id.unwrap_or_default());
                need(Some(ty), Permissions::READ, Target::Instance { ty, id });
            }
            Interaction::Update | Interaction::Patch | Interaction::Delete => {
                let permission = if interaction == Interaction::Delete {
                    Permissions::DELETE
                } else {
                    Permissions::UPDATE
                };
                let ty = ty.unwrap_or_default();
                match id {
                    Some(id) => need(Some(ty), permission, Target::Instance { ty, id }),
                    None => {
                        // Conditional: the resources the parameters find. The answer tells
                        // whether and how many match (`201` or `200`, `412` for several), so
                        // it is a search as well.
                        let search = Target::Search { ty };
                        need(Some(ty), Permissions::SEARCH, search);
                        if interaction == Interaction::Delete {
                            need(Some(ty), permission, search);
                        } else {
                            // What an update or patch writes is its body's: a resource found
                            // by a search narrowed to one patient may be rewritten into
                            // another's record, so whose it becomes cannot be told here.
                            need(Some(ty), permission, Target::Undecidable);
                        }
                        if interaction == Interaction::Update {
                            // A conditional update that finds nothing creates.
                            need(Some(ty), Permissions::CREATE, Target::Undecidable);
                        }
                    }
                }
            }
            Interaction::Create => need(ty, Permissions::CREATE, Target::Undecidable),
            Interaction::History => match (ty, id) {
                (Some(ty), Some(id)) => {
                    need(Some(ty), Permissions::READ, Target::Instance { ty, id })
                }
                (ty, _) => need(ty, Permissions::SEARCH, Target::Undecidable),
            },
            Interaction::Search => match (ty, id) {
                (Some(compartment), Some(id)) => match compartment_searched {
                    // `[compartment]/[id]/[type]`.
                    Some(searched) => need(
                        Some(searched),
                        Permissions::SEARCH,
                        Target::Compartment {
                            ty: compartment,
                            id,
                        },
                    ),
                    // `[compartment]/[id]/*`: every type the compartment holds, which for a
                    // patient's are other patients (`link`) and groups too: anyone's.
                    None => need(None, Permissions::SEARCH, Target::Undecidable),
                },
                (Some(ty), None) => need(Some(ty), Permissions::SEARCH, Target::Search { ty }),
                (None, _) => {
                    // System search: the types `_type` names, or every type.
                    let mut types = params
                        .iter()
                        .filter(|(name, _)| is_type_parameter(name))
                        .flat_map(|(_, value)| value.split(','))
                        .peekable();
                    let named = types.peek().is_some()
                        && params
                            .iter()
                            .filter(|(name, _)| is_type_parameter(name))
                            .flat_map(|(_, value)| value.split(','))
                            .all(is_type);
                    if named {
                        for ty in types {
                            need(Some(ty), Permissions::SEARCH, Target::Undecidable);
                        }
                    } else {
                        need(None, Permissions::SEARCH, Target::Undecidable);
                    }
                }
            },
            Interaction::Operation => {
                let within_type = found.operation.is_some_and(stays_within_its_type);
                // Reads across types by any method (FHIR lets a client POST an operation that
                // changes nothing); any other operation by another method than GET may write.
                let reads_only = get || found.operation.is_some_and(reads_across_types);
                let target = match (ty, id) {
                    (Some("Patient"), Some(id))
                        if !within_type
                            && found.operation.is_some_and(|operation| {
                                stays_in_the_patients_compartment(operation)
                                    && only_narrows_the_compartment(operation, params)
                            }) =>
                    {
                        // Everything in the patient's compartment (`$everything`, `$summary`):
                        // every type, for that patient. (Not any other operation on a patient:
                        // `Patient/[id]/$graphql` follows references and reverse lists out of
                        // the compartment, to every patient of the organization, say; nor one
                        // with a parameter that may add to it, HAPI's `_mdm=true` the records
                        // of the patients linked to this one: of the next arm.)
                        let target = Target::Compartment { ty: "Patient", id };
                        need(None, Permissions::READ, target);
                        need(None, Permissions::SEARCH, target);
                        // Both only read, by any method. (One that writes, `$merge`, is of the
                        // next arm: what it changes is named in its body, maybe another
                        // patient's record.)
                        None
                    }
                    _ if !within_type => {
                        // An operation that may return or touch resources of any type
                        // (`Encounter/1/$everything`, `Composition/1/$document`, `$graphql`,
                        // `$export`, one the gateway does not know): every type, anyone's.
                        need(None, Permissions::READ, Target::Undecidable);
                        need(None, Permissions::SEARCH, Target::Undecidable);
                        (!reads_only).then_some((None, Target::Undecidable))
                    }
                    (Some(ty), Some(id)) => {
                        let target = Target::Instance { ty, id };
                        need(Some(ty), Permissions::READ, target);
                        Some((Some(ty), target))
                    }
                    (ty, None) => {
                        need(ty, Permissions::SEARCH, Target::Undecidable);
                        Some((ty, Target::Undecidable))
                    }
                    (None, Some(_)) => None,
                };
                // An operation invoked otherwise than by GET may change what it touches; one the
                // gateway does not know may also delete (`$expunge`, `$merge`).
                if let (Some((ty, target)), false) = (target, get) {
                    need(ty, Permissions::CREATE, target);
                    need(ty, Permissions::UPDATE, target);
                    if !within_type {
                        need(ty, Permissions::DELETE, target);
                    }
                }
            }
            Interaction::Batch | Interaction::Transaction => {
                return Err(Refused::new(
                    "A batch or transaction is checked entry by entry, from its Bundle",
                ))
            }
        }
        // What a search's parameters reach besides the type searched: the types it includes
        // (an operation's parameters may include as a search's do: `$lastn?_revinclude=...`),
        // and the types a reverse chain (`_has:Observation:patient:code=x`) or a chain
        // (`subject:Patient.name=x`) filters on, whose data the answer reveals.
        // (A read's or history's too: FHIR gives them no `_include`, but a server may honour
        // one there as on a search.)
        let searches = matches!(
            interaction,
            Interaction::Search
                | Interaction::Operation
                | Interaction::Read
                | Interaction::Vread
                | Interaction::History
        ) || (matches!(
            interaction,
            Interaction::Update | Interaction::Patch | Interaction::Delete
        ) && id.is_none());
        if searches {
            for (name, value) in params {
                let mut pieces = name.split(':');
                // Any case: a server that reads names regardless of it takes `_INCLUDE` as
                // `_include`.
                let first = pieces.next().unwrap_or("").to_ascii_lowercase();
                let (reverse, value) = match first.as_str() {
                    "_include" => (false, value.as_ref()),
                    "_revinclude" => (true, value.as_ref()),
                    "_filter" => {
                        // Its expression may chain to any type or reverse-chain from one
                        // (`general-practitioner.name eq x`, `_has:Observation:...`), which
                        // is not parsed here: it needs search on every type.
                        need(None, Permissions::SEARCH, Target::Undecidable);
                        continue;
                    }
                    "_query" => {
                        // A named query the server defines may find and return any type.
                        need(None, Permissions::READ, Target::Undecidable);
                        need(None, Permissions::SEARCH, Target::Undecidable);
                        continue;
                    }
                    "_list" => {
                        // The answer tells which resources the List holds.
                        need(Some("List"), Permissions::READ, Target::Undecidable);
                        continue;
                    }
                    "_in" => {
                        // Membership of a List, Group or CareTeam (R5): the one the value
                        // names, else each.
                        let named = value.split('/').next().filter(|ty| {
                            value.contains('/') && ["List", "Group", "CareTeam"].contains(ty)
                        });
                        match named {
                            Some(ty) => need(Some(ty), Permissions::READ, Target::Undecidable),
                            None => {
                                for ty in ["List", "Group", "CareTeam"] {
                                    need(Some(ty), Permissions::READ, Target::Undecidable);
                                }
                            }
                        }
                        continue;
                    }
                    "_contained" | "_containedtype" => {
                        // Contained resources (`_contained=true`) or their containers
                        // (`_containedType=container`), of any type, anyone's; as `_query`.
                        if !(name == "_contained" && value == "false") {
                            need(None, Permissions::READ, Target::Undecidable);
                            need(None, Permissions::SEARCH, Target::Undecidable);
                        }
                        continue;
                    }
                    _ => {
                        let searched = compartment_searched.or(found.resource_type);
                        for ty in chained_types(searched, name) {
                            need(ty, Permissions::SEARCH, Target::Undecidable);
                        }
                        continue;
                    }
                };
                let plain = pieces.next().is_none();
                match included_type(reverse, value) {
                    Some(ty) => {
                        let via = value.split(':').nth(1).filter(|param| {
                            plain && !reverse && ["patient", "subject"].contains(param)
                        });
                        // The type searched: a compartment search's, not the compartment's.
                        let searched = compartment_searched
                            .or(found.resource_type)
                            .unwrap_or_default();
                        need(
                            Some(ty),
                            Permissions::READ,
                            Target::Included { ty, via, searched },
                        )
                    }
                    None => need(None, Permissions::READ, Target::Undecidable),
                }
            }
        }
        refused.map_or(Ok(allowed), Err)
    }

    /// For a read of `ty` that no scope allows outright: the queries of the granular scopes
    /// (`system/` or `user/`, with read permission on the type) under which it would be allowed
    /// if the resource matches them.
    pub(crate) fn granular_reads(&self, ty: &str) -> Vec<Vec<(String, String)>> {
        self.grants
            .scopes()
            .iter()
            .filter(|scope| {
                !scope.query().is_empty()
                    && scope.context() != ScopeContext::Patient
                    && scope.permissions().contains(Permissions::READ)
                    && scope.covers(Some(ty))
            })
            .map(|scope| scope.query().to_vec())
            .fold(Vec::new(), |mut queries, query| {
                // The same query under two scopes (`system/` and `user/`, a type and `*`) is
                // one search.
                if !queries.contains(&query) {
                    queries.push(query);
                }
                queries
            })
    }

    /// Refuses a patch of `ty` (an entry `n` of a Bundle's, or the request's) by a token that
    /// may not read what it writes ([`reads_what_it_writes`](Self::reads_what_it_writes)): a
    /// patch is applied to the resource as stored, so what it does, and what its answer says
    /// (the patched resource, or an error quoting a value a `copy` or `move` put where it does
    /// not fit, or a `test` that fails), reads the stored resource.
    pub(crate) fn patch_reads(&self, ty: &str, entry: Option<usize>) -> Result<(), Refused> {
        if self.reads_what_it_writes(ty) {
            return Ok(());
        }
        let entry = entry.map_or(String::new(), |n| format!("Entry {n} of the Bundle: "));
        Err(Refused::new(format!(
            "{entry}A patch of {ty} resources needs a scope that reads them too (r on {ty}, \
             without a query, as the scope that writes them): a patch is applied to the resource as \
             stored, and its answer, or its failure, shows what is stored"
        )))
    }

    /// Whether the token may read every resource of type `ty` it may create, update or patch:
    /// a scope with `r` on the type and no query (a granular one reads only some). A `patient/`
    /// one does when every scope that writes the type is a `patient/` one too (what those
    /// write is the patient's, which it reads); beside a `system/` or `user/` scope writing the
    /// type, only one of those reads all it writes.
    pub(crate) fn reads_what_it_writes(&self, ty: &str) -> bool {
        let scopes = self.grants.scopes();
        let covering = || scopes.iter().filter(|scope| scope.covers(Some(ty)));
        let writes_beyond_a_patient = covering().any(|scope| {
            scope.context() != ScopeContext::Patient
                && (scope.permissions().contains(Permissions::CREATE)
                    || scope.permissions().contains(Permissions::UPDATE))
        });
        covering().any(|scope| {
            scope.query().is_empty()
                && scope.permissions().contains(Permissions::READ)
                && (scope.context() != ScopeContext::Patient || !writes_beyond_a_patient)
        })
    }

    /// Whether one scope lets the token create, read, update and search every type,
    /// whoever's: then neither what type a written body says it is nor what its conditional
    /// references search or read (`_list`, `_query`) opens anything, and it need not be read.
    pub(crate) fn writes_every_type(&self) -> bool {
        self.grants.scopes().iter().any(|scope| {
            scope.context() != ScopeContext::Patient
                && scope.query().is_empty()
                && scope.covers(None)
                && [
                    Permissions::CREATE,
                    Permissions::READ,
                    Permissions::UPDATE,
                    Permissions::SEARCH,
                ]
                .into_iter()
                .all(|permission| scope.permissions().contains(permission))
        })
    }

    /// `" (... grants nothing: it is not a SMART scope ...)"` when the token has scopes that
    /// look like resource scopes and do not parse, else nothing.
    fn unreadable_note(&self) -> String {
        match self.grants.unreadable() {
            [] => String::new(),
            unreadable => format!(
                " ({} grant{} nothing: not a SMART resource scope, such as system/Patient.rs)",
                unreadable.join(" "),
                if unreadable.len() == 1 { "s" } else { "" }
            ),
        }
    }

    /// How some scope covers `need`, outright if one does.
    fn covered(&self, need: &Need<'_>, params: &[Param<'_>]) -> Option<Coverage> {
        let mut coverage = None;
        for scope in self.grants.scopes() {
            match self.scope_covers(scope, need, params) {
                Some(Coverage::Outright) => return Some(Coverage::Outright),
                Some(Coverage::ByParameters) => coverage = Some(Coverage::ByParameters),
                None => {}
            }
        }
        coverage
    }

    fn scope_covers(
        &self,
        scope: &ResourceScope,
        need: &Need<'_>,
        params: &[Param<'_>],
    ) -> Option<Coverage> {
        if !scope.permissions().contains(need.permission) || !scope.covers(need.resource_type) {
            return None;
        }
        let mut coverage = Coverage::Outright;
        if !scope.query().is_empty() {
            // A granular scope opens searches that carry its parameters, nothing else (a
            // read could return a resource outside them).
            let searching = need.permission == Permissions::SEARCH
                && matches!(
                    need.target,
                    Target::Search { .. } | Target::Compartment { .. }
                );
            if !searching || !carries(params, scope.query()) {
                return None;
            }
            coverage = Coverage::ByParameters;
        }
        let covers = match scope.context() {
            ScopeContext::System | ScopeContext::User => return Some(coverage),
            ScopeContext::Patient => {
                let patient = self.grants.patient()?;
                match need.target {
                    Target::Instance { ty, id } => ty == "Patient" && id == patient,
                    Target::Compartment { ty, id } => {
                        // Only the types whose `patient` or `subject` parameter can name the
                        // patient: the compartment holds others through other links (a
                        // Patient's `link`, a Group's members, a Practitioner), which are other
                        // people's records. (What the server's compartment holds of these types
                        // may still include one linked otherwise: an Observation the patient
                        // performed.)
                        ty == "Patient"
                            && id == patient
                            && need.resource_type.is_none_or(|searched| {
                                PATIENT_PARAM_TYPES.binary_search(&searched).is_ok()
                                    || SUBJECT_PARAM_TYPES.binary_search(&searched).is_ok()
                            })
                    }
                    Target::Search { ty } => {
                        coverage = Coverage::ByParameters;
                        narrowed_to(ty, params, patient)
                    }
                    // Only the patient themself: included through the parameter that narrows
                    // the search to them (`Observation?patient=123&_include=Observation:patient`).
                    // Through another (`performer`, `link`), by `:iterate` or `_revinclude`, a
                    // `Patient` may be another patient.
                    Target::Included { ty, via, searched } => {
                        coverage = Coverage::ByParameters;
                        ty == "Patient"
                            && ONE_PATIENT_TYPES.binary_search(&searched).is_ok()
                            && via.is_some_and(|via| {
                                narrowed_search(searched, params, patient)
                                    && params.iter().any(|(name, _)| name == via)
                            })
                    }
                    Target::Undecidable => false,
                }
            }
        };
        covers.then_some(coverage)
    }

    /// The scope that would have covered `need`, in the token's own non-patient context (or
    /// `system/`).
    fn sufficient(&self, need: &Need<'_>) -> String {
        let context = if self
            .grants
            .scopes()
            .iter()
            .any(|s| s.context() == ScopeContext::User)
        {
            ScopeContext::User
        } else {
            ScopeContext::System
        };
        format!(
            "{}/{}.{}",
            context.as_str(),
            need.resource_type.unwrap_or("*"),
            need.permission.letters()
        )
    }

    /// Checks the search of a conditional create (`If-None-Exist`, or a Bundle entry's
    /// `ifNoneExist`) of `ty`: its answer tells whether a matching resource exists, so it
    /// needs what that search would need. A search naming another type is refused.
    pub(crate) fn if_none_exist(&self, ty: &str, query: &str) -> Result<Allowed, Refused> {
        let (named, query) = match query.split_once('?') {
            // `?identifier=x` (as HAPI takes it) is the type's own search.
            Some(("", query)) => (ty, query),
            Some((named, query)) => (named.trim_matches('/'), query),
            None => (ty, query),
        };
        if named != ty {
            return Err(Refused::new(format!(
                "The conditional create of a {ty} searches another type"
            )));
        }
        let params = parse_query(query)
            .map_err(|why| Refused::malformed(format!("The conditional create's search {why}")))?;
        self.request(&Method::GET, &format!("/{ty}"), &params)
    }

    /// Checks the conditional references a written resource holds (`"reference":
    /// "Patient?identifier=x"`): the server resolves each by a search of the type it names,
    /// whose outcome (one match, none, several) tells of that type's data, so each needs what
    /// that search would, outright (the server takes no `Prefer: handling=strict` for it).
    pub(crate) fn conditional_references(&self, resource: &Value) -> Result<(), Refused> {
        let mut found = Vec::new();
        conditional_references_in(resource, &mut found);
        self.searches_of(found)
    }

    /// Checks the conditional references a patch may write: a JSON Patch's `value`, a FHIRPath
    /// Patch's `valueString` or `valueReference` set a reference whose key is not
    /// `reference` in the patch itself, so every string that reads as `[type]?...` counts,
    /// besides each `reference` with a `?`. A JSON Patch's `copy` or `move` into a
    /// `reference` is refused: the value it takes (a text the resource holds, say) is not in
    /// the patch to be checked.
    pub(crate) fn patch_references(&self, patch: &Value) -> Result<(), Refused> {
        if let Value::Array(operations) = patch {
            let into_reference = operations.iter().any(|operation| {
                let op = operation.get("op").and_then(Value::as_str);
                let path = operation.get("path").and_then(Value::as_str).unwrap_or("");
                matches!(op, Some("copy" | "move")) && path.rsplit('/').next() == Some("reference")
            });
            if into_reference {
                return Err(Refused::malformed(
                    "The patch copies or moves a value into a reference, whose search (a \
                     conditional reference) could not be checked",
                ));
            }
        }
        let mut found = Vec::new();
        conditional_references_in(patch, &mut found);
        patch_reference_strings(patch, &mut found);
        self.searches_of(found)
    }

    /// Checks the search of each conditional reference found.
    fn searches_of(&self, found: Vec<&str>) -> Result<(), Refused> {
        for reference in found {
            let (target, query) = reference.split_once('?').unwrap_or((reference, ""));
            if !is_type(target) {
                return Err(Refused::malformed(format!(
                    "The resource holds a conditional reference ({reference}) whose search \
                     cannot be checked: only [type]?[parameters] can"
                )));
            }
            let params = parse_query(query).map_err(|why| {
                Refused::malformed(format!(
                    "The resource holds a conditional reference ({reference}) whose search {why}"
                ))
            })?;
            let allowed = self
                .request(&Method::GET, &format!("/{target}"), &params)
                .map_err(|refused| Refused {
                    diagnostics: format!(
                        "The resource holds a conditional reference ({reference}): {}",
                        refused.diagnostics
                    ),
                    ..refused
                })?;
            if allowed.by_parameters {
                return Err(Refused::new(format!(
                    "The resource holds a conditional reference ({reference}) that only its \
                     parameters allow: the server could ignore one of them"
                )));
            }
        }
        Ok(())
    }

    /// Checks the query string of a batch or transaction (`POST [base]?...`), which applies to
    /// every entry: a server reads its `_cascade=delete` for each delete in the Bundle (HAPI
    /// does), and what else it would do with another parameter is not known. Only `_format`,
    /// `_pretty` and a `_cascade` the scopes allow are taken.
    pub(crate) fn batch_query(&self, params: &[Param<'_>]) -> Result<(), Refused> {
        for (name, value) in params {
            match name.as_ref() {
                "_format" | "_pretty" => {}
                _ if cascades(name, value) => self.cascade()?,
                "_cascade" => {}
                other => {
                    return Err(Refused::malformed(format!(
                        "A batch or transaction takes no parameter {other:?} in its URL (only \
                         _format, _pretty and _cascade): what a server does with it for each \
                         entry cannot be checked"
                    )))
                }
            }
        }
        Ok(())
    }

    /// Checks a cascading delete (`_cascade=delete`, HAPI's `X-Cascade: delete`): it deletes
    /// whatever refers to what is deleted, of any type, anyone's, so it needs `d` on `*`.
    pub(crate) fn cascade(&self) -> Result<(), Refused> {
        let need = Need {
            resource_type: None,
            permission: Permissions::DELETE,
            target: Target::Undecidable,
        };
        match self.covered(&need, &[]) {
            Some(_) => Ok(()),
            None => Err(Refused::new(format!(
                "The token's scopes do not allow a cascading delete, which deletes whatever \
                 refers to what is deleted, of any type{}",
                self.unreadable_note()
            ))
            .suggest(self.sufficient(&need))),
        }
    }

    /// Checks a batch or transaction Bundle (JSON), entry by entry.
    pub(crate) fn bundle(&self, body: &[u8]) -> Result<Allowed, Refused> {
        // A key twice in one object is read as its last by this parser and as its first by
        // others: the FHIR server could run another request than the one checked.
        // (The parser's own words say where and what: a key twice, nesting past 128 levels, a
        // number out of range, or no JSON at all.)
        if let Err(why) = serde_json::from_slice::<NoDuplicateKeys>(body) {
            return Err(Refused::malformed(format!(
                "The batch or transaction is not a JSON Bundle with each key once in an object \
                 (servers differ on which of two counts), so its entries cannot be checked: \
                 {why}"
            )));
        }
        let bundle: Value = serde_json::from_slice(body).map_err(|why| {
            Refused::malformed(format!(
                "The batch or transaction is not a JSON Bundle: its entries cannot be checked: \
                 {why}"
            ))
        })?;
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Err(Refused::malformed(
                "A POST to the base must be a batch or transaction Bundle",
            ));
        }
        let entries = match bundle.get("entry") {
            None => return Ok(Allowed::default()),
            Some(Value::Array(entries)) => entries,
            Some(_) => return Err(Refused::malformed("The Bundle's entry is not a list")),
        };
        let mut refused: Option<Refused> = None;
        let mut allowed = Allowed::default();
        for (n, entry) in entries.iter().enumerate() {
            let request = entry.get("request");
            let method = request
                .and_then(|r| r.get("method"))
                .and_then(Value::as_str)
                .and_then(|m| Method::from_bytes(m.as_bytes()).ok());
            let url = request.and_then(|r| r.get("url")).and_then(Value::as_str);
            let (Some(method), Some(url)) = (method, url) else {
                return Err(Refused::malformed(format!(
                    "Entry {n} of the Bundle has no request method and url to check"
                )));
            };
            entry_url(n, url)?;
            let (path, query) = url.split_once('?').unwrap_or((url, ""));
            let mut params = parse_query(query).map_err(|why| {
                Refused::malformed(format!("The query of entry {n} of the Bundle {why}"))
            })?;
            if path.trim_matches('/').is_empty() || path.trim_matches('/') == "_search" {
                // A batch within a batch, or a system search in one: refuse rather than guess.
                if method == Method::POST {
                    return Err(Refused::new(format!(
                        "Entry {n} of the Bundle posts to the base: nested batches are not checked"
                    )));
                }
            }
            let found = interaction_of(&method, path);
            let resource = entry.get("resource");
            // What a server does with an entry's resource is the method's, not the url's: HAPI
            // creates a POST entry's resource whatever its url names (`Observation/_search`,
            // `Patient/$match`), and updates a PUT entry's. It counts only where the request
            // takes one: a create's or an update's (checked below as the type the url names), a
            // patch's, or an operation's input, a Parameters (checked as its parameters). (A
            // read's or a delete's is ignored; a PATCH entry's on an operation's url would be
            // applied as a patch to the instance the url names.)
            if let Some(resource) = resource {
                let said = resource.get("resourceType").and_then(Value::as_str);
                match found.interaction {
                    Some(Interaction::Create | Interaction::Update | Interaction::Patch) => {}
                    Some(Interaction::Operation)
                        if method == Method::POST && said == Some("Parameters") =>
                    {
                        params.extend(operation_parameters(resource).map_err(|why| {
                            Refused::malformed(format!("Entry {n} of the Bundle: {why}"))
                        })?);
                    }
                    _ if ![Method::GET, Method::HEAD, Method::DELETE].contains(&method) => {
                        return Err(Refused::malformed(format!(
                            "Entry {n} of the Bundle carries a resource its request does not \
                             take (a create's, an update's, a patch's, an operation's \
                             Parameters): a server may create or update it whatever the url says"
                        )));
                    }
                    _ => {}
                }
            }
            let checked =
                self.classified(&method, path, found, &params)
                    .and_then(|entry_allowed| {
                        self.entry_writes(n, request, resource, found)
                            .map(|search| entry_allowed.and(search))
                    });
            if let Ok(entry_allowed) = checked {
                // An entry allowed by its parameters: the server must not ignore any of them.
                allowed = allowed.and(entry_allowed);
            }
            if let Err(entry_refused) = checked {
                let mut merged = refused.take().unwrap_or_else(|| {
                    Refused::new(format!(
                        "Entry {n} of the Bundle: {}",
                        entry_refused.diagnostics
                    ))
                });
                merged.malformed |= entry_refused.malformed;
                for scope in entry_refused.sufficient {
                    merged = merged.suggest(scope);
                }
                refused = Some(merged);
            }
        }
        refused.map_or(Ok(allowed), Err)
    }
    /// Checks what a Bundle entry allowed by its url writes, and a search it makes besides: a
    /// patch's conditional references; a create's or update's resource, of the type the url
    /// names, and its conditional references; a conditional create's `ifNoneExist`.
    fn entry_writes(
        &self,
        n: usize,
        request: Option<&Value>,
        resource: Option<&Value>,
        found: Classified<'_>,
    ) -> Result<Allowed, Refused> {
        let ty = found.resource_type.unwrap_or_default();
        if found.interaction == Some(Interaction::Patch) {
            self.patch_reads(ty, Some(n))?;
            if let Some(patch) = resource {
                self.patch_references(&entry_patch(n, patch)?)?;
            }
        }
        if matches!(
            found.interaction,
            Some(Interaction::Create | Interaction::Update)
        ) {
            // The server stores the entry's resource as the type it says it is: it must be the
            // type the scopes were checked for.
            if let Some(resource) = resource {
                let said = resource.get("resourceType").and_then(Value::as_str);
                if said != Some(ty) {
                    return Err(Refused::new(format!(
                        "Entry {n} of the Bundle writes a resource that is not a {ty}, the type \
                         its request url names"
                    )));
                }
                self.conditional_references(resource)?;
            }
        }
        match request.and_then(|r| r.get("ifNoneExist")) {
            None | Some(Value::Null) => Ok(Allowed::default()),
            Some(Value::String(query)) if found.interaction == Some(Interaction::Create) => {
                self.if_none_exist(ty, query)
            }
            Some(_) => Err(Refused::malformed(format!(
                "Entry {n} of the Bundle has an ifNoneExist that cannot be checked"
            ))),
        }
    }
}

/// An operation's parameters as its `Parameters` input names them, as search parameters: each
/// `name` with its primitive `value[x]` as text (a number or a boolean as JSON writes it), or
/// with nothing for one of another kind (a resource, parts, a complex value), so that each
/// name counts as a query's would (an `_include`'s value, a parameter `$everything` does not
/// know).
///
/// # Errors
///
/// A `parameter` that is not a list of objects each with a `name` FHIR could define.
pub(crate) fn operation_parameters(
    parameters: &Value,
) -> Result<Vec<Param<'static>>, &'static str> {
    const UNREADABLE: &str = "its Parameters cannot be read as parameters (a list of parameters \
                              each with a name of letters, digits and _ - . :)";
    let list = match parameters.get("parameter") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(UNREADABLE),
    };
    list.iter()
        .map(|parameter| {
            let name = parameter
                .get("name")
                .and_then(Value::as_str)
                .filter(|name| is_parameter_name(name))
                .ok_or(UNREADABLE)?;
            let members = parameter.as_object().ok_or(UNREADABLE)?;
            let value = members
                .iter()
                .find(|(key, _)| key.starts_with("value"))
                .map(|(_, value)| match value {
                    Value::String(text) => text.clone(),
                    Value::Number(number) => number.to_string(),
                    Value::Bool(flag) => flag.to_string(),
                    _ => String::new(),
                })
                .unwrap_or_default();
            Ok((name.to_owned().into(), value.into()))
        })
        .collect()
}

/// The patch a Bundle entry's resource holds: a FHIRPath Patch (`Parameters`) as it is, a
/// JSON Patch from its `Binary`'s base64 `data`.
fn entry_patch(n: usize, resource: &Value) -> Result<Value, Refused> {
    use base64::Engine as _;
    let unreadable = || {
        Refused::malformed(format!(
            "Entry {n} of the Bundle patches with what cannot be checked: only a FHIRPath \
             Patch (Parameters) or a JSON Patch (a Binary's base64 data) can"
        ))
    };
    match resource.get("resourceType").and_then(Value::as_str) {
        Some("Parameters") => Ok(resource.clone()),
        Some("Binary") => {
            let data = resource
                .get("data")
                .and_then(Value::as_str)
                .ok_or_else(unreadable)?;
            // FHIR's base64Binary may hold white space between its groups.
            let data: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|_| unreadable())?;
            json_resource(&bytes).map_err(|_| unreadable())
        }
        _ => Err(unreadable()),
    }
}

/// Refuses a batch or transaction entry's `request.url` (entry `n`) that may name something
/// other than what it says relative to the FHIR base it is posted to: an absolute URL or one
/// with a scheme (`http:/fhir/b`, which a resolver reads against the base's host), a path
/// from the server's root (`/fhir/b/Patient`) or a network path (`//host`), control
/// characters, tabs or spaces at either end (which URL parsers strip: ` //host`), a dot
/// segment anywhere (a server that resolves them over the whole URL,
/// `Patient/1?/../../Observation/1`, or against its base, `../b/Patient`; `..;x` and dots with
/// `+` too), a fragment, a backslash (read as a slash by some), or a percent-encoded path
/// (decoded by some). A URL in the query (`Observation?code=http://loinc.org|8867-4`) is a
/// parameter's value, and stays.
pub(crate) fn entry_url(n: usize, url: &str) -> Result<(), Refused> {
    let path = url.split_once('?').map_or(url, |(path, _)| path);
    if path.contains(':') || path.starts_with('/') {
        return Err(Refused::new(format!(
            "Entry {n} of the Bundle names an absolute URL, a scheme or a path from the \
             server's root; only URLs relative to the FHIR base can be checked"
        )));
    }
    let dots = url.split(['/', '?', '&', '=']).any(|segment| {
        // (`..;jsessionid` is `..` to a servlet container.)
        let name = segment.split(';').next().unwrap_or(segment);
        name.contains('.')
            && name
                .bytes()
                .all(|b| b == b'.' || b == b'+' || b <= b' ' || b == 0x7f)
    });
    let unprintable =
        url.bytes().any(|b| b < b' ' || b == 0x7f) || url.starts_with(' ') || url.ends_with(' ');
    if dots || unprintable || url.contains(['#', '\\']) || path.contains('%') {
        return Err(Refused::malformed(format!(
            "Entry {n} of the Bundle has a url with a dot segment, a control character or a \
             space at either end, a fragment, a backslash or a percent-encoded path: servers \
             differ on what it names"
        )));
    }
    Ok(())
}

/// Refuses a batch or transaction Bundle posted under a token the scopes do not restrict (a
/// tenant-only one) whose entries' URLs could name something outside the tenant's FHIR base
/// ([`entry_url`]): JSON (each key once) or XML (read by [`crate::xml::bundle_values`], whose
/// entities it decodes), in UTF-8. A JSON or XML body that is no Bundle is the server's to
/// refuse; one in another format or encoding (UTF-16, compressed), or an XML Bundle this
/// reader cannot read (a `DOCTYPE`, a namespace prefix), is refused, its entries unchecked.
pub(crate) fn bundle_entry_urls(body: &[u8]) -> Result<(), Refused> {
    let start = body
        .strip_prefix(b"\xEF\xBB\xBF")
        .unwrap_or(body)
        .trim_ascii_start();
    let malformed = |why: Refused| Refused::malformed(why.diagnostics);
    match start.first() {
        Some(b'{') => {
            let bundle = json_resource(start)?;
            if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
                return Ok(());
            }
            let entries = match bundle.get("entry") {
                None => return Ok(()),
                Some(Value::Array(entries)) => entries,
                Some(_) => return Err(Refused::malformed("The Bundle's entry is not a list")),
            };
            for (n, entry) in entries.iter().enumerate() {
                let url = entry.pointer("/request/url").and_then(Value::as_str);
                if let Some(url) = url {
                    entry_url(n, url).map_err(malformed)?;
                }
            }
            Ok(())
        }
        Some(b'<') => {
            let unreadable = || {
                Refused::malformed(
                    "The XML Bundle cannot be read here to check its entries' URLs (a document \
                     type declaration, a namespace prefix on its elements, a tag this gateway \
                     does not read): write it without",
                )
            };
            // A root read plainly as another element is the server's to refuse; one that
            // cannot be read (a document type, whose entities could make it one) is scanned,
            // and refused.
            if super::layer::xml_root(start).is_some_and(|root| root != "Bundle") {
                return Ok(());
            }
            let found =
                crate::xml::bundle_values(start, &[&[b"Bundle", b"entry", b"request", b"url"]])
                    .ok_or_else(unreadable)?;
            for (n, value) in found.values.into_iter().enumerate() {
                let url = crate::xml::unescape(&start[value]).ok_or_else(unreadable)?;
                entry_url(n, &url).map_err(malformed)?;
            }
            Ok(())
        }
        None => Ok(()),
        Some(_) => Err(Refused::malformed(
            "A batch or transaction must be FHIR JSON or XML in UTF-8 to be checked",
        )),
    }
}

/// A written resource's JSON, refused when it is not JSON or holds a key twice in an object
/// (servers differ on which of the two counts).
pub(crate) fn json_resource(body: &[u8]) -> Result<Value, Refused> {
    // (The parser's own words say where and what: a key twice, nesting past 128 levels, a
    // number out of range, or no JSON at all.)
    let refused = |why: serde_json::Error| {
        Refused::malformed(format!(
            "The body is not JSON with each key once in an object: its resource cannot be \
             checked: {why}"
        ))
    };
    serde_json::from_slice::<NoDuplicateKeys>(body).map_err(refused)?;
    serde_json::from_slice(body).map_err(refused)
}

/// The conditional references (`reference` strings holding a `?`) anywhere in `value`.
fn conditional_references_in<'v>(value: &'v Value, found: &mut Vec<&'v str>) {
    match value {
        Value::Object(members) => {
            for (key, member) in members {
                match (key.as_str(), member) {
                    ("reference", Value::String(reference)) if reference.contains('?') => {
                        found.push(reference);
                    }
                    _ => conditional_references_in(member, found),
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                conditional_references_in(item, found);
            }
        }
        _ => {}
    }
}

/// Whether `text` is a conditional reference as HAPI reads one: the word after the last `/`
/// before its `?` a type's name.
fn reads_as_conditional_reference(text: &str) -> bool {
    text.split_once('?').is_some_and(|(before, _)| {
        let last = before
            .trim()
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or("");
        is_type(last.trim())
    })
}

/// The strings a patch writes where a reference goes that read as conditional references: a
/// JSON Patch's string `value` whose `path` ends in `/reference`; a FHIRPath Patch's string
/// value (`valueString`, `valueUri`, ...) in an operation whose `path` ends in `.reference` or
/// whose `name` is `reference`. (A `reference` member of an object a patch writes is found
/// as in a resource.) In a patch of another shape, every string that reads as one.
fn patch_reference_strings<'v>(patch: &'v Value, found: &mut Vec<&'v str>) {
    let mut push = |value: Option<&'v Value>| {
        if let Some(Value::String(text)) = value {
            if reads_as_conditional_reference(text) {
                found.push(text);
            }
        }
    };
    match patch {
        Value::Array(operations) => {
            for operation in operations {
                let path = operation.get("path").and_then(Value::as_str).unwrap_or("");
                if path.rsplit('/').next() == Some("reference") {
                    push(operation.get("value"));
                }
            }
        }
        Value::Object(members)
            if members.get("resourceType").and_then(Value::as_str) == Some("Parameters") =>
        {
            let parameters = members.get("parameter").and_then(Value::as_array);
            for operation in parameters.into_iter().flatten() {
                let parts = operation.get("part").and_then(Value::as_array);
                let parts = parts.map(Vec::as_slice).unwrap_or_default();
                let part = |name: &str| {
                    parts
                        .iter()
                        .find(|part| part.get("name").and_then(Value::as_str) == Some(name))
                };
                let text = |name: &str| {
                    part(name)
                        .and_then(|part| part.get("valueString"))
                        .and_then(Value::as_str)
                };
                let sets_reference = text("path")
                    .is_some_and(|path| path.trim_end().ends_with(".reference"))
                    || text("name").is_some_and(|name| name.trim() == "reference");
                if let (true, Some(Value::Object(value))) = (sets_reference, part("value")) {
                    for (key, member) in value {
                        if key.starts_with("value") {
                            push(Some(member));
                        }
                    }
                }
            }
        }
        other => strings_like_conditional_references(other, found),
    }
}

/// Every string in `value` that reads as a conditional reference, `[type]?...`.
fn strings_like_conditional_references<'v>(value: &'v Value, found: &mut Vec<&'v str>) {
    match value {
        // As HAPI reads a reference: the type is what follows the last `/` before the `?`
        // (`Patient?x`, `Patient/?x`, `http://ehr/Patient?x`). One with a `/` before its `?`
        // is found too, and refused: only `[type]?[parameters]` can be checked.
        Value::String(text) if reads_as_conditional_reference(text) => found.push(text),
        Value::Object(members) => {
            for member in members.values() {
                strings_like_conditional_references(member, found);
            }
        }
        Value::Array(items) => {
            for item in items {
                strings_like_conditional_references(item, found);
            }
        }
        _ => {}
    }
}

/// Any JSON value with no key twice in one of its objects (else it fails to deserialize).
struct NoDuplicateKeys;

impl<'de> serde::Deserialize<'de> for NoDuplicateKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = NoDuplicateKeys;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("JSON with each key once in an object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if !seen.insert(key) {
                        return Err(serde::de::Error::custom("a key twice in one object"));
                    }
                    map.next_value::<NoDuplicateKeys>()?;
                }
                Ok(NoDuplicateKeys)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                while seq.next_element::<NoDuplicateKeys>()?.is_some() {}
                Ok(NoDuplicateKeys)
            }

            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }

            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }

            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }

            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }

            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }

            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(NoDuplicateKeys)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Whether an operation (its name, without `$`) reads and changes nothing but resources of the
/// type it is invoked on (and answers with them, a `Parameters` or an `OperationOutcome`): then
/// the scopes on that type decide. Any other operation, such as `$everything`, `$summary`,
/// `$document`, `$graphql` or `$export`, or one not listed here, may reach every type.
fn stays_within_its_type(operation: &str) -> bool {
    matches!(
        operation,
        // The resource's own metadata and versions.
        "meta" | "meta-add" | "meta-delete" | "diff" | "validate"
            // Searches and statistics of the type itself (`Patient/$match`, `Observation/$lastn`).
            | "match" | "lastn" | "stats"
            // Terminology, on ValueSet, CodeSystem and ConceptMap.
            | "expand" | "lookup" | "validate-code" | "subsumes" | "translate"
    )
}

/// Whether an operation on a patient answers with that patient's compartment only.
fn stays_in_the_patients_compartment(operation: &str) -> bool {
    matches!(operation, "everything" | "summary")
}

/// Whether an operation that may answer with any type only reads, whatever the method it is
/// invoked by (`POST Patient/[id]/$everything` with its parameters in a body).
fn reads_across_types(operation: &str) -> bool {
    matches!(operation, "everything" | "summary" | "document")
}

/// The parameters of `$everything` and `$summary` that only narrow or shape what they answer
/// with: FHIR's (`start`, `end`, `_since`, `_type`, `_count`), HAPI's paging and
/// `_lastUpdated`, and those of any interaction (`_elements`, `_summary`, `_format`,
/// `_pretty`). Sorted.
const NARROWING_COMPARTMENT_PARAMETERS: [&str; 13] = [
    "_count",
    "_elements",
    "_format",
    "_lastUpdated",
    "_offset",
    "_pretty",
    "_since",
    "_sort",
    "_summary",
    "_total",
    "_type",
    "end",
    "start",
];

/// Whether each of the parameters of `$everything` or `$summary` (`operation`) on a patient
/// only narrows what it answers with (`$summary`'s `profile` too, the IPS profile to answer
/// by). Another may add to it (HAPI's `_mdm=true`: the records of every patient linked to
/// this one), or is not known.
fn only_narrows_the_compartment(operation: &str, params: &[Param<'_>]) -> bool {
    params.iter().all(|(name, _)| {
        NARROWING_COMPARTMENT_PARAMETERS
            .binary_search(&name.as_ref())
            .is_ok()
            || (operation == "summary" && name == "profile")
    })
}

/// Whether a parameter asks for a cascading delete: `_cascade` (any modifier) with any value
/// but `none`.
fn cascades(name: &str, value: &str) -> bool {
    // Any case: a server that reads names regardless of it takes `_CASCADE` as `_cascade`.
    name.split(':')
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("_cascade"))
        && value != "none"
}

/// Whether a parameter's name is `_type` in any case (a server may read names regardless of
/// it: Microsoft's FHIR server takes `_TYPE` as `_type`).
fn is_type_parameter(name: &str) -> bool {
    name.eq_ignore_ascii_case("_type")
}

/// The type an `_include` (`Source:param[:Target]`) or `_revinclude` (`Source:param`) brings
/// in; `None` when it cannot be told (`*`, a parameter that may point anywhere).
fn included_type(reverse: bool, value: &str) -> Option<&str> {
    let mut parts = value.split(':');
    let source = parts.next()?;
    let param = parts.next()?;
    if reverse {
        return is_type(source).then_some(source);
    }
    if let Some(target) = parts.next() {
        return is_type(target).then_some(target);
    }
    if !is_type(source) {
        return None;
    }
    reference_target(Some(source), param)
}

/// The one type a reference search parameter of `source` points to in every FHIR release
/// (`patient`: `Patient`); `None` for one that may point to several (`subject`, `performer`),
/// or to another type of some source in some release when `source` is unknown.
fn reference_target(source: Option<&str>, param: &str) -> Option<&'static str> {
    let (ty, wider_on): (_, &[&str]) = match param {
        "patient" => ("Patient", &[]),
        "organization" => ("Organization", &[]),
        "location" => ("Location", &[]),
        "practitioner" => ("Practitioner", &[]),
        "encounter" => ("Encounter", &ENCOUNTER_OR_EPISODE),
        // R5: `Observation.specimen` is `Reference(Specimen | Group)`.
        "specimen" => ("Specimen", &["Observation"]),
        // R5: a packaged product's medication may be a device, a nutrition product...
        "medication" => ("Medication", &["PackagedProductDefinition"]),
        _ => return None,
    };
    match source {
        Some(source) if !wider_on.contains(&source) => Some(ty),
        None if wider_on.is_empty() => Some(ty),
        _ => None,
    }
}

/// The types whose `encounter` search parameter targets `EpisodeOfCare` besides `Encounter`
/// in R4's `search-parameters.json` (`DocumentReference.context.encounter` may name an
/// episode of care; the shared `clinical-encounter` parameter declares both for every type
/// that uses it), sorted.
const ENCOUNTER_OR_EPISODE: [&str; 12] = [
    "Composition",
    "DeviceRequest",
    "DiagnosticReport",
    "DocumentReference",
    "Flag",
    "List",
    "NutritionOrder",
    "Observation",
    "Procedure",
    "RiskAssessment",
    "ServiceRequest",
    "VisionPrescription",
];

/// The types a chained or reverse-chained parameter filters on, link by link, in any mix:
/// `subject:Patient.name`: `Patient`; `patient.general-practitioner:Practitioner.name`:
/// `Patient`, then `Practitioner`; `_has:Observation:patient:code`: `Observation`;
/// `_has:Observation:encounter:patient.name`: `Observation`, then `Patient`;
/// `patient._has:Group:member:_id`: `Patient`, then `Group`. A forward link's type is its type
/// modifier, else the one type of a few reference parameters, else `None` (every type); a
/// reverse chain that does not read as one is `None` too. Nothing for a plain parameter.
fn chained_types<'a>(searched: Option<&'a str>, name: &'a str) -> Vec<Option<&'a str>> {
    let mut types = Vec::new();
    let mut rest = name;
    // The type the next link's parameter is of.
    let mut source = searched;
    loop {
        // Any case: a server that reads names regardless of it takes `_HAS:` as `_has:`.
        if rest.eq_ignore_ascii_case("_has") {
            // A reverse chain with nothing after it: refused by servers, every type here.
            types.push(None);
            return types;
        }
        if let Some(reverse) = rest
            .get(..5)
            .filter(|prefix| prefix.eq_ignore_ascii_case("_has:"))
            .map(|_| &rest[5..])
        {
            // `_has:[type]:[reference]:[the rest, itself a parameter of that type]`.
            let mut pieces = reverse.splitn(3, ':');
            match (pieces.next(), pieces.next(), pieces.next()) {
                (Some(ty), Some(_reference), Some(then)) if is_type(ty) && !then.is_empty() => {
                    types.push(Some(ty));
                    source = Some(ty);
                    rest = then;
                }
                _ => {
                    types.push(None);
                    return types;
                }
            }
            continue;
        }
        let Some((link, then)) = rest.split_once('.') else {
            return types;
        };
        let mut parts = link.split(':');
        let param = parts.next().unwrap_or("");
        let ty = match parts.next() {
            Some(ty) if is_type(ty) => Some(ty),
            Some(_) => None,
            None => reference_target(source, param),
        };
        types.push(ty);
        source = ty;
        rest = then;
    }
}

/// Whether the search parameters carry each of a granular scope's (the same value, alone).
fn carries(params: &[Param<'_>], required: &[(String, String)]) -> bool {
    required
        .iter()
        .all(|(name, value)| params.iter().any(|(n, v)| n == name && v == value))
}

/// Whether a search of `ty` is narrowed to `patient` by its parameters.
fn narrowed_to(ty: &str, params: &[Param<'_>], patient: &str) -> bool {
    if ty == "Patient" {
        return params.iter().any(|(n, v)| n == "_id" && v == patient)
            && !params.iter().any(|(n, v)| n == "_id" && v != patient);
    }
    narrowed_search(ty, params, patient)
}

/// The types whose `patient` search parameter can point to a Patient in every FHIR release
/// that has the type (DSTU2, STU3, R4, R5: the releases' `search-parameters.json`), sorted.
const PATIENT_PARAM_TYPES: [&str; 80] = [
    "Account",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "BiologicallyDerivedProductDispense",
    "BodySite",
    "BodyStructure",
    "CarePlan",
    "CareTeam",
    "ChargeItem",
    "Claim",
    "ClinicalImpression",
    "Communication",
    "CommunicationRequest",
    "Composition",
    "Condition",
    "Consent",
    "Contract",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "DeviceAssociation",
    "DeviceDispense",
    "DeviceRequest",
    "DeviceUsage",
    "DeviceUseRequest",
    "DeviceUseStatement",
    "DiagnosticOrder",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "Encounter",
    "EncounterHistory",
    "EnrollmentRequest",
    "EpisodeOfCare",
    "FamilyMemberHistory",
    "Flag",
    "GenomicStudy",
    "Goal",
    "GuidanceResponse",
    "ImagingManifest",
    "ImagingObjectSelection",
    "ImagingSelection",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "Invoice",
    "List",
    "MeasureReport",
    "Media",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationOrder",
    "MedicationRequest",
    "MedicationStatement",
    "MolecularSequence",
    "NutritionIntake",
    "NutritionOrder",
    "Observation",
    "Order",
    "Person",
    "Procedure",
    "ProcedureRequest",
    "Provenance",
    "QuestionnaireResponse",
    "ReferralRequest",
    "RelatedPerson",
    "RequestGroup",
    "RequestOrchestration",
    "ResearchSubject",
    "RiskAssessment",
    "Sequence",
    "ServiceRequest",
    "Specimen",
    "SupplyDelivery",
    "Task",
    "VisionPrescription",
];

/// The same for the `subject` search parameter, sorted.
const SUBJECT_PARAM_TYPES: [&str; 43] = [
    "Account",
    "AdverseEvent",
    "Basic",
    "CarePlan",
    "CareTeam",
    "ChargeItem",
    "Communication",
    "CommunicationRequest",
    "Composition",
    "Contract",
    "DeviceAssociation",
    "DeviceDispense",
    "DeviceRequest",
    "DeviceUseRequest",
    "DeviceUseStatement",
    "DiagnosticOrder",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EncounterHistory",
    "EnrollmentRequest",
    "Flag",
    "GenomicStudy",
    "Goal",
    "GuidanceResponse",
    "ImagingSelection",
    "InventoryItem",
    "Invoice",
    "List",
    "Media",
    "MedicationRequest",
    "NutritionIntake",
    "Observation",
    "Order",
    "Procedure",
    "ProcedureRequest",
    "QuestionnaireResponse",
    "RequestGroup",
    "RequestOrchestration",
    "RiskAssessment",
    "ServiceRequest",
    "Specimen",
    "Task",
];

/// The types whose `patient` and `subject` name one patient, the record's own, in every
/// release: a search of one narrowed to the patient may include that Patient through them.
/// (Not an Appointment's participants, an AuditEvent's agents, a Provenance's targets, a
/// Person's links, an Account's or a Contract's subjects, or a List's or a Composition's,
/// which may be many patients.) Sorted.
#[rustfmt::skip]
const ONE_PATIENT_TYPES: [&str; 27] = [
    "AllergyIntolerance", "CarePlan", "ClinicalImpression", "Condition", "DetectedIssue",
    "DiagnosticReport", "DocumentReference", "Encounter", "EpisodeOfCare",
    "FamilyMemberHistory", "Flag", "Goal", "ImagingStudy", "Immunization",
    "MedicationAdministration", "MedicationDispense", "MedicationOrder", "MedicationRequest",
    "MedicationStatement", "NutritionOrder", "Observation", "Procedure", "QuestionnaireResponse",
    "RiskAssessment", "ServiceRequest", "Specimen", "VisionPrescription",
];

/// Whether `patient` or `subject` narrows a search of `ty` to the patient, each such parameter
/// naming that patient only (no `,` alternatives, no chained or modified forms) and being one
/// the type has: on another type (`Binary?patient=123`), a server that ignores a parameter it
/// does not know would search everyone's.
fn narrowed_search(ty: &str, params: &[Param<'_>], patient: &str) -> bool {
    let reference = format!("Patient/{patient}");
    let mut narrowed = false;
    for (name, value) in params {
        let base = name.split([':', '.']).next().unwrap_or("");
        let types: &[&str] = match base {
            "patient" => &PATIENT_PARAM_TYPES,
            "subject" => &SUBJECT_PARAM_TYPES,
            _ => continue,
        };
        if types.binary_search(&ty).is_err() {
            return false;
        }
        if name != base {
            // `patient:missing`, `subject.name`, `patient:Patient`: not a plain narrowing.
            return false;
        }
        let names_patient = match base {
            "patient" => value == patient || *value == reference,
            _ => *value == reference,
        };
        if !names_patient {
            return false;
        }
        narrowed = true;
    }
    narrowed
}

fn describe(ty: Option<&str>, id: Option<&str>) -> String {
    match (ty, id) {
        (Some(ty), Some(id)) => format!("{ty}/{id}"),
        (Some(ty), None) => ty.to_owned(),
        _ => "at the system level".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn grants(scopes: &str) -> Grants {
        Grants::from_scopes(scopes.split(' '), Some("123"))
    }

    fn check(scopes: &str, method: Method, url: &str) -> Result<Allowed, Refused> {
        let grants = grants(scopes);
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        Check::new(&grants).request(&method, path, &parse_query(query).unwrap())
    }

    fn allowed(scopes: &str, method: Method, url: &str) -> bool {
        check(scopes, method, url).is_ok()
    }

    #[test]
    fn one_search_for_each_granular_query_however_many_scopes_give_it() {
        let grants = grants(
            "system/Observation.rs?category=lab user/Observation.r?category=lab \
             system/*.r?category=lab system/Observation.r?category=vital-signs",
        );
        let queries = Check::new(&grants).granular_reads("Observation");
        assert_eq!(
            queries,
            [
                vec![("category".to_owned(), "lab".to_owned())],
                vec![("category".to_owned(), "vital-signs".to_owned())]
            ]
        );
    }

    #[test]
    fn what_a_token_writes_it_reads_only_with_a_plain_read_of_the_type() {
        let reads = |scopes: &str, ty: &str| Check::new(&grants(scopes)).reads_what_it_writes(ty);
        for (scopes, ty, expected) in [
            ("system/Patient.u", "Patient", false),
            ("system/Patient.cu", "Patient", false),
            ("system/Patient.ru", "Patient", true),
            ("system/Patient.u system/*.r", "Patient", true),
            ("system/Patient.u user/Patient.r", "Patient", true),
            ("system/*.cruds", "Observation", true),
            ("system/Patient.cruds", "Observation", false),
            // A granular read reads only some.
            (
                "system/Observation.cu system/Observation.r?category=lab",
                "Observation",
                false,
            ),
            // A patient's read covers what its patient scope writes, not a system one's.
            ("patient/Observation.cru", "Observation", true),
            (
                "patient/Observation.r patient/Observation.u",
                "Observation",
                true,
            ),
            (
                "system/Observation.u patient/Observation.r",
                "Observation",
                false,
            ),
            (
                "system/Observation.u system/Observation.r patient/Observation.r",
                "Observation",
                true,
            ),
            // v1.
            ("system/Patient.write", "Patient", false),
            ("system/Patient.*", "Patient", true),
        ] {
            assert_eq!(reads(scopes, ty), expected, "{scopes} on {ty}");
        }
    }

    #[test]
    fn each_interaction_needs_its_permission() {
        use Method as M;
        let cases: &[(M, &str, &str)] = &[
            (M::GET, "/Patient/1", "r"),
            (M::HEAD, "/Patient/1", "r"),
            (M::GET, "/Patient/1/_history/2", "r"),
            (M::GET, "/Patient/1/_history", "r"),
            (M::PUT, "/Patient/1", "u"),
            (M::PATCH, "/Patient/1", "u"),
            // A conditional update that finds nothing creates.
            (M::PUT, "/Patient?identifier=x", "cus"),
            (M::PATCH, "/Patient?identifier=x", "us"),
            (M::DELETE, "/Patient/1", "d"),
            (M::DELETE, "/Patient?identifier=x", "ds"),
            (M::POST, "/Patient", "c"),
            (M::GET, "/Patient?name=x", "s"),
            (M::POST, "/Patient/_search", "s"),
            (M::GET, "/Patient/_history", "s"),
            (M::GET, "/Patient/$match", "s"),
            (M::GET, "/Patient/1/$meta", "r"),
        ];
        for (method, url, letter) in cases {
            let right = format!("system/Patient.{letter}");
            assert!(
                allowed(&right, method.clone(), url),
                "{method} {url} with {right}"
            );
            // Without any one of the letters, the request is refused and that letter named.
            for missing in letter.chars() {
                let others: String = "cruds".chars().filter(|c| *c != missing).collect();
                let wrong = format!("system/Patient.{others} system/Observation.cruds");
                let refused = check(&wrong, method.clone(), url).unwrap_err();
                assert_eq!(
                    refused.sufficient,
                    [format!("system/Patient.{missing}")],
                    "{method} {url}"
                );
            }
        }
        // Reading the statement needs nothing; a POSTed operation may write.
        assert!(allowed("system/Observation.r", Method::GET, "/metadata"));
        assert!(!allowed(
            "system/Patient.r",
            Method::POST,
            "/Patient/1/$meta"
        ));
        assert!(allowed(
            "system/Patient.cru",
            Method::POST,
            "/Patient/1/$meta"
        ));
    }

    #[test]
    fn v1_scopes_and_wildcards() {
        assert!(allowed("system/Patient.read", Method::GET, "/Patient/1"));
        assert!(allowed(
            "system/Patient.read",
            Method::GET,
            "/Patient?name=x"
        ));
        assert!(!allowed("system/Patient.read", Method::PUT, "/Patient/1"));
        assert!(allowed("system/Patient.write", Method::PUT, "/Patient/1"));
        assert!(allowed("system/Patient.write", Method::POST, "/Patient"));
        assert!(!allowed("system/Patient.write", Method::GET, "/Patient/1"));
        assert!(allowed("user/*.read", Method::GET, "/Observation/9"));
        assert!(allowed("system/*.*", Method::DELETE, "/Observation/9"));
        assert!(allowed("system/*.cruds", Method::GET, "/"));
        assert!(
            !allowed("system/Patient.rs", Method::GET, "/"),
            "system search needs *"
        );
        assert!(allowed(
            "system/Patient.s system/Observation.s",
            Method::GET,
            "/?_type=Patient,Observation"
        ));
        assert!(!allowed(
            "system/Patient.s",
            Method::GET,
            "/?_type=Patient,Observation"
        ));
        assert!(!allowed("system/Patient.rs", Method::GET, "/_history"));
        let refused = check("user/Patient.r", Method::GET, "/Observation/1").unwrap_err();
        assert_eq!(
            refused.sufficient,
            ["user/Observation.r"],
            "in the token's context"
        );
    }

    #[test]
    fn patient_scopes_open_that_patient_only() {
        let p = "patient/*.rs";
        assert!(allowed(p, Method::GET, "/Patient/123"));
        assert!(!allowed(p, Method::GET, "/Patient/124"));
        assert!(allowed(p, Method::GET, "/Patient/123/Observation"));
        assert!(!allowed(p, Method::GET, "/Patient/124/Observation"));
        assert!(allowed(p, Method::GET, "/Observation?patient=123&code=x"));
        assert!(allowed(p, Method::GET, "/Observation?patient=Patient/123"));
        assert!(allowed(p, Method::GET, "/Observation?subject=Patient/123"));
        assert!(allowed(p, Method::GET, "/Patient?_id=123"));
        assert!(allowed(p, Method::GET, "/Patient/123/$everything"));
        assert!(!allowed(p, Method::GET, "/Patient/124/$everything"));
        for unnarrowed in [
            "/Observation",
            "/Observation?code=x",
            "/Observation?patient=124",
            "/Observation?patient=123,124",
            "/Observation?patient=123&patient=124",
            "/Observation?subject=123",
            "/Observation?patient:missing=true",
            "/Observation?subject.name=x",
            "/Patient?_id=123,124",
            "/Patient?_id=124",
            "/Observation/9",
            "/Observation/_history",
        ] {
            assert!(!allowed(p, Method::GET, unnarrowed), "{unnarrowed}");
        }
        assert!(!allowed("patient/*.cruds", Method::POST, "/Observation"));
        // A conditional delete searches within the patient's data, and needs `s`.
        let conditional = "/Observation?patient=123&code=x";
        assert!(allowed(
            "patient/Observation.ds",
            Method::DELETE,
            conditional
        ));
        assert!(!allowed(
            "patient/Observation.d",
            Method::DELETE,
            conditional
        ));
        assert!(!allowed(
            "patient/Observation.ds",
            Method::DELETE,
            "/Observation?code=x"
        ));
        // A conditional update or patch writes what its body says, maybe into another
        // patient's record (a found resource's subject rewritten, or one created for
        // another): refused, however narrowed its search.
        for method in [Method::PUT, Method::PATCH] {
            assert!(!allowed("patient/*.cruds", method, conditional));
        }
        // So is an operation that writes on the patient (`$merge` names the other one in its
        // body); the ones that read their compartment are not.
        assert!(!allowed(
            "patient/*.cruds",
            Method::POST,
            "/Patient/123/$merge"
        ));
        assert!(allowed(
            "patient/*.rs",
            Method::POST,
            "/Patient/123/$everything"
        ));
        // A compartment search only of the types whose `patient` or `subject` names the
        // record's patient: not the patients it links, a practitioner, a group.
        assert!(allowed(
            "patient/*.rs",
            Method::GET,
            "/Patient/123/Observation"
        ));
        assert!(allowed(
            "patient/*.rs",
            Method::GET,
            "/Patient/123/Condition"
        ));
        for other in ["Patient", "Practitioner", "Group", "Organization"] {
            let url = format!("/Patient/123/{other}");
            assert!(!allowed("patient/*.rs", Method::GET, &url), "{url}");
        }
        // No patient claim: patient scopes open nothing.
        let none = Grants::from_scopes(["patient/*.rs"], None);
        assert!(Check::new(&none)
            .request(&Method::GET, "/Patient/123", &[])
            .is_err());
    }

    #[test]
    fn granular_scopes_open_searches_carrying_their_parameters() {
        let g = "system/Observation.rs?category=laboratory";
        assert!(allowed(g, Method::GET, "/Observation?category=laboratory"));
        assert!(allowed(
            g,
            Method::GET,
            "/Observation?category=laboratory&code=x"
        ));
        assert!(!allowed(
            g,
            Method::GET,
            "/Observation?category=vital-signs"
        ));
        assert!(!allowed(
            g,
            Method::GET,
            "/Observation?category=laboratory,vital-signs"
        ));
        assert!(!allowed(g, Method::GET, "/Observation"));
        assert!(
            !allowed(g, Method::GET, "/Observation/1"),
            "a read is not decidable"
        );
        let both = "patient/Observation.rs?category=laboratory";
        assert!(allowed(
            both,
            Method::GET,
            "/Observation?category=laboratory&patient=123"
        ));
        assert!(!allowed(
            both,
            Method::GET,
            "/Observation?category=laboratory"
        ));
    }

    #[test]
    fn includes_need_read_on_what_they_bring_in() {
        let url = "/Observation?code=x&_include=Observation:performer:Practitioner";
        assert!(!allowed("system/Observation.s", Method::GET, url));
        assert!(allowed(
            "system/Observation.s system/Practitioner.r",
            Method::GET,
            url
        ));
        let refused = check("system/Observation.s", Method::GET, url).unwrap_err();
        assert_eq!(refused.sufficient, ["system/Practitioner.r"]);
        let patient = "/Observation?code=x&_include=Observation:patient";
        assert!(!allowed("system/Observation.s", Method::GET, patient));
        assert!(allowed(
            "system/Observation.s system/Patient.r",
            Method::GET,
            patient
        ));
        let any = "/Observation?_include=Observation:subject";
        assert!(!allowed(
            "system/Observation.s system/Patient.r",
            Method::GET,
            any
        ));
        assert!(allowed("system/Observation.s system/*.r", Method::GET, any));
        let rev = "/Patient?name=x&_revinclude=Provenance:target";
        assert!(!allowed("system/Patient.s", Method::GET, rev));
        assert!(allowed(
            "system/Patient.s system/Provenance.r",
            Method::GET,
            rev
        ));
        let iterate = "/Patient?_include:iterate=Patient:organization";
        assert!(!allowed("system/Patient.s", Method::GET, iterate));
        // A patient's own search may include that patient.
        let own = "/Observation?patient=123&_include=Observation:patient";
        assert!(allowed("patient/*.rs", Method::GET, own));
        let other = "/Observation?patient=123&_include=Observation:performer:Practitioner";
        assert!(!allowed("patient/*.rs", Method::GET, other));
        let subject = "/Observation?subject=Patient/123&_include=Observation:subject:Patient";
        assert!(allowed("patient/*.rs", Method::GET, subject));
        // A Patient included otherwise than through the parameter that narrows the search may
        // be another patient: the performer, a linked patient, one an iteration reaches.
        for another in [
            "/Observation?patient=123&_include=Observation:performer:Patient",
            "/Observation?patient=123&_include=Observation:subject:Patient",
            "/Observation?patient=123&_include:iterate=Observation:patient",
            "/Observation?patient=123&_include=Observation:patient&_include:iterate=Patient:link:Patient",
            "/Observation?patient=123&_include:recurse=Observation:patient",
            "/Patient?_id=123&_include=Patient:link:Patient",
            "/Patient?_id=123&_revinclude=Patient:link",
            "/Observation?patient=123&_revinclude:iterate=Patient:link",
        ] {
            assert!(!allowed("patient/*.rs", Method::GET, another), "{another}");
        }
        // A parameter with one target on most types may have more on some, in some release:
        // R4's `DocumentReference:encounter` brings episodes of care too, R5's
        // `Observation:specimen` groups. Those need `*` (or name the target), the others not.
        for (wider, narrow, ty) in [
            (
                "/DocumentReference?code=x&_include=DocumentReference:encounter",
                "/Condition?code=x&_include=Condition:encounter",
                "Encounter",
            ),
            (
                "/Observation?code=x&_include=Observation:specimen",
                "/DiagnosticReport?code=x&_include=DiagnosticReport:specimen",
                "Specimen",
            ),
        ] {
            let source = &wider[1..wider.find('?').unwrap()];
            let scopes = format!("system/{source}.s system/{ty}.r");
            assert!(!allowed(&scopes, Method::GET, wider), "{wider}");
            assert!(
                allowed(&format!("system/{source}.s system/*.r"), Method::GET, wider),
                "{wider}"
            );
            let named = format!("{wider}:{ty}");
            assert!(allowed(&scopes, Method::GET, &named), "{named}");
            let source = &narrow[1..narrow.find('?').unwrap()];
            let scopes = format!("system/{source}.s system/{ty}.r");
            assert!(allowed(&scopes, Method::GET, narrow), "{narrow}");
        }
        // Chained the same way: the link's type is known only where it has one target.
        assert!(!allowed(
            "system/DocumentReference.s system/Encounter.s",
            Method::GET,
            "/DocumentReference?encounter.status=finished"
        ));
        assert!(allowed(
            "system/Condition.s system/Encounter.s",
            Method::GET,
            "/Condition?encounter.status=finished"
        ));
        // `device` may point to a Device or a DeviceMetric: it needs both, or `*`.
        let device = "/Observation?code=x&_include=Observation:device";
        assert!(!allowed(
            "system/Observation.s system/Device.r",
            Method::GET,
            device
        ));
        assert!(allowed(
            "system/Observation.s system/*.r",
            Method::GET,
            device
        ));
    }

    #[test]
    fn a_patient_narrowing_counts_only_on_a_type_that_has_the_parameter() {
        // Sorted, for the binary search.
        for types in [&PATIENT_PARAM_TYPES[..], &SUBJECT_PARAM_TYPES[..]] {
            assert!(types.windows(2).all(|w| w[0] < w[1]));
        }
        for narrowed in [
            "/Observation?patient=123",
            "/Observation?subject=Patient/123",
            "/Condition?patient=Patient/123",
            "/MedicationOrder?patient=123",
            "/Task?subject=Patient/123",
        ] {
            assert!(allowed("patient/*.rs", Method::GET, narrowed), "{narrowed}");
        }
        assert!(ONE_PATIENT_TYPES.windows(2).all(|w| w[0] < w[1]));
        // Through a parameter that may name other patients (an appointment's participants):
        // no Patient included.
        assert!(!allowed(
            "patient/*.rs",
            Method::GET,
            "/Appointment?patient=123&_include=Appointment:patient"
        ));
        assert!(allowed(
            "patient/*.rs",
            Method::GET,
            "/Condition?patient=123&_include=Condition:patient"
        ));
        // A type without such a parameter (in some release that has the type): a lenient
        // server would ignore it and search everyone's.
        for unnarrowed in [
            "/Binary?patient=123",
            "/Practitioner?patient=123",
            "/Group?patient=123",
            "/Coverage?patient=123",
            "/Condition?subject=Patient/123",
            "/Binary?patient=123&_include=Binary:patient",
        ] {
            assert!(
                !allowed("patient/*.rs", Method::GET, unnarrowed),
                "{unnarrowed}"
            );
        }
    }

    #[test]
    fn what_only_its_parameters_allow_says_so() {
        let by_parameters = |scopes: &str, method: Method, url: &str| {
            check(scopes, method, url).unwrap().by_parameters
        };
        // Narrowed to the patient, or carrying a granular scope's parameters: the server must
        // not ignore them.
        assert!(by_parameters(
            "patient/*.rs",
            Method::GET,
            "/Observation?patient=123"
        ));
        assert!(by_parameters(
            "patient/*.rs",
            Method::GET,
            "/Observation?patient=123&_include=Observation:patient"
        ));
        assert!(by_parameters(
            "patient/*.rs",
            Method::GET,
            "/Patient?_id=123"
        ));
        assert!(by_parameters(
            "system/Observation.rs?category=laboratory",
            Method::GET,
            "/Observation?category=laboratory&code=x"
        ));
        // What the path alone allows, or a scope on the whole type: not.
        assert!(!by_parameters("patient/*.rs", Method::GET, "/Patient/123"));
        assert!(!by_parameters(
            "patient/*.rs",
            Method::GET,
            "/Patient/123/Observation"
        ));
        assert!(!by_parameters(
            "system/Observation.rs",
            Method::GET,
            "/Observation?code=x"
        ));
        // A scope covering it outright wins over one covering it by its parameters.
        assert!(!by_parameters(
            "system/Observation.rs?category=laboratory system/Observation.s",
            Method::GET,
            "/Observation?category=laboratory"
        ));
    }

    /// A GET of `url` is refused with the scopes `short`, allowed with `enough`.
    fn needs_more_than(url: &str, short: &str, enough: &str) {
        assert!(!allowed(short, Method::GET, url), "{url} with {short}");
        assert!(allowed(enough, Method::GET, url), "{url} with {enough}");
    }

    #[test]
    fn includes_on_a_read_and_membership_need_what_they_reach_in_any_case() {
        // A read's (or history's) `_include`, which a server may honour as on a search.
        for url in [
            "/Patient/1?_include=Patient:organization",
            "/Patient/1?_revinclude=Observation:subject",
            "/Patient/1/_history/2?_include=Patient:organization",
            "/Patient/1/_history?_include=Patient:organization",
        ] {
            needs_more_than(url, "system/Patient.r", "system/Patient.r system/*.r");
        }
        assert!(allowed(
            "system/Patient.r",
            Method::GET,
            "/Patient/1?_elements=id"
        ));
        // `_in`: membership of the List, Group or CareTeam named, else of each.
        needs_more_than(
            "/Patient?_in=Group/7",
            "system/Patient.rs system/List.r",
            "system/Patient.rs system/Group.r",
        );
        needs_more_than(
            "/Patient?_in=7",
            "system/Patient.rs system/List.r system/Group.r",
            "system/Patient.rs system/List.r system/Group.r system/CareTeam.r",
        );
        // Names in another case are read as a server that ignores case reads them.
        for url in [
            "/Patient?_INCLUDE=Patient:organization",
            "/Patient?_RevInclude=Observation:subject",
            "/Patient?_LIST=1",
        ] {
            assert!(!allowed("system/Patient.rs", Method::GET, url), "{url}");
        }
    }

    #[test]
    fn filter_named_queries_and_lists_need_what_they_may_reach() {
        // `_filter` may chain and reverse-chain anywhere: search on every type.
        for url in [
            "/Patient?_filter=general-practitioner.name%20eq%20smith",
            "/Patient?_filter=_has:Observation:patient:code%20eq%201234-5",
            "/Patient?_filter=name%20eq%20smith",
        ] {
            needs_more_than(url, "system/Patient.rs", "system/Patient.rs system/*.s");
        }
        // A conditional delete filtered so, too.
        let delete = "/Observation?_filter=patient.name%20eq%20smith";
        assert!(!allowed("system/Observation.cruds", Method::DELETE, delete));
        assert!(allowed(
            "system/Observation.cruds system/*.s",
            Method::DELETE,
            delete
        ));
        // A named query may return anything.
        needs_more_than(
            "/Patient?_query=everyone-interesting",
            "system/Patient.rs",
            "system/*.rs",
        );
        // Searching within a List tells what the List holds.
        needs_more_than(
            "/Patient?_list=42",
            "system/Patient.rs",
            "system/Patient.rs system/List.r",
        );
        // None opens a patient/ scope, however narrowed the search.
        let patient = Grants::from_scopes(["patient/*.cruds"], Some("123"));
        for special in ["_filter", "_query", "_list"] {
            let query = format!("patient=123&{special}=x");
            let params = parse_query(&query).unwrap();
            assert!(
                Check::new(&patient)
                    .request(&Method::GET, "/Observation", &params)
                    .is_err(),
                "{special}"
            );
        }
    }

    #[test]
    fn parameter_names_a_server_could_read_otherwise_are_refused() {
        for query in [
            "?_include:iterate=*",
            "%3F_include=*",
            "_include%20=*",
            "=x",
            "na%00me=1",
            "caf%C3%A9=1",
        ] {
            assert!(
                matches!(
                    parse_query(query),
                    Err(super::super::scope::Unreadable::Name(_))
                ),
                "{query}"
            );
        }
        assert_eq!(
            parse_query("%FF=1"),
            Err(super::super::scope::Unreadable::NotUtf8)
        );
        // A `;` as it is: a separator to some servers (`name=x;_include=*` is two parameters
        // there), part of a value to others. Encoded, it is a value's.
        for query in ["name;x=1", "name=x;_include=Patient:organization", ";"] {
            assert_eq!(
                parse_query(query),
                Err(super::super::scope::Unreadable::Semicolon),
                "{query}"
            );
        }
        assert_eq!(parse_query("name=x%3B_include").unwrap()[0].1, "x;_include");
        let params = parse_query(
            "_has:Observation:patient:code=1&subject:Patient.name=a+b&_include:iterate=x&value-quantity=1&&",
        )
        .unwrap();
        assert_eq!(params.len(), 4);
        assert_eq!(params[1].1, "a b");
        // In a Bundle entry's url too.
        let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "GET", "url": "Observation??_revinclude:iterate=*"}}]});
        let g = grants("system/Observation.rs");
        let refused = Check::new(&g)
            .bundle(&serde_json::to_vec(&bundle).unwrap())
            .unwrap_err();
        assert!(refused.malformed, "{}", refused.diagnostics);
    }

    #[test]
    fn chains_and_reverse_chains_need_search_on_the_types_they_filter_on() {
        // What patients have an Observation with this code tells about the Observations.
        let has = "/Patient?_has:Observation:patient:code=1234-5";
        let refused = check("system/Patient.rs", Method::GET, has).unwrap_err();
        assert_eq!(refused.sufficient, ["system/Observation.s"]);
        // In any case: a server may read names regardless of it.
        for url in [
            "/Patient?_HAS:Observation:patient:code=1234-5",
            "/Patient?_Has:Observation:patient:code=1234-5",
            "/Patient?_HAS=x",
        ] {
            assert!(!allowed("system/Patient.rs", Method::GET, url), "{url}");
        }
        // A system search's `_type` in any case names the types searched.
        assert!(!allowed(
            "system/Observation.rs",
            Method::GET,
            "/?_type=Observation&_TYPE=Patient"
        ));
        for (reverse, short, enough) in [
            (
                has,
                "system/Patient.rs",
                "system/Patient.rs system/Observation.s",
            ),
            (
                "/Patient?_has:Observation:patient:_has:AuditEvent:entity:agent=x",
                "system/Patient.rs system/Observation.s",
                "system/Patient.rs system/Observation.s system/AuditEvent.s",
            ),
        ] {
            needs_more_than(reverse, short, enough);
        }
        // A `_has` that does not read as one: every type.
        for odd in [
            "/Patient?_has:Observation:patient=x",
            "/Patient?_has:observation:patient:code=x",
            "/Patient?_has=x",
            "/Patient?_has:Observation:patient:_has=x",
        ] {
            assert!(
                !allowed("system/Patient.rs system/Observation.s", Method::GET, odd),
                "{odd}"
            );
            assert!(
                allowed("system/Patient.rs system/*.s", Method::GET, odd),
                "{odd}"
            );
        }
        // Chains: the type modifier, or the one type of the parameter, else every type.
        for (chained, short, enough) in [
            (
                "/Observation?subject:Patient.name=Smith",
                "system/Observation.rs",
                "system/Observation.rs system/Patient.s",
            ),
            (
                "/Observation?patient.birthdate=2000",
                "system/Observation.rs",
                "system/Observation.rs system/Patient.s",
            ),
            (
                "/Observation?subject.name=Smith",
                "system/Observation.rs system/Patient.s",
                "system/Observation.rs system/*.s",
            ),
            (
                "/Observation?patient.general-practitioner:Practitioner.name=x",
                "system/Observation.rs system/Patient.s",
                "system/Observation.rs system/Patient.s system/Practitioner.s",
            ),
            (
                "/Observation?patient._has:Group:member:_id=102",
                "system/Observation.rs system/Patient.s",
                "system/Observation.rs system/Patient.s system/Group.s",
            ),
            // Mixed: a chain within a reverse chain, and a chain after one within a chain.
            (
                "/Encounter?_has:Observation:encounter:patient.name=Smith",
                "system/Encounter.rs system/Observation.s",
                "system/Encounter.rs system/Observation.s system/Patient.s",
            ),
            (
                "/Encounter?_has:Observation:encounter:subject:Patient.general-practitioner:Practitioner.name=x",
                "system/Encounter.rs system/Observation.s system/Patient.s",
                "system/Encounter.rs system/Observation.s system/Patient.s system/Practitioner.s",
            ),
            (
                "/Observation?patient._has:Observation:subject:device.identifier=x",
                "system/Observation.rs system/Patient.s",
                "system/Observation.rs system/Patient.s system/*.s",
            ),
        ] {
            needs_more_than(chained, short, enough);
        }
        // The same in a conditional update's search, and under patient scopes (a chain is not
        // a narrowing: refused).
        assert!(!allowed(
            "system/Observation.rus",
            Method::PUT,
            "/Observation?subject:Patient.identifier=x"
        ));
        assert!(!allowed(
            "patient/*.rs",
            Method::GET,
            "/Observation?patient=123&subject:Patient.name=Smith"
        ));
        assert!(!allowed(
            "patient/*.rs",
            Method::GET,
            "/Patient?_id=123&_has:Observation:patient:code=x"
        ));
        // Plain and modified parameters are no chains.
        assert!(allowed(
            "system/Observation.rs",
            Method::GET,
            "/Observation?code:text=x&value-quantity=5.4"
        ));
    }

    #[test]
    fn a_bundle_with_a_key_twice_in_an_object_is_refused() {
        let g = grants("system/Patient.r");
        let check = Check::new(&g);
        // The last `url` is what this parser keeps; a server keeping the first would delete.
        let twice = br#"{"resourceType":"Bundle","type":"batch","entry":[
            {"request":{"method":"DELETE","url":"Patient/1","method":"GET"}}]}"#;
        let refused = check.bundle(twice).unwrap_err();
        assert!(refused.diagnostics.contains("each key once"), "{refused:?}");
        assert!(
            refused
                .diagnostics
                .contains("a key twice in one object at line 2"),
            "{refused:?}"
        );
        // What the parser could not read is named, and where.
        let deep = format!(
            r#"{{"resourceType":"Bundle","type":"batch","x":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let refused = check.bundle(deep.as_bytes()).unwrap_err();
        assert!(
            refused.diagnostics.contains("recursion limit exceeded"),
            "{refused:?}"
        );
        let huge = br#"{"resourceType":"Bundle","type":"batch","x":1e999999}"#;
        let refused = check.bundle(huge).unwrap_err();
        assert!(
            refused.diagnostics.contains("number out of range"),
            "{refused:?}"
        );
        let refused = json_resource(br#"{"resourceType":"Patient","x":1e999999}"#).unwrap_err();
        assert!(
            refused
                .diagnostics
                .contains("number out of range at line 1"),
            "{refused:?}"
        );
        let escaped = br#"{"resourceType":"Bundle","type":"batch","entry":[
            {"request":{"method":"DELETE","url":"Patient/1","m\u0065thod":"GET"}}]}"#;
        assert!(check.bundle(escaped).is_err());
        // The same key in two objects is fine.
        let once = br#"{"resourceType":"Bundle","type":"batch","entry":[
            {"request":{"method":"GET","url":"Patient/1"}},{"request":{"method":"GET","url":"Patient/2"}}]}"#;
        assert_eq!(check.bundle(once), Ok(Allowed::default()));
    }

    #[test]
    fn conditional_references_need_the_searches_they_make() {
        let check_with = |scopes: &str, resource: Value| {
            let grants = grants(scopes);
            Check::new(&grants).conditional_references(&resource)
        };
        let observation = |reference: &str| {
            json!({"resourceType": "Observation", "subject": {"reference": reference},
                "performer": [{"reference": "Practitioner/1"}]})
        };
        let searching = observation("Patient?identifier=x&birthdate=2000-01-01");
        assert!(check_with("system/Observation.c", searching.clone()).is_err());
        assert!(check_with("system/Observation.c system/Patient.s", searching.clone()).is_ok());
        // Plain references search nothing.
        assert!(check_with("system/Observation.c", observation("Patient/1")).is_ok());
        // Nested anywhere in the resource.
        let nested = json!({"resourceType": "Observation",
            "contained": [{"resourceType": "Specimen", "subject": {"reference": "Group?name=x"}}]});
        let refused = check_with("system/Observation.c system/Patient.s", nested).unwrap_err();
        assert_eq!(refused.sufficient, ["system/Group.s"]);
        // One that cannot be read as a search of a type.
        for odd in ["http://other/Patient?x=1", "?identifier=x", "patient?x=1"] {
            assert!(check_with("system/*.s", observation(odd)).is_err(), "{odd}");
        }
        // A patient/ scope's search narrowed by its parameters only: the server resolving the
        // reference would not be held to them.
        let patient = Grants::from_scopes(["patient/*.cruds"], Some("123"));
        assert!(Check::new(&patient)
            .conditional_references(&observation("Observation?patient=123"))
            .is_err());
        // In a transaction's entries too.
        let grants = grants("system/Observation.cu");
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"request": {"method": "POST", "url": "Observation"}, "resource": searching}]})
        .to_string();
        assert!(Check::new(&grants).bundle(bundle.as_bytes()).is_err());
    }

    #[test]
    fn bundle_entry_urls_must_name_one_thing_to_every_server() {
        let check_with = |scopes: &str, url: &str| {
            let grants = grants(scopes);
            let body = json!({"resourceType": "Bundle", "type": "batch",
                "entry": [{"request": {"method": "GET", "url": url}}]})
            .to_string();
            Check::new(&grants).bundle(body.as_bytes())
        };
        for url in [
            "Patient/1#/../../Observation/1",
            "Patient/1?/../../Observation/1",
            "Patient/1?x=/../Observation",
            "Patient/./1",
            "Patient/1/..",
            "Patient\\..\\Observation/1",
            "Patient/%2e%2e/Observation/1",
            "Patient/1?_id=..",
        ] {
            let refused = check_with("system/Patient.rs", url).unwrap_err();
            assert!(refused.malformed, "{url}: {refused:?}");
        }
        assert!(check_with("system/Patient.rs", "Patient/1").is_ok());
        assert!(check_with(
            "system/Patient.rs",
            "Patient?name=a.b&birthdate=ge2000-01-01"
        )
        .is_ok());
        // An entry allowed only by its parameters makes the batch a strict one.
        assert_eq!(
            check_with(
                "system/Observation.rs?category=laboratory",
                "Observation?category=laboratory"
            ),
            Ok(Allowed {
                by_parameters: true
            })
        );
    }

    #[test]
    fn a_tenant_only_batch_may_name_nothing_outside_the_base() {
        let json = |url: &str| {
            json!({"resourceType": "Bundle", "type": "transaction",
                "entry": [{"request": {"method": "GET", "url": "Patient/1"}},
                          {"request": {"method": "GET", "url": url}}]})
            .to_string()
        };
        let xml = |url: &str| {
            format!(
                "<?xml version=\"1.0\"?>\n<!-- a batch -->\n<Bundle xmlns=\"http://hl7.org/fhir\">\
                 <type value=\"batch\"/><entry><request><method value=\"GET\"/>\
                 <url value=\"Patient/1\"/></request></entry><entry><resource><ValueSet>\
                 <url value=\"http://hl7.org/fhir/ValueSet/x\"/></ValueSet></resource>\
                 <request><method value=\"POST\"/><url value=\"{url}\"/></request></entry></Bundle>"
            )
        };
        for url in [
            "http://127.0.0.1:9100/fhir/b/Patient/1",
            "//127.0.0.1:9100/fhir/b/Patient",
            "../b/Patient/1",
            "Patient/../../b/Patient",
            "/fhir/a/../b/Patient",
            "Patient/%2e%2e/%2e%2e/b",
            "..+/b/Patient",
            "\\\\127.0.0.1:9100\\fhir\\b",
            "Patient/1#x",
            // What a resolver reads against the base's host, or strips to a network path.
            "/fhir/b/Patient/1",
            "http:/fhir/b/Patient/1",
            " //127.0.0.1:9100/fhir/b/Patient/1",
            "/\t/127.0.0.1:9100/fhir/b",
            "http:\t//127.0.0.1:9100/fhir/b",
            "Patient/1\n",
            "Patient/..;/..;/b/Patient/1",
            "Patient/.+./b",
        ] {
            let refused = bundle_entry_urls(json(url).as_bytes()).unwrap_err();
            assert!(refused.malformed, "{url}: {refused:?}");
            assert!(
                refused.diagnostics.starts_with("Entry 1 "),
                "{url}: {refused:?}"
            );
            let escaped = url.replace('&', "&amp;").replace('"', "&quot;");
            let refused = bundle_entry_urls(xml(&escaped).as_bytes()).unwrap_err();
            assert!(refused.malformed, "{url}: {refused:?}");
        }
        // Dots written as character references are dots.
        let refused = bundle_entry_urls(xml("&#46;&#x2E;/b/Patient").as_bytes()).unwrap_err();
        assert!(refused.diagnostics.contains("dot segment"), "{refused:?}");
        for url in [
            "Patient",
            "Patient?name=a.b",
            "Observation/1/_history/2",
            "$export",
            // A URL in the query is a parameter's value.
            "Observation?code=http://loinc.org|8867-4",
            "Patient?identifier=http://hospital.example/mrn|123",
            "ValueSet/$expand?url=http://hl7.org/fhir/ValueSet/x",
            "CodeSystem/$lookup?system=http://loinc.org&code=1",
        ] {
            assert_eq!(bundle_entry_urls(json(url).as_bytes()), Ok(()), "{url}");
            let escaped = url.replace('&', "&amp;");
            assert_eq!(bundle_entry_urls(xml(&escaped).as_bytes()), Ok(()), "{url}");
        }
        // A key twice (which counts?), or XML this reader does not take: refused unchecked.
        let twice = r#"{"resourceType": "Bundle", "type": "batch", "entry": [{"request":
            {"method": "GET", "url": "Patient/1", "url": "../b/Patient/1"}}]}"#;
        assert!(bundle_entry_urls(twice.as_bytes()).unwrap_err().malformed);
        for unreadable in [
            // Prefixed elements and namespaced values, which a parser reading local names
            // takes for `url` and `value`.
            "<Bundle xmlns=\"http://hl7.org/fhir\" xmlns:f=\"http://hl7.org/fhir\"><entry>\
             <request><method value=\"GET\"/><f:url value=\"../b/Patient/1\"/></request>\
             </entry></Bundle>",
            "<Bundle xmlns:f=\"http://hl7.org/fhir\"><entry><f:request><url value=\"../b\"/>\
             </f:request></entry></Bundle>",
            "<Bundle><entry><request><url value=\"Patient/1\" x:value=\"../b/Patient/1\" \
             xmlns:x=\"urn:x\"/></request></entry></Bundle>",
            "<Bundle><entry><request><url value=\"Patient/1\" value=\"../b\"/></request>\
             </entry></Bundle>",
            "<f:Bundle xmlns:f=\"http://hl7.org/fhir\"><f:entry/></f:Bundle>",
            "<!DOCTYPE Bundle [<!ENTITY u \"../b\">]><Bundle><entry/></Bundle>",
            "<Bundle><entry><request><url value=\"Patient\"></request></Bundle>",
        ] {
            let refused = bundle_entry_urls(unreadable.as_bytes()).unwrap_err();
            assert!(
                refused.diagnostics.contains("cannot be read"),
                "{unreadable}"
            );
        }
        // JSON or XML that is not a Bundle: the server's to refuse.
        for other in [
            &br#"{"resourceType": "Patient"}"#[..],
            b"<Patient xmlns=\"http://hl7.org/fhir\"/>",
            b"",
        ] {
            assert_eq!(bundle_entry_urls(other), Ok(()));
        }
        // Another format or encoding cannot be checked: UTF-16 (as a server decoding the
        // charset its Content-Type names reads it), gzip, a form.
        let utf16: Vec<u8> = json("../b/Patient/1")
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        for other in [&utf16[..], b"\x1f\x8b\x08\x00", b"name=x"] {
            assert!(bundle_entry_urls(other).unwrap_err().malformed);
        }
    }

    #[test]
    fn bundles_are_checked_entry_by_entry() {
        let bundle = |entries: serde_json::Value| {
            serde_json::to_vec(
                &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
            )
            .unwrap()
        };
        let g = grants("system/Patient.cru system/Observation.rs");
        let check = Check::new(&g);
        let ok = bundle(json!([
            {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}},
            {"request": {"method": "GET", "url": "Observation?code=x"}},
            {"request": {"method": "PUT", "url": "Patient/1"}}
        ]));
        assert_eq!(check.bundle(&ok), Ok(Allowed::default()));
        let one_out = bundle(json!([
            {"request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "DELETE", "url": "Observation/7"}}
        ]));
        let refused = check.bundle(&one_out).unwrap_err();
        assert_eq!(refused.sufficient, ["system/Observation.d"]);
        assert!(
            refused.diagnostics.starts_with("Entry 1"),
            "{}",
            refused.diagnostics
        );
        for bad in [
            b"not json".to_vec(),
            serde_json::to_vec(&json!({"resourceType": "Patient"})).unwrap(),
            bundle(json!([{"request": {"url": "Patient"}}])),
            bundle(json!([{"request": {"method": "GET", "url": "http://elsewhere/Patient/1"}}])),
            bundle(json!([{"request": {"method": "POST", "url": "/"}}])),
            bundle(json!([{"request": {"method": "GET", "url": "Patient/../Observation/1"}}])),
        ] {
            assert!(
                check.bundle(&bad).is_err(),
                "{}",
                String::from_utf8_lossy(&bad)
            );
        }
        assert_eq!(check.bundle(&bundle(json!([]))), Ok(Allowed::default()));
    }

    #[test]
    fn operations_that_may_reach_other_types_need_every_type() {
        for url in [
            "/Patient/$everything",
            "/Patient/1/$summary",
            "/Encounter/1/$everything",
            "/Encounter/$everything",
            "/Composition/1/$document",
            "/Patient/1/$graphql",
            "/$graphql",
            "/$export",
            "/Group/1/$export",
            "/Patient/1/$made-up",
        ] {
            for own in [
                "system/Patient.rs system/Encounter.rs system/Composition.rs system/Group.rs",
                "system/*.s",
                "system/*.r",
            ] {
                let refused = check(own, Method::GET, url).unwrap_err();
                assert!(
                    refused
                        .sufficient
                        .iter()
                        .all(|s| s.starts_with("system/*.")),
                    "{url}: {refused:?}"
                );
            }
            assert!(allowed("system/*.rs", Method::GET, url), "{url}");
            let name = url.rsplit('$').next().unwrap();
            if reads_across_types(name) {
                // Only reads, by POST too.
                assert!(allowed("system/*.rs", Method::POST, url), "{url}");
            } else {
                // By POST it may write, even delete.
                assert!(!allowed("system/*.crus", Method::POST, url), "{url}");
                assert!(allowed("system/*.cruds", Method::POST, url), "{url}");
            }
        }
        assert!(allowed(
            "patient/*.rs",
            Method::POST,
            "/Patient/123/$everything"
        ));
        // An operation's includes need read on what they bring in, as a search's do.
        let lastn = "/Observation/$lastn?patient=1&_revinclude=Provenance:target";
        assert!(!allowed("system/Observation.s", Method::GET, lastn));
        assert!(allowed(
            "system/Observation.s system/Provenance.r",
            Method::GET,
            lastn
        ));
        // The patient's own compartment, for a patient-context token.
        assert!(allowed(
            "patient/*.rs",
            Method::GET,
            "/Patient/123/$summary"
        ));
        assert!(!allowed(
            "patient/*.rs",
            Method::GET,
            "/Patient/124/$summary"
        ));
        assert!(!allowed(
            "patient/Patient.rs",
            Method::GET,
            "/Patient/123/$graphql"
        ));
        // Not even with every type of the patient's: a GraphQL query follows references and
        // reverse lists out of the compartment; nor an operation the gateway does not know.
        for url in [
            "/Patient/123/$graphql?query=%7BmanagingOrganization%7Bid%7D%7D",
            "/Patient/123/$some-other",
        ] {
            assert!(!allowed("patient/*.rs", Method::GET, url), "{url}");
            assert!(allowed("user/*.rs", Method::GET, url), "{url}");
        }
        assert!(!allowed(
            "patient/*.rs",
            Method::GET,
            "/Encounter/1/$everything"
        ));
        // Operations that stay within their type: that type's scopes decide.
        for (url, scope) in [
            ("/Patient/1/$meta", "system/Patient.r"),
            ("/Patient/1/$validate", "system/Patient.r"),
            ("/Patient/$match", "system/Patient.s"),
            ("/Observation/$lastn?patient=1", "system/Observation.s"),
            ("/ValueSet/$expand?url=x", "system/ValueSet.s"),
            ("/CodeSystem/$lookup?code=x", "system/CodeSystem.s"),
        ] {
            assert!(allowed(scope, Method::GET, url), "{url} with {scope}");
        }
    }

    #[test]
    fn a_bundles_patch_entries_conditional_references_need_their_searches() {
        use base64::Engine as _;
        let bundle = |resource: serde_json::Value| {
            serde_json::to_vec(&json!({"resourceType": "Bundle", "type": "transaction",
                "entry": [{"request": {"method": "PATCH", "url": "Observation/1"},
                           "resource": resource}]}))
            .unwrap()
        };
        let json_patch = |value: &str| {
            let patch = json!([{"op": "replace", "path": "/subject/reference", "value": value}]);
            // Wrapped, as FHIR's base64Binary may be.
            let data = base64::engine::general_purpose::STANDARD.encode(patch.to_string());
            let (head, tail) = data.split_at(8);
            json!({"resourceType": "Binary", "contentType": "application/json-patch+json",
                   "data": format!("{head}\n  {tail}")})
        };
        let fhirpath_patch = |value: &str| {
            json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
                {"name": "type", "valueCode": "replace"},
                {"name": "path", "valueString": "Observation.subject"},
                {"name": "value", "valueReference": {"reference": value}}]}]})
        };
        // (A patch reads what it patches: `r` beside `u`.)
        let writer = grants("system/Observation.ru");
        let searcher = grants("system/Observation.ru system/Patient.s");
        let blind = grants("system/Observation.u system/Patient.s");
        for patch in [
            json_patch("Patient?identifier=x"),
            fhirpath_patch("Patient?identifier=x"),
        ] {
            let body = bundle(patch);
            let refused = Check::new(&writer).bundle(&body).unwrap_err();
            assert_eq!(
                refused.sufficient,
                ["system/Patient.s"],
                "{}",
                refused.diagnostics
            );
            assert!(Check::new(&searcher).bundle(&body).is_ok());
        }
        for plain in [json_patch("Patient/1"), fhirpath_patch("Patient/1")] {
            assert!(Check::new(&writer).bundle(&bundle(plain.clone())).is_ok());
            let refused = Check::new(&blind).bundle(&bundle(plain)).unwrap_err();
            assert!(
                refused
                    .diagnostics
                    .contains("A patch of Observation resources"),
                "{}",
                refused.diagnostics
            );
        }
        // A patch that cannot be read: refused, not passed unchecked.
        for unreadable in [
            json!({"resourceType": "Binary", "data": "not base64!"}),
            json!({"resourceType": "Observation", "status": "final"}),
        ] {
            let refused = Check::new(&searcher)
                .bundle(&bundle(unreadable))
                .unwrap_err();
            assert!(refused.malformed, "{}", refused.diagnostics);
        }
    }

    #[test]
    fn transaction_entries_write_the_types_their_urls_name() {
        let bundle = |entries: serde_json::Value| {
            serde_json::to_vec(
                &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
            )
            .unwrap()
        };
        let all = grants("system/Patient.crus");
        let g = grants("system/Patient.cru");
        let check = Check::new(&g);
        for wrong in [
            json!([{"request": {"method": "POST", "url": "Patient"},
                    "resource": {"resourceType": "Observation"}}]),
            json!([{"request": {"method": "PUT", "url": "Patient/1"},
                    "resource": {"resourceType": "Consent"}}]),
            json!([{"request": {"method": "PUT", "url": "Patient?identifier=x"},
                    "resource": {"resourceType": "Consent"}}]),
            json!([{"request": {"method": "POST", "url": "Patient"}, "resource": {}}]),
            json!([{"request": {"method": "POST", "url": "Patient"}, "resource": "Patient"}]),
        ] {
            // A conditional update searches too: `s` lets that entry reach the type check.
            let conditional = wrong.to_string().contains('?');
            let refused = Check::new(if conditional { &all } else { &g })
                .bundle(&bundle(wrong.clone()))
                .unwrap_err();
            assert!(
                refused.diagnostics.contains("not a Patient"),
                "{wrong}: {refused:?}"
            );
        }
        let right = json!([
            {"request": {"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient"}},
            {"request": {"method": "PUT", "url": "Patient/1"}, "resource": {"resourceType": "Patient"}},
            // A patch's resource is the patch (a Parameters or a Binary), not the patient.
            {"request": {"method": "PATCH", "url": "Patient/1"}, "resource": {"resourceType": "Parameters"}}
        ]);
        assert_eq!(check.bundle(&bundle(right)), Ok(Allowed::default()));
        // A conditional create searches: that needs search on the type, and the type only.
        let conditional = |if_none_exist: serde_json::Value| {
            bundle(
                json!([{"request": {"method": "POST", "url": "Patient", "ifNoneExist": if_none_exist},
                           "resource": {"resourceType": "Patient"}}]),
            )
        };
        let refused = check
            .bundle(&conditional(json!("identifier=x")))
            .unwrap_err();
        assert_eq!(refused.sufficient, ["system/Patient.s"]);
        let searching = grants("system/Patient.crus");
        let check = Check::new(&searching);
        assert_eq!(
            check.bundle(&conditional(json!("identifier=x"))),
            Ok(Allowed::default())
        );
        assert_eq!(
            check.bundle(&conditional(json!("Patient?identifier=x"))),
            Ok(Allowed::default())
        );
        assert_eq!(
            check.bundle(&conditional(json!("?identifier=x"))),
            Ok(Allowed::default())
        );
        for other in [json!("Observation?code=secret"), json!(7)] {
            assert!(
                check.bundle(&conditional(other.clone())).is_err(),
                "{other}"
            );
        }
        assert!(check
            .if_none_exist("Patient", "/Observation?code=x")
            .is_err());
    }

    #[test]
    fn scopes_that_do_not_parse_restrict_and_grant_nothing() {
        for typo in [
            "system/patient.rs",
            "system/Patient.sr",
            "System/Patient.rs",
            "system/Patient.read?category=x",
            "system/Patient.rs?",
            "patient.Patient.read",
            "user.all.read",
        ] {
            let g = Grants::from_scopes(["openid", typo], Some("123"));
            assert!(!g.is_empty(), "{typo}");
            assert!(g.scopes().is_empty(), "{typo}");
            let refused = Check::new(&g)
                .request(&Method::GET, "/Patient/123", &[])
                .unwrap_err();
            assert!(refused.diagnostics.contains(typo), "{refused:?}");
        }
        for not_smart in [
            "openid",
            "launch/patient",
            "user.read",
            "fhirUser",
            "profile",
            "User.Read.All",
            "user.Read.All",
        ] {
            assert!(
                Grants::from_scopes([not_smart], None).is_empty(),
                "{not_smart}"
            );
        }
    }

    #[test]
    fn what_is_not_fhir_is_refused() {
        assert!(!allowed(
            "system/*.cruds",
            Method::GET,
            "/Patient/1/2/3/4/5/6"
        ));
        assert!(!allowed("system/*.cruds", Method::GET, "/admin"));
    }

    /// A transaction of these entries.
    fn transaction(entries: Value) -> Vec<u8> {
        serde_json::to_vec(
            &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        )
        .unwrap()
    }

    #[test]
    fn a_bundle_entrys_resource_counts_only_where_its_request_takes_one() {
        // A POST entry is a create of its resource to HAPI, whatever its url: a search's or an
        // operation's url with a Patient in it would create the Patient unchecked.
        let patient = json!({"resourceType": "Patient"});
        for (scopes, method, url) in [
            ("system/Observation.s", "POST", "Observation/_search"),
            ("patient/*.rs", "POST", "Patient/123/$everything"),
            ("system/Patient.cus", "POST", "Patient/$match"),
            ("system/Patient.cru", "POST", "Patient/1/$meta"),
            ("system/Patient.cru", "PUT", "Patient/1/$meta"),
            ("system/*.cruds", "POST", "$graphql"),
            ("system/*.cruds", "PATCH", "Patient/1/$meta"),
        ] {
            let g = grants(scopes);
            let body = transaction(json!([
                {"request": {"method": method, "url": url}, "resource": patient}
            ]));
            let refused = Check::new(&g).bundle(&body).unwrap_err();
            assert!(refused.malformed, "{method} {url}: {refused:?}");
        }
        // An operation's Parameters is its input, checked as its parameters are.
        let g = grants("system/Patient.cus");
        let parameters = json!({"resourceType": "Parameters", "parameter": [
            {"name": "resource", "resource": {"resourceType": "Patient"}},
            {"name": "onlyCertainMatches", "valueBoolean": true},
            {"name": "count", "valueInteger": 3}]});
        let body = transaction(json!([
            {"request": {"method": "POST", "url": "Patient/$match"}, "resource": parameters}
        ]));
        assert_eq!(Check::new(&g).bundle(&body), Ok(Allowed::default()));
        let including = json!({"resourceType": "Parameters", "parameter": [
            {"name": "_revinclude", "valueString": "Provenance:target"}]});
        let body = transaction(json!([
            {"request": {"method": "POST", "url": "Observation/$lastn"}, "resource": including}
        ]));
        let g = grants("system/Observation.cus");
        let refused = Check::new(&g).bundle(&body).unwrap_err();
        assert_eq!(refused.sufficient, ["system/Provenance.r"]);
        let g = grants("system/Observation.cus system/Provenance.r");
        assert!(Check::new(&g).bundle(&body).is_ok());
        // A resource where a server ignores it (a read, a delete) changes nothing.
        let g = grants("system/Patient.rd");
        let body = transaction(json!([
            {"request": {"method": "DELETE", "url": "Patient/1"}, "resource": patient},
            {"request": {"method": "GET", "url": "Patient/2"}, "resource": patient}
        ]));
        assert_eq!(Check::new(&g).bundle(&body), Ok(Allowed::default()));
    }

    #[test]
    fn cascading_deletes_need_delete_on_every_type() {
        // HAPI deletes whatever refers to the resource, of any type, anyone's.
        let url = "/Patient/1?_cascade=delete";
        let refused = check("system/Patient.d", Method::DELETE, url).unwrap_err();
        assert_eq!(refused.sufficient, ["system/*.d"]);
        assert!(allowed("system/*.d", Method::DELETE, url));
        assert!(!allowed(
            "patient/*.cruds",
            Method::DELETE,
            "/Patient/123?_cascade=delete"
        ));
        assert!(!allowed(
            "system/Observation.ds",
            Method::DELETE,
            "/Observation?code=x&_cascade=delete"
        ));
        assert!(allowed(
            "system/Patient.d",
            Method::DELETE,
            "/Patient/1?_cascade=none"
        ));
        // In any case: a server may read names regardless of it.
        for url in ["/Patient/1?_CASCADE=delete", "/Patient/1?_Cascade:x=delete"] {
            assert!(!allowed("system/Patient.d", Method::DELETE, url), "{url}");
        }
        // In a Bundle's entry too.
        let g = grants("system/Patient.d");
        let body = transaction(json!([
            {"request": {"method": "DELETE", "url": "Patient/1?_cascade=delete"}}
        ]));
        assert_eq!(
            Check::new(&g).bundle(&body).unwrap_err().sufficient,
            ["system/*.d"]
        );
    }

    #[test]
    fn everything_under_patient_scopes_takes_only_narrowing_parameters() {
        // Looked up by binary search.
        assert!(NARROWING_COMPARTMENT_PARAMETERS.is_sorted());
        let p = "patient/*.rs";
        for narrowed in [
            "/Patient/123/$everything?_count=10&_offset=10&_since=2020-01-01T00:00:00Z",
            "/Patient/123/$everything?start=2020-01-01&end=2021-01-01&_type=Observation,Condition",
            "/Patient/123/$everything?_lastUpdated=gt2020&_elements=id&_summary=true&_format=json&_pretty=true",
            // They order and count only.
            "/Patient/123/$everything?_sort=-_lastUpdated&_total=accurate",
            "/Patient/123/$summary?profile=http://hl7.org/fhir/uv/ips/StructureDefinition/Bundle-uv-ips",
        ] {
            assert!(allowed(p, Method::GET, narrowed), "{narrowed}");
        }
        // `_mdm` brings in the records of the patients linked to this one; anything the list
        // does not know may widen it as well.
        for widened in [
            "/Patient/123/$everything?_mdm=true",
            "/Patient/123/$everything?_count=10&_mdm=true",
            "/Patient/123/$everything?_include=*",
            "/Patient/123/$everything?made-up=1",
            "/Patient/123/$summary?_mdm=true",
        ] {
            let refused = check(p, Method::GET, widened).unwrap_err();
            assert!(
                refused
                    .sufficient
                    .iter()
                    .all(|s| s.starts_with("system/*.")),
                "{widened}: {refused:?}"
            );
            assert!(allowed("system/*.rs", Method::GET, widened), "{widened}");
        }
        // In a Bundle, its Parameters' too.
        let g = grants(p);
        let everything = |parameter: Value| {
            transaction(
                json!([{"request": {"method": "POST", "url": "Patient/123/$everything"},
                "resource": {"resourceType": "Parameters", "parameter": [parameter]}}]),
            )
        };
        assert!(Check::new(&g)
            .bundle(&everything(json!({"name": "_mdm", "valueBoolean": true})))
            .is_err());
        assert!(Check::new(&g)
            .bundle(&everything(json!({"name": "_count", "valueInteger": 5})))
            .is_ok());
    }

    #[test]
    fn contained_resources_need_read_and_search_on_every_type() {
        // `_contained=true` answers with the containers, of any type.
        let url = "/Observation?code=x&_contained=true&_containedType=container";
        let refused = check("system/Observation.s", Method::GET, url).unwrap_err();
        assert_eq!(refused.sufficient, ["system/*.r", "system/*.s"]);
        assert!(allowed("system/*.rs", Method::GET, url));
        for url in [
            "/Observation?code=x&_contained=both",
            "/Observation?code=x&_containedType=contained",
            "/Observation?patient=123&_contained=true",
        ] {
            assert!(!allowed("system/Observation.s", Method::GET, url), "{url}");
            assert!(!allowed("patient/*.rs", Method::GET, url), "{url}");
        }
        assert!(allowed(
            "system/Observation.s",
            Method::GET,
            "/Observation?code=x&_contained=false"
        ));
    }

    #[test]
    fn heads_and_compartments_are_checked_as_their_searches() {
        // A HEAD is the GET it mirrors: a search's and a history's too.
        assert!(allowed("system/Patient.s", Method::HEAD, "/Patient?name=x"));
        assert!(allowed(
            "system/Patient.s",
            Method::HEAD,
            "/Patient/_history"
        ));
        assert!(allowed(
            "system/Patient.r",
            Method::HEAD,
            "/Patient/1/_history"
        ));
        assert!(!allowed(
            "system/Patient.r",
            Method::HEAD,
            "/Patient?name=x"
        ));
        // Every type of a compartment: search on every type; not a patient/ scope's, as the
        // compartment holds other patients (`link`) and groups.
        assert!(allowed("system/*.s", Method::GET, "/Patient/123/*"));
        assert!(allowed(
            "system/*.s",
            Method::GET,
            "/Patient/123/*?_lastUpdated=gt2020"
        ));
        assert!(!allowed("system/Patient.rs", Method::GET, "/Patient/123/*"));
        assert!(!allowed("patient/*.rs", Method::GET, "/Patient/123/*"));
        // A compartment search's include is of the type searched, not the compartment's.
        let p = "patient/*.rs";
        assert!(allowed(
            p,
            Method::GET,
            "/Patient/123/Observation?patient=123&_include=Observation:patient"
        ));
        // Not narrowed by `patient`: the compartment holds Observations the patient performed
        // on others, whose `patient` another one is.
        assert!(!allowed(
            p,
            Method::GET,
            "/Patient/123/Observation?_include=Observation:patient"
        ));
    }
}
