//! The admin API's lists in pages, over real HTTP through the gateway binary, its state in
//! files and in PostgreSQL: `GET /admin/tenants` and `GET /admin/clients` with `?limit=N` and
//! `after=<id>` walk the whole list, page after page, in the order of the whole list (client
//! ids in byte order, not a dictionary's), `"next"` naming the page's last id until the last
//! page; a page after an id that is none works; the whole list without a query is as it was;
//! and a query the lists do not take is refused with `400`.

#[path = "../../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{json, Value};
use support::postgres::Postgres;
use support::*;

const GATEWAY: &str = env!("CARGO_BIN_EXE_tower-fhir-gateway");
const ADMIN: &str = "admin-pages-admin-token-0123456789";
const SECRET: &str = "admin-pages-client-secret-0123456789";
const KEK: &str = "cmVwbGljYXMtc2hhcmUtdGhpcy0zMi1ieXRlLWtleSE=";

/// The tenants, not in their order.
const TENANTS: [&str; 5] = [
    "9b2e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f",
    "0a5e1c3d-5f6a-4b7c-8d9e-0a1b2c3d4e5f",
    "f00d0000-0000-4000-8000-000000000001",
    "4d1f6c2e-8a3b-4c5d-9e7f-1a2b3c4d5e6f",
    "a0000000-0000-4000-8000-000000000000",
];

/// The clients, not in their order: in byte order (upper case before lower, `' '` before
/// `'+'` before `'-'` before `'_'`), not in a dictionary's.
const CLIENTS: [&str; 6] = ["app_1", "a-app", "app+x", "B-app", "app-1", "app 2"];

/// Every byte but the unreserved ones percent-encoded (a client id's space and `+` too).
fn encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A gateway over [`TENANTS`] and [`CLIENTS`] (each client given the first tenant), with the
/// admin API, its state as `state` says: `{"state_dir": ...}` or `{"database_url": ...}`.
/// Returned once ready.
async fn start(dir: &Path, name: &str, state: Value) -> (Proc, TestClient) {
    let tenants: Vec<Value> = TENANTS
        .iter()
        .enumerate()
        .map(|(n, id)| {
            json!({"id": id, "upstreams": [
                {"base_url": format!("http://127.0.0.1:9/tenant-{n}/fhir"), "fhir_version": "4.0"}
            ]})
        })
        .collect();
    let clients: Vec<Value> = CLIENTS
        .iter()
        .map(|id| json!({"client_id": id, "client_secret": SECRET, "tenants": [TENANTS[0]]}))
        .collect();
    let mut config = json!({
        "admin_token": ADMIN,
        "metrics_listen": "127.0.0.1:0",
        "public_base_url": "https://gateway.example",
        "clients": clients,
        "tenants": tenants,
        "secret_hashing": {"memory_kib": 1024, "iterations": 1}
    });
    for (key, value) in state.as_object().unwrap() {
        config[key] = value.clone();
    }
    let (proc, client, _) = start_gateway_with_metrics(GATEWAY, dir, name, &config, KEK);
    let begun = Instant::now();
    while client.get("/readyz", &[]).await.status != StatusCode::OK {
        assert!(
            begun.elapsed() < Duration::from_secs(20),
            "{name} never became ready:\n{}",
            proc.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (proc, client)
}

/// `GET path` on the admin API.
async fn get(client: &TestClient, path: &str) -> Reply {
    client
        .get(path, &[("authorization", &format!("Bearer {ADMIN}"))])
        .await
}

/// The ids of a list's entries: the tenants' (strings), or the clients' `client_id`.
fn ids(entries: &Value) -> Vec<String> {
    entries
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            entry
                .as_str()
                .or_else(|| entry["client_id"].as_str())
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// Walks `/admin/{list}` in pages of `size` from after `start`: each page but the last full,
/// its `next` its last id, the last without `next`. Every entry, in the order of the pages.
async fn walk(client: &TestClient, list: &str, size: usize, start: Option<&str>) -> Vec<Value> {
    let mut walked = Vec::new();
    let mut after = start.map(str::to_owned);
    for _ in 0..100 {
        let query = match &after {
            Some(after) => format!("?limit={size}&after={}", encoded(after)),
            None => format!("?limit={size}"),
        };
        let reply = get(client, &format!("/admin/{list}{query}")).await;
        assert_eq!(reply.status, StatusCode::OK, "{query}: {}", reply.text());
        let page = reply.json();
        let entries = page[list].as_array().unwrap().clone();
        assert!(entries.len() <= size, "{query}: {page}");
        let mut members: Vec<&str> = page
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        members.sort_unstable();
        match page.get("next") {
            Some(next) => {
                assert_eq!(
                    entries.len(),
                    size,
                    "a page before the last is full: {page}"
                );
                let mut wanted = ["next", list];
                wanted.sort_unstable();
                assert_eq!(members, wanted, "{page}");
                let last = ids(&Value::Array(entries.clone())).pop().unwrap();
                assert_eq!(next.as_str(), Some(last.as_str()), "next is the last id");
                after = Some(last);
                walked.extend(entries);
            }
            None => {
                assert_eq!(members, [list], "{page}");
                walked.extend(entries);
                return walked;
            }
        }
    }
    panic!("/admin/{list} in pages of {size} never ended");
}

/// Every check of the pages, on a gateway started with [`start`].
async fn pages_walk_the_whole_list(client: &TestClient) {
    let mut tenants: Vec<String> = TENANTS.iter().map(|id| (*id).to_owned()).collect();
    tenants.sort_unstable();
    let mut clients: Vec<String> = CLIENTS.iter().map(|id| (*id).to_owned()).collect();
    clients.sort_unstable();
    assert_eq!(
        clients,
        ["B-app", "a-app", "app 2", "app+x", "app-1", "app_1"]
    );

    for (list, expected) in [("tenants", &tenants), ("clients", &clients)] {
        // The whole list, without a query (or with an empty one), as it was before pages.
        let whole = get(client, &format!("/admin/{list}")).await;
        assert_eq!(whole.status, StatusCode::OK, "{}", whole.text());
        let body = whole.json();
        assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
        assert_eq!(&ids(&body[list]), expected);
        let empty = get(client, &format!("/admin/{list}?")).await;
        assert_eq!(empty.body, whole.body);
        let entries = body[list].as_array().unwrap().clone();

        // Pages of 2 (and 1, and more than there are), walked from the start: the whole list.
        for size in [2, 1, 5, 6, 10_000] {
            assert_eq!(
                walk(client, list, size, None).await,
                entries,
                "pages of {size}"
            );
        }
        // Without a limit: everything after `after`, and no `next`.
        let rest = get(
            client,
            &format!("/admin/{list}?after={}", encoded(&expected[1])),
        )
        .await;
        assert_eq!(rest.status, StatusCode::OK, "{}", rest.text());
        assert_eq!(rest.json(), json!({list: entries[2..]}));
        // After the last: an empty page, no `next`.
        let last = encoded(expected.last().unwrap());
        let beyond = get(client, &format!("/admin/{list}?limit=2&after={last}")).await;
        assert_eq!(beyond.json(), json!({list: []}), "{}", beyond.text());
        // A page ending on the last entry has no `next`.
        let ending = get(
            client,
            &format!("/admin/{list}?limit=2&after={}", encoded(&expected[3])),
        )
        .await;
        assert_eq!(
            ending.json(),
            json!({list: entries[4..6.min(entries.len())]})
        );
    }

    // After an id that is none: from the next one on.
    let between = "4d1f6c2e-ffff-4000-8000-000000000000";
    assert!(!TENANTS.contains(&between));
    let page = get(client, &format!("/admin/tenants?limit=2&after={between}")).await;
    assert_eq!(
        page.json(),
        json!({"tenants": [tenants[2], tenants[3]], "next": tenants[3]}),
        "{}",
        page.text()
    );
    let page = get(client, "/admin/clients?limit=2&after=app").await;
    let body = page.json();
    assert_eq!(ids(&body["clients"]), ["app 2", "app+x"], "{body}");
    assert_eq!(body["next"], "app+x");
    // The tenant id in another spelling (upper case, braces): the same tenant.
    let spelled = format!("%7B{}%7D", tenants[1].to_uppercase());
    let page = get(client, &format!("/admin/tenants?limit=1&after={spelled}")).await;
    assert_eq!(
        page.json(),
        json!({"tenants": [tenants[2]], "next": tenants[2]})
    );
    // A tenant removed between two pages: the next page, after it, goes on.
    let removed = get(client, "/admin/tenants?limit=2").await.json();
    assert_eq!(removed["next"], tenants[1]);
    let gone = client
        .send(
            "DELETE",
            &format!("/admin/tenants/{}", tenants[1]),
            &[("authorization", &format!("Bearer {ADMIN}"))],
            "",
        )
        .await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{}", gone.text());
    let next = get(
        client,
        &format!("/admin/tenants?limit=2&after={}", tenants[1]),
    )
    .await;
    assert_eq!(
        next.json(),
        json!({"tenants": [tenants[2], tenants[3]], "next": tenants[3]})
    );

    // Refused: `400` with the admin API's error JSON, saying why.
    let long = format!("after={}", "a".repeat(256));
    let twice = format!("after={}&after={}", tenants[0], tenants[0]);
    let refusals = [
        (
            "tenants",
            "limit=0",
            "limit must be a whole number from 1 to 10000",
        ),
        ("tenants", "limit=10001", "limit must be"),
        ("tenants", "limit=99999999999999999999999", "limit must be"),
        ("tenants", "limit=two", "limit must be"),
        ("tenants", "limit=-1", "limit must be"),
        ("tenants", "limit=2.5", "limit must be"),
        ("tenants", "limit=", "limit must be"),
        ("tenants", "limit", "limit must be"),
        ("tenants", "limit=2&limit=2", "names limit more than once"),
        ("tenants", &twice, "names after more than once"),
        ("tenants", "after=app-1", "after must be a tenant id"),
        ("tenants", "after=", "after must be a tenant id"),
        (
            "tenants",
            "after=4d1f6c2e-8a3b-4c5d-9e7f",
            "after must be a tenant id",
        ),
        ("tenants", "page=2", "not \"page\""),
        ("tenants", "limit=2&Limit=2", "not \"Limit\""),
        ("clients", "limit=0", "limit must be"),
        ("clients", "limit=10001", "limit must be"),
        ("clients", "limit=%2B5", "limit must be"),
        ("clients", "limit=1&limit=2", "names limit more than once"),
        ("clients", "after=a&after=b", "names after more than once"),
        ("clients", "after=", "after must be a client id"),
        ("clients", "after=%00", "after must be a client id"),
        ("clients", "after=%C3%A9", "after must be a client id"),
        ("clients", "after=%FF", "after must be a client id"),
        ("clients", &long, "after must be a client id"),
        ("clients", "cursor=app", "not \"cursor\""),
        ("clients", "limit=2&offset=2", "not \"offset\""),
    ];
    for (list, query, why) in refusals {
        let reply = get(client, &format!("/admin/{list}?{query}")).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{list}?{query}: {}",
            reply.text()
        );
        assert_eq!(
            reply.headers["content-type"], "application/json",
            "{list}?{query}"
        );
        let error = reply.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(error.contains(why), "{list}?{query}: {}", reply.text());
    }
    // The longest client id is a possible `after`.
    let longest = get(client, &format!("/admin/clients?after={}", "a".repeat(255))).await;
    assert_eq!(longest.status, StatusCode::OK, "{}", longest.text());
    let body = longest.json();
    assert_eq!(ids(&body["clients"]), ["app 2", "app+x", "app-1", "app_1"]);
    // Without the admin token, a query is not even read.
    let unauthenticated = client.get("/admin/tenants?limit=0", &[]).await;
    assert_eq!(unauthenticated.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_lists_walk_in_pages_over_files() {
    let dir = scratch("admin-pages-files");
    let (proc, client) = start(&dir, "gateway", json!({"state_dir": dir.join("state")})).await;
    pages_walk_the_whole_list(&client).await;
    drop(proc);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_lists_walk_in_pages_over_postgres() {
    let dir = scratch("admin-pages-postgres");
    let Some(server) =
        Postgres::start_or_skip("admin-pages", "the_admin_lists_walk_in_pages_over_postgres")
    else {
        return;
    };
    server.create_database("gateway");
    let (proc, client) = start(
        &dir,
        "gateway",
        json!({"database_url": server.url("gateway")}),
    )
    .await;
    pages_walk_the_whole_list(&client).await;
    drop(proc);
    let _ = std::fs::remove_dir_all(&dir);
}
