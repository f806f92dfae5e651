//! SMART authorization: the token's scopes enforced on each FHIR interaction.
//!
//! [`SmartScopeLayer`] goes after the bearer layer (it reads the [`VerifiedClaims`]) and
//! before anything that forwards. It classifies each request as a FHIR interaction and checks
//! it against the token's SMART resource scopes ([`Grants`]): v2
//! (`system/Patient.rs`, `user/Observation.cruds`, `patient/*.r`), v1 (`.read`, `.write`,
//! `.*`), the `patient/`, `user/` and `system/` contexts, `*` resource types, and granular v2
//! scopes with a query (`system/Observation.rs?category=laboratory`). Scopes are read from
//! `scope` and from `scp` (a string or an array, as Microsoft Entra issues them).
//!
//! | interaction | needs |
//! |---|---|
//! | `read`, `vread`, instance `history` | `r` on the type |
//! | `update`, `patch` | `u` (an update that creates, on a server that lets a client choose the id, too: SMART v2's `u` allows it, and whether the id exists is not known before forwarding) |
//! | `delete` | `d` |
//! | a cascading delete (`_cascade` other than `none`, HAPI's `X-Cascade` header other than `none`; on any request, a batch's too) | `d` on `*`: it deletes whatever refers to what is deleted, of any type, anyone's |
//! | conditional `update`, `patch`, `delete` (`Patient?identifier=x`) | `u` or `d`, and `s` for the search; a conditional `update` `c` too (finding nothing, it creates) |
//! | `create` | `c` |
//! | the resource a `create` or `update` writes | of the type its URL names (JSON's `resourceType`, XML's root element; `415` for another format; a Binary in a format that is not FHIR's own is content, not checked; read unless one scope grants `c`, `r`, `u` and `s` on `*`); each conditional reference it, or a patch, holds (`"reference": "Patient?name=x"`, resolved by the server with a search) needs what that search would, outright (in XML, a `reference` whose value holds a `?` or a character reference gets `400`); in a patch, which sets a reference by a value of any name, each string it writes where a reference goes (a JSON Patch's `value` for a `path` ending in `/reference`; a FHIRPath Patch's `valueString` or other string value for a `path` ending in `.reference` or a `name` of `reference`; any string of a patch of another shape) that reads as a conditional reference as HAPI reads one (the word after the last `/` before a `?` a type name: `Patient?x`; `Patient/?x` and `http://.../Patient?x` are `400`, only `[type]?...` can be checked) counts as one; a JSON Patch's `copy` or `move` into a `reference` is `400` (what it takes is not in the patch); an XML patch holding any `?` past its prolog or any character reference, with a document type, or not in UTF-8 is `400` (send it as JSON) |
//! | `search` (type: GET, or a form `POST _search`; compartment `Patient/[id]/[type]`, whose includes are of the type searched; `Patient/[id]/*` needs `s` on `*`, anyone's), type `history` (a `HEAD` is checked as its `GET`) | `s` on the type; a `_search` body must be `application/x-www-form-urlencoded` (`415` otherwise, a body with no `Content-Type` too: the server would not read it as the parameters checked), in lower case, with no parameter but `charset=utf-8` and no `Content-Encoding` (`415`, for any request whose `Content-Type` begins as a form's: HAPI takes for a form whatever begins so, case-sensitively, `application/x-www-form-urlencodedx` too, reads none with a `Content-Encoding`, even `identity`, when there is no query string, and a servlet container decodes it in the charset it names) |
//! | any query string or form | parameter names as FHIR spells them, with their modifiers and chains (letters, digits, `_`, `-`, `.`, `:`): another is `400` (HAPI strips a leading `?`, so `??_include=*` would be an `_include` unchecked); at most [`MAX_SEARCH_PARAMETERS`] (500) of them, the query's and the form's together (`400`), and a form of at most [`MAX_FORM_BODY`] (1 MiB, `413`): past its own limits (Tomcat's `maxParameterCount`, 1000 in its newer releases; `maxPostSize`, 2 MB) a servlet container drops parameters, and the server would search without those checked |
//! | system `search` and `history` | `s` on each type `_type` names, else on `*` |
//! | `_include`, `_revinclude` (`:iterate` too) | `r` on the type included: `Source:param:Target`'s target, the source of a `_revinclude`, the one type of a few parameters (`patient`, `encounter`, `organization`, `location`, `specimen`, `medication`, `practitioner`) on the types where it has that one target in every release (not R4's `DocumentReference:encounter`, which may bring an `EpisodeOfCare`, nor R5's `Observation:specimen`, a `Group`), else `*` |
//! | a reverse chain (`_has:Observation:patient:code=x`, nested too), a chain (`subject:Patient.name=x`, `patient.birthdate=x`) | `s` on each type it filters on, link by link in any mix (`_has:Observation:encounter:patient.name=x`: `Observation`, then `Patient`): a `_has`'s types; a chain link's type modifier, else the one type of the parameter (as for includes), else `*`. Which resources match tells about those types' data |
//! | `_filter` (its expression may chain and reverse-chain anywhere), `_query` (a named query the server defines), `_list` | `s` on `*`; `r` and `s` on `*`; `r` on List |
//! | `_in` (R5: membership of a List, Group or CareTeam) | `r` on the type its value names, else on all three |
//! | a read's, vread's or history's `_include`, `_revinclude` | as a search's: a server may honour them there too |
//! | parameter names in another case (`_INCLUDE`) | as the name in FHIR's case: a server may ignore case |
//! | a `;` as it is in a query or form | `400`: some servers split parameters there (`name=x;_include=*`), others do not; send `%3B` |
//! | `_contained` (other than `false`), `_containedType` | `r` and `s` on `*`: the contained resources or their containers, of any type |
//! | `$operation` that stays within its type (`meta`, `meta-add`, `meta-delete`, `diff`, `validate`, `match`, `lastn`, `stats`, `expand`, `lookup`, `validate-code`, `subsumes`, `translate`) by GET | `r` on the type (instance level) or `s` (type level; `*` at the system level) |
//! | any other `$operation` (`$everything`, `$summary`, `$document`, `$graphql`, `$export`, one not listed) by GET | `r` and `s` on `*`: it may answer with any type (`Patient/[id]/$everything` and `$summary`: for that patient under `patient/` scopes, when each of its parameters only narrows or shapes what it answers with, `_count`, `_offset`, `_since`, `_lastUpdated`, `_type`, `_elements`, `_summary`, `_format`, `_pretty`, `start`, `end`, and `$summary`'s `profile`, in the query, a form or posted JSON `Parameters` (posted in another format, only with `r` and `s` on `*`, else `415`); another, HAPI's `_mdm=true` say, may add other patients' records; any other operation on a patient, `$graphql` say, may follow references out of its compartment: anyone's) |
//! | `$operation` by another method | the same plus `c` and `u` (and `d`, for one not known to stay within its type); `$everything`, `$summary`, `$document` by POST only read: as by GET |
//! | an `$operation`'s `_include`, `_revinclude` | as a search's, in the query or in a form posted to it (servers read a form's parameters as the query's) |
//! | `batch`, `transaction` | every entry checked as its own request (JSON Bundles only, each key once in an object: parsers differ on which of two counts; entries with absolute URLs (a scheme or `//` before the query) or paths from the server's root, nested batches or no request refused, as are urls with a dot segment anywhere (`..;x`, `.+.` too), a control character or a space at either end, a fragment, a backslash or a percent-encoded path, which servers read differently); a create's or update's `resource` is checked as a top-level one's, a patch's (a FHIRPath Patch's `Parameters`, a JSON Patch in a `Binary`'s base64 `data`; anything else `400`) as a top-level patch, an operation's (by POST) `Parameters` as its parameters, and a conditional create's `ifNoneExist` as a search of that type; an entry with a `resource` its request does not take (a `_search`'s, an operation's that is not a `Parameters`; but a read's or a delete's, which servers ignore) is `400`: HAPI creates a POST entry's resource whatever its url names; an entry allowed only by its parameters makes the batch go with `Prefer: handling=strict`; the batch's own query takes only `_format`, `_pretty` and `_cascade` (another is `400`: a server may apply it to every entry) |
//! | conditional `create` (`If-None-Exist`) | `c`, and `s` for the search |
//! | `capabilities` (`metadata`) | nothing |
//!
//! A token that names the tenant alone (no SMART scope) has tenant-wide access, unless
//! `require_smart_scopes(true)`: its requests pass unchecked, but for a `batch` or
//! `transaction`, whose entries the FHIR server reads relative to the tenant's base: one whose
//! `request.url` is absolute or has a scheme (another base, perhaps another tenant's on the
//! same server; a URL in its query stays), starts at the server's root (`/fhir/b/...`), has a
//! control character or a space at either end, a dot segment (`..;x` and `.+.` too), a
//! fragment, a backslash or a percent-encoded path is `400`, in JSON (each key once in an
//! object) or XML (its character references decoded; an XML Bundle with a document type, a
//! namespace prefix on an element or a `value` attribute, which this reader does not take, is
//! `400` too); a batch with a `Content-Encoding` or a charset other than UTF-8 is `415`.
//!
//! What cannot be decided before forwarding is refused rather than guessed:
//!
//! - A `patient/` scope opens only what is the token's patient's (its `patient` claim) from the
//!   request alone: that `Patient` (read, update, history, operations that only read it or
//!   its compartment), its compartment searches of the types whose `patient` or `subject`
//!   parameter can name the patient (`Patient/[id]/Observation`, not `Patient/[id]/Patient` or
//!   `/Group`; the server answers with what its compartment holds, which for an Observation
//!   includes one the patient performed), `$everything` and `$summary` with parameters that
//!   only narrow them, and searches narrowed to it by `patient=[id]`
//!   or `patient=Patient/[id]`, `subject=Patient/[id]`, or `Patient?_id=[id]` (each such
//!   parameter naming that patient alone, and one the type searched has in every FHIR
//!   release that has the type, DSTU2 to R5: `Observation?patient=123`, not
//!   `Binary?patient=123`, which a lenient server would run without it). (On STU3 a bare
//!   `patient=[id]` may also match a `Group` of that id; `patient=Patient/[id]` does not.) A read of another type by id, a create, a
//!   conditional update or patch (its body may move a found resource to another patient), an
//!   operation by POST on the Patient that may write (`$merge`), an unnarrowed search or a
//!   history of a type are refused: whose data they touch is in the
//!   resource, which the gateway has not seen. An include under a `patient/` scope brings in
//!   only `Patient`, through the very parameter that narrows the search to that patient
//!   (`Observation?patient=123&_include=Observation:patient`, or `subject=Patient/123` with
//!   `Observation:subject:Patient`), of a type whose parameter names one patient, the
//!   record's own (an Observation, a Condition; not an Appointment, whose participants may be
//!   other patients): not through another (`performer`, `link`), by
//!   `:iterate`, or by `_revinclude`, which may bring in other patients. A chain or `_has`
//!   is no narrowing.
//! - What only its search parameters allow (a search narrowed to the token's patient, one
//!   carrying a granular scope's parameters) goes on with `Prefer: handling=strict` in place
//!   of any `handling` the client asked for (its other preferences kept): a server that would
//!   ignore a parameter it does not support (`Binary?patient=123`) and search without it
//!   fails instead. A server that ignores `Prefer` as well is not held to it: grant such
//!   scopes only for searches the upstream supports.
//! - A granular scope (`?category=laboratory`) opens searches that carry each of its
//!   parameters with that value exactly (`category=laboratory`, not
//!   `category=laboratory,vital-signs`). A read by id that only a granular scope could allow
//!   (`system/` or `user/`) is checked by asking the inner service first: a `GET
//!   [type]?_id=[id]&[the scope's query]&_summary=count` with the read's extensions; when it
//!   finds the resource the read goes on as the client sent it, when it finds nothing the read
//!   is refused (`403`) without being sent, and when the answer is not a JSON search Bundle
//!   (an error, a timeout) it is `502`. The search asks for `Prefer: handling=strict`, and an
//!   answer whose `self` link echoes the search (it has `_id`) but lacks one of its parameters
//!   (the server ignored it) is `502` too: the resource was found by less than the scope says.
//!   Both are best effort: a server may ignore `Prefer`, and may echo the parameters it was
//!   sent rather than those it used (HAPI rejects unknown parameters by itself). Grant
//!   granular scopes only on parameters the upstream supports. The upstream evaluates its own search parameters, so
//!   the check means what the scope means there; the read costs one more request upstream for
//!   each granular query of the token on the type, made one after another until one finds it,
//!   [`MAX_READ_CHECKS`] at most (a token with more for the type is refused the read), and
//!   not one more against a rate limit (the [`Gateway`](crate::gateway::Gateway)'s rate
//!   limits are before this layer, and one placed after it counts only the first search). A
//!   check search answered `429` (a rate limit reached) is the read's answer. A vread under a granular scope is refused: an old
//!   version may not match what the current one does.
//! - A patch by a token that may not read what it writes (`r` on the type, without a query,
//!   as the scope that writes it; a `patient/` read only beside `patient/` writes) is refused,
//!   alone or in a Bundle: it is applied to the stored resource, and its answer or its failure
//!   shows it. A create or update by such a token goes as sent, and a successful answer's body
//!   (`204` and `Content-Length: 0` aside) is an OperationOutcome (`information`,
//!   `suppressed`) instead of the resource the server wrote; its status and other headers
//!   stay. (A token with `s` on the type can search for it all the same.)
//! - A request that is not a FHIR interaction (`classify` finds none) is refused.
//! - A request whose `Connection` names `Content-Type`, `Prefer` or `If-None-Exist` (a proxy
//!   removes what `Connection` names, so the server would see another request than the one
//!   checked), or that has two `Content-Type`s, is `400`.
//!
//! A refusal is `403` with an `OperationOutcome` (`forbidden`) saying what was not allowed,
//! and `WWW-Authenticate: Bearer error="insufficient_scope", scope="..."` naming scopes that
//! would have sufficed (RFC 6750 §3.1), before anything reaches the inner service.
//!
//! A token with no SMART resource scope at all (the tenant in `scope` and nothing else, as the
//! token endpoint issues to clients registered without scopes) keeps tenant-wide access,
//! unless the layer is built with
//! [`require_smart_scopes(true)`](SmartScopeBuilder::require_smart_scopes), which refuses it,
//! and with it any token marked [`NARROWED_CLAIM`] (resource scopes a client registered
//! without any asked for, which narrow a tenant-wide access it does not have there).
//! A scope that looks like a resource scope and does not parse (`system/patient.rs`,
//! `system/Patient.sr`, the dotted `patient.Patient.read`) grants nothing and counts as a
//! resource scope, so a typo restricts rather than opens; the refusal names it, and the
//! token endpoint's client stores refuse to register it.
//! A token's grants are parsed once and kept with its cached claims; a request checked from
//! its head costs no allocation beyond its query's parameters. A Bundle, a `_search` form (at
//! most [`MAX_FORM_BODY`]) or the parameters posted to `Patient/[id]/$everything` or
//! `$summary` are read whole first (at most
//! [`max_buffered_body`](SmartScopeBuilder::max_buffered_body),
//! else `413`; all such bodies held at once at most
//! [`max_buffered_total`](SmartScopeBuilder::max_buffered_total), else `503` with
//! `Retry-After`) and handed on unchanged as a [`ScopedBody`].
//!
//! ```
//! use std::convert::Infallible;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_fhir::auth::VerifiedClaims;
//! use tower_fhir::smart::{ScopedBody, SmartScopeLayer};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let service = ServiceBuilder::new()
//!     .layer(SmartScopeLayer::builder().build().unwrap())
//!     .service_fn(|_req: Request<ScopedBody<Full<Bytes>>>| async {
//!         Ok::<_, Infallible>(Response::new(Full::<Bytes>::from("ok")))
//!     });
//! let with_scopes = |uri: &str, scope: &str| {
//!     let claims = serde_json::json!({"exp": 4_000_000_000u64, "scope": scope});
//!     let claims = VerifiedClaims::assume_verified(claims.as_object().unwrap().clone()).unwrap();
//!     let mut request = Request::get(uri).body(Full::<Bytes>::default()).unwrap();
//!     request.extensions_mut().insert(claims);
//!     request
//! };
//!
//! let read = with_scopes("/Patient/1", "system/Patient.rs");
//! assert_eq!(service.clone().oneshot(read).await.unwrap().status(), StatusCode::OK);
//!
//! let other_type = with_scopes("/Observation/1", "system/Patient.rs");
//! let refused = service.clone().oneshot(other_type).await.unwrap();
//! assert_eq!(refused.status(), StatusCode::FORBIDDEN);
//! assert_eq!(
//!     refused.headers()["www-authenticate"],
//!     "Bearer error=\"insufficient_scope\", scope=\"system/Observation.r\""
//! );
//!
//! // The tenant alone, no SMART scope: tenant-wide, unless `require_smart_scopes(true)`.
//! let tenant_only = with_scopes("/Observation/1", "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f");
//! assert_eq!(service.oneshot(tenant_only).await.unwrap().status(), StatusCode::OK);
//! # });
//! ```
//!
//! [`VerifiedClaims`]: crate::auth::VerifiedClaims

mod check;
mod layer;
mod scope;

pub(crate) use layer::ScopeProbe;
pub use layer::{
    ConfigError, ResponseFuture, ScopedBody, SmartScopeBuilder, SmartScopeLayer, SmartScopes,
    DEFAULT_MAX_BUFFERED_BODY, DEFAULT_MAX_BUFFERED_TOTAL, MAX_FORM_BODY, MAX_READ_CHECKS,
    MAX_SEARCH_PARAMETERS,
};
#[cfg(feature = "token")]
pub(crate) use scope::looks_like_resource_scope;
pub use scope::{Grants, Permissions, ResourceScope, ScopeContext, NARROWED_CLAIM};
