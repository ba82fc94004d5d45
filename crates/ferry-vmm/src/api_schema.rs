//! The control API's JSON Schema (draft 2020-12), generated from the Rust types that the
//! server writes and reads, so that it cannot drift from them. `ferry api-schema` prints it;
//! `docs/api-schema.json` is the published copy, checked against this in a test. A module of
//! its own, above both the API and the migration types it describes.
//!
//! The document validates any line of the protocol (`anyOf` greeting, request, reply) and
//! names, under `x-results`, the schema of each request's `result` (by `cmd`).

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use crate::api::{ErrorCode, Greeting, Reply, Request, API_VERSION};
use crate::migration::{MigrateOptions, MigrationProgress};
use crate::status::{BalloonInfo, Status, VcpuReport};

/// `status`'s result: the VM and, once a migration was asked for, its progress.
#[derive(JsonSchema)]
#[allow(dead_code)] // only its schema is used; the server writes the same JSON by hand
struct StatusResult {
    #[schemars(flatten)]
    status: Status,
    /// The running or last migration (absent before the first).
    migration: Option<MigrationProgress>,
}

/// The whole schema document.
pub fn schema() -> Value {
    let mut generator = SchemaGenerator::new(SchemaSettings::draft2020_12());
    let mut sub = |f: fn(&mut SchemaGenerator) -> schemars::Schema| f(&mut generator).to_value();
    let greeting = sub(|g| g.subschema_for::<Greeting>());
    let request = sub(|g| g.subschema_for::<Request>());
    let reply = sub(|g| g.subschema_for::<Reply>());
    let none = json!({ "type": "null" });
    let results = json!({
        "status": sub(|g| g.subschema_for::<StatusResult>()),
        "pause": none,
        "resume": none,
        "balloon-set": none,
        "balloon-get": sub(|g| g.subschema_for::<BalloonInfo>()),
        "balloon-stats": sub(|g| g.subschema_for::<Option<ferry_balloon::BalloonStats>>()),
        "shutdown": none,
        "migrate": sub(|g| g.subschema_for::<ferry_migration::MigrationStats>()),
        "migrate-cancel": none,
        "vcpus": sub(|g| g.subschema_for::<Vec<VcpuReport>>()),
    });
    let options = sub(|g| g.subschema_for::<MigrateOptions>());
    let codes = sub(|g| g.subschema_for::<ErrorCode>());
    let definitions: Map<String, Value> = generator.take_definitions(true);
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ferry control API",
        "description": format!(
            "One JSON object per line over the VMM's Unix socket (docs/vmm.md): the server's \
             greeting first, then a reply line for each request line. API version \
             {API_VERSION}. x-results has the schema of each request's result, by cmd; \
             x-migrate-options that of the migrate request's options; x-error-codes the \
             codes of a failed reply."
        ),
        "x-api-version": API_VERSION,
        "anyOf": [greeting, request, reply],
        "x-results": results,
        "x-migrate-options": options,
        "x-error-codes": codes,
        "$defs": definitions,
    })
}

/// [`schema`] as the published file holds it: pretty, with a final newline.
pub fn schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&schema()).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_schema_is_the_one_the_types_generate() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api-schema.json");
        let published = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            published == schema_text(),
            "docs/api-schema.json is not what the API's types generate: regenerate it with \
             `cargo run -p ferry -- api-schema > docs/api-schema.json` and review the change \
             (a change to a request or reply that breaks clients needs a new API_VERSION)"
        );
    }

    /// One request of each kind.
    fn every_request() -> Vec<Request> {
        vec![
            Request::Status,
            Request::Pause,
            Request::Resume,
            Request::BalloonSet { target_bytes: 4096 },
            Request::BalloonGet,
            Request::BalloonStats,
            Request::Shutdown,
            Request::Migrate {
                to: "10.0.0.2:4444".into(),
                options: json!({ "hints": false }),
            },
            Request::MigrateCancel,
            Request::Vcpus,
        ]
    }

    #[test]
    fn every_request_has_a_result_and_every_code_is_listed() {
        let doc = schema();
        let results = doc["x-results"].as_object().unwrap();
        let requests = serde_json::to_string(&doc["$defs"]["Request"]).unwrap();
        for cmd in results.keys() {
            assert!(
                requests.contains(&format!("\"{cmd}\"")),
                "{cmd} is no request"
            );
        }
        for request in every_request() {
            let wire = serde_json::to_value(&request).unwrap();
            let cmd = wire["cmd"].as_str().unwrap();
            assert!(results.contains_key(cmd), "no result schema for {cmd}");
        }
        assert_eq!(doc["x-api-version"], json!(API_VERSION));
    }

    /// A validator for the document's schema `at` (a JSON pointer), with its definitions.
    fn validator(doc: &Value, at: &str) -> jsonschema::Validator {
        let mut schema = doc.pointer(at).unwrap_or_else(|| panic!("no {at}")).clone();
        if let Value::Object(map) = &mut schema {
            map.insert("$defs".into(), doc["$defs"].clone());
        } else {
            schema = json!({ "allOf": [schema], "$defs": doc["$defs"].clone() });
        }
        jsonschema::validator_for(&schema).unwrap()
    }

    #[test]
    fn what_the_server_writes_and_reads_validates_against_the_schema() {
        use crate::api::Refusal;
        use crate::migration::{MigrateOptions, MigrationProgress};
        use crate::status::RunState;

        let doc = schema();
        let line = jsonschema::validator_for(&doc).unwrap();
        let valid = |v: &jsonschema::Validator, value: Value| {
            let errors: Vec<String> = v.iter_errors(&value).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{value}: {errors:?}");
        };
        valid(&line, serde_json::to_value(Greeting::this()).unwrap());
        for request in every_request() {
            valid(&line, serde_json::to_value(request).unwrap());
        }
        assert!(!line.is_valid(&json!({ "cmd": "nonsense" })));
        assert!(
            !line.is_valid(&json!({ "cmd": "balloon-set" })),
            "target missing"
        );
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::MigrationActive,
            ErrorCode::OutcomeUnknown,
            ErrorCode::Internal,
        ] {
            let reply = Reply::from_result(Err(Refusal::new(code, "why")));
            valid(&line, serde_json::to_value(reply).unwrap());
        }
        valid(
            &line,
            serde_json::to_value(Reply::from_result(Ok(Value::Null))).unwrap(),
        );

        // Results, from the types the server serializes.
        let balloon = BalloonInfo {
            target_bytes: 1 << 20,
            actual_bytes: 4096,
            acked_features: 1 << 32,
            free_page_hint: true,
            page_reporting: false,
        };
        let status = Status {
            state: RunState::Running,
            vcpus: 2,
            memory_bytes: 1 << 30,
            uptime_ms: 1200,
            throttle_percent: 0,
            balloon: Some(balloon.clone()),
        };
        let mut annotated = serde_json::to_value(&status).unwrap();
        valid(&validator(&doc, "/x-results/status"), annotated.clone());
        let mut progress = MigrationProgress::new("10.0.0.2:4444", true);
        progress.stats = Some(ferry_migration::MigrationStats::default());
        annotated["migration"] = serde_json::to_value(progress).unwrap();
        valid(&validator(&doc, "/x-results/status"), annotated);
        valid(
            &validator(&doc, "/x-results/balloon-get"),
            serde_json::to_value(balloon).unwrap(),
        );
        let stats = validator(&doc, "/x-results/balloon-stats");
        valid(&stats, Value::Null);
        valid(
            &stats,
            serde_json::to_value(ferry_balloon::BalloonStats::default()).unwrap(),
        );
        valid(
            &validator(&doc, "/x-results/migrate"),
            serde_json::to_value(ferry_migration::MigrationStats::default()).unwrap(),
        );
        let report = VcpuReport {
            id: 1,
            state: "rip=0x0".into(),
            page_tables_outside_ram: Some(0x1_0000_0000),
        };
        valid(
            &validator(&doc, "/x-results/vcpus"),
            serde_json::to_value(vec![report]).unwrap(),
        );
        valid(&validator(&doc, "/x-results/pause"), Value::Null);
        valid(
            &validator(&doc, "/x-migrate-options"),
            serde_json::to_value(MigrateOptions::default()).unwrap(),
        );
    }
}
