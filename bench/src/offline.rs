//! The offline benchmark (`vkv bench offline`): a workload of request lengths submitted to a
//! running [`Engine`] all at once or as a Poisson process, and what came out — vLLM's
//! `benchmark_throughput` (all at once) and the arrival process of its `bench serve`, in process.
//!
//! Prompts are seeded random token ids of the sampled lengths (vLLM's "random" dataset) and every
//! request generates exactly its sampled output length (`ignore_eos`), so two runs with the same
//! seed do the same work whatever the model says. KV utilisation is sampled from the engine's
//! metrics every few milliseconds while the run lasts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rand_distr::{Distribution, Exp};

use crate::workload::RequestShape;
use vkv_engine::engine::{
    event_channel, Engine, EngineError, EventKind, GenerationRequest, StopConditions,
};
use vkv_engine::sampler::SamplingParams;

/// Mean, median and 99th percentile of a set of samples (0 when empty).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    pub mean: f64,
    pub median: f64,
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
            p99: percentile(&v, 99.0),
        }
    }

    /// The same summary with every value multiplied by `k` (seconds to milliseconds).
    pub fn scaled(self, k: f64) -> Summary {
        Summary {
            mean: self.mean * k,
            median: self.median * k,
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
        .map(|s| GenerationRequest {
            prompt: (0..s.prompt_len)
                .map(|_| rng.random_range(low..vocab_size as u32))
                .collect(),
            max_tokens: s.output_len,
            sampling: SamplingParams::default(),
            stop: StopConditions {
                ignore_eos: true,
                ..StopConditions::default()
            },
            cache_salt: None,
        })
        .collect()
}

/// Submit `requests` to `engine` as `arrivals` says and wait for all of them; `on_done(n)` is
/// called after each one finishes with the number finished so far.
pub fn run_offline(
    engine: &Engine,
    requests: Vec<GenerationRequest>,
    arrivals: Arrivals,
    seed: u64,
    on_done: &mut dyn FnMut(usize),
) -> Result<OfflineReport, EngineError> {
    let n = requests.len();
    let prompt_tokens: usize = requests.iter().map(|r| r.prompt.len()).sum();
    let before = engine.metrics();
    let (tx, mut rx) = event_channel();
    let capacity_bytes = before.kv_capacity_bytes as f64;
    let running = AtomicBool::new(true);
    let samples = Mutex::new(Vec::<(f64, f64)>::new());
    let start = Instant::now();
    let mut ttft = Vec::new();
    let mut tpot = Vec::new();
    let mut e2e = Vec::new();
    let mut queue = Vec::new();
    let (mut failed, mut output_tokens) = (0, 0);
    let submitted = std::thread::scope(|scope| -> Result<(), EngineError> {
        scope.spawn(|| {
            while running.load(Ordering::Relaxed) {
                let m = engine.metrics();
                let share = if m.kv.bytes_allocated > 0 {
                    m.kv.bytes_holding_tokens as f64 / m.kv.bytes_allocated as f64
                } else {
                    f64::NAN
                };
                let sample = (m.kv.bytes_allocated as f64 / capacity_bytes, share);
                samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(sample);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
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
                engine.submit(request, tx.clone())?;
            }
            Ok(())
        });
        let mut done = 0;
        while done < n {
            let Some(ev) = rx.blocking_recv() else {
                break; // the submitter failed and dropped the sender
            };
            match ev.kind {
                EventKind::Delta { .. } => {}
                EventKind::Finished(f) => {
                    done += 1;
                    output_tokens += f.usage.completion_tokens;
                    ttft.push(f.timings.ttft);
                    e2e.push(f.timings.e2e);
                    queue.push(f.timings.queue);
                    if let Some(t) = f.timings.tpot() {
                        tpot.push(t);
                    }
                    on_done(done);
                }
                EventKind::Failed(_) => {
                    done += 1;
                    failed += 1;
                    on_done(done);
                }
            }
        }
        running.store(false, Ordering::Relaxed);
        submitter.join().unwrap_or(Ok(()))
    });
    submitted?;
    let duration = start.elapsed().as_secs_f64();
    let after = engine.metrics();
    let samples = samples.into_inner().unwrap_or_else(|e| e.into_inner());
    let used: Vec<f64> = samples.iter().map(|s| s.0).collect();
    let shares: Vec<f64> = samples
        .iter()
        .map(|s| s.1)
        .filter(|s| !s.is_nan())
        .collect();
    let mean = |v: &[f64]| {
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    };
    Ok(OfflineReport {
        kv: after.kv_name.clone(),
        requests: n,
        failed,
        duration_s: duration,
        requests_per_s: (n - failed) as f64 / duration,
        output_tokens_per_s: output_tokens as f64 / duration,
        total_tokens_per_s: (prompt_tokens + output_tokens) as f64 / duration,
        prompt_tokens,
        output_tokens,
        ttft_ms: Summary::of(&ttft).scaled(1e3),
        tpot_ms: Summary::of(&tpot).scaled(1e3),
        e2e_ms: Summary::of(&e2e).scaled(1e3),
        queue_ms: Summary::of(&queue).scaled(1e3),
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
    })
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
