//! The `scope` parameter of a token request: which tenant, and which extra scopes, a client
//! gets.

use super::client::ClientRecord;
use super::error::TokenError;
use crate::tenant::TenantId;

/// The tenant and the extra scopes granted for the requested `scope`.
pub(super) fn grant_scope(
    client: &ClientRecord,
    requested: Option<&str>,
) -> Result<(TenantId, Vec<String>), TokenError> {
    let mut tenants = Vec::new();
    let mut extras: Vec<String> = Vec::new();
    for value in requested.unwrap_or("").split(' ').filter(|s| !s.is_empty()) {
        match TenantId::parse(value) {
            Ok(tenant) => {
                if !tenants.contains(&tenant) {
                    tenants.push(tenant);
                }
            }
            Err(_) => {
                if !client.scopes.iter().any(|allowed| allowed == value) {
                    return Err(TokenError::invalid_scope(
                        "The scope asks for something the client may not have",
                    ));
                }
                if !extras.iter().any(|e| e == value) {
                    extras.push(value.to_owned());
                }
            }
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
    Ok((tenant, extras))
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
        }
    }

    #[test]
    fn names_one_entitled_tenant_and_allowed_extras() {
        let one = record(&[A], &["system/*.read"]);
        let granted = |client: &ClientRecord, scope: Option<&str>| {
            grant_scope(client, scope).map_err(|e| e.description)
        };
        assert_eq!(granted(&one, None), Ok((tenant(A), vec![])));
        assert_eq!(
            granted(&one, Some(" system/*.read  system/*.read ")),
            Ok((tenant(A), vec!["system/*.read".to_owned()]))
        );
        assert_eq!(
            granted(&one, Some(&A.to_uppercase())),
            Ok((tenant(A), vec![]))
        );
        assert!(granted(&one, Some("patient/*.write")).is_err());
        assert!(granted(&one, Some(B)).is_err());

        let two = record(&[A, B], &[]);
        assert_eq!(granted(&two, Some(B)), Ok((tenant(B), vec![])));
        assert!(granted(&two, None).is_err());
        assert!(granted(&two, Some(&format!("{A} {B}"))).is_err());
    }
}
