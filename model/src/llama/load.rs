//! Building a [`Llama`]: from a GGUF file (tensors kept in their quantized format where the CPU
//! multiplies it directly), from a Hugging Face checkpoint directory (`config.json` +
//! safetensors), or from seeded random values at a real model's shapes; and the dense f32 views of
//! the weights that another device uploads. Invariant: every tensor's element count is checked
//! against the config before the model exists, so a wrong file is a [`ModelError`], not a panic in
//! the forward pass. Tensor names follow llama.cpp's GGUF names and HF's Llama names.

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;

use vkv_kernels::cpu::{self, Activations, Weight};

use super::{Layer, Llama, Projections};
use crate::weights::gguf::{GgmlType, GgufFile};
use crate::weights::safetensors::Checkpoint;
use crate::{LlamaConfig, ModelError};

/// Names of a layer's tensors in GGUF and in HF checkpoints, in `Layer` field order.
const GGUF_LAYER: [&str; 9] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];
const HF_LAYER: [&str; 9] = [
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A vector parameter (a norm's weight) as plain f32.
pub(super) fn to_f32(w: Weight, len: usize) -> Vec<f32> {
    match w {
        Weight::F32(v) => v,
        other => {
            let mut v = vec![0f32; len];
            other.row(0, len, &mut v);
            v
        }
    }
}

/// One layer's weights as f32 row-major `[out][in]` matrices, for uploading to another device.
#[derive(Debug, Clone)]
pub struct DenseLayer {
    pub attn_norm: Vec<f32>,
    /// Q, K and V projections stacked: `[(heads + 2·kv_heads)·head_dim][hidden]`.
    pub qkv: Vec<f32>,
    pub wo: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    /// Gate and up projections stacked: `[2·intermediate][hidden]`.
    pub gate_up: Vec<f32>,
    pub w_down: Vec<f32>,
}

pub(super) fn dense(w: &Weight, rows: usize, cols: usize) -> Vec<f32> {
    if let Weight::F32(v) = w {
        return v.clone();
    }
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols)
        .enumerate()
        .for_each(|(r, o)| w.row(r, cols, o));
    out
}

fn dense_projections(p: &Projections, rows: &[usize], cols: usize) -> Vec<f32> {
    match p {
        Projections::Stacked(w) => dense(w, rows.iter().sum(), cols),
        Projections::Apart(parts) => parts
            .iter()
            .zip(rows)
            .flat_map(|(w, &r)| dense(w, r, cols))
            .collect(),
    }
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// `n` values `offset + uniform(-scale, scale)`, rounded to bf16; value `i` depends only on
/// `(seed, i)` (splitmix64), so the fill runs in parallel and is the same on every machine.
fn random_values(seed: u64, n: usize, scale: f32, offset: f32) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(c, out)| {
        for (j, o) in out.iter_mut().enumerate() {
            let i = (c << 16) + j;
            let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9e3779b97f4a7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
            z ^= z >> 31;
            let u = (z >> 40) as f32 * (2.0 / 16777216.0) - 1.0;
            *o = half::bf16::from_f32(offset + scale * u).to_f32();
        }
    });
    v
}

impl Llama {
    /// Assemble a model from a configuration and a source of named f32 tensors, checking every
    /// tensor's element count.
    fn build(
        config: LlamaConfig,
        mut get: impl FnMut(&str) -> Result<Option<Weight>, ModelError>,
        names: &dyn Fn(usize, usize) -> String,
        globals: [&str; 4],
        rope_factors: Option<Vec<f32>>,
    ) -> Result<Self, ModelError> {
        let c = &config;
        let (h, i, q, kv) = (
            c.hidden_size,
            c.intermediate_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let mut need = |name: &str, len: usize| -> Result<Weight, ModelError> {
            let t = get(name)?.ok_or_else(|| ModelError::Tensor {
                name: name.into(),
                detail: "missing".into(),
            })?;
            if t.len() != len {
                return Err(ModelError::Tensor {
                    name: name.into(),
                    detail: format!("expected {len} elements, found {}", t.len()),
                });
            }
            Ok(t)
        };
        let embed = need(globals[0], c.vocab_size * h)?;
        let sizes = [h, q * h, kv * h, kv * h, h * q, h, i * h, i * h, h * i];
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let mut t: Vec<Weight> = Vec::with_capacity(9);
            for (j, &len) in sizes.iter().enumerate() {
                t.push(need(&names(l, j), len)?);
            }
            let mut t = t.into_iter();
            let mut next = || t.next().expect("nine tensors");
            let attn_norm = to_f32(next(), h);
            let qkv = Projections::new(vec![next(), next(), next()]);
            let wo = next();
            let ffn_norm = to_f32(next(), h);
            let gate_up = Projections::new(vec![next(), next()]);
            layers.push(Layer {
                attn_norm,
                qkv,
                wo,
                ffn_norm,
                gate_up,
                w_down: next(),
            });
        }
        let norm = to_f32(need(globals[1], h)?, h);
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(need(globals[2], c.vocab_size * h)?)
        };
        let mut inv_freq = cpu::rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling);
        if let Some(factors) = rope_factors {
            if factors.len() != inv_freq.len() {
                return Err(ModelError::Tensor {
                    name: globals[3].into(),
                    detail: format!(
                        "expected {} factors, found {}",
                        inv_freq.len(),
                        factors.len()
                    ),
                });
            }
            for (f, s) in inv_freq.iter_mut().zip(factors) {
                *f /= s;
            }
        }
        let mut model = Llama {
            config,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            batch_invariant: false,
            activations: Activations::F32,
        };
        model.set_activations(Activations::from_switches(Activations::Int8));
        Ok(model)
    }

    /// Load a GGUF file (any quantization the reader dequantizes).
    pub fn from_gguf(g: &GgufFile) -> Result<Self, ModelError> {
        let config = LlamaConfig::from_gguf(g)?;
        // Q4_1 and Q8_0 matrices stay quantized (their rows must be whole blocks).
        let get = |name: &str| -> Result<Option<Weight>, ModelError> {
            let Some(t) = g.tensor(name) else {
                return Ok(None);
            };
            let whole_blocks = t.dims.len() == 2 && t.dims[0] % cpu::BLOCK as u64 == 0;
            Ok(Some(match t.dtype {
                GgmlType::Q4_1 if whole_blocks => Weight::from_q4_1(g.tensor_bytes(name)?),
                GgmlType::Q8_0 if whole_blocks => Weight::from_q8_0(g.tensor_bytes(name)?),
                _ => Weight::F32(g.dequantize(name)?),
            }))
        };
        let rope_factors = match g.tensor("rope_freqs.weight") {
            Some(_) => Some(g.dequantize("rope_freqs.weight")?),
            None => None,
        };
        let names = |l: usize, j: usize| format!("blk.{l}.{}.weight", GGUF_LAYER[j]);
        Llama::build(
            config,
            get,
            &names,
            [
                "token_embd.weight",
                "output_norm.weight",
                "output.weight",
                "rope_freqs.weight",
            ],
            rope_factors,
        )
    }

    /// Load an HF directory: `config.json` and `*.safetensors` (F32, F16 or BF16 tensors, one
    /// file or shards). HF checkpoints keep Q and K rows in the order HF's `rotate_half` RoPE
    /// pairs them (dimension `i` with `i + head_dim/2`: [`RopeStyle::Half`], which
    /// [`LlamaConfig::from_hf_json`] sets), so they load as stored; GGUF files are the ones whose
    /// converter permuted those rows for adjacent pairs ([`RopeStyle::Interleaved`]). Every
    /// matrix's shape is checked against the configuration (`[out][in]`, HF's `nn.Linear`).
    ///
    /// [`RopeStyle::Half`]: vkv_kernels::cpu::RopeStyle::Half
    /// [`RopeStyle::Interleaved`]: vkv_kernels::cpu::RopeStyle::Interleaved
    pub fn from_hf_dir(dir: &Path) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| ModelError::Io {
            path: config_path.display().to_string(),
            detail: e.to_string(),
        })?;
        let config = LlamaConfig::from_hf_json(&text)?;
        let ck = Checkpoint::open_dir(dir)?;
        let c = &config;
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let layer_shapes: [&[usize]; 9] = [
            &[h],
            &[q, h],
            &[kv, h],
            &[kv, h],
            &[h, q],
            &[h],
            &[i, h],
            &[i, h],
            &[h, i],
        ];
        let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
        shapes.insert("model.embed_tokens.weight".into(), vec![v, h]);
        shapes.insert("model.norm.weight".into(), vec![h]);
        shapes.insert("lm_head.weight".into(), vec![v, h]);
        for l in 0..c.num_layers {
            for (j, s) in layer_shapes.iter().enumerate() {
                shapes.insert(
                    format!("model.layers.{l}.{}.weight", HF_LAYER[j]),
                    s.to_vec(),
                );
            }
        }
        let get = |name: &str| -> Result<Option<Weight>, ModelError> {
            if let (Some((found, _)), Some(want)) = (ck.info(name), shapes.get(name)) {
                if found != want.as_slice() {
                    return Err(ModelError::Tensor {
                        name: name.into(),
                        detail: format!(
                            "expected shape {want:?} (from config.json), found {found:?}"
                        ),
                    });
                }
            }
            Ok(ck.to_f32(name)?.map(Weight::F32))
        };
        let names = |l: usize, j: usize| format!("model.layers.{l}.{}.weight", HF_LAYER[j]);
        Llama::build(
            config,
            get,
            &names,
            [
                "model.embed_tokens.weight",
                "model.norm.weight",
                "lm_head.weight",
                "-",
            ],
            None,
        )
    }

    /// A model of `config`'s shape with seeded random weights, for benchmarks and tests that need
    /// shapes, not knowledge: matrices uniform in ±√(3 / fan-in) (unit-variance products), the
    /// embedding uniform in ±1, norms 1 ± 0.1; every value rounded to bf16, so a bf16 copy of the
    /// weights (the GPU's) is exact. The same `(config, seed)` gives the same weights on any
    /// machine and thread count. Memory: 4 bytes per parameter (f32) — small presets only.
    pub fn random(config: LlamaConfig, seed: u64) -> Result<Self, ModelError> {
        let config = config.checked()?;
        let c = config.clone();
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let q = c.num_heads * c.head_dim;
        let layer_fan_in = |j: usize| match j {
            4 => q,
            8 => i,
            _ => h,
        };
        let get = |name: &str| -> Result<Option<Weight>, ModelError> {
            let (n, scale, offset) = if name == "embed" {
                (c.vocab_size * h, 1.0, 0.0)
            } else if name == "head" {
                (c.vocab_size * h, (3.0 / h as f32).sqrt(), 0.0)
            } else if name == "norm" {
                (h, 0.1, 1.0)
            } else {
                let (_, j) = name.split_once('.').unwrap_or(("", "0"));
                let j: usize = j.parse().unwrap_or(0);
                let n = match j {
                    0 | 5 => h,
                    1 => q * h,
                    2 | 3 => c.num_kv_heads * c.head_dim * h,
                    4 => h * q,
                    _ => i * h,
                };
                if j == 0 || j == 5 {
                    (n, 0.1, 1.0)
                } else {
                    (n, (3.0 / layer_fan_in(j) as f32).sqrt(), 0.0)
                }
            };
            Ok(Some(Weight::F32(random_values(
                seed ^ fnv1a(name),
                n,
                scale,
                offset,
            ))))
        };
        let names = |l: usize, j: usize| format!("{l}.{j}");
        Llama::build(config, get, &names, ["embed", "norm", "head", "-"], None)
    }

    /// The embedding table as f32 `[vocab][hidden]` (dequantized), for another device.
    pub fn dense_embedding(&self) -> Vec<f32> {
        dense(&self.embed, self.config.vocab_size, self.config.hidden_size)
    }

    /// The output head as f32 `[vocab][hidden]`, or `None` when it is the embedding (tied).
    pub fn dense_lm_head(&self) -> Option<Vec<f32>> {
        self.lm_head
            .as_ref()
            .map(|w| dense(w, self.config.vocab_size, self.config.hidden_size))
    }

    /// The final norm's weight.
    pub fn final_norm(&self) -> &[f32] {
        &self.norm
    }

    /// RoPE inverse frequencies (`head_dim / 2`, scaling and GGUF rope factors applied).
    pub fn rope_inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// Layer `l`'s weights as f32 row-major matrices (dequantized), or `None` past the last layer.
    pub fn dense_layer(&self, l: usize) -> Option<DenseLayer> {
        let c = &self.config;
        let layer = self.layers.get(l)?;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        Some(DenseLayer {
            attn_norm: layer.attn_norm.clone(),
            qkv: dense_projections(&layer.qkv, &[q, kv, kv], h),
            wo: dense(&layer.wo, h, q),
            ffn_norm: layer.ffn_norm.clone(),
            gate_up: dense_projections(&layer.gate_up, &[i, i], h),
            w_down: dense(&layer.w_down, h, i),
        })
    }
}
