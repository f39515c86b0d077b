//! The engine thread serving the real SmolLM2 on the CPU: continuous batching gives each request
//! exactly what it gets alone (batch invariance), preemption under a tiny KV budget changes no
//! output and leaks nothing, aborts and disconnects free memory at once, stop strings cut the
//! output, and bad requests are refused with a message.

mod common;

use common::serving::{
    assert_disconnect_aborts, assert_empty, assert_mid_decode_abort_frees, collect, greedy,
    prompts, run_one, wait_for,
};

use vkv_engine::engine::FinishReason;
use vkv_engine::engine::{
    event_channel, Engine, EngineConfig, EngineError, GenerationRequest, RequestId,
};
use vkv_engine::kv::{KvCacheDtype, KvMode};
use vkv_kernels::cpu::Activations;

const MODES: [KvMode; 3] = common::serving::CPU_KV_MODES;

fn engine(mode: KvMode, kv_memory: usize, max_num_batched_tokens: usize) -> Engine {
    engine_with(Activations::Int8, mode, kv_memory, max_num_batched_tokens)
}

/// [`engine`] with a KV cache of `dtype` (the default is f16 on the CPU).
fn engine_of(
    dtype: KvCacheDtype,
    mode: KvMode,
    kv_memory: usize,
    max_num_batched_tokens: usize,
) -> Engine {
    let mut model = common::smollm2();
    model.model.set_activations(Activations::Int8);
    Engine::start(
        model,
        EngineConfig {
            kv_cache_dtype: dtype,
            ..config(mode, kv_memory, max_num_batched_tokens)
        },
    )
    .expect("start the engine")
}

fn config(mode: KvMode, kv_memory: usize, max_num_batched_tokens: usize) -> EngineConfig {
    EngineConfig {
        kv_mode: mode,
        kv_memory: Some(kv_memory),
        max_num_seqs: 64,
        max_num_batched_tokens,
        max_model_len: Some(2048),
        batch_invariant: true,
        map_ahead_tokens: 16,
        ..EngineConfig::default()
    }
}

/// The engine over SmolLM2 with its quantized products taking activations as `a`.
fn engine_with(
    a: Activations,
    mode: KvMode,
    kv_memory: usize,
    max_num_batched_tokens: usize,
) -> Engine {
    let mut model = common::smollm2();
    model.model.set_activations(a);
    Engine::start(model, config(mode, kv_memory, max_num_batched_tokens)).expect("start the engine")
}

#[test]
fn concurrent_requests_get_exactly_what_they_get_alone() {
    // Every mode with the default f16 KV cache, and paged with f32.
    let runs = MODES
        .map(|m| (m, KvCacheDtype::Auto))
        .into_iter()
        .chain([(MODES[0], KvCacheDtype::F32)]);
    for (mode, dtype) in runs {
        // A small step budget, so prompts are split into chunks and batches mix prefill and
        // decode in ways the one-at-a-time runs never see.
        let e = engine_of(dtype, mode, 256 << 20, 96);
        let name = format!("{} {dtype:?}", e.metrics().kv_name);
        let prompts = prompts(&e, 32);
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| run_one(&e, greedy(p.clone(), 12)).tokens)
            .collect();
        let (tx, mut rx) = event_channel();
        let ids: Vec<RequestId> = prompts
            .iter()
            .map(|p| e.submit(greedy(p.clone(), 12), tx.clone()).unwrap())
            .collect();
        let together = collect(&mut rx, ids.len());
        for (i, id) in ids.iter().enumerate() {
            let o = &together[id];
            let f = o.finished.as_ref().expect("finished");
            assert_eq!(f.reason, FinishReason::Length, "{name}");
            assert_eq!(
                o.tokens, alone[i],
                "{name}: request {i} differs when batched"
            );
            assert_eq!(f.usage.completion_tokens, 12);
            assert_eq!(f.usage.prompt_tokens, prompts[i].len());
            assert_eq!(f.timings.token_times.len(), 12);
            assert!(f.timings.ttft > 0.0 && f.timings.e2e >= f.timings.ttft);
        }
        let m = e.metrics();
        // SmolLM2: 30 layers × 3 KV heads × 64 × (K, V) elements a token.
        let bytes = if dtype == KvCacheDtype::F32 { 4 } else { 2 };
        assert_eq!(m.kv_bytes_per_token, 11_520 * bytes, "{name}");
        assert_eq!(
            m.kv_capacity_bytes,
            m.kv_capacity_tokens * m.kv_bytes_per_token,
            "{name}"
        );
        assert!(
            m.peak_running > 8,
            "{name}: peak running {}",
            m.peak_running
        );
        assert_empty(&e, &name);
    }
}

#[test]
fn preemption_under_a_tiny_kv_budget_changes_no_output_and_leaks_nothing() {
    // Each budget holds about 170-190 tokens of f32 KV (46 080 bytes a token); 10 requests need
    // about 60 each.
    let budgets = [170 * 46_080, 120 * (64 << 10), 4 * (2 << 20)];
    for (mode, kv_memory) in MODES.into_iter().zip(budgets) {
        let e = engine_of(KvCacheDtype::F32, mode, kv_memory, 2048);
        let name = e.metrics().kv_name;
        let prompts = prompts(&e, 10);
        let alone: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| run_one(&e, greedy(p.clone(), 40)).tokens)
            .collect();
        let (tx, mut rx) = event_channel();
        let ids: Vec<RequestId> = prompts
            .iter()
            .map(|p| e.submit(greedy(p.clone(), 40), tx.clone()).unwrap())
            .collect();
        let out = collect(&mut rx, ids.len());
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(out[id].tokens, alone[i], "{name}: request {i}");
        }
        let m = e.metrics();
        assert!(m.preemptions > 0, "{name}: no preemption");
        let preempted: u32 = out
            .values()
            .map(|o| o.finished.as_ref().unwrap().preemptions)
            .sum();
        assert_eq!(preempted as u64, m.preemptions, "{name}");
        assert_empty(&e, &name);
    }
}

#[test]
fn in_vmm_mode_decode_pages_are_mapped_ahead_without_waiting() {
    for mode in &MODES[1..] {
        // 64 tokens a step: the slots warmed before the first request hold at most 64 tokens.
        let e = engine(*mode, 256 << 20, 64);
        let name = e.metrics().kv_name;
        assert!(e.metrics().kv_warm_pages > 0, "{name}: nothing warmed");
        // 150 tokens cross page boundaries in both layouts (85 and 45 tokens a page).
        let prompt = prompts(&e, 1).remove(0);
        run_one(&e, greedy(prompt, 150));
        let map = e.metrics().map.expect("vmm has a mapper");
        assert!(map.pages_mapped_ahead > 0, "{name}: {map:?}");
        // No wait: the admission finds a slot warmed before any request (eager allocation),
        // and every page after the warm ones was mapped ahead.
        assert_eq!(map.waits, 0, "{name}: {map:?}");
        assert_eq!(map.growth_waits, 0, "{name}: {map:?}");
        assert_empty(&e, &name);
    }
}

#[test]
fn in_vmm_mode_queued_requests_find_their_first_pages_mapped_when_admitted() {
    for mode in &MODES[1..] {
        // 96 tokens a step: the 12 prompts are admitted over several steps, and each step names
        // the next admissions so their slots' first pages are mapped while it computes.
        let e = engine(*mode, 256 << 20, 96);
        let name = e.metrics().kv_name;
        let prompts = prompts(&e, 12);
        // At most the requests the first step admits can wait: nothing ran before it to map
        // their pages behind (a request is admitted while budget is left, even partly).
        let mut first_step = 0;
        let mut budget = 96usize;
        for p in &prompts {
            if budget == 0 {
                break;
            }
            first_step += 1;
            budget = budget.saturating_sub(p.len());
        }
        let (tx, mut rx) = event_channel();
        for p in &prompts {
            e.submit(greedy(p.clone(), 24), tx.clone()).unwrap();
        }
        collect(&mut rx, prompts.len());
        let map = e.metrics().map.expect("vmm has a mapper");
        assert!(
            map.waits as usize <= first_step && first_step < prompts.len(),
            "{name}: {} waits for {} requests, {first_step} in the first step: {map:?}",
            map.waits,
            prompts.len()
        );
        assert_eq!(map.growth_waits, 0, "{name}: {map:?}");
        assert_empty(&e, &name);

        // Queued requests aborted before admission leave no prepared slot behind.
        let (tx, mut rx) = event_channel();
        let ids: Vec<RequestId> = prompts
            .iter()
            .map(|p| e.submit(greedy(p.clone(), 400), tx.clone()).unwrap())
            .collect();
        rx.blocking_recv().unwrap();
        for &id in &ids {
            e.abort(id);
        }
        collect(&mut rx, ids.len());
        assert_empty(&e, &name);
    }
}

#[test]
fn aborts_and_disconnects_free_memory_at_once() {
    for mode in MODES {
        // 64 tokens a step: a 600-token prompt takes ten steps to prefill.
        let e = engine(mode, 256 << 20, 64);
        let name = e.metrics().kv_name;
        let long: Vec<u32> = prompts(&e, 5).concat().repeat(8)[..600].to_vec();

        // Mid-prefill.
        let (tx, mut rx) = event_channel();
        let id = e.submit(greedy(long.clone(), 10), tx).unwrap();
        wait_for(&e, "prefill to start", |m| m.kv.bytes_holding_tokens > 0);
        e.abort(id);
        let out = collect(&mut rx, 1).remove(&id).unwrap();
        let f = out.finished.unwrap();
        assert_eq!(f.reason, FinishReason::Abort, "{name}");
        assert!(out.tokens.is_empty(), "{name}: aborted during prefill");
        assert_eq!(e.metrics().kv.bytes_allocated, 0, "{name}: after abort");

        // Mid-decode.
        assert_mid_decode_abort_frees(&e, long[..50].to_vec(), &name);

        // A receiver dropped mid-stream is a client gone: aborted at its next token.
        assert_disconnect_aborts(&e, long[..50].to_vec(), 3, &name);
    }
}

#[test]
fn stop_strings_cut_the_output_and_stop_tokens_end_it() {
    // f32 activations: the greedy answer below ends with the end-of-sequence token. With 8-bit
    // activations it runs on ("L'Étoile, la Marseillaise, la femme au roi, ..."), and so does
    // llama.cpp's on this Q4_1 file (llama-cpp-python 0.3.36, greedy: "L'Étoile, la
    // Marseillaise, la femme, la femme au martyre, ...").
    let e = engine_with(Activations::F32, MODES[0], 64 << 20, 2048);
    let prompt = e
        .model()
        .tokenizer
        .apply_chat_template(
            &[vkv_engine::tokenizer::ChatMessage::new(
                "user",
                "What is the capital of France?",
            )],
            true,
        )
        .unwrap();
    let prompt = e.model().tokenizer.encode(&prompt, false).unwrap();
    let full = run_one(&e, greedy(prompt.clone(), 30));
    assert!(full.text.len() > 20, "{:?}", full.text);
    // A stop string from the middle of the greedy text.
    let stop = full.text[10..16].to_string();
    let cut = &full.text[..full.text.find(&stop).unwrap()];
    let mut req = greedy(prompt.clone(), 30);
    req.stop.stop = vec!["never appears".into(), stop.clone()];
    let out = run_one(&e, req);
    assert_eq!(out.text, cut, "stop {stop:?}");
    assert_eq!(out.finished.unwrap().reason, FinishReason::Stop);

    // The model's end-of-sequence token ends a chat answer unless ignored.
    let mut req = greedy(prompt.clone(), 200);
    req.stop.ignore_eos = false;
    let out = run_one(&e, req);
    let f = out.finished.unwrap();
    assert_eq!(f.reason, FinishReason::Stop, "{:?}", out.text);
    assert!(out.text.contains("Paris"), "{:?}", out.text);
    assert_eq!(f.usage.completion_tokens, out.tokens.len());
    // And an extra stop token id ends it at that token.
    let mut req = greedy(prompt, 30);
    req.stop.stop_token_ids = vec![full.tokens[3]];
    let out = run_one(&e, req);
    assert_eq!(out.tokens, full.tokens[..4].to_vec());
    assert_empty(&e, "after the stop tests");
}

#[test]
fn bad_requests_are_refused_with_a_message_and_the_engine_keeps_serving() {
    let e = engine(MODES[1], 64 << 20, 2048);
    let (tx, _rx) = event_channel();
    let refuse = |req: GenerationRequest| e.submit(req, tx.clone()).unwrap_err();
    assert!(refuse(greedy(vec![], 5)).to_string().contains("empty"));
    assert!(refuse(greedy(vec![1, 999_999], 5))
        .to_string()
        .contains("999999"));
    assert!(refuse(greedy(vec![1], 0))
        .to_string()
        .contains("max_tokens"));
    let mut hot = greedy(vec![1, 2], 5);
    hot.sampling.temperature = 3.0;
    assert!(refuse(hot).to_string().contains("temperature"));
    match refuse(greedy(vec![1; 2000], 100)) {
        EngineError::ContextLength {
            prompt: 2000,
            max_tokens: 100,
            limit: 2048,
        } => {}
        other => panic!("{other}"),
    }
    let out = run_one(&e, greedy(vec![1, 2, 3], 3));
    assert_eq!(out.tokens.len(), 3);
    e.shutdown(false);
    assert!(!e.is_alive());
    assert_eq!(
        e.submit(greedy(vec![1], 1), tx.clone()).unwrap_err(),
        EngineError::ShuttingDown
    );
}
