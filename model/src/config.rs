//! `LlamaConfig`: the hyper-parameters of a Llama-family model, read from GGUF metadata
//! (`{arch}.block_count`, `{arch}.attention.head_count`, ...) or from an HF `config.json`.
//! Llama 2 and 3, Mistral and SmolLM2 all load as `llama`; other architectures are refused
//! with a message naming them. [`LlamaConfig::preset`] gives the shapes of named models (from
//! their published `config.json`) for random-weight benchmarks.

use vkv_kernels::cpu::{Llama3RopeScaling, RopeStyle};

use super::ModelError;
use crate::weights::gguf::GgufFile;

/// Hyper-parameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub rope_style: RopeStyle,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
}

/// A named model shape, from the model's published `config.json`.
struct Preset {
    name: &'static str,
    /// [vocab, hidden, intermediate, layers, heads, KV heads, context length].
    dims: [usize; 7],
    rope_theta: f32,
    tied: bool,
}

const PRESETS: &[Preset] = &[
    // meta-llama/Meta-Llama-3-8B
    Preset {
        name: "llama-3-8b",
        dims: [128256, 4096, 14336, 32, 32, 8, 8192],
        rope_theta: 500000.0,
        tied: false,
    },
    // meta-llama/Meta-Llama-3-70B (141 GB in bf16: more than one GPU holds; for planning)
    Preset {
        name: "llama-3-70b",
        dims: [128256, 8192, 28672, 80, 64, 8, 8192],
        rope_theta: 500000.0,
        tied: false,
    },
    // meta-llama/Llama-2-7b-hf
    Preset {
        name: "llama-2-7b",
        dims: [32000, 4096, 11008, 32, 32, 32, 4096],
        rope_theta: 10000.0,
        tied: false,
    },
    // mistralai/Mistral-7B-v0.3
    Preset {
        name: "mistral-7b",
        dims: [32768, 4096, 14336, 32, 32, 8, 32768],
        rope_theta: 1000000.0,
        tied: false,
    },
    // 01-ai/Yi-6B
    Preset {
        name: "yi-6b",
        dims: [64000, 4096, 11008, 32, 32, 4, 4096],
        rope_theta: 5000000.0,
        tied: false,
    },
    // HuggingFaceTB/SmolLM2-135M
    Preset {
        name: "smollm2-135m",
        dims: [49152, 576, 1536, 30, 9, 3, 8192],
        rope_theta: 100000.0,
        tied: true,
    },
];

impl LlamaConfig {
    /// Names of the model presets [`LlamaConfig::preset`] knows.
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|p| p.name).collect()
    }

    /// The configuration of a named model (`llama-3-8b`, `yi-6b`, ...: see
    /// [`LlamaConfig::preset_names`]), HF conventions (half-split RoPE, RMSNorm eps 1e-5).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let p = PRESETS.iter().find(|p| p.name == name).ok_or_else(|| {
            ModelError::Config(format!(
                "unknown model preset {name:?}; known: {}",
                Self::preset_names().join(", ")
            ))
        })?;
        let [vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, max_position_embeddings] =
            p.dims;
        LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim: hidden_size / num_heads,
            rope_theta: p.rope_theta,
            rope_scaling: None,
            rope_style: RopeStyle::Half,
            rms_norm_eps: 1e-5,
            max_position_embeddings,
            tie_word_embeddings: p.tied,
        }
        .check()
    }

    /// Parameters of the model (embedding, layers, final norm, output head unless tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let (q, kv) = (
            self.num_heads * self.head_dim,
            self.num_kv_heads * self.head_dim,
        );
        let layer = 2 * h + q * h + 2 * kv * h + h * q + 3 * i * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_layers * layer + h + head
    }

    /// Checked construction (used by the loaders and presets; public for tests and tools that
    /// build a configuration by hand).
    pub fn checked(self) -> Result<Self, ModelError> {
        self.check()
    }

    fn check(self) -> Result<Self, ModelError> {
        let bad = |what: String| Err(ModelError::Config(what));
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad(format!(
                "attention heads {} must be a positive multiple of KV heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim must be even and positive, found {}",
                self.head_dim
            ));
        }
        if [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_layers,
        ]
        .contains(&0)
        {
            return bad(format!("zero-sized dimension in {self:?}"));
        }
        Ok(self)
    }

    /// From GGUF metadata. Only `general.architecture = llama` is supported.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let arch = g.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::UnsupportedArchitecture(arch.to_string()));
        }
        let key = |k: &str| format!("{arch}.{k}");
        let int = |k: &str| g.get_u64(&key(k)).map(|v| v as usize);
        let num_heads = int("attention.head_count")?;
        let hidden_size = int("embedding_length")?;
        let vocab_size = match int("vocab_size") {
            Ok(v) => v,
            Err(_) => g.get_string_array("tokenizer.ggml.tokens")?.len(),
        };
        LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: int("feed_forward_length")?,
            num_layers: int("block_count")?,
            num_heads,
            num_kv_heads: int("attention.head_count_kv").unwrap_or(num_heads),
            head_dim: int("rope.dimension_count").unwrap_or(hidden_size / num_heads.max(1)),
            rope_theta: g.get_f64(&key("rope.freq_base")).unwrap_or(10000.0) as f32,
            // Llama-3.1-style scaling travels in GGUF as a `rope_freqs.weight` tensor (applied by
            // the model loader), not as metadata.
            rope_scaling: None,
            // The GGUF converter permutes Q/K rows for llama.cpp's adjacent-pair RoPE.
            rope_style: RopeStyle::Interleaved,
            rms_norm_eps: g
                .get_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5) as f32,
            max_position_embeddings: int("context_length").unwrap_or(4096),
            tie_word_embeddings: g.tensor("output.weight").is_none(),
        }
        .check()
    }

    /// From the text of an HF `config.json` (`LlamaForCausalLM`, `MistralForCausalLM`).
    pub fn from_hf_json(text: &str) -> Result<Self, ModelError> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ModelError::Config(format!("config.json is not valid JSON: {e}")))?;
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if !matches!(model_type, "llama" | "mistral") {
            return Err(ModelError::UnsupportedArchitecture(format!(
                "model_type {model_type:?}"
            )));
        }
        let int = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| ModelError::Config(format!("config.json has no integer `{k}`")))
        };
        let float =
            |k: &str, default: f64| v.get(k).and_then(|x| x.as_f64()).unwrap_or(default) as f32;
        // What the forward pass does not have must not be ignored silently.
        for k in ["attention_bias", "mlp_bias"] {
            if v.get(k).and_then(|b| b.as_bool()) == Some(true) {
                return Err(ModelError::Config(format!(
                    "config.json sets `{k}`: vkv's Llama has no bias terms"
                )));
            }
        }
        if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str()) {
            if act != "silu" {
                return Err(ModelError::Config(format!(
                    "config.json's hidden_act is {act:?}: vkv's Llama MLP is SwiGLU (silu)"
                )));
            }
        }
        let num_heads = int("num_attention_heads")?;
        let hidden_size = int("hidden_size")?;
        // transformers 5 writes `rope_parameters` ({rope_type, rope_theta, ...}) where 4.x wrote
        // `rope_theta` and `rope_scaling` (null when there is none).
        let rope_parameters = v.get("rope_parameters").filter(|p| !p.is_null());
        let rope_theta = rope_parameters
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .map_or_else(|| float("rope_theta", 10000.0), |t| t as f32);
        let scaling = v
            .get("rope_scaling")
            .filter(|s| !s.is_null())
            .or(rope_parameters);
        let rope_scaling = match scaling {
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|t| t.as_str());
                let f = |k: &str| {
                    s.get(k)
                        .and_then(|x| x.as_f64())
                        .map(|x| x as f32)
                        .ok_or_else(|| ModelError::Config(format!("rope_scaling has no `{k}`")))
                };
                if kind == Some("default") && s.get("factor").is_none() {
                    None
                } else if kind != Some("llama3") {
                    return Err(ModelError::Config(format!(
                        "unsupported rope_scaling {s}: only llama3 is"
                    )));
                } else {
                    Some(Llama3RopeScaling {
                        factor: f("factor")?,
                        low_freq_factor: f("low_freq_factor")?,
                        high_freq_factor: f("high_freq_factor")?,
                        original_max_position_embeddings: f("original_max_position_embeddings")?,
                    })
                }
            }
            None => None,
        };
        LlamaConfig {
            vocab_size: int("vocab_size")?,
            hidden_size,
            intermediate_size: int("intermediate_size")?,
            num_layers: int("num_hidden_layers")?,
            num_heads,
            num_kv_heads: int("num_key_value_heads").unwrap_or(num_heads),
            head_dim: int("head_dim").unwrap_or(hidden_size / num_heads.max(1)),
            rope_theta,
            rope_scaling,
            rope_style: RopeStyle::Half,
            rms_norm_eps: float("rms_norm_eps", 1e-6),
            max_position_embeddings: int("max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|t| t.as_bool())
                .unwrap_or(false),
        }
        .check()
    }
}
