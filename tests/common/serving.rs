//! Driving the engine from tests: prompts, requests, and reading every request's events to the
//! end (shared by the CPU engine tests and the GPU ones).
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use vkv_engine::engine::FinishReason;
use vkv_engine::engine::{
    event_channel, Engine, EngineConfig, EventKind, EventReceiver, Finished, GenerationRequest,
    RequestId, StopConditions,
};
use vkv_engine::kv::{KvCacheDtype, KvMode};
use vkv_engine::sampler::SamplingParams;
use vkv_kernels::cpu::Activations;
use vkv_vmm::KvLayout;

/// The CPU engine's KV modes under test: paged, vmm per-layer with small pages, vmm token-major.
pub const CPU_KV_MODES: [KvMode; 3] = [
    KvMode::Paged { block_size: 16 },
    KvMode::Vmm {
        layout: KvLayout::PerLayer,
        page_size: 64 << 10,
    },
    KvMode::Vmm {
        layout: KvLayout::TokenMajor,
        page_size: 2 << 20,
    },
];

/// Prompts of different lengths and content, tokenized.
pub fn prompts(e: &Engine, n: usize) -> Vec<Vec<u32>> {
    let topics = [
        "the history of Paris",
        "how bees make honey",
        "why the sky is blue",
        "a recipe for bread",
        "the rules of chess",
        "how a compiler works",
        "the water cycle",
        "a short poem about autumn",
    ];
    (0..n)
        .map(|i| {
            let mut text = format!("Write about {}.", topics[i % topics.len()]);
            for _ in 0..i % 5 {
                text.push_str(" Please be precise and give one example of it.");
            }
            e.model().tokenizer.encode(&text, false).unwrap()
        })
        .collect()
}

/// A long shared system prompt (over 200 tokens), then one of six questions: what prefix caching
/// finds cached.
pub fn chat_prompts(e: &Engine, n: usize) -> Vec<Vec<u32>> {
    let system = "You are a careful assistant. Answer in plain words, give one example, and say \
                  what you are unsure of. Keep to the question; do not repeat it. "
        .repeat(6);
    let questions = [
        "Why is the sky blue?",
        "How do bees make honey?",
        "What does a compiler do?",
        "How does bread rise?",
        "What are the rules of chess?",
        "Where does rain come from?",
    ];
    (0..n)
        .map(|i| {
            let text = format!("{system}\nQuestion: {}", questions[i % questions.len()]);
            e.model().tokenizer.encode(&text, false).unwrap()
        })
        .collect()
}

/// The KV modes of the tests of KV shared between requests (prefix caching, parallel
/// sampling): paged, and vmm with 16 KiB pages. A vmm cached unit is the fewest pages per region that hold
/// whole tokens (`KvSpaceConfig::prefix_unit`), and SmolLM2's 3 KV heads of 64 make its f32 KV
/// 768 bytes a token per layer's K or V and 46 080 bytes a token over all layers: per-layer
/// units are 3 pages (64 tokens), token-major units 45 pages (16 tokens). With 2 MiB pages they
/// would be thousands of tokens (mainstream shapes — 8 KV heads of 128 — fill pages exactly).
/// Smaller pages would take more host mappings than `vm.max_map_count` allows two engines.
pub const SHARING_MODES: [KvMode; 3] = [
    KvMode::Paged { block_size: 16 },
    KvMode::Vmm {
        layout: KvLayout::PerLayer,
        page_size: 16 << 10,
    },
    KvMode::Vmm {
        layout: KvLayout::TokenMajor,
        page_size: 16 << 10,
    },
];

/// Tokens of the unit a fork copies rather than shares in each of `SHARING_MODES`: a paged
/// block, a per-layer vmm unit (3 pages of 16 KiB, 64 tokens), a token-major one (45 pages, 16
/// tokens).
pub fn unit_tokens(mode: KvMode) -> usize {
    match mode {
        KvMode::Paged { block_size } => block_size,
        KvMode::Vmm {
            layout: KvLayout::PerLayer,
            ..
        } => 64,
        KvMode::Vmm { .. } => 16,
    }
}

/// The SmolLM2 engine of those tests: f32 KV of `kv_memory` bytes, int8 activations, batch
/// invariant (a request's output does not depend on what else runs), prefix caching `caching`.
pub fn sharing_engine(mode: KvMode, caching: bool, kv_memory: usize) -> Engine {
    let mut model = super::smollm2();
    model.model.set_activations(Activations::Int8);
    Engine::start(
        model,
        EngineConfig {
            kv_mode: mode,
            kv_cache_dtype: KvCacheDtype::F32,
            kv_memory: Some(kv_memory),
            max_num_seqs: 16,
            max_num_batched_tokens: 256,
            max_model_len: Some(2048),
            batch_invariant: true,
            enable_prefix_caching: caching,
            ..EngineConfig::default()
        },
    )
    .expect("start the engine")
}

pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        stop: StopConditions {
            ignore_eos: true,
            ..StopConditions::default()
        },
        cache_salt: None,
        share_prompt_with: None,
        logprobs: None,
        adjust: Default::default(),
        prompt_logprobs: None,
        grammar: None,
        handoff: None,
    }
}

/// What a request produced, assembled from its events.
#[derive(Debug, Default)]
pub struct Output {
    pub tokens: Vec<u32>,
    /// One per token when the request asked for log-probabilities.
    pub logprobs: Vec<vkv_engine::sampler::TokenLogprob>,
    /// With `prompt_logprobs`: one per prompt token (`None` for the first).
    pub prompt_logprobs: Option<Vec<Option<vkv_engine::sampler::TokenLogprob>>>,
    pub text: String,
    /// The prefill half of a disaggregated request: the prompt's KV it handed out.
    pub exported: Option<std::sync::Arc<vkv_engine::engine::ExportedKv>>,
    pub finished: Option<Finished>,
    pub failed: Option<String>,
}

/// Read events until every one of `n` requests has its final event.
pub fn collect(rx: &mut EventReceiver, n: usize) -> HashMap<RequestId, Output> {
    collect_calling(rx, n, || {})
}

/// [`collect`], calling `on_first` once the first event has arrived.
pub fn collect_calling(
    rx: &mut EventReceiver,
    n: usize,
    on_first: impl FnOnce(),
) -> HashMap<RequestId, Output> {
    let mut out: HashMap<RequestId, Output> = HashMap::new();
    let mut done = 0;
    let mut on_first = Some(on_first);
    while done < n {
        let ev = rx.blocking_recv().expect("the engine is alive");
        if let Some(f) = on_first.take() {
            f();
        }
        let o = out.entry(ev.id).or_default();
        assert!(
            o.finished.is_none() && o.failed.is_none(),
            "event after the end"
        );
        match ev.kind {
            EventKind::Delta {
                token_ids,
                text,
                logprobs,
            } => {
                o.tokens.extend(token_ids);
                o.logprobs.extend(logprobs);
                o.text.push_str(&text);
            }
            EventKind::PromptLogprobs(l) => {
                assert!(
                    o.tokens.is_empty(),
                    "prompt log-probabilities after a token"
                );
                o.prompt_logprobs = Some(l);
            }
            EventKind::KvExported(kv) => o.exported = Some(kv),
            EventKind::Finished(f) => {
                o.finished = Some(f);
                done += 1;
            }
            EventKind::Failed(why) => {
                o.failed = Some(why);
                done += 1;
            }
        }
    }
    out
}

pub fn run_one(e: &Engine, req: GenerationRequest) -> Output {
    let (tx, mut rx) = event_channel();
    let id = e.submit(req, tx).unwrap();
    collect(&mut rx, 1).remove(&id).unwrap()
}

pub fn assert_empty(e: &Engine, what: &str) {
    let usage = e
        .audit_kv()
        .unwrap_or_else(|err| panic!("{what}: audit: {err}"));
    assert_eq!(
        (
            usage.sequences,
            usage.bytes_allocated,
            usage.bytes_holding_tokens
        ),
        (0, 0, 0),
        "{what}: KV memory left behind"
    );
}

/// Poll the metrics until `cond` holds (the engine publishes them after every step).
pub fn wait_for(e: &Engine, what: &str, cond: impl Fn(&vkv_engine::engine::EngineMetrics) -> bool) {
    let start = Instant::now();
    while !cond(&e.metrics()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The cache's usage (audited) once `n` sequences hold KV.
pub fn usage_with(e: &Engine, n: usize) -> vkv_engine::kv::KvUsage {
    let start = std::time::Instant::now();
    loop {
        let usage = e.audit_kv().expect("the books audit clean");
        if usage.sequences == n {
            return usage;
        }
        assert!(start.elapsed().as_secs() < 60, "never {n} sequences");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A request aborted after its first three tokens finishes with `abort`, and the cache is empty
/// at once.
pub fn assert_mid_decode_abort_frees(e: &Engine, prompt: Vec<u32>, name: &str) {
    let (tx, mut rx) = event_channel();
    let id = e.submit(greedy(prompt, 500), tx).unwrap();
    for _ in 0..3 {
        rx.blocking_recv().unwrap();
    }
    e.abort(id);
    let out = collect(&mut rx, 1).remove(&id).unwrap();
    assert_eq!(out.finished.unwrap().reason, FinishReason::Abort, "{name}");
    assert_eq!(e.metrics().kv.bytes_allocated, 0, "{name}: after abort");
}

/// A receiver dropped after the first event is a client gone: the engine aborts the request at
/// its next token (the engine's `finished_abort` reaching `aborts_after`) and frees everything.
pub fn assert_disconnect_aborts(e: &Engine, prompt: Vec<u32>, aborts_after: u64, name: &str) {
    let (tx, mut rx) = event_channel();
    e.submit(greedy(prompt, 500), tx).unwrap();
    rx.blocking_recv().unwrap();
    drop(rx);
    wait_for(e, "the disconnect", |m| {
        m.finished_abort == aborts_after && m.running == 0
    });
    assert_empty(e, name);
}
