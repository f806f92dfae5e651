//! A small in-process FHIR server standing in for a hospital's: a few patients and vital signs,
//! read and search, in one FHIR release's shape.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde_json::{json, Value};
use tower_fhir::version::FhirVersion;

struct Hospital {
    name: &'static str,
    version: FhirVersion,
    base: String,
    patients: Vec<Value>,
    observations: Vec<Value>,
}

/// Starts a demo FHIR server on a loopback port; returns its base URL (`http://.../fhir`).
pub(crate) async fn start(
    name: &'static str,
    version: FhirVersion,
    patients: &[(&str, &str, &str, &str)],
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a demo upstream");
    let addr: SocketAddr = listener.local_addr().expect("local address");
    let base = format!("http://{addr}/fhir");
    let hospital = Arc::new(Hospital {
        name,
        version,
        base: base.clone(),
        patients: patients
            .iter()
            .map(|(id, family, given, birth)| {
                json!({"resourceType": "Patient", "id": id, "meta": {"source": name},
                       "name": [{"family": family, "given": [given]}], "gender": "unknown", "birthDate": birth})
            })
            .collect(),
        observations: patients
            .iter()
            .enumerate()
            .map(|(i, (id, ..))| {
                json!({"resourceType": "Observation", "id": format!("hr-{id}"), "status": "final",
                       "category": [{"coding": [{"system": "http://hl7.org/fhir/observation-category", "code": "vital-signs"}]}],
                       "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]},
                       "subject": {"reference": format!("Patient/{id}")},
                       "effectiveDateTime": "2026-11-01T09:30:00Z",
                       "valueQuantity": {"value": 60 + i * 7, "unit": "beats/minute"}})
            })
            .collect(),
    });
    let app = Router::new()
        .route("/fhir/metadata", get(metadata))
        .route("/fhir/Patient", get(search_patients))
        .route("/fhir/Patient/_search", post(search_patients_form))
        .route("/fhir/Patient/{id}", get(read_patient))
        .route("/fhir/Observation", get(search_observations))
        .method_not_allowed_fallback(not_allowed)
        .fallback(not_served)
        .with_state(hospital);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    base
}

fn fhir(hospital: &Hospital, status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, hospital.version.json_media_type())],
        body.to_string(),
    )
        .into_response()
}

fn bundle(hospital: &Hospital, query: &str, resources: Vec<&Value>) -> Value {
    let entries: Vec<Value> = resources
        .iter()
        .map(|r| json!({"fullUrl": format!("{}/{}/{}", hospital.base, r["resourceType"].as_str().unwrap_or(""), r["id"].as_str().unwrap_or("")), "resource": r}))
        .collect();
    json!({"resourceType": "Bundle", "type": "searchset", "total": entries.len(),
           "link": [{"relation": "self", "url": format!("{}/{query}", hospital.base)}],
           "entry": entries})
}

async fn metadata(State(h): State<Arc<Hospital>>) -> Response {
    let resource_type = if h.version == FhirVersion::Dstu2 {
        "Conformance"
    } else {
        "CapabilityStatement"
    };
    fhir(
        &h,
        StatusCode::OK,
        json!({"resourceType": resource_type, "status": "active", "kind": "instance",
        "software": {"name": h.name}, "fhirVersion": h.version.release(), "format": ["json"],
        "rest": [{"mode": "server", "resource": [{"type": "Patient"}, {"type": "Observation"}]}]}),
    )
}

async fn read_patient(State(h): State<Arc<Hospital>>, Path(id): Path<String>) -> Response {
    match h.patients.iter().find(|p| p["id"] == id.as_str()) {
        Some(patient) => fhir(&h, StatusCode::OK, patient.clone()),
        None => outcome(
            &h,
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("Patient/{id} is not known at {}", h.name),
        ),
    }
}

fn matching_patients<'a>(h: &'a Hospital, params: &HashMap<String, String>) -> Vec<&'a Value> {
    let family = params.get("family").map(|f| f.to_lowercase());
    h.patients
        .iter()
        .filter(|p| match &family {
            Some(family) => p["name"][0]["family"]
                .as_str()
                .unwrap_or("")
                .to_lowercase()
                .starts_with(family.as_str()),
            None => true,
        })
        .collect()
}

async fn search_patients(
    State(h): State<Arc<Hospital>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    patient_bundle(&h, &params)
}

async fn search_patients_form(
    State(h): State<Arc<Hospital>>,
    Form(params): Form<HashMap<String, String>>,
) -> Response {
    patient_bundle(&h, &params)
}

/// A searchset of the matching patients, for GET and POST `_search` alike.
fn patient_bundle(h: &Hospital, params: &HashMap<String, String>) -> Response {
    let query = canonical_query(params);
    fhir(
        h,
        StatusCode::OK,
        bundle(h, &format!("Patient?{query}"), matching_patients(h, params)),
    )
}

async fn search_observations(
    State(h): State<Arc<Hospital>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let patient = params.get("patient").cloned().unwrap_or_default();
    let reference = format!("Patient/{patient}");
    let found: Vec<&Value> = h
        .observations
        .iter()
        .filter(|o| o["subject"]["reference"] == reference.as_str())
        .collect();
    fhir(
        &h,
        StatusCode::OK,
        bundle(&h, &format!("Observation?patient={patient}"), found),
    )
}

/// What the demo has not: `404` with an OperationOutcome saying what it has.
async fn not_served(State(h): State<Arc<Hospital>>, uri: axum::http::Uri) -> Response {
    outcome(
        &h,
        StatusCode::NOT_FOUND,
        "not-supported",
        &format!(
            "{} is not served by {}, a demo server with Patient (read, search) and \
             Observation (search by patient) only",
            uri.path(),
            h.name
        ),
    )
}

/// A method a route does not take: `405` with an OperationOutcome.
async fn not_allowed(State(h): State<Arc<Hospital>>, uri: axum::http::Uri) -> Response {
    outcome(
        &h,
        StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        &format!("{} takes no such method at {}", uri.path(), h.name),
    )
}

fn outcome(h: &Hospital, status: StatusCode, code: &str, diagnostics: &str) -> Response {
    fhir(
        h,
        status,
        json!({"resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}),
    )
}

/// The search parameters in a stable order, for the Bundle's self link.
fn canonical_query(params: &HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join("&")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The status and body of `method path` (under `/fhir`) at `authority`.
    async fn exchange(authority: &str, method: &str, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
        let request = format!(
            "{method} /fhir{path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        let status = answer[9..12].parse().unwrap();
        let body = answer.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn what_the_demo_has_not_is_an_operation_outcome() {
        let base = start("Demo", FhirVersion::R4, &[("1", "Doe", "Jo", "1970-01-01")]).await;
        let authority = base.trim_start_matches("http://").trim_end_matches("/fhir");
        for (method, path, status) in [
            ("GET", "/", 404),
            ("GET", "/Encounter/1", 404),
            ("DELETE", "/Patient/1", 405),
            ("GET", "/Patient/2", 404),
        ] {
            let (got, body) = exchange(authority, method, path).await;
            assert_eq!(got, status, "{method} {path}: {body}");
            let outcome: Value = serde_json::from_str(&body).expect(&body);
            assert_eq!(outcome["resourceType"], "OperationOutcome", "{body}");
        }
        let (got, body) = exchange(authority, "GET", "/Patient/1").await;
        assert_eq!(got, 200, "{body}");
    }
}
