//! Loading a model with its tokenizer, and generating text for one prompt — what
//! `vkv generate` runs. (Serving many requests at once is the engine loop's job; this is the
//! single-sequence path, on the same forward pass and KV caches.)

use std::path::Path;
use std::time::Instant;

use crate::kv::KvCache;
use crate::model::{Llama, LlamaConfig, ModelError, SeqChunk};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::{GgufVocab, Tokenizer, TokenizerError};
use crate::weights::gguf::GgufFile;

/// A model ready to run: weights, tokenizer and a name for messages.
pub struct LoadedModel {
    pub name: String,
    pub model: ModelWeights,
    pub tokenizer: Tokenizer,
}

/// A model's configuration and its weights: on the host (a CPU [`Llama`], which the CUDA device
/// uploads), or — for a preset too large for the host — only a seed, the CUDA device making
/// random weights of the preset's shapes itself.
pub struct ModelWeights {
    pub config: LlamaConfig,
    host: Option<Llama>,
    /// The seed of a preset's random weights.
    seed: u64,
}

impl ModelWeights {
    /// Weights on the host.
    pub fn host(llama: Llama) -> Self {
        ModelWeights {
            config: llama.config.clone(),
            host: Some(llama),
            seed: 0,
        }
    }

    /// Shapes only: random weights of `config` made on the device from `seed`.
    pub fn device_random(config: LlamaConfig, seed: u64) -> Self {
        ModelWeights {
            config,
            host: None,
            seed,
        }
    }

    /// The CPU model, or an error naming why there is none.
    pub fn cpu(&self) -> Result<&Llama, ModelError> {
        self.host.as_ref().ok_or_else(|| {
            ModelError::Config(format!(
                "this model has {:.1} B parameters and no weights on the host: the CPU device \
                 loads presets up to {:.0} B (run it with --device cuda)",
                self.config.num_parameters() as f64 / 1e9,
                CPU_PRESET_MAX_PARAMS as f64 / 1e9
            ))
        })
    }

    /// The seed of device-made random weights (`None`: the weights are on the host).
    pub fn device_seed(&self) -> Option<u64> {
        self.host.is_none().then_some(self.seed)
    }

    /// [`Llama::forward`] on the CPU model (its KV reserved already).
    pub fn forward(
        &self,
        batch: &[SeqChunk<'_>],
        kv: &dyn KvCache,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.cpu()?.forward(batch, kv)
    }

    /// [`Llama::step`] on the CPU model: reserve, then run (this module's single-sequence path).
    pub fn step(
        &self,
        batch: &[SeqChunk<'_>],
        kv: &mut dyn KvCache,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        self.cpu()?.step(batch, kv)
    }

    /// [`Llama::set_activations`] (the CPU model's; a no-op without one).
    pub fn set_activations(&mut self, a: vkv_kernels::cpu::Activations) {
        if let Some(m) = &mut self.host {
            m.set_activations(a);
        }
    }

    /// [`Llama::set_batch_invariant`] (the CPU model's; a no-op without one).
    pub fn set_batch_invariant(&mut self, on: bool) {
        if let Some(m) = &mut self.host {
            m.set_batch_invariant(on);
        }
    }
}

/// Errors of loading or generating.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Kv(#[from] crate::kv::KvError),
}

/// The `tokenizer.ggml.*` metadata of a GGUF file.
pub fn gguf_vocab(g: &GgufFile) -> Result<GgufVocab, ModelError> {
    let id = |k: &str| g.get_u64(k).ok().map(|v| v as u32);
    Ok(GgufVocab {
        model: g.get_str("tokenizer.ggml.model")?.to_string(),
        pre: g.get_str("tokenizer.ggml.pre").ok().map(str::to_string),
        tokens: g.get_string_array("tokenizer.ggml.tokens")?,
        token_types: g
            .get_i64_array("tokenizer.ggml.token_type")
            .unwrap_or_default(),
        merges: g
            .get_string_array("tokenizer.ggml.merges")
            .unwrap_or_default(),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        unknown_token_id: id("tokenizer.ggml.unknown_token_id"),
        padding_token_id: id("tokenizer.ggml.padding_token_id"),
        add_bos_token: g
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.as_bool())
            .unwrap_or(false),
        chat_template: g
            .get_str("tokenizer.chat_template")
            .ok()
            .map(str::to_string),
    })
}

/// Parameters above which [`load_model`] refuses a `preset:` on the CPU (its f32 weights would
/// take 4 bytes each: 32 GB for llama-3-8b).
pub const CPU_PRESET_MAX_PARAMS: usize = 2_000_000_000;

/// A tokenizer made up for a vocabulary of `vocab_size` ids, for models that come without one
/// (presets, an HF directory without `tokenizer.json`): the 256 byte tokens of GPT-2's
/// byte-level alphabet, then placeholder tokens `<|tN|>`, no merges (so text encodes one token
/// per byte) and no EOS. Text means nothing to such a model; token ids are what it is for.
pub fn placeholder_tokenizer(vocab_size: usize) -> Result<Tokenizer, TokenizerError> {
    // GPT-2's bytes_to_unicode: printable bytes stand for themselves, the rest map to U+0100...
    let mut tokens = Vec::with_capacity(vocab_size.max(256));
    let mut next = 256u32;
    for b in 0u32..256 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        let c = if printable {
            b
        } else {
            next += 1;
            next - 1
        };
        tokens.push(char::from_u32(c).unwrap_or('?').to_string());
    }
    tokens.extend((256..vocab_size).map(|i| format!("<|t{i}|>")));
    Tokenizer::from_gguf_vocab(GgufVocab {
        model: "gpt2".into(),
        tokens,
        ..GgufVocab::default()
    })
}

/// A model preset with seeded random weights ([`Llama::random`], seed 0; above
/// [`CPU_PRESET_MAX_PARAMS`] only the shapes, for the CUDA device to fill) and a
/// [`placeholder_tokenizer`]. For benchmarks and smoke tests that need shapes, not knowledge.
pub fn load_preset(name: &str) -> Result<LoadedModel, GenerateError> {
    let config = LlamaConfig::preset(name)?;
    let vocab_size = config.vocab_size;
    let model = if config.num_parameters() > CPU_PRESET_MAX_PARAMS {
        ModelWeights::device_random(config.checked()?, 0)
    } else {
        ModelWeights::host(Llama::random(config, 0)?)
    };
    let tokenizer = placeholder_tokenizer(vocab_size)?;
    Ok(LoadedModel {
        name: format!("preset:{name}"),
        model,
        tokenizer,
    })
}

/// Load a GGUF file, an HF directory (config.json, *.safetensors, and tokenizer.json — without
/// it a [`placeholder_tokenizer`]), or `preset:NAME` ([`load_preset`]).
pub fn load_model(path: &Path) -> Result<LoadedModel, GenerateError> {
    if let Some(name) = path.to_str().and_then(|p| p.strip_prefix("preset:")) {
        return load_preset(name);
    }
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    if path.is_dir() {
        let model = ModelWeights::host(Llama::from_hf_dir(path)?);
        let tokenizer_path = path.join("tokenizer.json");
        let (tokenizer, name) = if tokenizer_path.exists() {
            let config = path.join("tokenizer_config.json");
            let t = Tokenizer::from_files(
                &tokenizer_path,
                config.exists().then_some(config.as_path()),
            )?;
            (t, name)
        } else {
            // A bare checkpoint (the transformers check writes one): token ids only.
            (
                placeholder_tokenizer(model.config.vocab_size)?,
                format!("{name} (no tokenizer.json: placeholder byte tokenizer)"),
            )
        };
        return Ok(LoadedModel {
            name,
            model,
            tokenizer,
        });
    }
    let g = GgufFile::open(path).map_err(ModelError::from)?;
    let model = ModelWeights::host(Llama::from_gguf(&g)?);
    let tokenizer = Tokenizer::from_gguf_vocab(gguf_vocab(&g)?)?;
    Ok(LoadedModel {
        name,
        model,
        tokenizer,
    })
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

#[cfg(test)]
mod preset_tests {
    use super::*;

    #[test]
    fn a_preset_loads_with_a_byte_level_tokenizer_and_big_ones_only_as_shapes() {
        let m = load_model(Path::new("preset:smollm2-135m")).unwrap();
        assert_eq!(m.name, "preset:smollm2-135m");
        assert_eq!(m.tokenizer.vocab_size(), m.model.config.vocab_size);
        let text = "Hello, wörld! 42";
        let ids = m.tokenizer.encode(text, false).unwrap();
        assert_eq!(ids.len(), text.len(), "one token per byte");
        assert!(ids.iter().all(|&i| i < 256));
        assert_eq!(m.tokenizer.decode(&ids, false).unwrap(), text);
        // A big preset loads its shapes only; running it on the CPU is refused, naming why.
        let big = load_model(Path::new("preset:llama-3-8b")).unwrap();
        assert_eq!(big.model.device_seed(), Some(0));
        let e = big.model.cpu().err().unwrap().to_string();
        assert!(
            e.contains("8.0 B parameters") && e.contains("--device cuda"),
            "{e}"
        );
        let e = load_model(Path::new("preset:gpt-5"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unknown model preset"), "{e}");
    }
}
