//! openapi.yaml and the router describe the same API: a route missing from either side fails here.

use std::collections::BTreeSet;

#[test]
fn every_route_is_in_the_openapi_spec_and_every_spec_path_is_routed() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let spec: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    let methods = ["get", "put", "post", "delete", "patch", "head", "options", "trace"];
    let mut documented = BTreeSet::new();
    for (path, item) in spec["paths"].as_mapping().expect("paths is a mapping") {
        for (key, _) in item.as_mapping().unwrap() {
            let key = key.as_str().unwrap();
            if methods.contains(&key) {
                documented.insert((key.to_uppercase(), path.as_str().unwrap().to_string()));
            }
        }
    }
    let routed: BTreeSet<(String, String)> = modelpress::api::route_table()
        .into_iter()
        .map(|(m, p)| (m.to_string(), p))
        .collect();
    let missing_from_spec: Vec<_> = routed.difference(&documented).collect();
    let missing_from_router: Vec<_> = documented.difference(&routed).collect();
    assert!(
        missing_from_spec.is_empty(),
        "routes not in openapi.yaml: {missing_from_spec:?}"
    );
    assert!(
        missing_from_router.is_empty(),
        "openapi.yaml paths with no route: {missing_from_router:?}"
    );
}

#[test]
fn every_error_code_the_api_emits_is_documented() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    for code in [
        "invalid_model",
        "storage_unavailable",
        "invalid_recipe",
        "invalid_json",
        "invalid_request",
        "invalid_query",
        "unsupported_media_type",
        "payload_too_large",
        "not_found",
        "method_not_allowed",
        "model_in_use",
        "job_finished",
        "job_not_finished",
        "range_not_satisfiable",
        "not_ready",
        "internal",
        "model_load_failed",
        "pass_failed",
        "evaluation_failed",
        "runtime_crashed",
        "timeout",
        "lease_expired",
        "memory_limit",
        "idempotency_key_reused",
        "model_missing",
        "storage_error",
        "io_error",
        "invalid_dataset",
        "dataset_in_use",
        "dataset_mismatch",
        "cuda_unavailable",
        "dataset_missing",
        "non_finite_output",
        "unauthorized",
        "rate_limited",
        "quota_exceeded",
        "invalid_webhook_url",
        "job_not_succeeded",
        "invalid_input",
        "not_acceptable",
        "unsupported_output",
        "inference_timeout",
        "inference_unavailable",
    ] {
        assert!(text.contains(code), "openapi.yaml does not mention error code {code}");
    }
}

#[test]
fn every_known_pass_has_a_schema_in_the_recipe_spec() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml")).unwrap();
    let spec: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    let mapping = &spec["components"]["schemas"]["Pass"]["discriminator"]["mapping"];
    for pass in modelpress::compress::KNOWN_PASSES {
        let target = mapping[*pass]
            .as_str()
            .unwrap_or_else(|| panic!("openapi.yaml's Pass has no mapping for {pass:?}"));
        let name = target.rsplit('/').next().unwrap();
        assert_eq!(
            spec["components"]["schemas"][name]["properties"]["pass"]["const"].as_str(),
            Some(*pass),
            "schema {name} does not describe pass {pass:?}"
        );
    }
}
