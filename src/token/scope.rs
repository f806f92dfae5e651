//! The `scope` parameter of a token request: which tenant, and which extra scopes, a client
//! gets.

use super::client::ClientRecord;
use super::error::TokenError;
use crate::smart::{looks_like_resource_scope, ResourceScope};
use crate::tenant::TenantId;

/// The tenant and the extra scopes granted for the requested `scope`.
///
/// Each value that is not a tenant is granted when the client may have it: one of its
/// registered `scopes` as written, or a SMART resource scope within one of them
/// (`system/Patient.r` under `system/*.rs`), or, when `narrowing` is on, any SMART resource
/// scope for a client registered with none (its tokens have tenant-wide access where a token
/// without resource scopes is not refused: asking for some gives it less).
/// Values it may not have are left out (RFC 6749
/// §3.3: the response's `scope` says what was granted). Asking for no scope besides the
/// tenant grants every registered scope; asking only for scopes the client may not have is
/// `invalid_scope`. A client registered with SMART resource scopes gets its registered ones
/// when it asks only for others (`openid`): a token without any would have tenant-wide access.
pub(super) fn grant_scope(
    client: &ClientRecord,
    requested: Option<&str>,
    narrowing: bool,
) -> Result<(TenantId, Vec<String>), TokenError> {
    // A client registered with no resource scope (none that looks like one: one that no longer
    // parses restricts all the same) may narrow its tenant-wide access, when that is on.
    let tenant_wide = narrowing && !client.scopes.iter().any(|s| looks_like_resource_scope(s));
    let mut tenants = Vec::new();
    let mut extras: Vec<String> = Vec::new();
    let mut refused = false;
    let requested = requested.unwrap_or("");
    // (Checked whole: a value with a tab or newline in it would be read as two scopes by a
    // resource server that splits on any white space.)
    if !requested
        .split(' ')
        .all(|value| value.is_empty() || is_scope_token(value))
    {
        return Err(TokenError::invalid_scope(
            "The scope has characters RFC 6749 does not allow in one (only visible ASCII, \
             without double quote and backslash, separated by spaces)",
        ));
    }
    for value in requested.split(' ').filter(|s| !s.is_empty()) {
        match TenantId::parse(value) {
            Ok(tenant) => {
                if !tenants.contains(&tenant) {
                    tenants.push(tenant);
                }
            }
            Err(_) if may_have(client, value, tenant_wide) => {
                if !extras.iter().any(|e| e == value) {
                    extras.push(value.to_owned());
                }
            }
            Err(_) => refused = true,
        }
    }
    let tenant = match tenants.as_slice() {
        [tenant] => *tenant,
        [] if client.tenants.len() == 1 => client.tenants[0],
        [] => {
            return Err(TokenError::invalid_scope(
                "The scope must name the tenant (the client has several)",
            ))
        }
        _ => {
            return Err(TokenError::invalid_scope(
                "The scope names more than one tenant",
            ))
        }
    };
    if !client.tenants.contains(&tenant) {
        return Err(TokenError::invalid_scope(
            "The client is not entitled to that tenant",
        ));
    }
    if extras.is_empty() {
        if refused {
            return Err(TokenError::invalid_scope(
                "The scope asks only for what the client may not have",
            ));
        }
        extras.clone_from(&client.scopes);
    } else if !extras.iter().any(|e| looks_like_resource_scope(e)) {
        // A token with no resource scope has the tenant-wide access of a client registered
        // without any: one restricted to some resources never gets such a token by asking
        // only for other scopes (`openid`). Its registered resource scopes come with them,
        // those that no longer parse too (stored before the parser grew stricter, or written
        // by hand): the SMART layer reads such a scope as granting nothing but restricting.
        for registered in &client.scopes {
            if looks_like_resource_scope(registered) {
                extras.push(registered.clone());
            }
        }
    }
    Ok((tenant, extras))
}

/// The tenant a token request's `scope` names, when it names exactly one (whatever else it
/// asks for): the only tenant [`grant_scope`] can grant it, known before the client is read,
/// so that the client is read narrowed to it ([`ClientStore::client_for_tenant`]). `None`
/// when it names none (`grant_scope` then grants the client's only tenant, if it has just
/// one) or several (refused).
///
/// [`ClientStore::client_for_tenant`]: super::ClientStore::client_for_tenant
pub(super) fn named_tenant(requested: Option<&str>) -> Option<TenantId> {
    let mut named = requested
        .unwrap_or("")
        .split(' ')
        .filter_map(|value| TenantId::parse(value).ok());
    let first = named.next()?;
    named.all(|other| other == first).then_some(first)
}

/// Whether `scope` is one RFC 6749 `scope-token` (§3.3): one or more of `%x21 / %x23-5B /
/// %x5D-7E`, that is visible ASCII but `"` and `\`.
pub(super) fn is_scope_token(scope: &str) -> bool {
    !scope.is_empty()
        && scope
            .bytes()
            .all(|b| matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E))
}

/// Whether `granted` holds resource scopes the client has only because it was registered
/// without any (and narrowing is on): they narrow its tenant-wide access.
pub(super) fn narrows(client: &ClientRecord, granted: &[String]) -> bool {
    !client.scopes.iter().any(|s| looks_like_resource_scope(s))
        && granted.iter().any(|s| looks_like_resource_scope(s))
}

/// Whether the client may have `scope`: registered as written, or a SMART resource scope
/// within a registered one, or any SMART resource scope for a `tenant_wide` client.
fn may_have(client: &ClientRecord, scope: &str, tenant_wide: bool) -> bool {
    if client.scopes.iter().any(|allowed| allowed == scope) {
        return true;
    }
    let Some(asked) = ResourceScope::parse(scope) else {
        return false;
    };
    tenant_wide
        || client
            .scopes
            .iter()
            .filter_map(|allowed| ResourceScope::parse(allowed))
            .any(|allowed| asked.within(&allowed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
    const B: &str = "9b2e7d4a-1c3f-4e5a-8b6c-7d8e9f0a1b2c";

    fn tenant(text: &str) -> TenantId {
        TenantId::parse(text).unwrap()
    }

    fn record(tenants: &[&str], scopes: &[&str]) -> ClientRecord {
        ClientRecord {
            id: "app".to_owned(),
            secrets: Vec::new(),
            tenants: tenants.iter().map(|t| tenant(t)).collect(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            token_lifetime_secs: None,
            revoked: false,
            rate_limit: None,
            token_endpoint_auth_method: Default::default(),
            jwks: None,
            jwks_uri: None,
        }
    }

    #[test]
    fn the_tenant_a_scope_names_is_found_before_the_client_is_read() {
        let named = |scope: Option<&str>| named_tenant(scope);
        assert_eq!(named(Some(A)), Some(tenant(A)));
        assert_eq!(
            named(Some(&format!("system/*.read {A} {A}"))),
            Some(tenant(A))
        );
        for none in [
            None,
            Some(""),
            Some("system/*.read"),
            Some(&*format!("{A} {B}")),
        ] {
            assert_eq!(named(none), None, "{none:?}");
        }
    }

    #[test]
    fn a_client_narrowed_to_the_tenant_named_is_granted_what_it_is_whole() {
        let c = "1d2d0000-0000-4000-8000-000000000001";
        let clients = [
            record(&[], &[]),
            record(&[A], &["system/*.read"]),
            record(&[A, B], &["system/Patient.rs", "launch"]),
            record(&[B, A, c], &[]),
        ];
        let scopes = [
            None,
            Some(String::new()),
            Some(A.to_owned()),
            Some(B.to_owned()),
            Some(format!("{A} {B}")),
            Some(format!("{B} {B} launch")),
            Some("system/*.read".to_owned()),
            Some(format!("{A} system/Patient.r openid")),
            Some(format!("{c} openid")),
            Some("a\tb".to_owned()),
        ];
        let granted = |client: &ClientRecord, scope: Option<&str>| {
            grant_scope(client, scope, false).map_err(|e| e.description)
        };
        for client in &clients {
            for scope in scopes.iter().map(Option::as_deref) {
                let narrowed = client.narrowed(named_tenant(scope));
                assert_eq!(
                    granted(&narrowed, scope),
                    granted(client, scope),
                    "{:?} asking {scope:?}",
                    client.tenants
                );
            }
        }
    }

    #[test]
    fn names_one_entitled_tenant_and_allowed_extras() {
        let one = record(&[A], &["system/*.read"]);
        let granted = |client: &ClientRecord, scope: Option<&str>| {
            grant_scope(client, scope, false).map_err(|e| e.description)
        };
        // Only the tenant, or nothing (one tenant): every registered scope.
        assert_eq!(
            granted(&one, None),
            Ok((tenant(A), vec!["system/*.read".to_owned()]))
        );
        assert_eq!(
            granted(&one, Some(" system/*.read  system/*.read ")),
            Ok((tenant(A), vec!["system/*.read".to_owned()]))
        );
        assert_eq!(
            granted(&one, Some(&A.to_uppercase())),
            Ok((tenant(A), vec!["system/*.read".to_owned()]))
        );
        // Only what it may not have: invalid_scope.
        assert_eq!(
            granted(&one, Some("patient/*.write")),
            Err("The scope asks only for what the client may not have")
        );
        assert!(granted(&one, Some(B)).is_err());

        let two = record(&[A, B], &[]);
        assert_eq!(granted(&two, Some(B)), Ok((tenant(B), vec![])));
        assert!(granted(&two, None).is_err());
        assert!(granted(&two, Some(&format!("{A} {B}"))).is_err());
        // Registered without scopes: the tenant alone, anything else refused.
        assert_eq!(granted(&two, Some(A)), Ok((tenant(A), vec![])));
        assert!(granted(&two, Some(&format!("{A} system/*.read"))).is_err());
    }

    #[test]
    fn grants_the_requested_scopes_the_client_may_have() {
        let client = record(
            &[A],
            &["system/*.rs", "system/Observation.cruds", "launch/patient"],
        );
        let granted = |scope: &str| grant_scope(&client, Some(scope), false).map(|(_, s)| s);
        // Within a registered scope (narrower type, fewer permissions, a query added; v1
        // and v2 forms): granted as asked.
        assert_eq!(
            granted(&format!(
                "{A} system/Patient.r system/Observation.read system/Condition.rs?clinical-status=active launch/patient"
            ))
            .unwrap(),
            [
                "system/Patient.r",
                "system/Observation.read",
                "system/Condition.rs?clinical-status=active",
                "launch/patient"
            ]
        );
        // What it may not have is left out, the rest granted.
        assert_eq!(
            granted(&format!(
                "{A} system/Patient.rs system/Patient.cud user/Patient.r openid"
            ))
            .unwrap(),
            ["system/Patient.rs"]
        );
        // Wider than registered, another context, or malformed: nothing granted.
        for scope in [
            "system/Patient.cruds",
            "patient/Patient.r",
            "system/*.write",
            "system/Patient.sr",
            "launch",
        ] {
            assert!(granted(&format!("{A} {scope}")).is_err(), "{scope}");
        }
        // A registered granular scope grants only as narrow or narrower.
        let granular = record(&[A], &["system/Observation.rs?category=laboratory"]);
        let granted = |scope: &str| grant_scope(&granular, Some(scope), false).map(|(_, s)| s);
        assert!(granted("system/Observation.rs").is_err());
        assert_eq!(
            granted("system/Observation.s?category=laboratory&code=1234-5").unwrap(),
            ["system/Observation.s?category=laboratory&code=1234-5"]
        );
        // Asking only for scopes that are not resource scopes does not shed the restriction:
        // the registered resource scopes come with them.
        let restricted = record(&[A], &["system/Patient.rs", "openid", "launch/patient"]);
        assert_eq!(
            grant_scope(&restricted, Some(&format!("{A} openid")), false)
                .unwrap()
                .1,
            ["openid", "system/Patient.rs"]
        );
        // A registered scope that looks like a resource scope but no longer parses (the
        // parser grew stricter: `_count` in a granular scope) still restricts: it comes with
        // `openid`, as the SMART layer reads it as granting nothing.
        let unreadable = record(&[A], &["openid", "system/Observation.rs?_count=10"]);
        assert_eq!(
            grant_scope(&unreadable, Some(&format!("{A} openid")), false)
                .unwrap()
                .1,
            ["openid", "system/Observation.rs?_count=10"]
        );
        assert!(grant_scope(&unreadable, Some(&format!("{A} system/*.cruds")), false).is_err());
        // A client registered without resource scopes keeps tenant-wide tokens.
        let open = record(&[A], &["openid"]);
        assert_eq!(
            grant_scope(&open, Some(&format!("{A} openid")), false)
                .unwrap()
                .1,
            ["openid"]
        );
    }

    #[test]
    fn narrowing_lets_a_client_without_resource_scopes_ask_for_some() {
        let granted = |client: &ClientRecord, scope: &str, narrowing: bool| {
            grant_scope(client, Some(scope), narrowing)
                .map(|(_, s)| s)
                .map_err(|e| e.description)
        };
        let ask = format!("{A} openid system/Patient.r patient/*.rs launch");
        // Registered without resource scopes: any resource scope when narrowing is on (less
        // than its tenant-wide access), none when it is off (where tokens without resource
        // scopes are refused, one would give it access it does not have).
        for open in [record(&[A], &["openid"]), record(&[A], &[])] {
            assert_eq!(
                granted(&open, &ask, true).unwrap(),
                if open.scopes.is_empty() {
                    vec!["system/Patient.r", "patient/*.rs"]
                } else {
                    vec!["openid", "system/Patient.r", "patient/*.rs"]
                }
            );
            assert!(!granted(&open, &ask, false)
                .unwrap_or_default()
                .iter()
                .any(|s| s.contains('/')));
            // Asking only for what is not a resource scope still gets nothing more.
            assert!(granted(&open, &format!("{A} launch"), true).is_err());
            assert_eq!(granted(&open, A, true).unwrap(), open.scopes);
        }
        // A client with resource scopes is held to them whatever the switch says, and so is
        // one whose registered resource scope no longer parses (it restricts).
        for restricted in [
            record(&[A], &["system/Patient.rs"]),
            record(&[A], &["openid", "system/Observation.rs?_count=10"]),
        ] {
            for narrowing in [false, true] {
                assert!(
                    granted(&restricted, &format!("{A} system/Encounter.r"), narrowing).is_err()
                );
            }
        }
    }

    #[test]
    fn a_scope_outside_the_scope_token_characters_is_invalid_scope() {
        // A granular scope's query may carry any text the client asks for: a tab, a newline
        // or a quote in it would reach the signed token's `scope`, where a resource server
        // splitting on any white space reads a second scope (or tenant) into it.
        let granular = record(&[A, B], &["system/Observation.rs?category=laboratory"]);
        for smuggled in [
            "system/Observation.rs?category=laboratory&x=\tsystem/*.cruds",
            "system/Observation.rs?category=laboratory&x=\n9b2e7d4a-1c3f-4e5a-8b6c-7d8e9f0a1b2c",
            "system/Observation.rs?category=laboratory&x=\"",
            "system/Observation.rs?category=laboratory&x=\\",
            "system/Observation.rs?category=laboratory&x=\u{e9}",
            "system/Observation.rs?category=laboratory&x=\u{7f}",
        ] {
            let error =
                grant_scope(&granular, Some(&format!("{A} {smuggled}")), false).unwrap_err();
            assert_eq!(error.code.as_str(), "invalid_scope", "{smuggled:?}");
            assert!(error.description.contains("RFC 6749"), "{smuggled:?}");
        }
        // Spaces alone separate: runs of them, and at either end, are still taken.
        assert_eq!(
            grant_scope(
                &granular,
                Some(&format!(
                    "  {A}   system/Observation.rs?category=laboratory&x=1 "
                )),
                false
            )
            .unwrap()
            .1,
            ["system/Observation.rs?category=laboratory&x=1"]
        );
    }
}
