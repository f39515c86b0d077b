//! Generating text for one prompt — what
//! `vkv generate` runs. (Serving many requests at once is the engine loop's job; this is the
//! single-sequence path, on the same forward pass and KV caches.)

use std::time::Instant;

use crate::engine::FinishReason;
use crate::kv::KvCache;
use crate::model::{LoadError, LoadedModel, ModelError, SeqChunk};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::TokenizerError;

/// Errors of loading or generating.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Kv(#[from] crate::kv::KvError),
}

/// What one generation did.
#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

/// Generate up to `max_tokens` after `prompt` for sequence 0 of `kv`, streaming text pieces to
/// `on_text` as they become final. The sequence is freed at the end, also on error.
pub fn generate(
    m: &LoadedModel,
    kv: &mut dyn KvCache,
    prompt: &[u32],
    max_tokens: usize,
    params: SamplingParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation, GenerateError> {
    const SEQ: u64 = 0;
    params
        .validate()
        .map_err(|e| GenerateError::Input(e.to_string()))?;
    let limit = m.model.config.max_position_embeddings;
    if prompt.is_empty() || prompt.len() >= limit {
        return Err(GenerateError::Input(format!(
            "the prompt has {} tokens: it must have at least 1 and fewer than the context length {limit}",
            prompt.len()
        )));
    }
    let result = run(
        m,
        kv,
        SEQ,
        prompt,
        max_tokens.min(limit - prompt.len()),
        params,
        on_text,
    );
    let _ = kv.free(SEQ);
    result
}

fn run(
    m: &LoadedModel,
    kv: &mut dyn KvCache,
    seq: u64,
    prompt: &[u32],
    max_tokens: usize,
    params: SamplingParams,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation, GenerateError> {
    let mut sampler = Sampler::new(params);
    let mut stream = m.tokenizer.stream();
    let stops = m.tokenizer.stop_token_ids().to_vec();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let start = Instant::now();
    let logits = m.model.step(
        &[SeqChunk {
            seq,
            tokens: prompt,
            start: 0,
            all_logits: false,
        }],
        kv,
    )?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let mut next = sampler.sample(&logits[0]);
    let start = Instant::now();
    let mut finish = FinishReason::Length;
    while tokens.len() < max_tokens {
        if stops.contains(&next) {
            finish = FinishReason::Stop;
            break;
        }
        tokens.push(next);
        let piece = stream.push(next)?;
        if !piece.is_empty() {
            on_text(&piece);
            text.push_str(&piece);
        }
        if tokens.len() == max_tokens {
            break;
        }
        let pos = prompt.len() + tokens.len() - 1;
        let logits = m.model.step(
            &[SeqChunk {
                seq,
                tokens: &[next],
                start: pos,
                all_logits: false,
            }],
            kv,
        )?;
        next = sampler.sample(&logits[0]);
    }
    let rest = stream.finish()?;
    if !rest.is_empty() {
        on_text(&rest);
        text.push_str(&rest);
    }
    Ok(Generation {
        tokens,
        text,
        finish,
        prompt_tokens: prompt.len(),
        prefill_seconds,
        decode_seconds: start.elapsed().as_secs_f64(),
    })
}

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
    mode: crate::kv::KvMode,
    dtype: vkv_kernels::cpu::KvDtype,
    kv_bytes: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    batch: usize,
) -> Result<Throughput, GenerateError> {
    use rand::{RngExt, SeedableRng};
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
        batch.max(3),
        prompt_tokens + decode_tokens,
        kv_bytes,
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
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
            next.push(crate::sampler::argmax(&logits[0]));
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
            next = logits.iter().map(|l| crate::sampler::argmax(l)).collect();
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
