//! Disaggregated prefill and decode on the CPU engine (DistServe): a prefill half computes the
//! prompt and the first token and hands the prompt's KV out; a decode half in another engine —
//! of the same or another KV mode — takes it in and generates the rest. Greedy outputs must be
//! exactly colocated serving's, and neither engine may keep a byte of KV afterwards.

mod common;

use std::sync::Arc;

use common::serving::{assert_empty, greedy, prompts, run_one, sharing_engine, CPU_KV_MODES};
use vkv_engine::engine::{Engine, KvHandoff};
use vkv_engine::kv::{KvBlob, KvMode};

const KV_MEMORY: usize = 64 << 20;

fn name(mode: KvMode) -> String {
    format!("{mode:?}")
}

/// The prefill half of `prompt` on `e`: its first token and the prompt's KV.
fn prefill_half(e: &Engine, prompt: &[u32]) -> (u32, Arc<KvBlob>) {
    let mut req = greedy(prompt.to_vec(), 1);
    req.handoff = Some(KvHandoff::Export);
    let out = run_one(e, req);
    assert_eq!(out.failed, None);
    let exported = out.exported.expect("the prefill half hands its KV out");
    assert_eq!(exported.kv.tokens, prompt.len());
    assert_eq!(exported.stats.bytes, exported.kv.rows().len());
    assert_eq!(exported.first_token, Some(out.tokens[0]));
    (out.tokens[0], Arc::new(exported.kv.clone()))
}

#[test]
fn the_decode_half_continues_exactly_where_colocated_serving_would() {
    // Every mode to itself, and across layouts (the wire order is the exporter's).
    let pairs = [(0, 0), (1, 1), (2, 2), (0, 2), (2, 1)];
    let engines: Vec<Engine> = CPU_KV_MODES
        .iter()
        .map(|&m| sharing_engine(m, false, KV_MEMORY))
        .collect();
    let prompts = prompts(&engines[0], 4);
    for (from, to) in pairs {
        let what = format!("{} -> {}", name(CPU_KV_MODES[from]), name(CPU_KV_MODES[to]));
        for prompt in &prompts {
            let colocated = run_one(&engines[to], greedy(prompt.clone(), 24)).tokens;
            let (first, kv) = prefill_half(&engines[from], prompt);
            assert_eq!(first, colocated[0], "{what}: the first token");
            let mut req = greedy(prompt.clone(), 24);
            req.handoff = Some(KvHandoff::Import {
                first_token: first,
                kv,
            });
            let decoded = run_one(&engines[to], req);
            assert_eq!(decoded.failed, None, "{what}");
            assert_eq!(decoded.tokens, colocated, "{what}");
            let usage = decoded.finished.unwrap().usage;
            assert_eq!(
                (usage.prompt_tokens, usage.completion_tokens),
                (prompt.len(), 24)
            );
        }
        let m = engines[to].metrics().kv_handoff.imported;
        assert!(
            m.requests > 0 && m.bytes > 0 && m.copies > 0,
            "{what}: {m:?}"
        );
    }
    for (e, mode) in engines.iter().zip(CPU_KV_MODES) {
        assert_empty(e, &name(mode));
    }
    // The contiguous layouts hand a request's KV out in one run (token-major) or one per layer
    // and K/V (per-layer); paged gathers blocks.
    let exported = |i: usize| engines[i].metrics().kv_handoff.exported;
    let per_request = |i: usize| exported(i).copies / exported(i).requests;
    assert_eq!(per_request(2), 1, "token-major");
    assert_eq!(per_request(1), 2 * 30, "per-layer: SmolLM2 has 30 layers");
    assert!(per_request(0) > 2 * 30, "paged: {:?}", exported(0));
}

#[test]
fn handed_over_kv_that_does_not_fit_the_request_is_refused_and_leaks_nothing() {
    let mode = CPU_KV_MODES[2];
    let e = sharing_engine(mode, false, KV_MEMORY);
    let prompt = prompts(&e, 1).remove(0);
    let (first, kv) = prefill_half(&e, &prompt);
    // KV of another length: refused when submitted.
    let mut req = greedy(prompt[1..].to_vec(), 8);
    req.handoff = Some(KvHandoff::Import {
        first_token: first,
        kv: kv.clone(),
    });
    let (tx, _rx) = vkv_engine::engine::event_channel();
    let err = e.submit(req, tx).unwrap_err().to_string();
    assert!(err.contains("handed-over KV holds"), "{err}");
    // KV of another model's shape: the request fails at admission, with the shapes named.
    let dims = vkv_engine::kv::KvDims {
        head_dim: 2 * kv.dims.head_dim,
        ..kv.dims
    };
    let other = KvBlob::zeroed(kv.order, kv.tokens, dims, kv.dtype);
    let mut req = greedy(prompt.clone(), 8);
    req.handoff = Some(KvHandoff::Import {
        first_token: first,
        kv: Arc::new(other),
    });
    let out = run_one(&e, req);
    let why = out.failed.expect("a KV of another shape fails the request");
    assert!(why.contains("KV handoff") && why.contains("head"), "{why}");
    // A prefill half must generate exactly one token.
    let mut req = greedy(prompt.clone(), 2);
    req.handoff = Some(KvHandoff::Export);
    let (tx, _rx) = vkv_engine::engine::event_channel();
    assert!(e.submit(req, tx).is_err());
    assert_empty(&e, "after the refusals");
    // And the engine still serves the handed-over request as it should.
    let mut req = greedy(prompt.clone(), 8);
    req.handoff = Some(KvHandoff::Import {
        first_token: first,
        kv,
    });
    let out = run_one(&e, req);
    assert_eq!(out.tokens, run_one(&e, greedy(prompt, 8)).tokens);
    assert_empty(&e, "at the end");
}

#[test]
fn bench_handoff_reports_the_copies_each_layout_takes() {
    let out = common::vkv(&[
        "bench",
        "handoff",
        "--kv-mode",
        "both",
        "--prompt-lens",
        "40,100",
        "--repeats",
        "1",
        "--kv-cache-dtype",
        "f32",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 4, "{report}");
    for p in points {
        let tokens = p["tokens"].as_u64().unwrap();
        // SmolLM2: 30 layers × K and V × 3 KV heads × 64 dims, f32.
        assert_eq!(
            p["bytes"].as_u64().unwrap(),
            tokens * 30 * 2 * 3 * 64 * 4,
            "{p}"
        );
        assert!(p["export_us"].as_f64().unwrap() > 0.0 && p["ttft_ms"].as_f64().unwrap() > 0.0);
        if p["kv"].as_str().unwrap().starts_with("vmm-token-major") {
            assert_eq!(
                (p["export_copies"].as_u64(), p["import_copies"].as_u64()),
                (Some(1), Some(1)),
                "{p}"
            );
        } else {
            assert!(
                p["export_copies"].as_u64().unwrap() >= 60,
                "paged: a run per layer and K/V at least: {p}"
            );
        }
    }
    let bad = common::vkv(&["bench", "handoff", "--repeats", "0"]);
    common::assert_one_line_error(&bad, "--repeats", "--repeats 0");
}
