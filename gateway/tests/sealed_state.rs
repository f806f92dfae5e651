//! The secrets in `state_dir` sealed with `TOWER_FHIR_KEY_ENCRYPTION_KEY`, over real HTTP
//! through the gateway binary: a state written in clear is sealed at the first start with the
//! key (the upstreams' credentials in `tenants.json`, the private keys in
//! `signing-keys.json`), a credential onboarded through the admin API is written sealed,
//! proxied requests carry the opened credential, a token issued before a restart still
//! verifies after it; without the key, with another one, or with one that is no key, the
//! gateway refuses to start and names the variable, and writes neither file (whichever of
//! them is sealed, in clear or missing); `--check-config` refuses the same and writes nothing.
//! The demo does not read the key. The key changes with
//! `TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY` holding the old one: the start seals both files
//! again with the new key, which alone opens them from then on.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{json, Value};
use support::*;

const GATEWAY: &str = env!("CARGO_BIN_EXE_tower-fhir-gateway");
const TENANT: &str = "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f";
/// Onboarded through the admin API.
const ONBOARDED: &str = "7b3e9a10-2c4d-4e5f-8a6b-0c1d2e3f4a5b";
const CREDENTIAL: &str = "Bearer sealed-state-upstream-credential-0123456789";
const ONBOARDED_CREDENTIAL: &str = "Bearer sealed-state-onboarded-credential-9876543210";
const SECRET: &str = "sealed-state-client-secret-0123456789";
const ADMIN: &str = "sealed-state-admin-token-0123456789";
const KEK: &str = "c2VhbGVkLXN0YXRlLWtleS1lbmNyeXB0aW9uLWtleSE=";
const OTHER_KEK: &str = "YW5vdGhlci1rZXktZW5jcnlwdGlvbi1rZXktMzJieXQ=";
const ENV: &str = "TOWER_FHIR_KEY_ENCRYPTION_KEY";
const PREVIOUS_ENV: &str = "TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY";
const NEXT_ENV: &str = "TOWER_FHIR_NEXT_KEY_ENCRYPTION_KEY";

/// The key-encryption keys a gateway is given: the key, and the keys it changes from
/// (previous) or to (next).
#[derive(Clone, Copy, Default)]
struct Keys<'a> {
    key: Option<&'a str>,
    previous: Option<&'a str>,
    next: Option<&'a str>,
}

impl<'a> From<Option<&'a str>> for Keys<'a> {
    fn from(key: Option<&'a str>) -> Self {
        Self {
            key,
            ..Keys::default()
        }
    }
}

impl Keys<'_> {
    /// Sets (or removes) the three variables in `command`'s environment.
    fn apply(self, command: &mut Command) {
        for (name, value) in [
            (ENV, self.key),
            (PREVIOUS_ENV, self.previous),
            (NEXT_ENV, self.next),
        ] {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
    }
}

/// The configuration: one tenant whose upstream (at `/tenant` on `upstream`) takes
/// [`CREDENTIAL`], the client `app` for it and for [`ONBOARDED`], the admin API, the state in
/// `dir/state`.
fn config(dir: &Path, upstream: &RecordingUpstream) -> Value {
    json!({
        "state_dir": dir.join("state"),
        "admin_token": ADMIN,
        "public_base_url": "https://gateway.example",
        "clients": [{"client_id": "app", "client_secret": SECRET, "tenants": [TENANT, ONBOARDED]}],
        "tenants": [{
            "id": TENANT,
            "upstreams": [{
                "base_url": upstream.base("/tenant"),
                "fhir_version": "4.0",
                "authorization": CREDENTIAL
            }]
        }],
        "secret_hashing": {"memory_kib": 1024, "iterations": 1}
    })
}

/// The gateway command on `dir/gateway.json`, listening on port 0, with `kek` as its
/// key-encryption keys (none for `None`) and no database URL from this environment.
fn command<'a>(dir: &Path, config: &Value, kek: impl Into<Keys<'a>>) -> Command {
    let file = dir.join("gateway.json");
    std::fs::write(&file, serde_json::to_vec_pretty(config).unwrap()).unwrap();
    let mut command = Command::new(GATEWAY);
    command
        .arg("--config")
        .arg(&file)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env_remove("TOWER_FHIR_DATABASE_URL");
    kek.into().apply(&mut command);
    command
}

/// A gateway started as [`command`] says, its log in `dir/{name}.log`.
fn start<'a>(
    dir: &Path,
    name: &str,
    config: &Value,
    kek: impl Into<Keys<'a>>,
) -> (Proc, TestClient, String) {
    let log = dir.join(format!("{name}.log"));
    let (proc, base) = Proc::start(
        command(dir, config, kek),
        log.clone(),
        "tower-fhir gateway listening on ",
    );
    let client = TestClient::new(base.trim_start_matches("http://").parse().unwrap());
    (proc, client, log.display().to_string())
}

/// What a gateway that must refuse to start said (its stderr), once it has exited, failing.
fn refused<'a>(dir: &Path, config: &Value, kek: impl Into<Keys<'a>>) -> String {
    let mut child = command(dir, config, kek)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the gateway did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut said = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut said).unwrap();
    assert!(!status.success(), "started: {said}");
    said
}

/// `--check-config` on `dir/gateway.json` with `kek` as the key-encryption key: what it said
/// on stdout when it passed, on stderr when it failed.
fn check_config<'a>(dir: &Path, kek: impl Into<Keys<'a>>) -> Result<String, String> {
    check_config_file(&dir.join("gateway.json"), kek)
}

fn check_config_file<'a>(file: &Path, kek: impl Into<Keys<'a>>) -> Result<String, String> {
    let mut command = Command::new(GATEWAY);
    command
        .arg("--check-config")
        .arg(file)
        .env("RUST_LOG", "off")
        .env_remove("TOWER_FHIR_DATABASE_URL");
    kek.into().apply(&mut command);
    let checked = command.output().unwrap();
    if checked.status.success() {
        Ok(String::from_utf8_lossy(&checked.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&checked.stderr).into_owned())
    }
}

/// The two state files that hold secrets, as bytes (`None`: no such file).
#[derive(Clone, PartialEq, Eq)]
struct StateFiles {
    tenants: Option<Vec<u8>>,
    keys: Option<Vec<u8>>,
}

/// As text, for a failed comparison.
impl std::fmt::Debug for StateFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn text(bytes: &Option<Vec<u8>>) -> Option<std::borrow::Cow<'_, str>> {
            bytes.as_deref().map(String::from_utf8_lossy)
        }
        f.debug_struct("StateFiles")
            .field("tenants", &text(&self.tenants))
            .field("keys", &text(&self.keys))
            .finish()
    }
}

impl StateFiles {
    fn read(dir: &Path) -> Self {
        let read = |name: &str| std::fs::read(dir.join("state").join(name)).ok();
        Self {
            tenants: read("tenants.json"),
            keys: read("signing-keys.json"),
        }
    }

    /// Puts these files in `dir/state` (removing one that is `None`).
    fn write(&self, dir: &Path) {
        for (name, bytes) in [
            ("tenants.json", &self.tenants),
            ("signing-keys.json", &self.keys),
        ] {
            let path = dir.join("state").join(name);
            match bytes {
                Some(bytes) => std::fs::write(&path, bytes).unwrap(),
                None => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    /// These tenants without signing keys (a backup restored in part).
    fn only_tenants(&self) -> Self {
        Self {
            tenants: self.tenants.clone(),
            keys: None,
        }
    }

    /// These signing keys without tenants.
    fn only_keys(&self) -> Self {
        Self {
            tenants: None,
            keys: self.keys.clone(),
        }
    }

    /// These tenants with the other's signing keys.
    fn tenants_with(&self, other: &Self) -> Self {
        Self {
            tenants: self.tenants.clone(),
            keys: other.keys.clone(),
        }
    }
}

/// The demo (no `--config`) does not read the key: its state is a temporary directory. One
/// that is no key in its environment neither stops it nor goes unsaid.
#[test]
fn the_demo_ignores_the_key_encryption_key() {
    let dir = scratch("sealed-state-demo");
    let mut command = Command::new(GATEWAY);
    command
        .arg("--listen")
        .arg("127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .env(ENV, "c2hvcnQ=")
        .env_remove("TOWER_FHIR_DATABASE_URL");
    let (mut proc, _) = Proc::start(
        command,
        dir.join("gateway.log"),
        "tower-fhir gateway listening on ",
    );
    // (Said before the listening line.)
    let log = proc.stderr();
    assert!(
        log.contains("the demo ignores TOWER_FHIR_KEY_ENCRYPTION_KEY"),
        "{log}"
    );
    assert!(proc.terminate());
    std::fs::remove_dir_all(&dir).unwrap();
}

async fn token(client: &TestClient, tenant: &str) -> String {
    client.client_token("app", SECRET, tenant).await
}

/// A read with `token` reaches `upstream` with `credential` as its `Authorization`.
async fn reaches(client: &TestClient, upstream: &RecordingUpstream, token: &str, credential: &str) {
    let read = client.get_bearer("/Patient/1", token).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    let received = upstream.last();
    assert_eq!(
        received.headers.get("authorization").unwrap(),
        credential,
        "{}",
        received.target
    );
}

/// The state files, read: neither the credentials nor a private key in clear.
fn assert_sealed(dir: &Path) {
    let state = dir.join("state");
    let tenants = std::fs::read_to_string(state.join("tenants.json")).unwrap();
    let keys = std::fs::read_to_string(state.join("signing-keys.json")).unwrap();
    for file in [&tenants, &keys] {
        assert!(!file.contains("credential-0123456789"), "{file}");
        assert!(!file.contains("credential-9876543210"), "{file}");
        assert!(!file.contains("PRIVATE KEY"), "{file}");
    }
    assert!(tenants.contains("authorization_sealed"), "{tenants}");
    assert!(keys.contains("pem_sealed"), "{keys}");
    #[cfg(unix)]
    for file in ["tenants.json", "signing-keys.json"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file}: {mode:o}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_in_state_dir_are_sealed_with_the_key_encryption_key() {
    let dir = scratch("sealed-state");
    let upstream = RecordingUpstream::start().await;
    let config = config(&dir, &upstream);

    // A first start without the key: the state in clear, as before.
    let (mut clear, client, log) = start(&dir, "clear", &config, None);
    let before = token(&client, TENANT).await;
    reaches(&client, &upstream, &before, CREDENTIAL).await;
    let clear_tenants = std::fs::read_to_string(dir.join("state/tenants.json")).unwrap();
    assert!(clear_tenants.contains(CREDENTIAL), "{clear_tenants}");
    let clear_keys = std::fs::read_to_string(dir.join("state/signing-keys.json")).unwrap();
    assert!(clear_keys.contains("PRIVATE KEY"), "{clear_keys}");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!said.contains("sealed with"), "{said}");
    assert!(clear.terminate());

    // With the key: sealed at start; the token issued before still verifies, and the
    // upstream still gets its credential.
    let (mut sealed, client, log) = start(&dir, "sealed", &config, Some(KEK));
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("secrets in state_dir sealed with TOWER_FHIR_KEY_ENCRYPTION_KEY"),
        "{said}"
    );
    assert_sealed(&dir);
    reaches(&client, &upstream, &before, CREDENTIAL).await;
    let issued = token(&client, TENANT).await;
    reaches(&client, &upstream, &issued, CREDENTIAL).await;
    // A tenant onboarded through the admin API is written sealed.
    let onboarded = client
        .send(
            "PUT",
            &format!("/admin/tenants/{ONBOARDED}"),
            &[
                ("authorization", &format!("Bearer {ADMIN}")),
                ("content-type", "application/json"),
            ],
            &json!({"upstreams": [{
                "base_url": upstream.base("/onboarded"),
                "fhir_version": "4.0",
                "authorization": ONBOARDED_CREDENTIAL
            }]})
            .to_string(),
        )
        .await;
    assert!(onboarded.status.is_success(), "{}", onboarded.text());
    assert_sealed(&dir);
    let for_onboarded = token(&client, ONBOARDED).await;
    reaches(&client, &upstream, &for_onboarded, ONBOARDED_CREDENTIAL).await;
    assert!(sealed.terminate());

    // Restarted with the same key: the tokens issued before verify, the credentials open.
    let (mut again, client, _) = start(&dir, "again", &config, Some(KEK));
    reaches(&client, &upstream, &issued, CREDENTIAL).await;
    reaches(&client, &upstream, &for_onboarded, ONBOARDED_CREDENTIAL).await;
    assert_sealed(&dir);
    assert!(again.terminate());
    let sealed = StateFiles::read(&dir);
    let clear = StateFiles {
        tenants: Some(clear_tenants.into_bytes()),
        keys: Some(clear_keys.into_bytes()),
    };

    // `--check-config` with the key: fine, nothing written.
    let said = check_config(&dir, Some(KEK));
    assert!(said.is_ok(), "{said:?}");
    assert_eq!(StateFiles::read(&dir), sealed, "--check-config wrote");

    // Each start refused (and `--check-config` with the same key), neither file touched
    // (nor made): a key that does not open the state seals nothing with itself.
    let refusals: [(&str, StateFiles, Option<&str>, &[&str]); 10] = [
        (
            "the wrong key",
            sealed.clone(),
            Some(OTHER_KEK),
            &["the wrong key", "tenants.json", "signing-keys.json"],
        ),
        (
            "no key, a sealed state",
            sealed.clone(),
            None,
            &["no key-encryption key", "tenants.json", "signing-keys.json"],
        ),
        (
            "a key that is no key",
            sealed.clone(),
            Some("c2hvcnQ="),
            &["5 bytes"],
        ),
        (
            "sealed tenants, no signing keys, the wrong key",
            sealed.only_tenants(),
            Some(OTHER_KEK),
            &["the wrong key", "tenants.json"],
        ),
        (
            "sealed tenants, no signing keys, no key",
            sealed.only_tenants(),
            None,
            &["no key-encryption key", "tenants.json"],
        ),
        (
            "sealed tenants, signing keys in clear, the wrong key",
            sealed.tenants_with(&clear),
            Some(OTHER_KEK),
            &["the wrong key", "tenants.json"],
        ),
        (
            "sealed tenants, signing keys in clear, no key",
            sealed.tenants_with(&clear),
            None,
            &["no key-encryption key", "tenants.json"],
        ),
        (
            "sealed signing keys, tenants in clear, the wrong key",
            clear.tenants_with(&sealed),
            Some(OTHER_KEK),
            &["the wrong key", "signing-keys.json"],
        ),
        (
            "sealed signing keys, tenants in clear, no key",
            clear.tenants_with(&sealed),
            None,
            &["no key-encryption key", "signing-keys.json"],
        ),
        (
            "sealed signing keys, no tenants, no key",
            sealed.only_keys(),
            None,
            &["no key-encryption key", "signing-keys.json"],
        ),
    ];
    for (case, files, kek, says) in refusals {
        files.write(&dir);
        let said = refused(&dir, &config, kek);
        assert_eq!(
            StateFiles::read(&dir),
            files,
            "{case}: the start changed a state file"
        );
        let checked = check_config(&dir, kek).expect_err(case);
        assert_eq!(
            StateFiles::read(&dir),
            files,
            "{case}: --check-config changed a state file"
        );
        for said in [&said, &checked] {
            assert!(said.contains(ENV), "{case}: {said}");
            for what in says {
                assert!(said.contains(what), "{case}: {what}: {said}");
            }
        }
        if kek != Some("c2hvcnQ=") {
            assert!(said.contains("left as they were"), "{case}: {said}");
        }
        assert!(!said.contains("malformed"), "{case}: {said}");
    }

    // A state in clear takes any key (nothing sealed to open): `--check-config` passes and
    // writes nothing (the start would seal it).
    clear.write(&dir);
    assert!(check_config(&dir, Some(OTHER_KEK)).is_ok());
    assert_eq!(StateFiles::read(&dir), clear);
    sealed.write(&dir);

    // `--check-config` on a state_dir not made yet: fine, and not made.
    let fresh = json!({"state_dir": dir.join("fresh/state"), "tenants": []});
    let file = dir.join("fresh.json");
    std::fs::write(&file, serde_json::to_vec(&fresh).unwrap()).unwrap();
    let checked = check_config_file(&file, Some(KEK));
    assert!(checked.is_ok(), "{checked:?}");
    assert!(!dir.join("fresh").exists());

    // The key still opens everything after the refusals.
    let (mut last, client, _) = start(&dir, "last", &config, Some(KEK));
    reaches(&client, &upstream, &issued, CREDENTIAL).await;
    assert!(last.terminate());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The key changes: started with the new key and the old one as its previous key, the
/// gateway seals both files again with the new key (the tokens and credentials as they were),
/// which alone opens them from then on, and the old key no longer does. Started with the old
/// key and the new one as its next key, it writes neither file. A previous or next key set
/// without a key, both set, one equal to the key or no key, and a pair neither of which opens
/// the state, are refused, by the start and `--check-config` alike, neither file written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_encryption_key_changes_with_the_old_one_as_previous() {
    let dir = scratch("sealed-state-change-key");
    let upstream = RecordingUpstream::start().await;
    let config = config(&dir, &upstream);
    let changing = Keys {
        key: Some(OTHER_KEK),
        previous: Some(KEK),
        next: None,
    };

    let (mut old, client, _) = start(&dir, "old", &config, Some(KEK));
    let issued = token(&client, TENANT).await;
    reaches(&client, &upstream, &issued, CREDENTIAL).await;
    assert!(old.terminate());
    let by_old = StateFiles::read(&dir);

    // Checked with the pair: fine, nothing written.
    let said = check_config(&dir, changing);
    assert!(said.is_ok(), "{said:?}");
    assert_eq!(StateFiles::read(&dir), by_old, "--check-config wrote");

    // Started with the old key and the new one next (replicas waiting for the change):
    // nothing sealed again.
    let waiting = Keys {
        key: Some(KEK),
        next: Some(OTHER_KEK),
        ..Keys::default()
    };
    assert!(check_config(&dir, waiting).is_ok());
    let (mut step_one, client, log) = start(&dir, "waiting", &config, waiting);
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("the key-encryption key is about to change"),
        "{said}"
    );
    reaches(&client, &upstream, &issued, CREDENTIAL).await;
    assert!(step_one.terminate());
    assert_eq!(StateFiles::read(&dir), by_old, "a next key wrote");

    // Refused, neither file written: a previous or next key without a key, both, the same key
    // twice, a previous key that is no key, and two keys neither of which opens the state.
    let third = "dGhpcmQta2V5LWVuY3J5cHRpb24ta2V5LTMyYnl0ZXM=";
    let refusals: [(&str, Keys<'_>, &[&str]); 7] = [
        (
            "a previous key without a key",
            Keys {
                previous: Some(KEK),
                ..Keys::default()
            },
            &[
                PREVIOUS_ENV,
                "is set and TOWER_FHIR_KEY_ENCRYPTION_KEY is not",
            ],
        ),
        (
            "a next key without a key",
            Keys {
                next: Some(OTHER_KEK),
                ..Keys::default()
            },
            &[NEXT_ENV, "is set and TOWER_FHIR_KEY_ENCRYPTION_KEY is not"],
        ),
        (
            "a previous and a next key",
            Keys {
                key: Some(KEK),
                previous: Some(third),
                next: Some(OTHER_KEK),
            },
            &[PREVIOUS_ENV, NEXT_ENV, "are both set"],
        ),
        (
            "the same key twice",
            Keys {
                key: Some(KEK),
                previous: Some(KEK),
                next: None,
            },
            &[PREVIOUS_ENV, "is the key"],
        ),
        (
            "the same key as next",
            Keys {
                key: Some(KEK),
                next: Some(KEK),
                ..Keys::default()
            },
            &[NEXT_ENV, "is the key"],
        ),
        (
            "a previous key that is no key",
            Keys {
                key: Some(OTHER_KEK),
                previous: Some("c2hvcnQ="),
                next: None,
            },
            &[PREVIOUS_ENV, "5 bytes"],
        ),
        (
            "neither key opens",
            Keys {
                key: Some(OTHER_KEK),
                previous: Some(third),
                next: None,
            },
            &["the wrong key", "tenants.json", "signing-keys.json"],
        ),
    ];
    for (case, keys, says) in refusals {
        let said = refused(&dir, &config, keys);
        assert_eq!(StateFiles::read(&dir), by_old, "{case}: the start wrote");
        let checked = check_config(&dir, keys).expect_err(case);
        assert_eq!(
            StateFiles::read(&dir),
            by_old,
            "{case}: --check-config wrote"
        );
        for said in [&said, &checked] {
            for what in says {
                assert!(said.contains(what), "{case}: {what}: {said}");
            }
        }
    }

    // Started with the pair: both files sealed again, the token and credential as they were.
    let (mut changed, client, log) = start(&dir, "changed", &config, changing);
    let said = std::fs::read_to_string(&log).unwrap();
    for what in [
        "upstream credentials sealed with the previous key-encryption key sealed again",
        "the key-encryption key changes: TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY is set",
        "private signing keys sealed with the previous key-encryption key sealed again",
    ] {
        assert!(said.contains(what), "{what}: {said}");
    }
    let by_new = StateFiles::read(&dir);
    assert_ne!(by_new.tenants, by_old.tenants);
    assert_ne!(by_new.keys, by_old.keys);
    assert_sealed(&dir);
    reaches(&client, &upstream, &issued, CREDENTIAL).await;
    assert!(changed.terminate());

    // A start stopped between the two files' writes (the signing keys sealed again, the
    // tenants not yet): the new key alone is refused, naming the tenants, and `--check-config`
    // with it fails; the pair opens it and finishes the change.
    let halfway = by_old.tenants_with(&by_new);
    halfway.write(&dir);
    let said = check_config(&dir, Some(OTHER_KEK)).expect_err("halfway");
    assert!(
        said.contains("tenants.json") && said.contains("the wrong key"),
        "{said}"
    );
    assert!(
        said.contains("TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY"),
        "names the way on: {said}"
    );
    assert_eq!(StateFiles::read(&dir), halfway);
    let (mut finished, _, log) = start(&dir, "finished", &config, changing);
    assert!(finished.terminate());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!said.contains("nothing in state_dir was sealed"), "{said}");
    let again = StateFiles::read(&dir);
    assert_eq!(
        again.keys, by_new.keys,
        "the keys were sealed with the new key already"
    );
    // Once more with the pair: nothing left for the previous key, which the start says.
    let (mut done, _, log) = start(&dir, "done", &config, changing);
    assert!(done.terminate());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains(
            "nothing in state_dir was sealed with TOWER_FHIR_PREVIOUS_KEY_ENCRYPTION_KEY"
        ),
        "{said}"
    );
    assert_eq!(StateFiles::read(&dir), again);
    assert_ne!(again.tenants, by_old.tenants);

    // The new key alone opens the state; the old one no longer does.
    let said = refused(&dir, &config, Some(KEK));
    assert!(said.contains("the wrong key"), "{said}");
    assert!(check_config(&dir, Some(KEK)).is_err());
    assert!(check_config(&dir, Some(OTHER_KEK)).is_ok());
    let (mut new, client, _) = start(&dir, "new", &config, Some(OTHER_KEK));
    reaches(&client, &upstream, &issued, CREDENTIAL).await;
    let fresh = token(&client, TENANT).await;
    reaches(&client, &upstream, &fresh, CREDENTIAL).await;
    assert!(new.terminate());
    std::fs::remove_dir_all(&dir).unwrap();
}
