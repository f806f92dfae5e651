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
        None => fhir(
            &h,
            StatusCode::NOT_FOUND,
            json!({"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "not-found", "diagnostics": format!("Patient/{id} is not known at {}", h.name)}]}),
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

/// The search parameters in a stable order, for the Bundle's self link.
fn canonical_query(params: &HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join("&")
}
