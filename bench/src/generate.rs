//! `vkv bench generate`'s measurement: CPU prefill and decode throughput of a loaded model on the
//! single-sequence path (`Llama::step` over a [`KvCache`], no engine, no scheduler) — one prompt's
//! prefill, one sequence decoding, and `batch` sequences decoding together in one step.
//!
//! Prompts are seeded random token ids (seed 7, drawn from 256 up to the vocabulary size);
//! decoding is greedy, so the sampler is not what is measured. Prefill is the median of 3
//! prompts; decode rates are tokens over the wall time of all steps. Its peer for the same
//! numbers with llama.cpp is `benches/peers/llamacpp_cpu.py`. (Moved here from
//! `vkv_engine::generate`: it measures the engine rather than serving with it.)

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use vkv_engine::generate::GenerateError;
use vkv_engine::kv::{KvBudget, KvCache, KvMode};
use vkv_engine::model::LoadedModel;
use vkv_engine::model::SeqChunk;
use vkv_engine::sampler::argmax;
use vkv_kernels::cpu::KvDtype;

/// CPU throughput of a model: prefill of one prompt, decode of one sequence, and decode of
/// `batch` sequences stepping together (`vkv bench generate`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Throughput {
    pub kv: String,
    /// The KV cache's element type (`f16`, `f32`).
    pub kv_dtype: &'static str,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub batch: usize,
    /// Prompt tokens per second, median of 3 prefills.
    pub prefill_tokens_per_s: f64,
    /// One sequence, tokens per second.
    pub decode_tokens_per_s: f64,
    /// `batch` sequences decoding together, total tokens per second.
    pub batch_decode_tokens_per_s: f64,
}

/// Measure [`Throughput`]: prompts are seeded random ids from the vocabulary; decoding is
/// greedy (the sampler is not what is measured).
pub fn measure_throughput(
    m: &LoadedModel,
    mode: KvMode,
    dtype: KvDtype,
    kv_bytes: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    batch: usize,
) -> Result<Throughput, GenerateError> {
    let c = &m.model.config;
    if prompt_tokens == 0 || batch == 0 || prompt_tokens + decode_tokens > c.max_position_embeddings
    {
        return Err(GenerateError::Input(format!(
            "prompt ({prompt_tokens}) + decode ({decode_tokens}) tokens must fit the context length {} and batch must be > 0",
            c.max_position_embeddings
        )));
    }
    let dims = c.kv_dims();
    let mut kv = mode.build(
        dims,
        dtype,
        KvBudget::new(batch.max(3), prompt_tokens + decode_tokens, kv_bytes),
    )?;
    let mut rng = StdRng::seed_from_u64(7);
    let prompts: Vec<Vec<u32>> = (0..batch.max(3))
        .map(|_| {
            (0..prompt_tokens)
                .map(|_| rng.random_range(256..c.vocab_size as u32))
                .collect()
        })
        .collect();
    let mut prefill = Vec::new();
    for (s, p) in prompts.iter().take(3).enumerate() {
        let t = Instant::now();
        m.model.step(
            &[SeqChunk {
                seq: s as u64,
                tokens: p,
                start: 0,
                all_logits: false,
            }],
            kv.as_mut(),
        )?;
        prefill.push(prompt_tokens as f64 / t.elapsed().as_secs_f64());
        kv.free(s as u64)?;
    }
    prefill.sort_by(f64::total_cmp);
    let decode = |kv: &mut dyn KvCache, seqs: usize| -> Result<f64, GenerateError> {
        let mut next = Vec::with_capacity(seqs);
        for (s, p) in prompts.iter().take(seqs).enumerate() {
            let logits = m.model.step(
                &[SeqChunk {
                    seq: s as u64,
                    tokens: p,
                    start: 0,
                    all_logits: false,
                }],
                kv,
            )?;
            next.push(argmax(&logits[0]));
        }
        let t = Instant::now();
        for step in 0..decode_tokens {
            let tokens: Vec<[u32; 1]> = next.iter().map(|&n| [n]).collect();
            let chunks: Vec<SeqChunk<'_>> = tokens
                .iter()
                .enumerate()
                .map(|(s, tok)| SeqChunk {
                    seq: s as u64,
                    tokens: tok,
                    start: prompt_tokens + step,
                    all_logits: false,
                })
                .collect();
            let logits = m.model.step(&chunks, kv)?;
            next = logits.iter().map(|l| argmax(l)).collect();
        }
        let rate = (seqs * decode_tokens) as f64 / t.elapsed().as_secs_f64();
        for s in 0..seqs {
            kv.free(s as u64)?;
        }
        Ok(rate)
    };
    let single = decode(kv.as_mut(), 1)?;
    let batched = decode(kv.as_mut(), batch)?;
    Ok(Throughput {
        kv: kv.name(),
        kv_dtype: dtype.name(),
        threads: rayon::current_num_threads(),
        prompt_tokens,
        decode_tokens,
        batch,
        prefill_tokens_per_s: prefill[1],
        decode_tokens_per_s: single,
        batch_decode_tokens_per_s: batched,
    })
}
