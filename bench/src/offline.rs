//! The offline benchmark (`vkv bench offline`): a workload of request lengths submitted to a
//! running [`Engine`] all at once or as a Poisson process, and what came out — vLLM's
//! `benchmark_throughput` (all at once) and the arrival process of its `bench serve`, in process.
//!
//! Prompts are seeded random token ids of the sampled lengths (vLLM's "random" dataset) and every
//! request generates exactly its sampled output length (`ignore_eos`), so two runs with the same
//! seed do the same work whatever the model says. KV utilisation is sampled from the engine's
//! metrics every few milliseconds while the run lasts.
//!
//! The prefix-sharing workloads ([`crate::prefix`]): `prefix-repetition` is a request list like
//! the others ([`workload_requests`]); `multi-turn` is closed-loop ([`run_multi_turn`]): one
//! thread per conversation sends turn *k* + 1 only after turn *k* finished (plus the think time),
//! its prompt the earlier prompt, the tokens the engine generated and a new user message;
//! `arrivals` then say when conversations start. Every report has the prefix-cache numbers
//! (cached prompt tokens from the engine's `Usage::cached_tokens`, the hit rate, the workload's
//! ideal one), and a multi-turn report the TTFT of first and later turns apart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Exp};

use crate::prefix::{
    ideal_hits, prefix_repetition_prompts, user_tokens, CacheBlock, PrefixCacheReport,
    TokenConversation, TurnLatency,
};
use crate::workload::{MultiTurn, RequestShape, Workload};
use vkv_engine::engine::{
    event_channel, BeamSearch, Engine, EngineError, EngineMetrics, EventKind, Finished,
    GenerationRequest, StopConditions,
};
use vkv_engine::sampler::SamplingParams;

/// Mean, median, 90th (DistServe's SLO percentile) and 99th percentile of a set of samples (0
/// when empty).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Summary {
        if samples.is_empty() {
            return Summary::default();
        }
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Summary {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            median: percentile(&v, 50.0),
            p90: percentile(&v, 90.0),
            p99: percentile(&v, 99.0),
        }
    }

    /// The same summary with every value multiplied by `k` (seconds to milliseconds).
    pub fn scaled(self, k: f64) -> Summary {
        Summary {
            mean: self.mean * k,
            median: self.median * k,
            p90: self.p90 * k,
            p99: self.p99 * k,
        }
    }
}

/// Linear interpolation between closest ranks (numpy's default) over sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = p / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    AllAtOnce,
    /// Poisson process of this many requests per second.
    Poisson {
        rate: f64,
    },
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OfflineReport {
    pub kv: String,
    pub requests: usize,
    pub failed: usize,
    /// Why the first failed request failed.
    pub first_error: Option<String>,
    pub duration_s: f64,
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Prompt and output tokens per second.
    pub total_tokens_per_s: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub e2e_ms: Summary,
    pub queue_ms: Summary,
    pub preemptions: u64,
    /// vmm: `reserve`s that had to map pages themselves (admissions of fresh slots included).
    pub map_waits: Option<u64>,
    /// vmm: of `map_waits`, those of running sequences (decode growth): the ones that cost a step.
    pub map_waits_growth: Option<u64>,
    pub peak_running: usize,
    /// KV memory allocated / KV capacity, mean and peak over the run.
    pub kv_used_mean: f64,
    pub kv_used_peak: f64,
    /// Bytes holding tokens / bytes allocated, mean over samples with anything allocated.
    pub kv_token_share_mean: f64,
    /// The share of KV memory that sharing saves (forked prompts of parallel samples, cached
    /// prefixes) against every sequence holding its own blocks or pages, mean over samples with
    /// anything allocated: the PagedAttention paper's "memory saving".
    pub kv_sharing_saving_mean: f64,
    /// Samples per request (`--n`), and whether they shared their prompt's KV.
    pub samples_per_request: usize,
    pub shared_samples: bool,
    /// The `samples_per_request` were beams of a beam search.
    pub beam_search: bool,
    /// Cached prompt tokens (the engine's per-request `cached_tokens`, summed), the hit rate and
    /// the workload's ideal one.
    pub prefix_cache: PrefixCacheReport,
    /// `multi-turn`: TTFT of first and of later turns.
    pub turns: Option<TurnLatency>,
}

/// Parallel sampling in a run (`--n`): `n` samples of every request, sharing the prompt's KV
/// ([`Engine::submit_samples`]) or, as the baseline, submitted as `n` independent requests that
/// each compute and hold the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Samples {
    pub n: usize,
    pub shared: bool,
    /// Beam search of width `n` instead ([`Engine::submit_beam_search`]).
    pub beam_search: bool,
}

impl Default for Samples {
    fn default() -> Self {
        Samples {
            n: 1,
            shared: true,
            beam_search: false,
        }
    }
}

/// One request of the benchmark: `prompt`, then exactly `max_tokens` tokens sampled as
/// [`SamplingParams::default`] says, past end-of-sequence (`ignore_eos`).
fn bench_request(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
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

/// Seeded random prompts of the workload's lengths, every id an ordinary token (≥ 256, below the
/// vocabulary size).
pub fn random_requests(
    shapes: &[RequestShape],
    vocab_size: usize,
    seed: u64,
) -> Vec<GenerationRequest> {
    let mut rng = StdRng::seed_from_u64(seed);
    let low = 256.min(vocab_size as u32 - 1);
    shapes
        .iter()
        .map(|s| {
            let prompt = (0..s.prompt_len)
                .map(|_| rng.random_range(low..vocab_size as u32))
                .collect();
            bench_request(prompt, s.output_len)
        })
        .collect()
}

/// `n` requests of a request-list workload (every one but `multi-turn`, which
/// [`run_multi_turn`] runs): `prefix-repetition`'s shared prefixes
/// ([`prefix_repetition_prompts`]), or random prompts of the sampled lengths clamped to
/// `max_len` ([`random_requests`]).
pub fn workload_requests(
    workload: &Workload,
    n: usize,
    vocab_size: usize,
    seed: u64,
    max_len: usize,
) -> Vec<GenerationRequest> {
    match workload {
        Workload::PrefixRepetition(p) => prefix_repetition_prompts(p, n, vocab_size, seed)
            .into_iter()
            .map(|prompt| bench_request(prompt, p.output_len))
            .collect(),
        _ => random_requests(&workload.sample(n, seed, Some(max_len)), vocab_size, seed),
    }
}

/// What finished requests added up to.
#[derive(Debug, Default)]
struct Tally {
    ttft: Vec<f64>,
    tpot: Vec<f64>,
    e2e: Vec<f64>,
    queue: Vec<f64>,
    failed: usize,
    first_error: Option<String>,
    output_tokens: usize,
    cached_tokens: usize,
}

impl Tally {
    fn finished(&mut self, f: &Finished) {
        self.output_tokens += f.usage.completion_tokens;
        self.cached_tokens += f.usage.cached_tokens;
        self.ttft.push(f.timings.ttft);
        self.e2e.push(f.timings.e2e);
        self.queue.push(f.timings.queue);
        if let Some(t) = f.timings.tpot() {
            self.tpot.push(t);
        }
    }

    fn failed(&mut self, why: String) {
        self.failed += 1;
        self.first_error.get_or_insert(why);
    }
}

/// KV use samples: (allocated / capacity, bytes holding tokens / allocated or NaN).
/// Per sample: KV allocated / capacity; bytes holding tokens / allocated and the share sharing
/// saves ([`vkv_engine::kv::KvUsage::sharing_saving`]), both NaN when nothing is allocated.
type KvSamples = Vec<(f64, f64, f64)>;

/// Run `body` while another thread samples the engine's KV use every 5 ms.
fn sampling_kv<T>(engine: &Engine, body: impl FnOnce() -> T) -> (T, KvSamples) {
    let capacity_bytes = engine.metrics().kv_capacity_bytes as f64;
    let running = AtomicBool::new(true);
    let samples = Mutex::new(KvSamples::new());
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            while running.load(Ordering::Relaxed) {
                let m = engine.metrics();
                let (share, saving) = if m.kv.bytes_allocated > 0 {
                    (
                        m.kv.bytes_holding_tokens as f64 / m.kv.bytes_allocated as f64,
                        m.kv.sharing_saving(),
                    )
                } else {
                    (f64::NAN, f64::NAN)
                };
                let sample = (m.kv.bytes_allocated as f64 / capacity_bytes, share, saving);
                samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(sample);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let result = body();
        running.store(false, Ordering::Relaxed);
        result
    });
    (
        result,
        samples.into_inner().unwrap_or_else(PoisonError::into_inner),
    )
}

/// What a run comes to, from the engine's metrics before and after, what finished, and the KV
/// samples.
#[allow(clippy::too_many_arguments)]
fn build_report(
    engine: &Engine,
    before: &EngineMetrics,
    requests: usize,
    prompt_tokens: usize,
    tally: Tally,
    duration: f64,
    samples: &KvSamples,
    prefix_cache: PrefixCacheReport,
    turns: Option<TurnLatency>,
) -> OfflineReport {
    let after = engine.metrics();
    let used: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let shares: Vec<f64> = samples
        .iter()
        .map(|s| s.1)
        .filter(|s| !s.is_nan())
        .collect();
    let savings: Vec<f64> = samples
        .iter()
        .map(|s| s.2)
        .filter(|s| !s.is_nan())
        .collect();
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    let output_tokens = tally.output_tokens;
    OfflineReport {
        kv: after.kv_name.clone(),
        requests,
        failed: tally.failed,
        first_error: tally.first_error,
        duration_s: duration,
        requests_per_s: (requests - tally.failed) as f64 / duration,
        output_tokens_per_s: output_tokens as f64 / duration,
        total_tokens_per_s: (prompt_tokens + output_tokens) as f64 / duration,
        prompt_tokens,
        output_tokens,
        ttft_ms: Summary::of(&tally.ttft).scaled(1e3),
        tpot_ms: Summary::of(&tally.tpot).scaled(1e3),
        e2e_ms: Summary::of(&tally.e2e).scaled(1e3),
        queue_ms: Summary::of(&tally.queue).scaled(1e3),
        preemptions: after.preemptions - before.preemptions,
        map_waits: after
            .map
            .map(|m| m.waits - before.map.map_or(0, |b| b.waits)),
        map_waits_growth: after
            .map
            .map(|m| m.growth_waits - before.map.map_or(0, |b| b.growth_waits)),
        peak_running: after.peak_running,
        kv_used_mean: mean(&used),
        kv_used_peak: used.iter().copied().fold(0.0, f64::max),
        kv_token_share_mean: mean(&shares),
        kv_sharing_saving_mean: mean(&savings),
        samples_per_request: 1,
        shared_samples: false,
        beam_search: false,
        prefix_cache,
        turns,
    }
}

/// Submit `requests` to `engine` as `arrivals` says and wait for all of them; `on_done(n)` is
/// called after each one finishes with the number finished so far. The ideal prefix hit rate is
/// that of the prompts in this order, in blocks of `block`.
pub fn run_offline(
    engine: &Engine,
    requests: Vec<GenerationRequest>,
    arrivals: Arrivals,
    samples: Samples,
    seed: u64,
    block: &CacheBlock,
    on_done: &mut dyn FnMut(usize),
) -> Result<OfflineReport, EngineError> {
    let n = requests.len() * samples.n;
    let prompt_tokens: usize = requests.iter().map(|r| r.prompt.len()).sum();
    let ideal = ideal_hits(
        requests.iter().map(|r| (r.prompt.as_slice(), &[][..])),
        block.size,
    );
    let before = engine.metrics();
    let (tx, mut rx) = event_channel();
    let start = Instant::now();
    let mut tally = Tally::default();
    let (submitted, kv_samples) = sampling_kv(engine, || {
        std::thread::scope(|scope| -> Result<(), EngineError> {
            let submitter = scope.spawn(move || -> Result<(), EngineError> {
                let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
                let mut at = 0.0;
                for request in requests {
                    if let Arrivals::Poisson { rate } = arrivals {
                        let gap = Exp::new(rate).map_err(|e| {
                            EngineError::InvalidRequest(format!("request rate {rate}: {e}"))
                        })?;
                        at += gap.sample(&mut rng);
                        let wait = at - start.elapsed().as_secs_f64();
                        if wait > 0.0 {
                            std::thread::sleep(Duration::from_secs_f64(wait));
                        }
                    }
                    if samples.beam_search {
                        let beam = BeamSearch {
                            width: samples.n,
                            length_penalty: 1.0,
                        };
                        engine.submit_beam_search(request, beam, tx.clone())?;
                    } else if samples.shared {
                        engine.submit_samples(request, samples.n, tx.clone())?;
                    } else {
                        for i in 0..samples.n {
                            let mut sample = request.clone();
                            sample.sampling.seed = request.sampling.seed.map(|s| s + i as u64);
                            engine.submit(sample, tx.clone())?;
                        }
                    }
                }
                Ok(())
            });
            let mut done = 0;
            while done < n {
                let Some(ev) = rx.blocking_recv() else {
                    break; // the submitter failed and dropped the sender
                };
                match ev.kind {
                    EventKind::Delta { .. }
                    | EventKind::PromptLogprobs(_)
                    | EventKind::KvExported(_) => continue,
                    EventKind::Finished(f) => tally.finished(&f),
                    EventKind::Failed(why) => tally.failed(why),
                }
                done += 1;
                on_done(done);
            }
            submitter.join().unwrap_or(Ok(()))
        })
    });
    submitted?;
    let duration = start.elapsed().as_secs_f64();
    let prefix_cache =
        PrefixCacheReport::new(prompt_tokens, Some(tally.cached_tokens), block, Some(ideal));
    let mut report = build_report(
        engine,
        &before,
        n,
        prompt_tokens,
        tally,
        duration,
        &kv_samples,
        prefix_cache,
        None,
    );
    report.samples_per_request = samples.n;
    report.shared_samples = samples.shared && samples.n > 1;
    report.beam_search = samples.beam_search;
    Ok(report)
}

/// One turn of a multi-turn run as it went.
struct TurnRecord {
    turn: usize,
    /// Seconds from the start of the run at which it was submitted (not submitted: infinite).
    sent_at: f64,
    prompt: Vec<u32>,
    reply: Vec<u32>,
    outcome: Result<Finished, String>,
}

/// Start times of `n` conversations in seconds: all at 0, or a Poisson process.
fn start_times(n: usize, arrivals: Arrivals, seed: u64) -> Result<Vec<f64>, EngineError> {
    match arrivals {
        Arrivals::AllAtOnce => Ok(vec![0.0; n]),
        Arrivals::Poisson { rate } => {
            let gap = Exp::new(rate)
                .map_err(|e| EngineError::InvalidRequest(format!("request rate {rate}: {e}")))?;
            let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
            let mut at = 0.0;
            Ok((0..n)
                .map(|_| {
                    at += gap.sample(&mut rng);
                    at
                })
                .collect())
        }
    }
}

/// One conversation: its turns one after another, each record sent to `records`.
fn converse(
    engine: &Engine,
    spec: &MultiTurn,
    users: &[Vec<u32>],
    start: Instant,
    starts_at: f64,
    records: &std::sync::mpsc::Sender<TurnRecord>,
) {
    let wait = starts_at - start.elapsed().as_secs_f64();
    if wait > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(wait));
    }
    let mut conversation = TokenConversation::default();
    let mut failed = None::<String>;
    for (turn, user) in users.iter().enumerate() {
        if let Some(why) = &failed {
            let _ = records.send(TurnRecord {
                turn,
                sent_at: f64::INFINITY,
                prompt: Vec::new(),
                reply: Vec::new(),
                outcome: Err(format!("not sent: {why}")),
            });
            continue;
        }
        let prompt = conversation.turn_prompt(user);
        let sent_at = start.elapsed().as_secs_f64();
        let (tx, mut rx) = event_channel();
        let mut reply = Vec::new();
        let outcome = match engine.submit(bench_request(prompt.clone(), spec.output_len), tx) {
            Err(e) => Err(format!("turn {turn} refused: {e}")),
            Ok(_) => loop {
                match rx.blocking_recv().map(|ev| ev.kind) {
                    Some(EventKind::Delta { token_ids, .. }) => reply.extend(token_ids),
                    Some(EventKind::PromptLogprobs(_) | EventKind::KvExported(_)) => {}
                    Some(EventKind::Finished(f)) => break Ok(f),
                    Some(EventKind::Failed(why)) => {
                        break Err(format!("turn {turn} failed: {why}"))
                    }
                    None => break Err(format!("turn {turn}: the engine dropped the request")),
                }
            },
        };
        match &outcome {
            Ok(_) => conversation.add_reply(&reply),
            Err(why) => failed = Some(why.clone()),
        }
        let _ = records.send(TurnRecord {
            turn,
            sent_at,
            prompt,
            reply,
            outcome,
        });
        if failed.is_none() && turn + 1 < users.len() && spec.think_seconds > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(spec.think_seconds));
        }
    }
}

/// Run a `multi-turn` workload: `spec.conversations` conversations, started as `arrivals` says
/// (all at once, or a Poisson process of conversations per second), one thread each; turn
/// *k* + 1 is submitted when turn *k* has finished and the think time passed, its prompt turn
/// *k*'s prompt, the tokens the engine generated for it and a new user message of seeded random
/// token ids. A failed turn ends its conversation (the turns not sent count as failed).
/// `on_done(n)` after each turn ends. The ideal prefix hit rate takes the turns in the order they
/// were submitted.
pub fn run_multi_turn(
    engine: &Engine,
    spec: &MultiTurn,
    vocab_size: usize,
    arrivals: Arrivals,
    seed: u64,
    block: &CacheBlock,
    on_done: &mut dyn FnMut(usize),
) -> Result<OfflineReport, EngineError> {
    let users = user_tokens(
        spec.conversations,
        spec.turns,
        spec.user_len,
        vocab_size,
        seed,
    );
    let starts = start_times(spec.conversations, arrivals, seed)?;
    let before = engine.metrics();
    let start = Instant::now();
    let (records, samples) = sampling_kv(engine, || {
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel();
            for (users, &at) in users.iter().zip(&starts) {
                let tx = tx.clone();
                scope.spawn(move || converse(engine, spec, users, start, at, &tx));
            }
            drop(tx);
            let mut records = Vec::with_capacity(spec.requests());
            for record in rx {
                records.push(record);
                on_done(records.len());
            }
            records
        })
    });
    let duration = start.elapsed().as_secs_f64();
    let mut records = records;
    records.sort_by(|a, b| a.sent_at.total_cmp(&b.sent_at));
    let mut tally = Tally::default();
    let (mut first, mut later) = (Vec::new(), Vec::new());
    for record in &records {
        match &record.outcome {
            Ok(f) => {
                tally.finished(f);
                if record.turn == 0 {
                    first.push(f.timings.ttft);
                } else {
                    later.push(f.timings.ttft);
                }
            }
            Err(why) => tally.failed(why.clone()),
        }
    }
    let prompt_tokens = records.iter().map(|r| r.prompt.len()).sum();
    let ideal = ideal_hits(
        records
            .iter()
            .filter(|r| !r.prompt.is_empty())
            .map(|r| (r.prompt.as_slice(), r.reply.as_slice())),
        block.size,
    );
    let prefix_cache =
        PrefixCacheReport::new(prompt_tokens, Some(tally.cached_tokens), block, Some(ideal));
    Ok(build_report(
        engine,
        &before,
        records.len(),
        prompt_tokens,
        tally,
        duration,
        &samples,
        prefix_cache,
        Some(TurnLatency::new(spec, &first, &later)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_interpolate_like_numpy() {
        let s = Summary::of(&[4.0, 1.0, 3.0, 2.0]);
        assert_eq!(s.mean, 2.5);
        assert_eq!(s.median, 2.5);
        assert!((s.p99 - 3.97).abs() < 1e-12);
        assert_eq!(Summary::of(&[]), Summary::default());
        assert_eq!(Summary::of(&[7.0]).p99, 7.0);
    }
}
