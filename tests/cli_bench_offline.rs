//! `vkv bench offline` end to end: the real binary serves a small workload in both KV modes and
//! reports per-mode results and their ratio; bad options are one-line errors.

mod common;

use common::{assert_one_line_error, vkv};

#[test]
fn both_modes_serve_the_workload_and_report_a_ratio() {
    let out = vkv(&[
        "bench",
        "offline",
        "--workload",
        "uniform:8-40,2-12",
        "--num-prompts",
        "12",
        "--kv-mode",
        "both",
        "--kv-memory",
        "64MiB",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = v["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    assert!(runs[0]["kv"].as_str().unwrap().starts_with("paged-16"));
    assert!(runs[1]["kv"]
        .as_str()
        .unwrap()
        .starts_with("vmm-token-major"));
    for r in runs {
        assert_eq!(r["requests"], 12);
        assert_eq!(r["failed"], 0);
        // Every request generates exactly its sampled output length (ignore_eos).
        let out_tokens = r["output_tokens"].as_u64().unwrap();
        assert!((12..=144).contains(&out_tokens), "{out_tokens}");
        assert!(r["output_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["ttft_ms"]["median"].as_f64().unwrap() > 0.0);
        assert!(r["peak_running"].as_u64().unwrap() > 1);
    }
    // Both modes ran the same seeded workload.
    assert_eq!(runs[0]["output_tokens"], runs[1]["output_tokens"]);
    assert_eq!(runs[0]["prompt_tokens"], runs[1]["prompt_tokens"]);
    assert!(runs[1]["map_waits"].is_u64() && runs[0]["map_waits"].is_null());
    assert!(
        v["ratio_vmm_over_paged"]["output_tokens_per_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

#[test]
fn bad_options_are_one_line_errors() {
    let out = vkv(&["bench", "offline", "--request-rate=-1"]);
    assert_one_line_error(&out, "--request-rate", "a negative rate");
    let out = vkv(&["bench", "offline", "--workload", "nonsense"]);
    assert_one_line_error(&out, "nonsense", "an unknown workload");
    let out = vkv(&["generate", "--prompt", "hi", "--kv-mode", "both"]);
    assert_one_line_error(&out, "only `vkv bench offline`", "both modes for generate");
    let out = vkv(&["bench", "offline", "--response-format", "/nonexistent.json"]);
    assert_one_line_error(
        &out,
        "json_object or a JSON Schema file",
        "a missing schema file",
    );
}

/// `--response-format`: every request's output follows the grammar, which ends it once its
/// value is complete (four digits in an array: 9 characters, fewer tokens than the 40 allowed).
#[test]
fn structured_outputs_end_each_request_at_its_value() {
    let dir = common::scratch("offline-schema");
    let schema = dir.path().join("digits.json");
    std::fs::write(
        &schema,
        r#"{"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 4, "maxItems": 4}"#,
    )
    .unwrap();
    let out = vkv(&[
        "bench",
        "offline",
        "--workload",
        "fixed:16,40",
        "--num-prompts",
        "4",
        "--kv-memory",
        "64MiB",
        "--response-format",
        schema.to_str().unwrap(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let r = &v["runs"][0];
    assert_eq!(r["failed"], 0, "{r}");
    let tokens = r["output_tokens"].as_u64().unwrap();
    assert!(
        (4 * 5..=4 * 10).contains(&tokens),
        "{tokens} tokens for 4 requests"
    );
}
