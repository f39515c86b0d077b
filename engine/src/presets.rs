//! KV-cache shapes of well-known models: what decides KV bytes per token (layers, KV heads, head
//! dimension, element size). Used wherever a model's shape matters without its weights —
//! `vkv bench vmm` today, `vkv frag` and the random-weight presets later.
//!
//! Figures are from each model's published `config.json`: `num_hidden_layers`,
//! `num_key_value_heads` (or `num_attention_heads` without GQA), `hidden_size / num_attention_heads`.

/// The KV-relevant shape of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvShape {
    pub name: &'static str,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Bytes per KV element (2: fp16/bf16).
    pub dtype_bytes: usize,
}

impl KvShape {
    /// Bytes of K and V of one token over all layers.
    pub fn bytes_per_token(&self) -> usize {
        2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes
    }
}

const fn shape(
    name: &'static str,
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
) -> KvShape {
    KvShape {
        name,
        num_layers,
        num_kv_heads,
        head_dim,
        dtype_bytes: 2,
    }
}

/// Every preset, by name.
pub const KV_SHAPES: &[KvShape] = &[
    shape("llama-3-8b", 32, 8, 128),
    shape("llama-2-7b", 32, 32, 128),
    shape("mistral-7b", 32, 8, 128),
    shape("yi-6b", 32, 4, 128),
    shape("yi-34b", 60, 8, 128),
    shape("opt-13b", 40, 40, 128),
    shape("smollm2-135m", 30, 3, 64),
];

/// The preset called `name`, or an error listing the known ones.
pub fn kv_shape(name: &str) -> Result<KvShape, String> {
    KV_SHAPES
        .iter()
        .find(|s| s.name == name)
        .copied()
        .ok_or_else(|| {
            let known: Vec<&str> = KV_SHAPES.iter().map(|s| s.name).collect();
            format!("unknown model preset {name:?}; known: {}", known.join(", "))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_3_8b_holds_128_kib_per_token() {
        assert_eq!(kv_shape("llama-3-8b").unwrap().bytes_per_token(), 128 << 10);
        assert!(kv_shape("gpt-5").unwrap_err().contains("llama-3-8b"));
    }
}
