//! KV-cache shapes of well-known models: what decides KV bytes per token (layers, KV heads, head
//! dimension, element size). Used wherever a model's shape matters without its weights —
//! `vkv bench vmm` today, `vkv frag` and the random-weight presets later.
//!
//! Figures are from each model's published `config.json`: `num_hidden_layers`,
//! `num_key_value_heads` (or `num_attention_heads` without GQA), `hidden_size / num_attention_heads`,
//! `max_position_embeddings`. [`kv_shape_from_hf_config`] reads the same fields from any HF
//! `config.json`.

/// The KV-relevant shape of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvShape {
    pub name: String,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Bytes per KV element (2: fp16/bf16).
    pub dtype_bytes: usize,
    /// The model's context length (`max_position_embeddings`).
    pub max_len: usize,
}

impl KvShape {
    /// Bytes of K and V of one token over all layers.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes
    }
}

/// Every preset: name, layers, KV heads, head dim, context length (all bf16/fp16).
const PRESETS: &[(&str, usize, usize, usize, usize)] = &[
    ("llama-3-8b", 32, 8, 128, 8192),
    ("llama-3-70b", 80, 8, 128, 8192),
    ("llama-2-7b", 32, 32, 128, 4096),
    ("mistral-7b", 32, 8, 128, 32768),
    ("yi-6b", 32, 4, 128, 4096),
    ("yi-34b", 60, 8, 128, 4096),
    ("opt-13b", 40, 40, 128, 2048),
    ("smollm2-135m", 30, 3, 64, 8192),
];

/// Names of the presets.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|p| p.0).collect()
}

/// Why a KV shape could not be had from a preset name or a `config.json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresetError {
    /// No preset has this name; the message lists the known ones.
    #[error("unknown model preset {name:?}; known: {}", preset_names().join(", "))]
    UnknownPreset { name: String },
    /// The `config.json` text does not parse as JSON.
    #[error("{name}: config.json is not valid JSON: {detail}")]
    InvalidJson { name: String, detail: String },
    /// A required field is absent, zero or not an integer.
    #[error("{name}: config.json has no positive integer `{field}`")]
    MissingField { name: String, field: &'static str },
    /// `hidden_size` does not split evenly into the attention heads (and no `head_dim` says
    /// otherwise).
    #[error("{name}: hidden_size {hidden_size} is not a multiple of num_attention_heads {heads}")]
    UnevenHeads {
        name: String,
        hidden_size: usize,
        heads: usize,
    },
}

/// The preset called `name`, or an error listing the known ones.
pub fn kv_shape(name: &str) -> Result<KvShape, PresetError> {
    let &(name, num_layers, num_kv_heads, head_dim, max_len) = PRESETS
        .iter()
        .find(|p| p.0 == name)
        .ok_or_else(|| PresetError::UnknownPreset {
            name: name.to_string(),
        })?;
    Ok(KvShape {
        name: name.to_string(),
        num_layers,
        num_kv_heads,
        head_dim,
        dtype_bytes: 2,
        max_len,
    })
}

/// The KV shape of an HF model from its `config.json` text: `num_hidden_layers`,
/// `num_key_value_heads` (default `num_attention_heads`), `head_dim` (default `hidden_size /
/// num_attention_heads`), `max_position_embeddings` (default 4096) and `torch_dtype` (4 bytes for
/// float32, else 2). `name` labels the result.
pub fn kv_shape_from_hf_config(name: &str, json: &str) -> Result<KvShape, PresetError> {
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| PresetError::InvalidJson {
            name: name.to_string(),
            detail: e.to_string(),
        })?;
    let field = |key: &str| {
        v.get(key)
            .and_then(serde_json::Value::as_u64)
            .map(|x| x as usize)
    };
    let need = |key: &'static str| {
        field(key)
            .filter(|&x| x > 0)
            .ok_or_else(|| PresetError::MissingField {
                name: name.to_string(),
                field: key,
            })
    };
    let num_layers = need("num_hidden_layers")?;
    let heads = need("num_attention_heads")?;
    let num_kv_heads = field("num_key_value_heads")
        .filter(|&x| x > 0)
        .unwrap_or(heads);
    let head_dim = match field("head_dim").filter(|&x| x > 0) {
        Some(d) => d,
        None => {
            let hidden_size = need("hidden_size")?;
            if hidden_size % heads != 0 {
                return Err(PresetError::UnevenHeads {
                    name: name.to_string(),
                    hidden_size,
                    heads,
                });
            }
            hidden_size / heads
        }
    };
    let dtype_bytes = match v.get("torch_dtype").and_then(serde_json::Value::as_str) {
        Some("float32") => 4,
        _ => 2,
    };
    Ok(KvShape {
        name: name.to_string(),
        num_layers,
        num_kv_heads,
        head_dim,
        dtype_bytes,
        max_len: field("max_position_embeddings")
            .filter(|&x| x > 0)
            .unwrap_or(4096),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_config_fields_give_the_shape() {
        let json = r#"{"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                       "hidden_size": 576, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}"#;
        let s = kv_shape_from_hf_config("smollm2", json).unwrap();
        let preset = kv_shape("smollm2-135m").unwrap();
        assert_eq!(s.bytes_per_token(), preset.bytes_per_token());
        assert_eq!(s.max_len, 8192);
        let err = kv_shape_from_hf_config("x", r#"{"num_attention_heads": 8}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("num_hidden_layers"), "{err}");
        assert!(kv_shape_from_hf_config("x", "{oops")
            .unwrap_err()
            .to_string()
            .contains("not valid JSON"));
    }

    #[test]
    fn llama_3_8b_holds_128_kib_per_token() {
        assert_eq!(kv_shape("llama-3-8b").unwrap().bytes_per_token(), 128 << 10);
        assert!(kv_shape("gpt-5")
            .unwrap_err()
            .to_string()
            .contains("llama-3-8b"));
    }
}
