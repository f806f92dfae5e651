//! Token verification: header parsing, key choice, jsonwebtoken, and the verified-token cache.

use std::borrow::Cow;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures::future::BoxFuture;
use http::{header, HeaderMap};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::claims::VerifiedClaims;
use super::keys::{KeySet, VerificationKey};
use super::rejection::{Rejection, RejectionKind};
use super::revoked::RevokedTokens;
use super::source::{RefreshingKeys, SharedFetch, Trigger};
use crate::hot_cache::HotCache;

/// A decoded JWS header can be no larger than this; real ones are under 200 bytes.
const MAX_HEADER_BYTES: usize = 1024;
/// How many keys of one fetched set (or of a client's keys) a token is tried against, with or
/// without a `kid`: each try is a signature check, and a key set that holds many keys under
/// one `kid` (or none) must not make a forged token cost hundreds of them. Keys that do not
/// allow the token's algorithm are not tried, so they do not count; static keys, which the
/// operator chose, are all tried.
const MAX_TRIES: usize = 4;

/// Everything the bearer layer needs to verify a request, shared by all its services.
pub(crate) struct Verifier {
    pub(crate) realm: Arc<str>,
    pub(crate) validations: Vec<(Algorithm, Validation)>,
    pub(crate) static_keys: KeySet,
    pub(crate) sources: Vec<Arc<RefreshingKeys>>,
    pub(crate) cache: Option<TokenCache>,
    pub(crate) max_token_bytes: usize,
    /// With one static key and nothing fetched, the key and a validation pinned to its
    /// algorithms: jsonwebtoken checks the header itself, so ours need not be parsed.
    pub(crate) single_key: Option<(Arc<VerificationKey>, Validation)>,
    /// The token cache's hit and miss counters.
    pub(crate) cache_counts: crate::ops::CacheCounts,
    /// Set when some issuer has audiences of its own; jsonwebtoken then checks no `aud` and
    /// [`Audiences::accepts`] does.
    pub(crate) audiences: Option<Audiences>,
    /// Tokens revoked before they expire, refused even when cached.
    pub(crate) revoked: Option<RevokedTokens>,
    /// Set when some token type (`typ`) is required, for all issuers or for some.
    pub(crate) types: Option<TokenTypes>,
}

/// The token types (the JWS header's `typ`) a token must declare, per issuer: explicit typing
/// (RFC 8725 §3.11, RFC 9068 §4), so that another kind of JWT an identity provider signs with
/// the same keys (an ID token, a logout token) is not taken for an access token. Each name is
/// held as [`token_type_name`] makes it.
pub(crate) struct TokenTypes {
    /// `(issuer, its types)`; an issuer not listed uses `default`.
    pub(crate) per_issuer: Vec<(String, Vec<String>)>,
    /// The types set with `token_type()`; empty means `typ` is not checked.
    pub(crate) default: Vec<String>,
}

impl TokenTypes {
    pub(crate) fn accepts(&self, issuer: Option<&str>, typ: Option<&str>) -> bool {
        let wanted = self
            .per_issuer
            .iter()
            .find(|(iss, _)| Some(iss.as_str()) == issuer)
            .map_or(&self.default, |(_, types)| types);
        wanted.is_empty()
            || typ.is_some_and(|typ| {
                let typ = without_application(typ);
                wanted.iter().any(|w| w.eq_ignore_ascii_case(typ))
            })
    }
}

/// A `typ` value as it is compared: a media type, so without case, and with `application/`
/// left out when no other `/` follows (RFC 7515 §4.1.9: `at+jwt` is `application/at+jwt`).
/// `None` when it is not a media type name (`type/subtype` or `subtype` of RFC 6838's
/// characters, nothing more).
pub(crate) fn token_type_name(typ: &str) -> Option<String> {
    let name = without_application(typ);
    let chars = |part: &str| {
        !part.is_empty()
            && part.len() <= 127
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let valid = match name.split_once('/') {
        Some((kind, subtype)) => chars(kind) && chars(subtype),
        None => chars(name),
    };
    valid.then(|| name.to_ascii_lowercase())
}

/// `typ` without a leading `application/` (in any case) when no other `/` follows.
fn without_application(typ: &str) -> &str {
    const PREFIX: &str = "application/";
    match typ.get(..PREFIX.len()) {
        Some(prefix)
            if prefix.eq_ignore_ascii_case(PREFIX) && !typ[PREFIX.len()..].contains('/') =>
        {
            &typ[PREFIX.len()..]
        }
        _ => typ,
    }
}

/// The audiences a token must name, per issuer.
pub(crate) struct Audiences {
    /// `(issuer, its audiences)`; an issuer not listed uses `default`.
    pub(crate) per_issuer: Vec<(String, Vec<String>)>,
    /// The audiences set with `audience()`; empty means `aud` is not checked.
    pub(crate) default: Vec<String>,
}

impl Audiences {
    pub(crate) fn accepts(&self, claims: &VerifiedClaims) -> bool {
        let issuer = claims.issuer();
        let wanted = self
            .per_issuer
            .iter()
            .find(|(iss, _)| Some(iss.as_str()) == issuer)
            .map_or(&self.default, |(_, audiences)| audiences);
        wanted.is_empty() || claims.audience().any(|aud| wanted.iter().any(|w| w == aud))
    }
}

/// The result of verifying without waiting.
pub(crate) enum Verdict {
    Accept(VerifiedClaims),
    Reject(Rejection),
    /// Keys must be fetched first; the future finishes the verification.
    Wait(BoxFuture<'static, Result<VerifiedClaims, Rejection>>),
}

/// A JWT payload's `iss` as its verified claims will read it: the last `iss` member, when it
/// is a string (a duplicate member replaces the earlier one, as in the claims' map).
struct UnverifiedIssuer(Option<String>);

impl<'de> Deserialize<'de> for UnverifiedIssuer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = UnverifiedIssuer;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut members: A,
            ) -> Result<Self::Value, A::Error> {
                let mut issuer = None;
                while let Some(name) = members.next_key::<Cow<'de, str>>()? {
                    if name == "iss" {
                        issuer = members.next_value::<StringOrNone>()?.0;
                    } else {
                        members.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(UnverifiedIssuer(issuer))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

/// A JSON string, or `None` for any other value (read past without building it).
struct StringOrNone(Option<String>);

impl<'de> Deserialize<'de> for StringOrNone {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct Any;
        impl<'de> Visitor<'de> for Any {
            type Value = StringOrNone;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E>(self, text: &str) -> Result<Self::Value, E> {
                Ok(StringOrNone(Some(text.to_owned())))
            }
            fn visit_string<E>(self, text: String) -> Result<Self::Value, E> {
                Ok(StringOrNone(Some(text)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(StringOrNone(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(StringOrNone(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(StringOrNone(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(StringOrNone(None))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(StringOrNone(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Self::Value, A::Error> {
                while items.next_element::<IgnoredAny>()?.is_some() {}
                Ok(StringOrNone(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<Self::Value, A::Error> {
                while members.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(StringOrNone(None))
            }
        }
        deserializer.deserialize_any(Any)
    }
}

#[derive(Deserialize)]
struct JwsHeader<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
    /// `Some` whenever the header has the member, `null` included: RFC 7515 allows only a
    /// non-empty array of names here, and this verifier understands none, so any `crit` is
    /// refused (serde would read a `null` as absent, as jsonwebtoken's `Header` does).
    #[serde(default, deserialize_with = "member_present")]
    crit: Option<Value>,
}

/// Deserializes a member that is there, whatever its value, as `Some` (with
/// `#[serde(default)]`, an absent one is `None`).
fn member_present<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// Whether the JWS header of `token` (its first segment) has a `crit` member, `null`
/// included; `false` for a header that cannot be read (the verification refuses it anyway).
fn names_crit(token: &[u8]) -> bool {
    let encoded = token.split(|&b| b == b'.').next().unwrap_or_default();
    URL_SAFE_NO_PAD.decode(encoded).is_ok_and(|header| {
        serde_json::from_slice::<JwsHeader<'_>>(&header).is_ok_and(|header| header.crit.is_some())
    })
}

impl Verifier {
    pub(crate) fn reject(&self, kind: RejectionKind, description: &'static str) -> Rejection {
        Rejection::new(kind, description, Arc::clone(&self.realm))
    }

    /// A token with a `crit` header member: none is understood here.
    fn critical(&self) -> Rejection {
        self.reject(
            RejectionKind::InvalidToken,
            "The token has critical header extensions this server does not understand",
        )
    }

    /// The bearer token of a request, or why there is none.
    ///
    /// The token's characters are checked only when it fails verification (a token that
    /// verifies is base64url and dots, so `b64token`): this keeps a pass over every token off
    /// the hot path.
    pub(crate) fn extract<'h>(&self, headers: &'h HeaderMap) -> Result<&'h [u8], Rejection> {
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return Err(self.reject(RejectionKind::MissingToken, "Authentication required"));
        };
        if values.next().is_some() {
            return Err(self.reject(
                RejectionKind::InvalidRequest,
                "More than one Authorization header",
            ));
        }
        let value = value.as_bytes();
        let (scheme, rest) = match value.iter().position(|&b| b == b' ') {
            Some(space) => (&value[..space], &value[space..]),
            None => (value, &b""[..]),
        };
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            // Another scheme (Basic, ...) is "no bearer credentials", not an error (§3.1).
            return Err(self.reject(
                RejectionKind::MissingToken,
                "Bearer authentication required",
            ));
        }
        let token = trim_leading_spaces(rest);
        if token.is_empty() {
            return Err(self.reject(RejectionKind::InvalidRequest, "The bearer token is empty"));
        }
        if token.len() > self.max_token_bytes {
            return Err(self.reject(
                RejectionKind::InvalidRequest,
                "The bearer token is too long",
            ));
        }
        Ok(token)
    }

    /// Refuses a request whose query string carries an access token (RFC 6750 §2.3's
    /// `access_token` parameter): the query goes to the FHIR server as it came, so the token
    /// would reach it and its logs (and anyone could replay it here). `invalid_request`, as
    /// RFC 6750 §3.1 has it for a token sent in more than one way.
    pub(crate) fn refuse_query_token(&self, query: Option<&str>) -> Result<(), Rejection> {
        if query.is_some_and(names_a_token) {
            return Err(self.reject(
                RejectionKind::InvalidRequest,
                "An access token in the query string is not accepted: it would be forwarded to \
                 the FHIR server and its logs. Send it in an Authorization: Bearer header",
            ));
        }
        Ok(())
    }

    /// Verifies a token, from the cache when it can, without waiting unless keys must be
    /// fetched (also when a source says its keys changed: a retired key must not verify one
    /// more token, cached or not).
    pub(crate) fn verify(self: &Arc<Self>, token: &[u8]) -> Verdict {
        if self.revoked.as_ref().is_some_and(RevokedTokens::is_stale) {
            // Any token could have been revoked where this process cannot hear (a database
            // out of reach): none is taken, good or not, until the list is current again.
            return Verdict::Reject(self.reject(
                RejectionKind::RevocationsStale,
                "This server cannot tell now whether the access token was revoked; try again \
                 later",
            ));
        }
        let changed: Vec<SharedFetch> = self
            .sources
            .iter()
            .filter(|source| source.changed())
            .filter_map(|source| source.fetch(Trigger::Changed))
            .collect();
        if changed.is_empty() {
            return self.verify_with_keys_held(token);
        }
        let this = Arc::clone(self);
        let token = token.to_vec();
        Verdict::Wait(Box::pin(async move {
            futures::future::join_all(changed).await;
            match this.verify_with_keys_held(&token) {
                Verdict::Accept(claims) => Ok(claims),
                Verdict::Reject(rejection) => Err(rejection),
                Verdict::Wait(verifying) => verifying.await,
            }
        }))
    }

    fn verify_with_keys_held(self: &Arc<Self>, token: &[u8]) -> Verdict {
        if let Some(cache) = &self.cache {
            // A refresh is due on hits too: keys gone at the IdP must retire their tokens (and
            // keys too old to use are dropped before the cache is asked).
            for source in &self.sources {
                source.refresh_if_due();
            }
            if let Some(claims) = cache.get(token) {
                self.cache_counts.hit.increment(1);
                if self.revoked.as_ref().is_some_and(|r| r.refuses(&claims)) {
                    cache.forget(token);
                    return Verdict::Reject(self.revoked_token());
                }
                return Verdict::Accept(claims);
            }
        }
        if self.cache.is_some() {
            self.cache_counts.miss.increment(1);
        }
        match self.verify_uncached(token) {
            Verdict::Reject(_) if !is_b64token(token) => Verdict::Reject(self.reject(
                RejectionKind::InvalidRequest,
                "The bearer token has characters outside the b64token syntax",
            )),
            verdict => verdict,
        }
    }

    fn verify_uncached(self: &Arc<Self>, token: &[u8]) -> Verdict {
        if let Some((key, validation)) = &self.single_key {
            // jsonwebtoken reads `"crit": null` as no member, and this path reads the header
            // no other way (the general one refuses any `crit` as it reads the header).
            if names_crit(token) {
                return Verdict::Reject(self.critical());
            }
            let result = self
                .decode(token, key, validation, None)
                .map_err(|(rejection, _)| rejection);
            return verdict(result);
        }
        if self.cache.is_none() {
            for source in &self.sources {
                source.refresh_if_due();
            }
        }
        // The issuer is read once the header is known good: a token that is not a JWT, or
        // names an algorithm not allowed, costs no more than its header.
        let checked = self.with_header(token, |alg, kid| {
            let scope = self.scope(token);
            let result = self.verify_with_current_keys(token, alg, kid, &scope);
            (scope, result)
        });
        let scope = match checked {
            Err(rejection) => return Verdict::Reject(rejection),
            Ok((_, Some(result))) => return verdict(result),
            Ok((scope, None)) => scope,
        };
        if scope.is_none()
            && self.static_keys.is_empty()
            && self.sources_for(&scope).next().is_none()
        {
            // No key vouches for this token's issuer (or for a token naming none).
            return Verdict::Reject(self.reject(
                RejectionKind::InvalidToken,
                "The access token's issuer is not trusted",
            ));
        }
        // Only the sources that may vouch for this token are fetched, and waited for: a token
        // naming one identity provider neither spends another's refetch cooldown nor waits on
        // another that hangs.
        let fetches: Vec<SharedFetch> = self
            .sources_for(&scope)
            .filter_map(|source| {
                let trigger = if source.has_fetched() {
                    Trigger::UnknownKid
                } else {
                    Trigger::Cold
                };
                source.fetch(trigger)
            })
            .collect();
        if fetches.is_empty() {
            return Verdict::Reject(self.no_key_after_fetch(&scope));
        }
        let this = Arc::clone(self);
        let token = token.to_vec();
        Verdict::Wait(Box::pin(async move {
            futures::future::join_all(fetches).await;
            this.with_header(&token, |alg, kid| {
                this.verify_with_current_keys(&token, alg, kid, &scope)
            })?
            .unwrap_or_else(|| Err(this.no_key_after_fetch(&scope)))
        }))
    }

    /// Whose keys may verify `token`: the sources bound to its `iss` when some source is
    /// (`Some`, that issuer), otherwise the static keys and the sources bound to no issuer
    /// (`None`). A key of any other source could verify its signature but never vouch for
    /// it (see `decode`), so the token's `iss` is read before its signature is checked: the
    /// claims verified later are these same bytes, so nothing that could accept the token is
    /// left out.
    fn scope(&self, token: &[u8]) -> Option<Arc<str>> {
        if self.sources.iter().all(|source| source.issuer.is_none()) {
            return None;
        }
        let payload = token.split(|&b| b == b'.').nth(1)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let UnverifiedIssuer(issuer) = serde_json::from_slice(&payload).ok()?;
        let issuer = issuer?;
        self.sources
            .iter()
            .filter_map(|source| source.issuer.as_ref())
            .find(|bound| ***bound == *issuer)
            .cloned()
    }

    /// The sources whose keys may verify a token of this scope (see [`scope`](Self::scope)).
    fn sources_for<'a>(
        &'a self,
        scope: &'a Option<Arc<str>>,
    ) -> impl Iterator<Item = &'a Arc<RefreshingKeys>> + 'a {
        self.sources
            .iter()
            .filter(move |source| source.issuer == *scope)
    }

    fn revoked_token(&self) -> Rejection {
        self.reject(RejectionKind::InvalidToken, "The access token was revoked")
    }

    fn unknown_key(&self) -> Rejection {
        self.reject(
            RejectionKind::InvalidToken,
            "No key is known for this token",
        )
    }

    fn no_key_after_fetch(&self, scope: &Option<Arc<str>>) -> Rejection {
        // A source that never answered might hold the key, and one whose keys were dropped for
        // their age (its fetches failing) too: that is an outage, not a bad token.
        if self
            .sources_for(scope)
            .any(|s| !s.has_fetched() || s.expired())
        {
            self.reject(
                RejectionKind::KeysUnavailable,
                "The keys to verify tokens are unavailable; try again later",
            )
        } else {
            self.unknown_key()
        }
    }

    /// Parses the JWS header (into a stack buffer: this runs on every uncached request) and
    /// hands its `alg` and `kid` to `then`.
    fn with_header<R>(
        &self,
        token: &[u8],
        then: impl FnOnce(Algorithm, Option<&str>) -> R,
    ) -> Result<R, Rejection> {
        let not_jwt = || self.reject(RejectionKind::InvalidToken, "The access token is not a JWT");
        let mut parts = token.split(|&b| b == b'.');
        let (Some(encoded), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(not_jwt());
        };
        let mut buffer = [0u8; MAX_HEADER_BYTES];
        let len = URL_SAFE_NO_PAD
            .decode_slice(encoded, &mut buffer)
            .map_err(|_| not_jwt())?;
        let header: JwsHeader<'_> =
            serde_json::from_slice(&buffer[..len]).map_err(|_| not_jwt())?;
        if header.crit.is_some() {
            return Err(self.critical());
        }
        let alg: Algorithm = header.alg.parse().map_err(|_| {
            self.reject(
                RejectionKind::InvalidToken,
                "The token's algorithm is not supported",
            )
        })?;
        Ok(then(alg, header.kid.as_deref()))
    }

    /// `None` when the token names a `kid` that no key has (or, without a `kid`, when there
    /// are no keys at all): fetching keys may help.
    fn verify_with_current_keys(
        &self,
        token: &[u8],
        alg: Algorithm,
        kid: Option<&str>,
        scope: &Option<Arc<str>>,
    ) -> Option<Result<VerifiedClaims, Rejection>> {
        let Some(validation) = self.validation(alg) else {
            return Some(Err(self.reject(
                RejectionKind::InvalidToken,
                "The token's algorithm is not allowed for its key",
            )));
        };
        let fetched: Vec<(Arc<KeySet>, Option<&str>)> = self
            .sources_for(scope)
            .map(|s| (s.current(), s.issuer.as_deref()))
            .collect();
        // The static keys vouch for no issuer bound to keys of its own.
        let static_keys = if scope.is_none() {
            self.static_keys.keys()
        } else {
            &[]
        };
        // Each key is tagged with its set (0: the static keys, which the operator chose, are
        // all tried), so that a fetched set's signature checks are counted.
        let keys = KeySet::candidates_of(static_keys, kid)
            .map(|key| (key, None, 0))
            .chain(fetched.iter().enumerate().flat_map(|(n, (set, issuer))| {
                set.candidates(kid).map(move |key| (key, *issuer, n + 1))
            }));
        let mut outcome = None;
        let mut named = false;
        // A few signature checks of each fetched set, not hundreds (of each set: two issuers
        // may use the same `kid`).
        let (mut checking, mut checks) = (0, 0);
        for (key, issuer, set) in keys {
            named |= kid.is_none() || key.kid() == kid;
            if !key.allows(alg) {
                // A key's own algorithm wins over the token header's.
                outcome.get_or_insert_with(|| {
                    Err(self.reject(
                        RejectionKind::InvalidToken,
                        "The token's algorithm is not allowed for its key",
                    ))
                });
                continue;
            }
            if set != checking {
                (checking, checks) = (set, 0);
            }
            if set > 0 && checks == MAX_TRIES {
                continue;
            }
            checks += 1;
            match self.decode(token, key, validation, issuer) {
                Ok(claims) => return Some(Ok(claims)),
                Err((rejection, signature_ok)) => {
                    outcome = Some(Err(rejection));
                    if signature_ok {
                        return outcome;
                    }
                }
            }
        }
        if named {
            outcome
        } else {
            None
        }
    }

    fn validation(&self, alg: Algorithm) -> Option<&Validation> {
        self.validations
            .iter()
            .find(|(allowed, _)| *allowed == alg)
            .map(|(_, validation)| validation)
    }

    /// On failure, also whether the signature was good (so no other key need be tried).
    fn decode(
        &self,
        token: &[u8],
        key: &Arc<VerificationKey>,
        validation: &Validation,
        bound_issuer: Option<&str>,
    ) -> Result<VerifiedClaims, (Rejection, bool)> {
        let data = jsonwebtoken::decode::<UniqueClaims>(token, key.decoding_key(), validation)
            .map_err(|err| self.decode_error(err.kind()))?;
        let claims = data.claims.0;
        // A key with a `kid` is only for tokens naming it or none. The general path picks its
        // candidates so; the single-key path comes here straight.
        if let (Some(ours), Some(theirs)) = (key.kid(), data.header.kid.as_deref()) {
            if ours != theirs {
                return Err((self.unknown_key(), false));
            }
        }
        if data.header.crit.is_some() {
            return Err((self.critical(), true));
        }
        if let Some(problem) = malformed_claim(&claims) {
            return Err((self.reject(RejectionKind::InvalidToken, problem), true));
        }
        let claims = VerifiedClaims::verified(claims, data.header.kid, data.header.alg)
            .ok_or_else(|| {
                (
                    self.reject(
                        RejectionKind::InvalidToken,
                        "The access token has no valid exp claim",
                    ),
                    true,
                )
            })?;
        if self
            .audiences
            .as_ref()
            .is_some_and(|audiences| !audiences.accepts(&claims))
        {
            return Err((
                self.reject(
                    RejectionKind::InvalidToken,
                    "The access token is not meant for this audience",
                ),
                true,
            ));
        }
        let trusted_for_key = match bound_issuer {
            // Each identity provider vouches for its own tokens only.
            Some(bound) => claims.issuer() == Some(bound),
            // A key bound to no issuer vouches for none that has keys of its own: the holder of
            // a shared or static key cannot sign in the name of an issuer (the token endpoint,
            // say) whose tokens its own keys vouch for.
            None => claims.issuer().is_none_or(|issuer| {
                !self
                    .sources
                    .iter()
                    .any(|source| source.issuer.as_deref() == Some(issuer))
            }),
        };
        if !trusted_for_key {
            // The signature is good, but this key may not vouch for it: the same key may be
            // configured again for its issuer (a key source given bound and unbound), so the
            // other keys still get their turn.
            return Err((
                self.reject(
                    RejectionKind::InvalidToken,
                    "The access token's issuer is not trusted for its key",
                ),
                false,
            ));
        }
        if self
            .types
            .as_ref()
            .is_some_and(|types| !types.accepts(claims.issuer(), data.header.typ.as_deref()))
        {
            return Err((
                self.reject(
                    RejectionKind::InvalidToken,
                    "The token's type (typ) is not one accepted for access tokens",
                ),
                true,
            ));
        }
        if self.revoked.as_ref().is_some_and(|r| r.refuses(&claims)) {
            return Err((self.revoked_token(), true));
        }
        if let Some(cache) = &self.cache {
            cache.insert(token, &claims, key);
        }
        Ok(claims)
    }

    fn decode_error(&self, kind: &ErrorKind) -> (Rejection, bool) {
        let (description, signature_ok) = match kind {
            ErrorKind::InvalidSignature => ("The access token signature is invalid", false),
            ErrorKind::InvalidAlgorithm => {
                ("The token's algorithm is not allowed for its key", false)
            }
            ErrorKind::ExpiredSignature => ("The access token expired", true),
            ErrorKind::ImmatureSignature => ("The access token is not valid yet", true),
            ErrorKind::InvalidIssuer => ("The access token's issuer is not trusted", true),
            ErrorKind::InvalidAudience => ("The access token is meant for another audience", true),
            ErrorKind::MissingRequiredClaim(claim) => (
                match claim.as_str() {
                    "exp" => "The access token has no valid exp claim",
                    "iss" => "The access token has no iss claim",
                    "aud" => "The access token has no aud claim",
                    _ => "The access token lacks a required claim",
                },
                true,
            ),
            ErrorKind::InvalidClaimFormat(_) => ("The access token has a malformed claim", true),
            // The claims, read once the signature was good (a claim named twice, say): no
            // other key would read them otherwise.
            ErrorKind::Json(_) => ("The access token is malformed", true),
            _ => ("The access token is malformed", false),
        };
        (
            self.reject(RejectionKind::InvalidToken, description),
            signature_ok,
        )
    }
}

/// What [`verify_with_keys`] checks besides the signature.
#[cfg(feature = "token")]
pub(crate) struct Expected<'a> {
    /// The algorithms accepted (each key still allows only its own).
    pub(crate) algorithms: &'a [Algorithm],
    /// The `iss` required, if any.
    pub(crate) issuer: Option<&'a str>,
    /// The `aud` must name one of these; empty: `aud` is not checked.
    pub(crate) audiences: &'a [String],
    /// Leeway for `exp` and `nbf`, in seconds.
    pub(crate) leeway: u64,
}

/// Verifies one JWT against a key set, outside any layer (the token endpoint's introspection,
/// client assertions): the header's `alg` among the expected and allowed by the key (no
/// `none`, no HMAC with a public key), the key by `kid` (a token without one tries at most a
/// few keys), `exp` required, `nbf`, `iss` and `aud` when expected, no `crit`. The error says
/// why, for the log only.
#[cfg(feature = "token")]
pub(crate) fn verify_with_keys(
    keys: &KeySet,
    token: &str,
    expected: &Expected<'_>,
) -> Result<VerifiedClaims, &'static str> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|_| "not a JWT, or an algorithm not supported")?;
    if header.crit.is_some() || names_crit(token.as_bytes()) {
        return Err("critical header extensions");
    }
    if !expected.algorithms.contains(&header.alg) {
        return Err("an algorithm not accepted here");
    }
    let mut validation = Validation::new(header.alg);
    validation.leeway = expected.leeway;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    match expected.issuer {
        Some(issuer) => {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        None => validation.iss = None,
    }
    if expected.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(expected.audiences);
        required.push("aud");
    }
    validation.set_required_spec_claims(&required);
    let mut outcome = Err("no key for it");
    let mut checks = 0;
    for key in keys.candidates(header.kid.as_deref()) {
        if !key.allows(header.alg) {
            outcome = Err("an algorithm its key does not allow");
            continue;
        }
        if checks == MAX_TRIES {
            break;
        }
        checks += 1;
        match jsonwebtoken::decode::<UniqueClaims>(token, key.decoding_key(), &validation) {
            Ok(data) => {
                let claims = data.claims.0;
                if let Some(problem) = malformed_claim(&claims) {
                    return Err(problem);
                }
                return VerifiedClaims::verified(claims, data.header.kid, data.header.alg)
                    .ok_or("no valid exp");
            }
            Err(err) => {
                outcome = Err(match err.kind() {
                    ErrorKind::InvalidSignature => "a bad signature",
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::ImmatureSignature => "not valid yet",
                    ErrorKind::InvalidIssuer => "another issuer",
                    ErrorKind::InvalidAudience => "another audience",
                    ErrorKind::MissingRequiredClaim(_) => "a required claim missing",
                    _ => "malformed",
                });
                if !matches!(err.kind(), ErrorKind::InvalidSignature) {
                    // The signature was good: no other key will do better.
                    return outcome;
                }
            }
        }
    }
    outcome
}

/// A JWT's claims, each named once: a payload naming one twice (`"scope": ..., "scope": ...`)
/// is refused, as it is read by its last value here and perhaps by its first elsewhere (RFC
/// 7519 §4: "MUST either reject JWTs with duplicate Claim Names or use a JSON parser that
/// returns only the lexically last"; the first is the one no other reader can differ from).
struct UniqueClaims(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueClaims {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Claims;
        impl<'de> serde::de::Visitor<'de> for Claims {
            type Value = UniqueClaims;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object of claims")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut entries: A,
            ) -> Result<UniqueClaims, A::Error> {
                let mut claims = Map::new();
                while let Some(name) = entries.next_key::<String>()? {
                    if claims.contains_key(&name) {
                        return Err(serde::de::Error::custom("a claim named twice"));
                    }
                    let value = entries.next_value()?;
                    claims.insert(name, value);
                }
                Ok(UniqueClaims(claims))
            }
        }
        deserializer.deserialize_map(Claims)
    }
}

/// What is wrong with a registered claim the crate reads (besides `exp`, which
/// [`VerifiedClaims`] checks, and `aud`): `iss`, `sub` and `jti` must be strings, `iat` and
/// `nbf` NumericDates, when present. A claim that is not what it says is not ignored (a
/// string `iat` read as none would pass a check of its value). RFC 7519 §4.1.1: `iss` is one
/// string; jsonwebtoken takes an array whose members include an accepted issuer, but every
/// check here (whose keys may vouch for the token, its audience and type for that issuer, a
/// client assertion's `iss` against its client) reads a string only: an array would pass
/// them as a token with no issuer at all.
fn malformed_claim(claims: &Map<String, Value>) -> Option<&'static str> {
    let numeric =
        |value: &Value| value.as_u64().is_some() || value.as_f64().is_some_and(|f| f >= 0.0);
    if !claims.get("iss").is_none_or(Value::is_string) {
        Some("The access token's iss claim is not a string")
    } else if !claims.get("sub").is_none_or(Value::is_string) {
        Some("The access token's sub claim is not a string")
    } else if !claims.get("jti").is_none_or(Value::is_string) {
        Some("The access token's jti claim is not a string")
    } else if !claims.get("iat").is_none_or(numeric) {
        Some("The access token's iat claim is not a NumericDate")
    } else if !claims.get("nbf").is_none_or(numeric) {
        Some("The access token's nbf claim is not a NumericDate")
    } else {
        None
    }
}

fn verdict(result: Result<VerifiedClaims, Rejection>) -> Verdict {
    match result {
        Ok(claims) => Verdict::Accept(claims),
        Err(rejection) => Verdict::Reject(rejection),
    }
}

fn trim_leading_spaces(mut bytes: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = bytes {
        bytes = rest;
    }
    bytes
}

/// RFC 6750 §2.1: `b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_b64token(token: &[u8]) -> bool {
    // A lookup table: this runs over every token of every request.
    const ALLOWED: [bool; 256] = {
        let mut table = [false; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            table[b] =
                c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
            b += 1;
        }
        table
    };
    let body_end = token.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    body_end > 0 && token[..body_end].iter().all(|&b| ALLOWED[b as usize])
}

/// Tokens already verified, each kept no longer than its own `exp`.
pub(crate) struct TokenCache {
    // Looked up by a keyed hash of the token's last bytes (its signature: tokens of one issuer
    // share long prefixes, and hashing hundreds of bytes per request costs more than the rest
    // of the lookup); the whole token is compared once on a hit.
    cache: HotCache<Arc<[u8]>, CachedToken>,
}

#[derive(Clone)]
struct CachedToken {
    claims: VerifiedClaims,
    key: Arc<VerificationKey>,
}

/// How much of a token's end is hashed.
const HASHED_SUFFIX: usize = 32;

impl TokenCache {
    pub(crate) fn new(capacity: u64) -> Self {
        Self {
            cache: HotCache::new(usize::try_from(capacity).unwrap_or(usize::MAX)),
        }
    }

    /// The most tokens it keeps.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.cache.capacity()
    }

    fn key(&self, token: &[u8]) -> u64 {
        self.cache
            .hash(&token[token.len().saturating_sub(HASHED_SUFFIX)..])
    }

    fn get(&self, token: &[u8]) -> Option<VerifiedClaims> {
        let key = self.key(token);
        let cached = self.cache.get(key, token)?;
        // Re-check what may have changed since the token was verified.
        if cached.key.is_retired() || cached.claims.is_expired() {
            self.cache.remove(key, token);
            return None;
        }
        Some(cached.claims)
    }

    /// Drops a token (say, one found revoked).
    fn forget(&self, token: &[u8]) {
        self.cache.remove(self.key(token), token);
    }

    fn insert(&self, token: &[u8], claims: &VerifiedClaims, key: &Arc<VerificationKey>) {
        if claims.time_left().is_some() {
            let cached = CachedToken {
                claims: claims.clone(),
                key: Arc::clone(key),
            };
            self.cache
                .insert(self.key(token), Arc::from(token), cached, |kept| {
                    kept.key.is_retired() || kept.claims.is_expired()
                });
        }
    }
}

/// Whether `query` has an `access_token` parameter (its name read as [`is_parameter`] reads
/// it; `&` or `;` between parameters, as servers split them).
pub(crate) fn names_a_token(query: &str) -> bool {
    // Only a query holding a `%`, a byte beyond ASCII, or `token` (in any case) after a `_`,
    // `.`, `+` or `[` can: most hold none (a FHIR search's `_count` has no `k`), one pass
    // over its `%`s and `k`s, no split.
    let bytes = query.as_bytes();
    let may = memchr::memchr3_iter(b'%', b'k', b'K', bytes).any(|at| {
        bytes[at] == b'%'
            || at >= 3
                && matches!(bytes[at - 3], b'_' | b'.' | b'+' | b'[')
                && bytes
                    .get(at - 2..at + 3)
                    .is_some_and(|word| word.eq_ignore_ascii_case(b"token"))
    }) || !bytes.is_ascii();
    if !may {
        return false;
    }
    query.split(['&', ';']).any(|pair| {
        let name = pair.split_once('=').map_or(pair, |(name, _)| name);
        name.len() >= "access_token".len() && is_parameter(name, "access_token")
    })
}

/// Whether the query parameter name `name` is `wanted` (ASCII, lower case) as the
/// most lenient servers read names: `+` a space, percent-decoded, white space and control
/// characters around it dropped (Java's `trim`), an array's brackets after it dropped
/// (`access_token[]`, `access_token[0]`: Rack, PHP, Express's `qs`), `.`, a space or a `[`
/// in it read as `_` (PHP), compared in any case, with the case mappings of Unicode that lead
/// to ASCII (the Kelvin sign `K` a `k`, `ſ` an `s`, `ı` and `İ` an `i`, as Java's
/// `equalsIgnoreCase` and .NET's `OrdinalIgnoreCase` read them; `ß` and `ẞ` an `ss`, as
/// upper-casing reads them) and fullwidth forms read as ASCII (NFKC). `access_to%E2%84%AAen`,
/// `acce%C3%9F_token`, `access.token` and `access_token[]` are each an `access_token` here.
pub(crate) fn is_parameter(name: &str, wanted: &str) -> bool {
    let name = parameter_name(name);
    let name = name.trim_matches(|c: char| c <= ' ' || c.is_whitespace());
    let name = match name.find('[') {
        Some(at) if at > 0 && name.ends_with(']') => &name[..at],
        _ => name,
    };
    if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return name.eq_ignore_ascii_case(wanted);
    }
    let mut wanted = wanted.bytes().map(|b| b.to_ascii_lowercase());
    let same = name.chars().all(|c| {
        let fullwidth;
        let folded: &[u8] = match c {
            '\u{212A}' => b"k",
            '\u{017F}' => b"s",
            '\u{0131}' | '\u{0130}' => b"i",
            '\u{00DF}' | '\u{1E9E}' => b"ss",
            '.' | ' ' | '[' => b"_",
            '\u{FF01}'..='\u{FF5E}' => {
                fullwidth = [u8::try_from(u32::from(c) - 0xFEE0)
                    .unwrap_or(0)
                    .to_ascii_lowercase()];
                &fullwidth
            }
            c if c.is_ascii() => {
                fullwidth = [(c as u8).to_ascii_lowercase()];
                &fullwidth
            }
            _ => return false,
        };
        folded.iter().all(|&b| wanted.next() == Some(b))
    });
    same && wanted.next().is_none()
}

/// A query parameter's name as the most lenient servers read it: `+` a space, percent-decoded
/// (bytes that are not UTF-8 replaced), white space around it dropped. `access_token+` and
/// `access_token%09` are `access_token` here, as they are to a server that trims names.
pub(crate) fn parameter_name(name: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let spaced = if name.contains('+') {
        Cow::Owned(name.replace('+', " "))
    } else {
        Cow::Borrowed(name)
    };
    let decoded = match percent_encoding::percent_decode_str(&spaced).decode_utf8_lossy() {
        Cow::Borrowed(_) => spaced,
        Cow::Owned(decoded) => Cow::Owned(decoded),
    };
    match decoded {
        Cow::Borrowed(name) => Cow::Borrowed(name.trim()),
        Cow::Owned(name) if name.trim().len() == name.len() => Cow::Owned(name),
        Cow::Owned(name) => Cow::Owned(name.trim().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_access_token_parameter_is_found_in_any_spelling_a_server_reads() {
        for query in [
            "access_token=eyJ",
            "_count=1&access_token=eyJ",
            "a=1;access_token=x",
            "%61ccess_token=x",
            "access%5Ftoken=x",
            "access_token",
            "ACCESS_TOKEN=x",
            "Access_Token=x",
            // Names a lenient server trims.
            "access_token%09=x",
            "access_token+=x",
            "+access_token=x",
            "%20access_token%20=x",
            // Unicode's case mappings that lead to ASCII letters (Java's `equalsIgnoreCase`).
            "access_to%E2%84%AAen=x",
            "acce%C5%BF%C5%BF_token=x",
            // Sent unencoded (hyper takes bytes beyond ASCII in a query).
            "access_to\u{212A}en=x",
            // Upper-casing's `ß` (`SS`), Java's `trim` (control characters), arrays (Rack,
            // PHP, `qs`), PHP's `.`, space and `[` for `_`, fullwidth letters (NFKC).
            "acce%C3%9F_token=x",
            "ACCE%E1%BA%9E_TOKEN=x",
            "access_token%00=x",
            "%01access_token=x",
            "access_token%1F=x",
            "access_token[]=x",
            "access_token%5B%5D=x",
            "access_token[0]=x",
            "access.token=x",
            "access+token=x",
            "access[token=x",
            "%EF%BD%81ccess_token=x",
        ] {
            assert!(names_a_token(query), "{query}");
        }
        for query in [
            "",
            "name=access_token",
            "_content=access_token%3Dx",
            "my_access_token=x",
            "access_tokens=x",
            "access%2Btoken=x",
            "access-token=x",
            "access[token]=x",
            "_count=1&_sort=name",
            "name=%41",
            "access_tok%C3%A9n=x",
            "%E2%84%AAaccess_token=x",
            "access_token%C4%B1=x",
        ] {
            assert!(!names_a_token(query), "{query}");
        }
        for (name, wanted) in [("%C4%B1d_token", "id_token"), ("%C4%B0D_TOKEN", "id_token")] {
            assert!(is_parameter(name, wanted), "{name}");
        }
        assert!(!is_parameter("%C3%AFd_token", "id_token"));
    }

    #[test]
    fn token_types_are_media_types_with_application_optional() {
        assert_eq!(token_type_name("at+jwt").as_deref(), Some("at+jwt"));
        assert_eq!(
            token_type_name("Application/AT+JWT").as_deref(),
            Some("at+jwt")
        );
        assert_eq!(token_type_name("text/plain").as_deref(), Some("text/plain"));
        assert_eq!(token_type_name("application/a/b"), None);
        for bad in ["", "a b", "at+jwt;x=1", "/x", "x/", "é"] {
            assert_eq!(token_type_name(bad), None, "{bad:?}");
        }
        let types = TokenTypes {
            per_issuer: vec![("https://typed".into(), vec!["at+jwt".into()])],
            default: Vec::new(),
        };
        assert!(
            types.accepts(Some("https://other"), None),
            "no default: unchecked"
        );
        assert!(types.accepts(Some("https://typed"), Some("application/At+Jwt")));
        assert!(!types.accepts(Some("https://typed"), Some("JWT")));
        assert!(!types.accepts(Some("https://typed"), None));
        assert!(!types.accepts(Some("https://typed"), Some("text/at+jwt")));
        let typed = TokenTypes {
            per_issuer: Vec::new(),
            default: vec!["at+jwt".into()],
        };
        assert!(!typed.accepts(None, Some("jwt")));
        assert!(typed.accepts(None, Some("at+jwt")));
    }

    #[test]
    fn the_token_cache_answers_only_for_the_very_token() {
        let cache = TokenCache::new(100);
        let key = Arc::new(VerificationKey::hmac(b"a-shared-secret-of-32-bytes-or-more!").unwrap());
        let claims = |sub: &str| {
            let exp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                + 600;
            let map = serde_json::json!({"sub": sub, "exp": exp});
            VerifiedClaims::assume_verified(map.as_object().unwrap().clone()).unwrap()
        };
        cache.insert(b"token-a", &claims("a"), &key);
        cache.insert(b"token-b", &claims("b"), &key);
        assert_eq!(cache.get(b"token-a").unwrap().subject(), Some("a"));
        assert_eq!(cache.get(b"token-b").unwrap().subject(), Some("b"));
        assert!(cache.get(b"token-c").is_none());
        // An entry found under a token's key but holding another token (a hash collision) is
        // a miss, never the other token's claims.
        let impostor = CachedToken {
            claims: claims("b"),
            key: Arc::clone(&key),
        };
        cache.cache.insert(
            cache.key(b"token-z"),
            Arc::from(&b"token-b"[..]),
            impostor,
            |_| false,
        );
        assert!(cache.get(b"token-z").is_none());
        // Tokens that end alike (the hashed part) are still told apart.
        let suffix = [b'x'; HASHED_SUFFIX];
        let (one, two) = (
            [b"one.".as_slice(), &suffix].concat(),
            [b"two.".as_slice(), &suffix].concat(),
        );
        cache.insert(&one, &claims("one"), &key);
        assert!(cache.get(&two).is_none());
        cache.insert(&two, &claims("two"), &key);
        assert!(
            cache.get(&one).is_none(),
            "one slot per hash: the later token took it"
        );
        assert_eq!(cache.get(&two).unwrap().subject(), Some("two"));
    }

    /// What the tests of [`verify_with_keys`] expect: HS256, no issuer or audience.
    #[cfg(feature = "token")]
    const HS256_ALONE: Expected<'static> = Expected {
        algorithms: &[Algorithm::HS256],
        issuer: None,
        audiences: &[],
        leeway: 0,
    };

    /// Ten minutes from now, in seconds since the epoch: a live token's `exp`.
    #[cfg(feature = "token")]
    fn in_ten_minutes() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600
    }

    /// The JWS of `header` and `payload` (JSON text, taken as it is) signed with HS256 under
    /// `secret`.
    #[cfg(feature = "token")]
    fn hs256(secret: &str, header: &str, payload: &str) -> String {
        // Both backends in an `--all-features` build: jsonwebtoken needs one chosen.
        crate::install_crypto_provider();
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
        let signature =
            jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
        format!("{input}.{signature}")
    }

    /// An HS256 token signed with `secret`, naming `kid`.
    #[cfg(feature = "token")]
    fn signed(secret: &str, kid: Option<&str>) -> String {
        let mut header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = kid.into();
        }
        let claims = serde_json::json!({"sub": "s", "exp": in_ten_minutes()});
        hs256(secret, &header.to_string(), &claims.to_string())
    }

    /// Any `crit` member is refused, `null` and `[]` too (RFC 7515 allows only a non-empty
    /// array, and serde reads a `null` as no member at all).
    #[cfg(feature = "token")]
    #[test]
    fn a_crit_member_is_refused_whatever_its_value() {
        let secret = "the-one-secret-of-32-bytes-or-more!";
        let keys = KeySet::new().with_key(VerificationKey::hmac(secret).unwrap());
        let claims = serde_json::json!({"sub": "s", "exp": in_ten_minutes()}).to_string();
        let with_header = |header: Value| hs256(secret, &header.to_string(), &claims);
        let plain = with_header(serde_json::json!({"alg": "HS256"}));
        assert!(verify_with_keys(&keys, &plain, &HS256_ALONE).is_ok());
        for crit in [
            serde_json::json!(null),
            serde_json::json!([]),
            serde_json::json!(["exp"]),
        ] {
            let token = with_header(serde_json::json!({"alg": "HS256", "crit": crit}));
            assert_eq!(
                verify_with_keys(&keys, &token, &HS256_ALONE).unwrap_err(),
                "critical header extensions",
                "{crit}"
            );
        }
        // Not even a list: not a header jsonwebtoken reads.
        let token = with_header(serde_json::json!({"alg": "HS256", "crit": "exp"}));
        assert!(verify_with_keys(&keys, &token, &HS256_ALONE).is_err());
    }

    #[cfg(feature = "token")]
    #[test]
    fn a_token_tries_a_few_keys_of_a_set_whatever_its_kid() {
        let expected = HS256_ALONE;
        let secret = |n: usize| format!("the-{n:02}th-secret-of-32-bytes-or-more!");
        // Ten keys under one `kid` (a JWK Set's `kid`s should differ; one that does not must
        // not make each forged token cost ten signature checks).
        let set = |right: usize| {
            (0..10).fold(KeySet::new(), |set, n| {
                let key = VerificationKey::hmac(secret(if n == right { 99 } else { n }))
                    .unwrap()
                    .with_kid("dup");
                set.with_key(key)
            })
        };
        let token = signed(&secret(99), Some("dup"));
        assert!(verify_with_keys(&set(1), &token, &expected).is_ok());
        assert_eq!(
            verify_with_keys(&set(9), &token, &expected).unwrap_err(),
            "a bad signature",
            "the tenth key is never tried"
        );
        // Keys without a `kid` are tried for a named one only when no key has it.
        let kidless = VerificationKey::hmac(secret(99)).unwrap();
        let named = VerificationKey::hmac(secret(1)).unwrap().with_kid("k");
        let both = KeySet::new().with_key(kidless).with_key(named);
        assert!(verify_with_keys(&both, &signed(&secret(99), Some("other")), &expected).is_ok());
        assert!(verify_with_keys(&both, &signed(&secret(99), Some("k")), &expected).is_err());
        assert!(verify_with_keys(&both, &signed(&secret(1), Some("k")), &expected).is_ok());
        // Keys that cannot check the token's algorithm are no try: four RSA keys under the
        // same `kid` leave the HMAC key its turn.
        let rsa = include_str!("../../tests/support/keys/rsa_public.pem");
        let mixed = (0..4)
            .fold(KeySet::new(), |set, _| {
                set.with_key(VerificationKey::rsa_pem(rsa).unwrap().with_kid("k"))
            })
            .with_key(VerificationKey::hmac(secret(99)).unwrap().with_kid("k"));
        assert!(verify_with_keys(&mixed, &signed(&secret(99), Some("k")), &expected).is_ok());
    }

    /// Client assertions and introspection read claims as the bearer layer does: a claim
    /// named twice, or one that is not what it says, refuses the JWT.
    #[cfg(feature = "token")]
    #[test]
    fn verified_alone_a_jwt_with_claims_named_twice_or_malformed_is_refused() {
        let secret = "the-only-secret-of-32-bytes-or-more!";
        let keys = KeySet::new().with_key(VerificationKey::hmac(secret).unwrap());
        let expected = HS256_ALONE;
        let exp = in_ten_minutes();
        let raw = |payload: String| hs256(secret, r#"{"alg":"HS256","typ":"JWT"}"#, &payload);
        let good = raw(format!(r#"{{"sub":"s","exp":{exp}}}"#));
        assert!(verify_with_keys(&keys, &good, &expected).is_ok());
        for (payload, why) in [
            (
                format!(r#"{{"sub":"s","sub":"t","exp":{exp}}}"#),
                "malformed",
            ),
            (
                format!(r#"{{"sub":"s","exp":{exp},"iat":"{exp}"}}"#),
                "The access token's iat claim is not a NumericDate",
            ),
            (
                format!(r#"{{"sub":1,"exp":{exp}}}"#),
                "The access token's sub claim is not a string",
            ),
        ] {
            assert_eq!(
                verify_with_keys(&keys, &raw(payload.clone()), &expected).unwrap_err(),
                why,
                "{payload}"
            );
        }
    }

    #[test]
    fn the_unverified_issuer_is_the_one_the_claims_will_read() {
        let issuer = |payload: &str| {
            let UnverifiedIssuer(issuer) = serde_json::from_str(payload).unwrap();
            let claims: Map<String, Value> = serde_json::from_str(payload).unwrap();
            // What the verified claims would say: the map's `iss`, when a string.
            assert_eq!(
                issuer.as_deref(),
                claims.get("iss").and_then(Value::as_str),
                "{payload}"
            );
            issuer
        };
        assert_eq!(
            issuer(r#"{"iss":"https://a.test","exp":1}"#).unwrap(),
            "https://a.test"
        );
        // A later member replaces an earlier one, whatever its type.
        assert_eq!(
            issuer(r#"{"iss":"https://a.test","iss":"https://b.test"}"#).unwrap(),
            "https://b.test"
        );
        assert_eq!(issuer(r#"{"iss":"https://a.test","iss":7}"#), None);
        assert_eq!(issuer(r#"{"iss":["https://a.test"]}"#), None);
        assert_eq!(
            issuer(r#"{"sub":"x","nested":{"iss":"https://a.test"}}"#),
            None
        );
        // An escaped name is the same name.
        assert_eq!(
            issuer(r#"{"\u0069ss":"https://a.\u0074est"}"#).unwrap(),
            "https://a.test"
        );
        assert!(serde_json::from_str::<UnverifiedIssuer>("[1]").is_err());
    }

    #[test]
    fn b64token_syntax() {
        assert!(is_b64token(b"abc.DEF-_~+/=="));
        assert!(!is_b64token(b"=="));
        assert!(!is_b64token(b"a=b"));
        assert!(!is_b64token(b"a b"));
        assert!(!is_b64token(b"a\"b"));
        assert!(!is_b64token("é".as_bytes()));
    }

    #[test]
    fn leading_spaces_trimmed() {
        assert_eq!(trim_leading_spaces(b"   x "), b"x ");
        assert_eq!(trim_leading_spaces(b""), b"");
    }
}
