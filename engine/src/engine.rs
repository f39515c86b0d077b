//! The engine: one thread that owns the model, the KV cache and the [`Scheduler`], and runs the
//! serving loop — take requests, plan a step, run one batched forward pass, sample, stream what
//! was generated, repeat — reached only through channels (vLLM's `EngineCore` busy loop; TGI's
//! queue and batching task are actors the same way).
//!
//! - In: [`Engine::submit`] checks a request against the model and the cache (so a client's
//!   mistake is an error at once, never a failure later) and queues it; [`Engine::abort`] cancels
//!   one; [`Engine::shutdown`] drains or aborts everything and stops the thread.
//! - Out: the engine thread generates token ids; a second thread, the detokenizer
//!   ([`detokenize`]), turns them into each request's [`EngineEvent`]s for the sender it came
//!   with: `Delta`s (new token ids and the text that became final with them; text that could
//!   still turn out to be the start of a stop string is held back, as vLLM's detokenizer does),
//!   then exactly one `Finished` (reason, usage, timings) or `Failed`. When the receiving side
//!   is gone (a client disconnected) the request is aborted at the next step, and its KV memory
//!   freed.
//! - Stop conditions: the model's end-of-sequence tokens (unless `ignore_eos`), extra stop token
//!   ids, `max_tokens` and a structured output's grammar matched whole on the engine thread;
//!   stop strings (the output is cut before the
//!   string, OpenAI's behaviour) in the detokenizer, which then ends the request
//!   (`Command::StopString`). The stop token counts as a completion token, as in vLLM.
//! - In vmm mode, before each forward pass the engine tells the cache what every scheduled
//!   sequence will need next ([`crate::kv::MapAhead::map_ahead`]): the `Mapper` thread maps those pages while
//!   the step computes, so the next step's `reserve` finds them (map waits stay at 0).
//! - The model and its KV cache live on a [`crate::device::Backend`] (CPU or CUDA): the loop
//!   keeps the scheduler's books through its `KvManager`, and asks the device for logits only of
//!   rows sampled with a temperature (greedy rows may be picked on the device).
//! - [`Engine::metrics`] is a snapshot the loop refreshes after every step and every command.
//!
//! Invariants: every submitted request gets exactly one final event; a finished, aborted or
//! failed request holds no KV memory; the thread never panics on a request's content.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Sender;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::device::Device;
use crate::kv::{KvBlob, KvCacheDtype, KvMode, KvUsage, PrefixStats, SeqId, TransferStats};
use crate::model::LoadedModel;
use crate::sampler::{LogitsAdjustments, SamplingParams, TokenLogprob, MAX_TOP_LOGPROBS};
use crate::structured_output::{Grammar, GrammarCompiler, GrammarError, ResponseFormat};

mod beam_search;
mod detokenize;
mod serving_loop;
use detokenize::{FinishCounts, Output};
use serving_loop::EngineLoop;
/// A request's id, unique within one engine.
pub type RequestId = SeqId;

/// How the engine is set up (the command line's engine options).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where the model runs (see [`crate::device`]).
    pub device: Device,
    pub kv_mode: KvMode,
    /// The element type of the KV cache (`--kv-cache-dtype`): the CPU's f16 or f32; CUDA takes
    /// only `Auto` (its cache is bf16).
    pub kv_cache_dtype: KvCacheDtype,
    /// Bytes of KV memory (host memory on the CPU device). `None`: on the CPU
    /// [`crate::device::DEFAULT_CPU_KV_MEMORY`], on CUDA what `gpu_memory_utilization` leaves.
    pub kv_memory: Option<usize>,
    /// CUDA: the share of the device's memory the engine may use in all (weights, activations
    /// and KV), as vLLM's `gpu_memory_utilization`.
    pub gpu_memory_utilization: f64,
    /// Sequences running at once at most.
    pub max_num_seqs: usize,
    /// Tokens in one forward pass at most (prefill chunks + decodes).
    pub max_num_batched_tokens: usize,
    /// Longest prompt + output; default and upper bound: the model's context length.
    pub max_model_len: Option<usize>,
    /// CUDA: every step kernel by kernel, no CUDA graphs for decode steps (vLLM's
    /// `--enforce-eager`).
    pub enforce_eager: bool,
    /// Results of a request independent of what else runs (see `Llama::set_batch_invariant`).
    pub batch_invariant: bool,
    /// vmm: tokens beyond the next one that the Mapper backs ahead of a decoding sequence.
    pub map_ahead_tokens: usize,
    /// Automatic prefix caching (`--enable-prefix-caching`, vLLM's name): the KV of full blocks
    /// of computed tokens stays cached after a request and a later request whose tokens start
    /// the same way reuses it instead of computing it again (`vkv_kv::PrefixCache`).
    pub enable_prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            device: Device::Cpu,
            gpu_memory_utilization: 0.9,
            kv_mode: KvMode::Vmm {
                layout: vkv_vmm::KvLayout::TokenMajor,
                page_size: 2 << 20,
            },
            kv_cache_dtype: KvCacheDtype::Auto,
            kv_memory: None,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            max_model_len: None,
            enforce_eager: false,
            batch_invariant: false,
            map_ahead_tokens: 16,
            enable_prefix_caching: false,
        }
    }
}

/// When to stop besides `max_tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopConditions {
    /// Stop strings: the output ends just before the first one that appears.
    pub stop: Vec<String>,
    /// Token ids that end the output besides the model's end-of-sequence tokens.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
}

/// One request: prompt token ids and how to continue them.
#[derive(Debug, Clone, Default)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    /// vLLM's `cache_salt`: with prefix caching, a request reuses only the cached KV of requests
    /// with the same salt (tenants that must not share KV give different ones).
    pub cache_salt: Option<String>,
    /// Parallel sampling (`n > 1`): a request submitted before this one with the same prompt.
    /// This one starts from that request's prompt KV once it is computed — shared, not computed
    /// again (PagedAttention §4.4; see [`crate::scheduler`]) — and samples on its own from
    /// there. Ignored if that request has ended or its prompt differs. See
    /// [`Engine::submit_samples`].
    pub share_prompt_with: Option<RequestId>,
    /// Log-probabilities of the generated tokens (OpenAI's `logprobs`): `Some(k)` sends each
    /// token's with the `k` most likely alternatives (at most
    /// [`crate::sampler::MAX_TOP_LOGPROBS`]) in [`EventKind::Delta`]'s `logprobs`.
    pub logprobs: Option<usize>,
    /// Penalties and `logit_bias` applied to the logits before sampling.
    pub adjust: LogitsAdjustments,
    /// Log-probabilities of the prompt's tokens (completions' `echo` with `logprobs`):
    /// `Some(k)` sends one [`EventKind::PromptLogprobs`] before the first token — each prompt
    /// token's given the tokens before it, with the `k` most likely alternatives; the first
    /// token has none. The prompt is then computed whole (no prefix-cache hit), every row's
    /// logits brought back.
    pub prompt_logprobs: Option<usize>,
    /// Structured outputs: the grammar the output follows, from [`Engine::compile_grammar`]
    /// (each sample of [`Engine::submit_samples`] gets its own copy).
    pub grammar: Option<Grammar>,
    /// Disaggregated prefill and decode: this request is the prefill half (compute the prompt
    /// and the first token, then hand the prompt's KV out) or the decode half (start from KV
    /// and a first token computed elsewhere). See [`KvHandoff`].
    pub handoff: Option<KvHandoff>,
}

/// A request's part in disaggregated serving (DistServe): prefill on one instance, decode on
/// another, the prompt's KV handed between them (`vkv_kv::export_kv` / `import_kv`).
#[derive(Debug, Clone)]
pub enum KvHandoff {
    /// The prefill half: generate one token (`max_tokens` must be 1), then send
    /// [`EventKind::KvExported`] with the prompt's KV before `Finished`; the KV memory is freed
    /// as for any request that ends.
    Export,
    /// The decode half: the prompt's KV and the first token (sampled by the prefill instance)
    /// arrive with the request. The first token is this request's first output (sent at once,
    /// stop conditions checked); the KV is written into the cache when the request is admitted,
    /// and decoding goes on from there. A preempted request recomputes its prompt here.
    Import { first_token: u32, kv: Arc<KvBlob> },
}

/// The prompt's KV a prefill half handed out ([`KvHandoff::Export`]), with what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportedKv {
    pub kv: KvBlob,
    /// The one token the prefill half generated (the decode half's first).
    pub first_token: Option<u32>,
    /// Bytes read and the runs (memory copies) they took.
    pub stats: TransferStats,
    /// Seconds the engine thread spent reading them.
    pub seconds: f64,
}

/// Token counts of a finished request (OpenAI's `usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Of the prompt tokens, those whose KV came from the prefix cache when the request was
    /// first scheduled (OpenAI's `usage.prompt_tokens_details.cached_tokens`).
    pub cached_tokens: usize,
}

/// Where a request's time went, in seconds from its arrival at [`Engine::submit`].
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Arrival to the first step that computed any of it.
    pub queue: f64,
    /// Arrival to the first generated token (TTFT); 0 if none was generated.
    pub ttft: f64,
    /// Arrival to the end.
    pub e2e: f64,
    /// When each generated token was sampled.
    pub token_times: Vec<f64>,
}

impl Timings {
    /// Time per output token after the first ((last − first) / (n − 1)), if there were two.
    pub fn tpot(&self) -> Option<f64> {
        match self.token_times.as_slice() {
            [first, .., last] => Some((last - first) / (self.token_times.len() - 1) as f64),
            _ => None,
        }
    }
}

/// Beam search's parameters (vLLM's `BeamSearchParams`; see [`Engine::submit_beam_search`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamSearch {
    /// Beams kept each step, and answers returned.
    pub width: usize,
    /// Hypotheses are ranked by cumulative log-probability over `length ^ length_penalty`.
    pub length_penalty: f32,
}

/// Why generation stopped (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token or stop string was produced.
    Stop,
    /// `max_tokens` were produced, or the context is full.
    Length,
    /// The request was cancelled (by its client, or at shutdown).
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// The last event of a request that ran to an end.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub reason: FinishReason,
    pub usage: Usage,
    pub timings: Timings,
    /// Times the request was preempted (and recomputed).
    pub preemptions: u32,
}

/// What happened to a request.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// New tokens and the text that became final with them (possibly empty), and — if the
    /// request asked for them — the tokens' log-probabilities, one per id.
    Delta {
        token_ids: Vec<u32>,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// The prompt tokens' log-probabilities (see [`GenerationRequest::prompt_logprobs`]), one
    /// per prompt token, `None` for the first; before the first `Delta`.
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// The prefill half of a disaggregated request ([`KvHandoff::Export`]): its prompt's KV,
    /// after its one token and before `Finished`.
    KvExported(Arc<ExportedKv>),
    /// The end; nothing follows.
    Finished(Finished),
    /// The engine could not run the request; nothing follows.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct EngineEvent {
    pub id: RequestId,
    pub kind: EventKind,
}

/// Where a request's events go: one channel per request (the server) or one for many (a
/// benchmark). Usable from async code (`recv().await`) and blocking code (`blocking_recv`).
pub type EventSender = UnboundedSender<EngineEvent>;
pub type EventReceiver = UnboundedReceiver<EngineEvent>;

/// A channel for [`Engine::submit`]'s events.
pub fn event_channel() -> (EventSender, EventReceiver) {
    tokio::sync::mpsc::unbounded_channel()
}

/// Why a request was refused, or the engine could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// A parameter out of range; the message names it.
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the prompt has {prompt} tokens and max_tokens is {max_tokens}: {} in all, more than the context length of {limit} tokens", prompt + max_tokens)]
    ContextLength {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
    #[error("the prompt has {prompt} tokens and max_tokens is {max_tokens}: {} in all, more than the KV cache holds ({capacity} tokens); raise --kv-memory (or --gpu-memory-utilization on CUDA)", prompt + max_tokens)]
    KvCapacity {
        prompt: usize,
        max_tokens: usize,
        capacity: usize,
    },
    #[error("the engine is shutting down and takes no new requests")]
    ShuttingDown,
    #[error("the engine thread has stopped")]
    Stopped,
    #[error("the engine could not start: {0}")]
    Start(String),
    #[error("the KV cache's books are wrong: {0}")]
    KvAudit(String),
}

/// The vmm Mapper's counters, where there is one.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct MapMetrics {
    /// `reserve`s that found pages missing and mapped them on the critical path (target 0).
    pub waits: u64,
    /// Of `waits`, those of sequences already running (decode steps, later prefill chunks);
    /// the rest are admissions of slots without pages.
    pub growth_waits: u64,
    pub wait_seconds: f64,
    pub pages_mapped_ahead: u64,
    pub pages_mapped_on_wait: u64,
    /// Times the Mapper thread died (a panic in a driver call) and was started again.
    pub mapper_restarts: u64,
}

/// Counters of one direction of KV handoff (see [`KvHandoff`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct HandoffCounters {
    /// Requests whose KV went this way.
    pub requests: u64,
    pub bytes: u64,
    /// Memory copies (runs) they took.
    pub copies: u64,
    /// Seconds the engine thread spent copying.
    pub seconds: f64,
}

impl HandoffCounters {
    pub(crate) fn count(&mut self, stats: TransferStats, seconds: f64) {
        self.requests += 1;
        self.bytes += stats.bytes as u64;
        self.copies += stats.copies as u64;
        self.seconds += seconds;
    }
}

/// KV handed out by prefill halves and taken in by decode halves.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct HandoffMetrics {
    pub exported: HandoffCounters,
    pub imported: HandoffCounters,
}

/// Tokens to back in each free slot before the first request (largest first; admissions take
/// the slot with the most pages): every one of the `max_num_seqs` slots an eighth of its share
/// of the cache, enough for a typical prompt, then — while the total stays within a quarter of
/// the cache — the first slots up to one whole step (`max_num_batched_tokens`), for long
/// prompts admitted first.
fn warm_plan(capacity: usize, max_num_seqs: usize, step_tokens: usize) -> Vec<usize> {
    let slots = max_num_seqs.max(1);
    let base = (capacity / (8 * slots)).min(step_tokens);
    let mut left = (capacity / 4).saturating_sub(base * slots);
    let mut plan = vec![base; slots];
    for t in &mut plan {
        let extra = step_tokens.saturating_sub(base).min(left);
        if extra == 0 {
            break;
        }
        *t += extra;
        left -= extra;
    }
    plan
}

/// A snapshot of the engine (see [`Engine::metrics`]).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EngineMetrics {
    /// `cpu`, `cuda (NVIDIA H100 80GB HBM3)`.
    pub device: String,
    pub running: usize,
    pub waiting: usize,
    /// Most requests running at once so far.
    pub peak_running: usize,
    pub kv_name: String,
    pub kv_capacity_tokens: usize,
    /// Bytes of KV memory the capacity stands for (the device's element size).
    pub kv_capacity_bytes: usize,
    /// Bytes of K and V of one token over all layers (the cache's element size).
    pub kv_bytes_per_token: usize,
    pub kv: KvUsage,
    pub map: Option<MapMetrics>,
    /// Automatic prefix caching's counters (tokens looked up and found, units cached and
    /// evicted: blocks in paged mode, pages in vmm mode); `None` when it is off.
    pub prefix: Option<PrefixStats>,
    /// Disaggregated serving: KV handed out and taken in.
    pub kv_handoff: HandoffMetrics,
    /// Pages backed before the first request (vmm's eager allocation, see `warm_kv`).
    pub kv_warm_pages: usize,
    /// CUDA: decode steps replayed from a CUDA graph, and graphs captured.
    pub cuda_graph_replays: u64,
    pub cuda_graph_captures: u64,
    pub steps: u64,
    /// Seconds spent in steps (scheduling, forward pass, sampling).
    pub busy_seconds: f64,
    /// Prompt tokens computed, recomputation after preemption included.
    pub prefill_tokens: u64,
    pub generated_tokens: u64,
    pub preemptions: u64,
    pub finished_stop: u64,
    pub finished_length: u64,
    pub finished_abort: u64,
    pub failed: u64,
}

enum Command {
    Add {
        id: RequestId,
        request: Box<GenerationRequest>,
        events: EventSender,
        arrival: Instant,
        span: tracing::Span,
        /// Beam search: the request's answers are `id .. id + width`.
        beam: Option<BeamSearch>,
    },
    Abort(RequestId),
    /// From the detokenizer: a stop string appeared in the request's text.
    StopString(RequestId),
    Audit(Sender<Result<KvUsage, EngineError>>),
    Shutdown {
        abort: bool,
    },
}

struct Shared {
    metrics: Mutex<EngineMetrics>,
    /// How requests ended as their clients were told (kept by the detokenizer).
    finishes: FinishCounts,
    accepting: AtomicBool,
    /// Request ids, and the sequence ids of forked beams (one space: a request's first
    /// sequence has the request's id).
    next_id: AtomicU64,
}

/// The handle to the engine thread (see the module docs). Dropping it aborts what is in flight
/// and joins the thread.
pub struct Engine {
    tx: Sender<Command>,
    shared: Arc<Shared>,
    model: Arc<LoadedModel>,
    /// The engine thread, then the detokenizer thread (which ends when the engine thread has).
    threads: Mutex<Vec<JoinHandle<()>>>,
    max_model_len: usize,
    max_num_seqs: usize,
    kv_capacity: usize,
    /// Structured outputs' compiler for this model's vocabulary, built on first use.
    grammars: OnceLock<Result<GrammarCompiler, GrammarError>>,
}

impl Engine {
    /// Build the KV cache and start the engine thread.
    pub fn start(mut model: LoadedModel, config: EngineConfig) -> Result<Engine, EngineError> {
        let c = &model.model.config;
        let max_model_len = config
            .max_model_len
            .unwrap_or(c.max_position_embeddings)
            .min(c.max_position_embeddings);
        if max_model_len < 2 || config.max_num_seqs == 0 || config.max_num_batched_tokens == 0 {
            return Err(EngineError::Start(format!(
                "max-model-len ({max_model_len}) must be at least 2, max-num-seqs ({}) and max-num-batched-tokens ({}) at least 1",
                config.max_num_seqs, config.max_num_batched_tokens
            )));
        }
        let max_num_seqs = config.max_num_seqs;
        model.model.set_batch_invariant(config.batch_invariant);
        let model = Arc::new(model);
        let backend = crate::device::start(&model, &config, max_model_len)
            .map_err(|e| EngineError::Start(e.to_string()))?;
        let kv_capacity = backend.kv().capacity_tokens();
        if kv_capacity == 0 {
            return Err(EngineError::Start(format!(
                "the KV memory ({}) holds no token of this model ({} bytes per token)",
                config
                    .kv_memory
                    .map_or("what the GPU has left".into(), |b| format!("{b} bytes")),
                backend.kv().bytes_per_token()
            )));
        }
        let shared = Arc::new(Shared {
            metrics: Mutex::new(EngineMetrics {
                device: backend.device_name(),
                kv_name: backend.kv().name(),
                kv_capacity_tokens: kv_capacity,
                kv_capacity_bytes: kv_capacity * backend.kv().bytes_per_token(),
                kv_bytes_per_token: backend.kv().bytes_per_token(),
                ..EngineMetrics::default()
            }),
            accepting: AtomicBool::new(true),
            finishes: FinishCounts::default(),
            next_id: AtomicU64::new(0),
        });
        let (tx, rx) = crossbeam_channel::unbounded();
        let (output_tx, output_rx) = crossbeam_channel::unbounded();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let detokenizer = std::thread::Builder::new()
            .name("vkv-detokenize".into())
            .spawn({
                let model = model.clone();
                let shared = shared.clone();
                let tx = tx.clone();
                move || detokenize::run(&model, &output_rx, &tx, &shared.finishes)
            })
            .map_err(|e| EngineError::Start(format!("spawning the detokenizer thread: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("vkv-engine".into())
            .spawn({
                let model = model.clone();
                let shared = shared.clone();
                move || {
                    EngineLoop::new(&model, backend, &config, &shared, output_tx)
                        .run(&rx, &ready_tx)
                }
            })
            .map_err(|e| EngineError::Start(format!("spawning the engine thread: {e}")))?;
        // The thread has bound the device and warmed the KV cache (or found the device
        // unusable, which every request will then be told): its first metrics are out.
        let _ = ready_rx.recv();
        Ok(Engine {
            tx,
            shared,
            model,
            threads: Mutex::new(vec![thread, detokenizer]),
            max_model_len,
            max_num_seqs,
            kv_capacity,
            grammars: OnceLock::new(),
        })
    }

    /// Compile a response format into the grammar of a request's output (see
    /// [`crate::structured_output`]), on the caller's thread. The first call builds the compiler
    /// for the model's vocabulary (tens of milliseconds).
    pub fn compile_grammar(&self, format: &ResponseFormat) -> Result<Grammar, GrammarError> {
        let compiler = self.grammars.get_or_init(|| {
            let model = self.model.clone();
            let encode = move |text: &str| model.tokenizer.encode(text, false).unwrap_or_default();
            GrammarCompiler::new(
                &self.model.tokenizer,
                encode,
                self.model.model.config.vocab_size,
                self.model.tokenizer.stop_token_ids(),
            )
        });
        compiler.as_ref().map_err(Clone::clone)?.compile(format)
    }

    /// The model and its tokenizer (shared with the engine thread).
    pub fn model(&self) -> &LoadedModel {
        &self.model
    }

    /// Longest prompt + max_tokens a request may have.
    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    /// Sequences running at once at most (`--max-num-seqs`): also the most samples one request
    /// may ask for, so that they all run together.
    pub fn max_num_seqs(&self) -> usize {
        self.max_num_seqs
    }

    /// Tokens the KV cache holds in all.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv_capacity
    }

    /// The device the model runs on (`cpu`, `cuda (NVIDIA H100 80GB HBM3)`).
    pub fn device_name(&self) -> String {
        lock(&self.shared.metrics).device.clone()
    }

    /// Check and queue a request; its events go to `events`.
    pub fn submit(
        &self,
        request: GenerationRequest,
        events: EventSender,
    ) -> Result<RequestId, EngineError> {
        self.check(&request)?;
        self.queue(request, events, None)
    }

    /// Send a checked request to the engine thread; returns its (first) id.
    fn queue(
        &self,
        request: GenerationRequest,
        events: EventSender,
        beam: Option<BeamSearch>,
    ) -> Result<RequestId, EngineError> {
        let arrival = Instant::now();
        if !self.shared.accepting.load(Ordering::Acquire) {
            return Err(EngineError::ShuttingDown);
        }
        let ids = beam.map_or(1, |b| b.width) as u64;
        let id = self.shared.next_id.fetch_add(ids, Ordering::Relaxed);
        // The request's span, a child of the caller's (the server's HTTP exchange): the engine
        // thread logs the request's admission, chunks, preemptions and end inside it.
        let span = tracing::info_span!(
            "request",
            id,
            prompt_tokens = request.prompt.len(),
            max_tokens = request.max_tokens
        );
        tracing::debug!(parent: &span, "queued");
        self.tx
            .send(Command::Add {
                id,
                request: Box::new(request),
                events,
                arrival,
                span,
                beam,
            })
            .map_err(|_| EngineError::Stopped)?;
        Ok(id)
    }

    /// Beam search (vLLM's `use_beam_search`; see the `beam_search` module): keep the
    /// `beam.width` most likely continuations of the prompt, each a sequence sharing its
    /// ancestors' KV, and answer with the `width` best, best first: the returned ids, each with
    /// its tokens and text in one delta at the end, then its `Finished`, sent to `events`. The
    /// request's sampling parameters are not used; stop strings, log-probabilities, penalties
    /// and `logit_bias` are refused with it.
    pub fn submit_beam_search(
        &self,
        request: GenerationRequest,
        beam: BeamSearch,
        events: EventSender,
    ) -> Result<Vec<RequestId>, EngineError> {
        let invalid = |m: String| Err(EngineError::InvalidRequest(m));
        if beam.width == 0 || beam.width > self.max_num_seqs {
            return invalid(format!(
                "the beam width must be at least 1 and at most max-num-seqs ({}) so that all beams run together, found {}",
                self.max_num_seqs, beam.width
            ));
        }
        if !beam.length_penalty.is_finite() {
            return invalid(format!(
                "length_penalty must be a finite number, found {}",
                beam.length_penalty
            ));
        }
        if !request.stop.stop.is_empty() {
            return invalid("stop strings are not supported with beam search".into());
        }
        if request.logprobs.is_some() || request.prompt_logprobs.is_some() {
            return invalid("logprobs are not supported with beam search".into());
        }
        if !request.adjust.is_none() {
            return invalid(
                "presence_penalty, frequency_penalty and logit_bias are not supported with beam search"
                    .into(),
            );
        }
        if request.grammar.is_some() {
            return invalid("structured outputs are not supported with beam search".into());
        }
        if request.handoff.is_some() {
            return invalid("beam search is not supported with disaggregated serving".into());
        }
        self.check(&request)?;
        let first = self.queue(request, events, Some(beam))?;
        Ok((first..first + beam.width as u64).collect())
    }

    /// Parallel sampling (OpenAI's `n`): submit `n` samples of one request, all sending their
    /// events to `events`, and return their ids — sample `i` is the `i`-th. The first computes
    /// the prompt; the others start from its prompt KV, shared (see
    /// [`GenerationRequest::share_prompt_with`]). With a seed, sample `i` samples with seed
    /// `seed + i` (vLLM's rule), so the samples differ and each is reproducible. All or
    /// nothing: a refused request submits no sample.
    pub fn submit_samples(
        &self,
        request: GenerationRequest,
        n: usize,
        events: EventSender,
    ) -> Result<Vec<RequestId>, EngineError> {
        if n == 0 || n > self.max_num_seqs {
            return Err(EngineError::InvalidRequest(format!(
                "n must be at least 1 and at most max-num-seqs ({}) so that all samples run together, found {n}",
                self.max_num_seqs
            )));
        }
        if n > 1 && request.handoff.is_some() {
            return Err(EngineError::InvalidRequest(format!(
                "n must be 1 with disaggregated serving, found {n}"
            )));
        }
        self.check(&request)?;
        let first = self.submit(request.clone(), events.clone())?;
        let mut ids = vec![first];
        for i in 1..n {
            let mut sample = request.clone();
            sample.share_prompt_with = Some(first);
            sample.sampling.seed = request.sampling.seed.map(|s| s.wrapping_add(i as u64));
            match self.submit(sample, events.clone()) {
                Ok(id) => ids.push(id),
                // Only a shutdown begun meanwhile refuses a request the first passed.
                Err(e) => {
                    for &id in &ids {
                        self.abort(id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(ids)
    }

    fn check(&self, r: &GenerationRequest) -> Result<(), EngineError> {
        let invalid = |m: String| Err(EngineError::InvalidRequest(m));
        let vocab = self.model.model.config.vocab_size;
        if r.prompt.is_empty() {
            return invalid("the prompt is empty: it must have at least one token".into());
        }
        if let Some(&t) = r.prompt.iter().find(|&&t| t as usize >= vocab) {
            return invalid(format!(
                "prompt token id {t} is outside the vocabulary of {vocab} tokens"
            ));
        }
        if r.max_tokens == 0 {
            return invalid("max_tokens must be at least 1, found 0".into());
        }
        r.sampling
            .validate()
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        r.adjust
            .validate(vocab)
            .map_err(|e| EngineError::InvalidRequest(e.to_string()))?;
        if let Some(k) = r
            .logprobs
            .into_iter()
            .chain(r.prompt_logprobs)
            .find(|&k| k > MAX_TOP_LOGPROBS)
        {
            return invalid(format!(
                "logprobs: at most {MAX_TOP_LOGPROBS} alternatives per token, found {k}"
            ));
        }
        if r.stop.stop.iter().any(String::is_empty) {
            return invalid("stop strings must not be empty".into());
        }
        match &r.handoff {
            Some(KvHandoff::Export) if r.max_tokens != 1 => {
                return invalid(format!(
                    "the prefill half of a disaggregated request generates one token: max_tokens must be 1, found {}",
                    r.max_tokens
                ));
            }
            Some(KvHandoff::Import { first_token, kv }) => {
                if *first_token as usize >= vocab {
                    return invalid(format!(
                        "the handed-over first token {first_token} is outside the vocabulary of {vocab} tokens"
                    ));
                }
                if kv.tokens != r.prompt.len() {
                    return invalid(format!(
                        "the handed-over KV holds {} tokens; the prompt has {}",
                        kv.tokens,
                        r.prompt.len()
                    ));
                }
            }
            _ => {}
        }
        let (prompt, max_tokens) = (r.prompt.len(), r.max_tokens);
        if prompt.saturating_add(max_tokens) > self.max_model_len {
            return Err(EngineError::ContextLength {
                prompt,
                max_tokens,
                limit: self.max_model_len,
            });
        }
        if prompt + max_tokens > self.kv_capacity {
            return Err(EngineError::KvCapacity {
                prompt,
                max_tokens,
                capacity: self.kv_capacity,
            });
        }
        Ok(())
    }

    /// Cancel a request wherever it is; its memory is freed before its `Finished` (reason
    /// `abort`) is sent. Unknown or finished ids are ignored.
    pub fn abort(&self, id: RequestId) {
        let _ = self.tx.send(Command::Abort(id));
    }

    /// The latest snapshot of the engine's state and counters.
    pub fn metrics(&self) -> EngineMetrics {
        let mut m = lock(&self.shared.metrics).clone();
        let f = &self.shared.finishes;
        m.finished_stop = f.stop.load(Ordering::Relaxed);
        m.finished_length = f.length.load(Ordering::Relaxed);
        m.finished_abort = f.abort.load(Ordering::Relaxed);
        m
    }

    /// Check the KV cache's books (no leaked block or page, see `KvCache::audit`) between two
    /// steps, and return its usage.
    pub fn audit_kv(&self) -> Result<KvUsage, EngineError> {
        let (reply, answer) = crossbeam_channel::bounded(1);
        self.tx
            .send(Command::Audit(reply))
            .map_err(|_| EngineError::Stopped)?;
        answer.recv().map_err(|_| EngineError::Stopped)?
    }

    /// Whether the engine thread is still running.
    pub fn is_alive(&self) -> bool {
        lock(&self.threads)
            .first()
            .is_some_and(|t| !t.is_finished())
    }

    /// Stop taking requests, then either finish those in flight (`abort: false`) or abort them,
    /// and wait for the thread to end.
    pub fn shutdown(&self, abort: bool) {
        self.shared.accepting.store(false, Ordering::Release);
        let _ = self.tx.send(Command::Shutdown { abort });
        // The engine thread first: once it is gone the detokenizer drains and ends, every
        // final event sent.
        for thread in std::mem::take(&mut *lock(&self.threads)) {
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown(true);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_plan_stays_within_a_quarter_and_puts_the_largest_first() {
        // The H100 Llama-3-8B case: 453k tokens, 128 slots, 8192-token steps.
        let plan = warm_plan(453_312, 128, 8192);
        assert_eq!(plan.len(), 128);
        assert!(plan.iter().sum::<usize>() <= 453_312 / 4);
        assert!(plan.windows(2).all(|w| w[0] >= w[1]), "{plan:?}");
        assert_eq!(plan[0], 8192);
        assert_eq!(*plan.last().unwrap(), 453_312 / (8 * 128));
        // A cache smaller than a step: nothing over a quarter, no slot over the step.
        let plan = warm_plan(1000, 4, 8192);
        assert!(plan.iter().sum::<usize>() <= 250 && plan.iter().all(|&t| t <= 8192));
        assert_eq!(warm_plan(0, 64, 2048).iter().sum::<usize>(), 0);
    }

    #[test]
    fn tpot_is_the_mean_gap_after_the_first_token() {
        let t = Timings {
            token_times: vec![1.0, 1.5, 2.5],
            ..Timings::default()
        };
        assert_eq!(t.tpot(), Some(0.75));
        assert_eq!(Timings::default().tpot(), None);
    }
}
