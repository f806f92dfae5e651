//! Secrets at rest, sealed or in clear: what the file stores and the database share whether
//! the `seal` feature is built or not. Without it no key-encryption key can be given (the
//! [`Kek`] type has no value), and a sealed secret is refused saying that this build cannot
//! open it.

use crate::tenant::TenantId;

/// The key-encryption key that seals secrets at rest.
#[cfg(feature = "seal")]
pub(crate) use crate::seal::KeyEncryptionKey as Kek;

/// Which key opened a sealed secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenedBy {
    /// The key that seals.
    Key,
    /// The previous key (the key being changed from): the secret is to be sealed again with
    /// the key that seals.
    #[cfg_attr(not(feature = "seal"), allow(dead_code))]
    Previous,
    /// The next key (the key being changed to, by other replicas): the secret stays as it is.
    #[cfg_attr(not(feature = "seal"), allow(dead_code))]
    Next,
}

/// Without the `seal` feature there is no key-encryption key: this type has no value.
#[cfg(not(feature = "seal"))]
#[derive(Debug)]
pub(crate) enum Kek {}

#[cfg(not(feature = "seal"))]
impl Kek {
    pub(crate) fn seal_base64(
        &self,
        _binding: &str,
        _plaintext: &[u8],
    ) -> Result<String, std::convert::Infallible> {
        match *self {}
    }

    pub(crate) fn open_base64(&self, _binding: &str, _sealed: &str) -> Option<(Vec<u8>, OpenedBy)> {
        match *self {}
    }
}

/// The environment variable the gateway reads its key-encryption key from (the `seal`
/// module's `KEY_ENCRYPTION_KEY_ENV`), named when a stored value opens only with it.
pub(crate) const KEY_ENV: &str = "TOWER_FHIR_KEY_ENCRYPTION_KEY";

/// The environment variable the gateway reads the key being changed from (the `seal`
/// module's `PREVIOUS_KEY_ENCRYPTION_KEY_ENV`).
pub(crate) const PREVIOUS_KEY_ENV: &str = "TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY";

/// Where a sealed credential is kept in an upstream's JSON, in place of `authorization`: the
/// sealed bytes in base64.
pub(crate) const SEALED_AUTHORIZATION: &str = "authorization_sealed";

/// Why `what`, sealed, is refused when no key-encryption key is given.
pub(crate) fn no_key(what: &str) -> String {
    no_key_in(what, cfg!(feature = "seal"))
}

/// [`no_key`] in a build with the `seal` feature or without it (which no key can be given
/// to: no test builds the library without it, the tests' own dependencies enabling it).
fn no_key_in(what: &str, seal_built: bool) -> String {
    if seal_built {
        format!("{what} is sealed and no key-encryption key is given: set {KEY_ENV} to the key it was sealed with")
    } else {
        format!("{what} is sealed, and this build cannot open sealed secrets (tower-fhir without its `seal` feature): build with the `seal` feature and set {KEY_ENV} to the key it was sealed with")
    }
}

/// Why `what`, sealed, is refused when the key-encryption key given does not open it.
pub(crate) fn wrong_key(what: &str, or: &str) -> String {
    format!("{what} does not open with the key-encryption key given: the wrong key{or}; set {KEY_ENV} to the key it was sealed with (or, to change the key, set {PREVIOUS_KEY_ENV} to it)")
}

/// What a sealed credential is bound to: its tenant and its upstream's base URL.
fn credential_binding(tenant: TenantId, base_url: &str) -> String {
    format!("tower-fhir tenant {tenant} upstream {base_url}")
}

/// The upstreams of a tenant record's JSON (`{"upstreams": [...]}`), as objects.
pub(crate) fn upstreams_of(
    json: &mut serde_json::Value,
) -> impl Iterator<Item = &mut serde_json::Map<String, serde_json::Value>> {
    json.get_mut("upstreams")
        .and_then(serde_json::Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_object_mut)
}

/// The base URL of an upstream's JSON, as written.
fn base_of(upstream: &serde_json::Map<String, serde_json::Value>) -> String {
    upstream
        .get("base_url")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// A credential an upstream's JSON held sealed, once opened.
pub(crate) struct Opened {
    pub(crate) base_url: String,
    pub(crate) credential: String,
    /// As it was in the file (base64), to write again while the credential is unchanged.
    pub(crate) sealed: String,
    /// Which key opened it (the key that seals, when it was just sealed).
    pub(crate) by: OpenedBy,
}

/// Opens the sealed credential of an upstream's JSON with `kek`, in place (its
/// `authorization_sealed` becomes `authorization`): what was sealed, or `None` when the
/// credential is in clear or there is none. An error when it cannot be opened (no key, the
/// wrong key, or a credential copied from another tenant or upstream) or when the upstream
/// holds it both in clear and sealed.
pub(crate) fn open_upstream(
    kek: Option<&Kek>,
    tenant: TenantId,
    upstream: &mut serde_json::Map<String, serde_json::Value>,
) -> Result<Option<Opened>, String> {
    let Some(sealed) = upstream.get(SEALED_AUTHORIZATION).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let base_url = base_of(upstream);
    let what = format!(
        "tenant {tenant}: the credential of its upstream {}",
        crate::route::without_userinfo(&base_url)
    );
    if upstream.get("authorization").is_some_and(|v| !v.is_null()) {
        return Err(format!(
            "{what} is both in clear (`authorization`) and sealed (`{SEALED_AUTHORIZATION}`): keep one"
        ));
    }
    let Some(sealed) = sealed.as_str().map(str::to_owned) else {
        return Err(format!("{what}: `{SEALED_AUTHORIZATION}` is not a string"));
    };
    let Some(kek) = kek else {
        return Err(no_key(&what));
    };
    let (credential, by) = kek
        .open_base64(&credential_binding(tenant, &base_url), &sealed)
        .and_then(|(credential, by)| Some((String::from_utf8(credential).ok()?, by)))
        .ok_or_else(|| {
            wrong_key(
                &what,
                ", a credential copied from another tenant or upstream, or a base_url changed \
                 since it was sealed",
            )
        })?;
    upstream.remove(SEALED_AUTHORIZATION);
    upstream.insert("authorization".to_owned(), credential.clone().into());
    Ok(Some(Opened {
        base_url,
        credential,
        sealed,
        by,
    }))
}

/// A tenant record's JSON as read, each sealed credential opened with `kek` (see
/// [`open_upstream`]).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn open_credentials(
    kek: Option<&Kek>,
    tenant: TenantId,
    mut json: serde_json::Value,
) -> Result<serde_json::Value, String> {
    for upstream in upstreams_of(&mut json) {
        open_upstream(kek, tenant, upstream)?;
    }
    Ok(json)
}

/// A tenant record's JSON sealed again with `kek` when it holds a credential in clear or one
/// only `kek`'s previous key opens (with how many of each), `None` when every credential is
/// sealed with `kek` already. An error as [`open_credentials`]'s.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn reseal_credentials(
    kek: &Kek,
    tenant: TenantId,
    mut json: serde_json::Value,
) -> Result<Option<(serde_json::Value, Resealed)>, String> {
    let mut resealed = Resealed::default();
    for upstream in upstreams_of(&mut json) {
        match open_upstream(Some(kek), tenant, upstream)? {
            Some(opened) if opened.by == OpenedBy::Previous => resealed.previous += 1,
            Some(_) => {}
            None if upstream.get("authorization").is_some_and(|v| !v.is_null()) => {
                resealed.in_clear += 1;
            }
            None => {}
        }
    }
    if resealed == Resealed::default() {
        return Ok(None);
    }
    Ok(Some((seal_credentials(Some(kek), tenant, json)?, resealed)))
}

/// What [`reseal_credentials`] sealed again: credentials found in clear, and credentials only
/// the previous key opened.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resealed {
    pub(crate) in_clear: usize,
    pub(crate) previous: usize,
}

/// Seals the credential of an upstream's JSON with `kek`, in place (its `authorization`
/// becomes `authorization_sealed`): `kept` gives the sealed text already written for this
/// tenant, base URL and credential, to write again rather than seal anew (a fresh nonce only
/// for what changed). The credential and what it was sealed to, when there was one.
pub(crate) fn seal_upstream(
    kek: &Kek,
    tenant: TenantId,
    upstream: &mut serde_json::Map<String, serde_json::Value>,
    kept: impl FnOnce(&str, &str) -> Option<String>,
) -> Result<Option<Opened>, String> {
    let base_url = base_of(upstream);
    if upstream.contains_key(SEALED_AUTHORIZATION) {
        return Err(format!(
            "tenant {tenant}: the credential of its upstream {} is already sealed",
            crate::route::without_userinfo(&base_url)
        ));
    }
    let Some(serde_json::Value::String(credential)) = upstream.remove("authorization") else {
        return Ok(None);
    };
    let sealed = match kept(&base_url, &credential) {
        Some(sealed) => sealed,
        None => kek
            .seal_base64(
                &credential_binding(tenant, &base_url),
                credential.as_bytes(),
            )
            .map_err(|e| {
                format!("tenant {tenant}: the credential of its upstream {base_url} cannot be sealed: {e}")
            })?,
    };
    upstream.insert(SEALED_AUTHORIZATION.to_owned(), sealed.clone().into());
    Ok(Some(Opened {
        base_url,
        credential,
        sealed,
        by: OpenedBy::Key,
    }))
}

/// A tenant record's JSON with each upstream's `authorization` sealed with `kek` (as it is
/// without one).
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) fn seal_credentials(
    kek: Option<&Kek>,
    tenant: TenantId,
    mut json: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let Some(kek) = kek else {
        return Ok(json);
    };
    for upstream in upstreams_of(&mut json) {
        seal_upstream(kek, tenant, upstream, |_, _| None)?;
    }
    Ok(json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";

    #[test]
    fn an_upstream_with_a_credential_both_in_clear_and_sealed_is_refused() {
        let tenant = TenantId::parse(TENANT).unwrap();
        let mut upstream = json!({
            "base_url": "http://a/fhir",
            "authorization": "Bearer a",
            SEALED_AUTHORIZATION: "AAAA",
        });
        let refused = open_upstream(None, tenant, upstream.as_object_mut().unwrap())
            .err()
            .unwrap();
        assert!(refused.contains("both in clear"), "{refused}");
        assert!(refused.contains(TENANT), "{refused}");
    }

    #[test]
    fn a_sealed_secret_without_a_key_says_what_to_do_with_the_seal_feature_or_without() {
        let with = no_key_in("the signing key \"k1\"", true);
        assert!(with.contains("no key-encryption key is given"), "{with}");
        assert!(with.contains(KEY_ENV), "{with}");
        let without = no_key_in("the signing key \"k1\"", false);
        assert!(
            without.contains("this build cannot open sealed secrets"),
            "{without}"
        );
        assert!(without.contains("`seal` feature"), "{without}");
        assert!(without.contains(KEY_ENV), "{without}");
        assert_eq!(no_key("x"), no_key_in("x", cfg!(feature = "seal")));
    }

    #[cfg(feature = "seal")]
    fn kek(byte: u8) -> Kek {
        use base64::Engine;
        Kek::from_base64(&base64::engine::general_purpose::STANDARD.encode([byte; 32])).unwrap()
    }

    #[cfg(feature = "seal")]
    #[test]
    fn a_refusal_names_the_upstream_without_its_userinfo() {
        let tenant = TenantId::parse(TENANT).unwrap();
        let record = json!({"upstreams": [{"base_url": "http://a/fhir", "fhir_version": "4.0",
            "authorization": "Bearer a-secret"}]});
        let mut sealed = seal_credentials(Some(&kek(1)), tenant, record).unwrap();
        // The base URL edited by hand since, with credentials in it.
        sealed["upstreams"][0]["base_url"] = json!("http://user:PW-LEAK@a/fhir");
        let upstream = sealed["upstreams"][0].as_object_mut().unwrap();
        let refused = open_upstream(Some(&kek(1)), tenant, upstream)
            .err()
            .unwrap();
        assert!(!refused.contains("PW-LEAK"), "{refused}");
        assert!(refused.contains("<redacted>@a/fhir"), "{refused}");
        assert!(refused.contains("base_url changed"), "{refused}");
    }

    #[cfg(feature = "seal")]
    #[test]
    fn the_variable_named_is_the_seal_modules() {
        assert_eq!(KEY_ENV, crate::seal::KEY_ENCRYPTION_KEY_ENV);
        assert_eq!(
            PREVIOUS_KEY_ENV,
            crate::seal::PREVIOUS_KEY_ENCRYPTION_KEY_ENV
        );
    }

    #[cfg(feature = "seal")]
    #[test]
    fn sealed_credentials_open_only_for_their_tenant_and_upstream() {
        let tenant = TenantId::parse(TENANT).unwrap();
        let other_tenant = TenantId::parse("9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f").unwrap();
        let record = json!({"upstreams": [
            {"base_url": "http://a/fhir", "fhir_version": "4.0", "authorization": "Bearer a-secret"},
            {"base_url": "http://b/fhir", "fhir_version": "4.0"},
        ]});
        let sealed = seal_credentials(Some(&kek(1)), tenant, record.clone()).unwrap();
        assert!(!sealed.to_string().contains("a-secret"), "{sealed}");
        assert!(sealed["upstreams"][0].get("authorization").is_none());
        assert!(sealed["upstreams"][0][SEALED_AUTHORIZATION].is_string());
        assert!(sealed["upstreams"][1].get(SEALED_AUTHORIZATION).is_none());
        assert_eq!(
            seal_credentials(None, tenant, record.clone()).unwrap(),
            record,
            "without a key, as it is"
        );
        assert!(
            seal_credentials(Some(&kek(1)), tenant, sealed.clone())
                .unwrap_err()
                .contains("already sealed"),
            "sealed twice"
        );

        let opened = open_credentials(Some(&kek(1)), tenant, sealed.clone()).unwrap();
        assert_eq!(opened, record);
        let refused = open_credentials(None, tenant, sealed.clone()).unwrap_err();
        assert!(refused.contains("no key-encryption key"), "{refused}");
        assert!(refused.contains(KEY_ENV), "{refused}");
        for (key, tenant, why) in [
            (kek(2), tenant, "another key"),
            (kek(1), other_tenant, "another tenant"),
        ] {
            let refused = open_credentials(Some(&key), tenant, sealed.clone()).unwrap_err();
            assert!(refused.contains("the wrong key"), "{why}: {refused}");
            assert!(refused.contains(KEY_ENV), "{why}: {refused}");
        }
        // Moved to another upstream of the same tenant.
        let mut moved = sealed.clone();
        let credential = moved["upstreams"][0]
            .as_object_mut()
            .unwrap()
            .remove(SEALED_AUTHORIZATION)
            .unwrap();
        moved["upstreams"][1][SEALED_AUTHORIZATION] = credential;
        assert!(open_credentials(Some(&kek(1)), tenant, moved).is_err());
    }

    #[cfg(feature = "seal")]
    #[test]
    fn a_record_is_sealed_again_when_it_holds_a_credential_in_clear_or_under_the_previous_key() {
        let tenant = TenantId::parse(TENANT).unwrap();
        let (old, new) = (kek(1), kek(2));
        let changing = new.clone().with_previous(old.clone());
        let record = json!({"upstreams": [
            {"base_url": "http://a/fhir", "fhir_version": "4.0", "authorization": "Bearer a"},
            {"base_url": "http://b/fhir", "fhir_version": "4.0", "authorization": "Bearer b"},
        ]});
        let by_old = seal_credentials(Some(&old), tenant, record.clone()).unwrap();
        let (resealed, counted) = reseal_credentials(&changing, tenant, by_old.clone())
            .unwrap()
            .unwrap();
        assert_eq!(
            counted,
            Resealed {
                in_clear: 0,
                previous: 2
            }
        );
        assert_eq!(
            open_credentials(Some(&new), tenant, resealed.clone()).unwrap(),
            record,
            "opens with the new key alone"
        );
        assert!(open_credentials(Some(&old), tenant, resealed.clone()).is_err());
        assert_eq!(
            reseal_credentials(&changing, tenant, resealed.clone()).unwrap(),
            None,
            "sealed with the key already: left as it is"
        );
        assert_eq!(reseal_credentials(&new, tenant, resealed).unwrap(), None);
        // One upstream in clear beside one sealed with the old key.
        let mut mixed = by_old.clone();
        mixed["upstreams"][1] = record["upstreams"][1].clone();
        let (resealed, counted) = reseal_credentials(&changing, tenant, mixed)
            .unwrap()
            .unwrap();
        assert_eq!(
            counted,
            Resealed {
                in_clear: 1,
                previous: 1
            }
        );
        assert!(!resealed.to_string().contains("Bearer"), "{resealed}");
        assert_eq!(
            open_credentials(Some(&new), tenant, resealed).unwrap(),
            record
        );
        // Neither key: refused, nothing resealed.
        let refused =
            reseal_credentials(&kek(3).with_previous(kek(4)), tenant, by_old).unwrap_err();
        assert!(refused.contains("the wrong key"), "{refused}");
    }

    #[cfg(feature = "seal")]
    #[test]
    fn a_kept_sealed_credential_is_written_again_as_it_was() {
        let tenant = TenantId::parse(TENANT).unwrap();
        let mut upstream = json!({"base_url": "http://a/fhir", "authorization": "Bearer a"});
        let first = seal_upstream(
            &kek(1),
            tenant,
            upstream.as_object_mut().unwrap(),
            |_, _| None,
        )
        .unwrap()
        .unwrap();
        let mut again = json!({"base_url": "http://a/fhir", "authorization": "Bearer a"});
        let kept = seal_upstream(
            &kek(1),
            tenant,
            again.as_object_mut().unwrap(),
            |base, c| {
                assert_eq!((base, c), ("http://a/fhir", "Bearer a"));
                Some(first.sealed.clone())
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(kept.sealed, first.sealed);
        assert_eq!(again, upstream);
        let mut fresh = json!({"base_url": "http://a/fhir", "authorization": "Bearer a"});
        let resealed = seal_upstream(&kek(1), tenant, fresh.as_object_mut().unwrap(), |_, _| None)
            .unwrap()
            .unwrap();
        assert_ne!(
            resealed.sealed, first.sealed,
            "a fresh nonce when sealed anew"
        );
    }
}
