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
