//! The Llama forward pass on the CPU: one call runs a flattened batch of sequence chunks — prefill
//! chunks and decode tokens mixed, each at its own position — writing their K and V into a
//! [`KvCache`] and attending over it, so the same code serves the paged and the vmm KV modes.
//!
//! Per layer: RMSNorm → Q, K, V projections → RoPE → KV append → causal GQA attention per token
//! over its sequence's cache → output projection + residual → RMSNorm → SwiGLU MLP + residual.
//! Matrices stay in their GGUF format when the CPU multiplies it directly (Q4_1, Q8_0: decode
//! reads ~6× fewer bytes) and are dequantized to f32 otherwise. Products with quantized matrices
//! quantize the activations to 8 bits and run integer kernels by default
//! ([`vkv_kernels::cpu::matmul_w_int8`]: faster, and batch-invariant), or keep them f32
//! ([`Activations::F32`], the reference: [`vkv_kernels::cpu::matmul_w`]); f32 matrices go
//! through `gemm`. The rest runs on the CPU ops of the kernels crate. A batch of several
//! sequences runs as two halves side by side, each through every layer on its own thread (data
//! parallelism over sequences, as a serving engine with one worker per core would), instead of a
//! parallel region per operation: every operation is per row, so results do not change.

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use vkv_kernels::cpu::{self, Activations, KvRef, Weight};

use super::{LlamaConfig, ModelError};
use crate::kv::{KvCache, SeqId};
use crate::weights::gguf::{GgmlType, GgufFile};
use crate::weights::safetensors::Checkpoint;

/// One sequence's part of a batch: `tokens` at positions `start..start + tokens.len()`.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    pub start: usize,
    /// Return logits for every token of the chunk, not only the last.
    pub all_logits: bool,
}

/// Why [`check_batch`] refused a batch; each variant names the sequence and the numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum BatchError {
    /// A chunk with no tokens, or a second chunk of a sequence already in the batch.
    #[error("sequence {seq}: expected one non-empty chunk, found an empty or repeated chunk")]
    EmptyOrRepeated { seq: SeqId },
    /// A token id at or past the vocabulary size.
    #[error("token id {token} is outside the vocabulary of {vocab_size}")]
    TokenOutsideVocab { token: u32, vocab_size: usize },
    /// A chunk whose end passes the model's context length.
    #[error("sequence {seq} would reach {end} tokens, over the context length {context_len}")]
    PastContext {
        seq: SeqId,
        end: usize,
        context_len: usize,
    },
    /// A sequence with no KV memory reserved.
    #[error("sequence {seq} holds no KV memory: reserve its tokens before the forward pass")]
    NotReserved { seq: SeqId },
    /// A chunk ending past what its sequence has reserved.
    #[error(
        "sequence {seq} would reach {end} tokens but {reserved} are reserved: reserve before the forward pass"
    )]
    PastReserved {
        seq: SeqId,
        end: usize,
        reserved: usize,
    },
}

/// The checks both forward passes make before touching memory: every chunk non-empty, one per
/// sequence, its token ids in the vocabulary, its end within the context length, and its start
/// no further than what `held(seq)` says its KV cache holds. The error says which and why.
pub(crate) fn check_batch(
    batch: &[SeqChunk<'_>],
    c: &LlamaConfig,
    held: impl Fn(SeqId) -> Option<usize>,
) -> Result<(), BatchError> {
    let mut seen = std::collections::HashSet::new();
    for chunk in batch {
        let seq = chunk.seq;
        if chunk.tokens.is_empty() || !seen.insert(seq) {
            return Err(BatchError::EmptyOrRepeated { seq });
        }
        if let Some(&token) = chunk.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(BatchError::TokenOutsideVocab {
                token,
                vocab_size: c.vocab_size,
            });
        }
        let end = chunk.start + chunk.tokens.len();
        if end > c.max_position_embeddings {
            return Err(BatchError::PastContext {
                seq,
                end,
                context_len: c.max_position_embeddings,
            });
        }
        // The scheduler reserved `end` tokens before the step; the chunk's own tokens are
        // written at `start..end`, so everything before `start` must be there already.
        let Some(reserved) = held(seq) else {
            return Err(BatchError::NotReserved { seq });
        };
        if end > reserved {
            return Err(BatchError::PastReserved { seq, end, reserved });
        }
    }
    Ok(())
}

struct Layer {
    attn_norm: Vec<f32>,
    /// Q, K, V projections.
    qkv: Projections,
    wo: Weight,
    ffn_norm: Vec<f32>,
    /// Gate and up projections.
    gate_up: Projections,
    w_down: Weight,
}

/// Projections of the same input: stacked into one matrix when they share a format (one product,
/// one parallel region, instead of several), else kept apart. Either way each output row is the
/// same dot products.
enum Projections {
    Stacked(Weight),
    Apart(Vec<Weight>),
}

impl Projections {
    fn new(parts: Vec<Weight>) -> Self {
        match Weight::stack_rows(parts) {
            Ok(w) => Projections::Stacked(w),
            Err(parts) => Projections::Apart(parts),
        }
    }
}

/// A Llama-family model with f32 weights (see the module docs).
pub struct Llama {
    pub config: LlamaConfig,
    embed: Weight,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Option<Weight>,
    inv_freq: Vec<f32>,
    /// Every product row-wise ([`cpu::matmul_w_rowwise`]): a sequence's logits do not depend on
    /// what else is in the batch. Off by default (prefill is slower).
    batch_invariant: bool,
    /// How activations meet quantized matrices: 8-bit integer dot products (the default: faster,
    /// and batch-invariant whatever `batch_invariant` says) or f32 (the reference).
    activations: Activations,
}

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
fn to_f32(w: Weight, len: usize) -> Vec<f32> {
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

fn dense(w: &Weight, rows: usize, cols: usize) -> Vec<f32> {
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

    /// Make every sequence's results independent of the batch it runs in (see the field).
    pub fn set_batch_invariant(&mut self, on: bool) {
        self.batch_invariant = on;
    }

    pub fn batch_invariant(&self) -> bool {
        self.batch_invariant
    }

    /// Use 8-bit activations with integer products, or f32, for quantized matrices (see the
    /// field). `VKV_CPU_ACTIVATIONS=f32|int8` sets it at load.
    pub fn set_activations(&mut self, a: Activations) {
        self.activations = a;
        if a == Activations::Int8 {
            self.pack_int8();
        }
    }

    /// Repack every quantized matrix for the integer kernels now (see [`Weight::pack_int8`]).
    fn pack_int8(&self) {
        let c = &self.config;
        let (h, q, i) = (c.hidden_size, c.num_heads * c.head_dim, c.intermediate_size);
        let mut all: Vec<(&Weight, usize)> = Vec::new();
        for layer in &self.layers {
            for p in [&layer.qkv, &layer.gate_up] {
                match p {
                    Projections::Stacked(w) => all.push((w, h)),
                    Projections::Apart(parts) => all.extend(parts.iter().map(|w| (w, h))),
                }
            }
            all.extend([(&layer.wo, q), (&layer.w_down, i)]);
        }
        all.push((self.lm_head.as_ref().unwrap_or(&self.embed), h));
        all.par_iter().for_each(|(w, k)| w.pack_int8(*k));
    }

    pub fn activations(&self) -> Activations {
        self.activations
    }

    fn matmul(&self, x: &[f32], m: usize, k: usize, w: &Weight, n: usize, out: &mut [f32]) {
        if self.activations == Activations::Int8 && w.is_quantized() {
            cpu::matmul_w_int8(x, m, k, w, n, out)
        } else if self.batch_invariant {
            cpu::matmul_w_rowwise(x, m, k, w, n, out)
        } else {
            cpu::matmul_w(x, m, k, w, n, out)
        }
    }

    /// `outs[i] = x · parts[i]ᵀ` (`[m][widths[i]]` each), in one product when stacked: the int8
    /// products write each part's columns to its output, the others go through `scratch` (the
    /// `[m][Σ widths]` result) and copy.
    fn project(
        &self,
        p: &Projections,
        x: &[f32],
        m: usize,
        k: usize,
        outs: &mut [(&mut [f32], usize)],
        scratch: &mut Vec<f32>,
    ) {
        match p {
            Projections::Apart(parts) => {
                for (w, (out, n)) in parts.iter().zip(outs.iter_mut()) {
                    self.matmul(x, m, k, w, *n, out);
                }
            }
            Projections::Stacked(w)
                if self.activations == Activations::Int8 && w.is_quantized() =>
            {
                // Each part's columns straight into its output.
                cpu::matmul_w_int8_split(x, m, k, w, outs);
            }
            Projections::Stacked(w) => {
                let total: usize = outs.iter().map(|(_, n)| n).sum();
                scratch.resize(m * total, 0.0);
                self.matmul(x, m, k, w, total, scratch);
                cpu::split_columns(scratch, m, outs);
            }
        }
    }

    /// Run one batch over KV memory reserved for it (by the scheduler, or
    /// [`super::reserve_batch`]): a chunk whose tokens are not reserved is an error, and the
    /// pass itself never allocates. Returns, per chunk, the logits of its last token
    /// (`vocab_size` values) or of all its tokens when `all_logits`.
    pub fn forward(
        &self,
        batch: &[SeqChunk<'_>],
        kv: &dyn KvCache,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        // Run on a worker of the thread pool, not beside it: the serial parts (norms, RoPE, KV
        // appends) then take a worker's core instead of competing with workers that spin
        // between parallel regions (on this 2-core machine, measured in alternating runs on a
        // busy machine: single-sequence decode 70-72 tokens/s on a worker, 60-61 beside).
        rayon::scope(|_| self.forward_here(batch, kv))
    }

    fn forward_here(
        &self,
        batch: &[SeqChunk<'_>],
        kv: &dyn KvCache,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let c = &self.config;
        let (nkv, hd) = (c.num_kv_heads, c.head_dim);
        let dims = kv.dims();
        if (dims.num_layers, dims.num_kv_heads, dims.head_dim) != (c.num_layers, nkv, hd) {
            return Err(ModelError::Batch(format!(
                "KV cache shaped {dims:?} does not fit the model"
            )));
        }
        check_batch(batch, c, |seq| kv.reserved(seq))
            .map_err(|e| ModelError::Batch(e.to_string()))?;
        // Every chunk's KV addressing, per layer: `refs[l][chunk]`.
        let refs: Vec<Vec<KvRef<'_>>> = (0..c.num_layers)
            .map(|l| batch.iter().map(|ch| kv.layer(ch.seq, l)).collect())
            .collect::<Result<_, _>>()?;
        match split_point(batch) {
            Some(at) => {
                // Two halves of the batch side by side, each through every layer on its own
                // thread (and helping the other through work stealing when it is done first):
                // no parallel region per product, norm or attention, where a decode step of 16
                // sequences had ~9 per layer, each a wake-up of the other core and a wait at its
                // end. A row's result does not change: every operation is per row, and the
                // integer products are batch-invariant.
                let (left, right) = refs
                    .iter()
                    .map(|r| r.split_at(at))
                    .unzip::<_, _, Vec<_>, Vec<_>>();
                // The output head runs once for both halves: its 30-100 MB of weights are then
                // read once a step, for every row together.
                let (mut hidden, b) = rayon::join(
                    || self.layers(&batch[..at], &left),
                    || self.layers(&batch[at..], &right),
                );
                hidden.extend(b);
                Ok(self.head(batch, &hidden))
            }
            None => {
                let refs: Vec<&[KvRef<'_>]> = refs.iter().map(|r| r.as_slice()).collect();
                Ok(self.head(batch, &self.layers(batch, &refs)))
            }
        }
    }

    /// Every layer of `batch` after its KV is reserved: `refs[l][chunk]` addresses each chunk's
    /// KV in layer `l`. Returns the final hidden states of the rows whose logits
    /// [`Llama::forward`] returns (per chunk its last row, or all its rows when `all_logits`).
    fn layers(&self, batch: &[SeqChunk<'_>], refs: &[&[KvRef<'_>]]) -> Vec<f32> {
        let c = &self.config;
        let (h, nh, nkv, hd) = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
        // Flatten: row r is token `tokens[r]` of chunk `owner[r]` at `positions[r]`.
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut owner = Vec::new();
        for (ci, chunk) in batch.iter().enumerate() {
            for (j, &t) in chunk.tokens.iter().enumerate() {
                tokens.push(t as usize);
                positions.push(chunk.start + j);
                owner.push(ci);
            }
        }
        let rows = tokens.len();
        let mut x = vec![0f32; rows * h];
        for (r, &t) in tokens.iter().enumerate() {
            self.embed.row(t, h, &mut x[r * h..(r + 1) * h]);
        }
        let (qw, kvw, iw) = (nh * hd, nkv * hd, c.intermediate_size);
        let mut xn = vec![0f32; rows * h];
        let (mut q, mut k, mut v) = (
            vec![0f32; rows * qw],
            vec![0f32; rows * kvw],
            vec![0f32; rows * kvw],
        );
        let mut attn = vec![0f32; rows * qw];
        let mut o = vec![0f32; rows * h];
        let (mut gate, mut up) = (vec![0f32; rows * iw], vec![0f32; rows * iw]);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut scratch = Vec::new();
        let angles = cpu::RopeTable::new(&positions, &self.inv_freq);
        // Attention's row blocks: up to QUERY_BLOCK consecutive rows of one chunk.
        let mut query_blocks = Vec::new();
        let mut r = 0;
        for chunk in batch {
            for at in (0..chunk.tokens.len()).step_by(QUERY_BLOCK) {
                query_blocks.push((r + at, QUERY_BLOCK.min(chunk.tokens.len() - at)));
            }
            r += chunk.tokens.len();
        }
        for (l, layer) in self.layers.iter().enumerate() {
            cpu::rms_norm(&x, &layer.attn_norm, c.rms_norm_eps, &mut xn);
            self.project(
                &layer.qkv,
                &xn,
                rows,
                h,
                &mut [(&mut q, qw), (&mut k, kvw), (&mut v, kvw)],
                &mut scratch,
            );
            cpu::rope_rotate(&mut q, &angles, nh, hd, c.rope_style);
            cpu::rope_rotate(&mut k, &angles, nkv, hd, c.rope_style);
            let refs = refs[l];
            for r in 0..rows {
                // SAFETY: every chunk's tokens are reserved (checked above); rows write distinct tokens.
                unsafe {
                    cpu::kv_append(
                        &refs[owner[r]],
                        positions[r],
                        &k[r * kvw..(r + 1) * kvw],
                        &v[r * kvw..(r + 1) * kvw],
                        nkv,
                        hd,
                    )
                };
            }
            // One task per (block of a chunk's consecutive rows, KV head): the query heads of a
            // GQA group, and the rows of a prefill chunk, read its K and V once.
            let group = nh / nkv;
            let out = AttnOut(attn.as_mut_ptr());
            (0..query_blocks.len() * nkv)
                .into_par_iter()
                .for_each_init(Vec::new, |scratch, i| {
                    let ((r0, count), g) = (query_blocks[i / nkv], i % nkv);
                    let rows = cpu::QueryRows {
                        q: &q[r0 * qw + g * group * hd..],
                        q_stride: qw,
                        count,
                        first_context: positions[r0] + 1,
                        kv_head: g,
                        group,
                        head_dim: hd,
                        scale,
                        out: out.at(r0 * qw + g * group * hd),
                        out_stride: qw,
                    };
                    // SAFETY: every token up to each row's position was written above or
                    // earlier; tasks write disjoint (rows, group) blocks of `attn`.
                    unsafe { cpu::attention_rows(&rows, &refs[owner[r0]], scratch) };
                });
            self.matmul(&attn, rows, qw, &layer.wo, h, &mut o);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            cpu::rms_norm(&x, &layer.ffn_norm, c.rms_norm_eps, &mut xn);
            self.project(
                &layer.gate_up,
                &xn,
                rows,
                h,
                &mut [(&mut gate, iw), (&mut up, iw)],
                &mut scratch,
            );
            cpu::silu_mul(&mut gate, &up);
            self.matmul(&gate, rows, iw, &layer.w_down, h, &mut o);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        }
        // Logits for the rows asked for.
        let mut wanted = Vec::new();
        let mut row = 0;
        for chunk in batch {
            let n = chunk.tokens.len();
            if chunk.all_logits {
                wanted.extend(row..row + n);
            } else {
                wanted.push(row + n - 1);
            }
            row += n;
        }
        let mut sel = vec![0f32; wanted.len() * h];
        for (i, &r) in wanted.iter().enumerate() {
            sel[i * h..(i + 1) * h].copy_from_slice(&x[r * h..(r + 1) * h]);
        }
        sel
    }

    /// The logits of `hidden` (the final hidden states [`Llama::layers`] returns for `batch`,
    /// in order), per chunk.
    fn head(&self, batch: &[SeqChunk<'_>], hidden: &[f32]) -> Vec<Vec<f32>> {
        let c = &self.config;
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        let rows = hidden.len() / h;
        let mut normed = vec![0f32; hidden.len()];
        cpu::rms_norm(hidden, &self.norm, c.rms_norm_eps, &mut normed);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; rows * vocab];
        self.matmul(&normed, rows, h, head, vocab, &mut logits);
        let mut out = Vec::with_capacity(batch.len());
        let mut at = 0;
        for chunk in batch {
            let n = if chunk.all_logits {
                chunk.tokens.len()
            } else {
                1
            };
            out.push(logits[at * vocab..(at + n) * vocab].to_vec());
            at += n;
        }
        out
    }
}

/// Consecutive rows of a chunk that attend together (`cpu::attention_rows`): each K and V row
/// is converted and loaded once for them all.
const QUERY_BLOCK: usize = 16;

/// The attention output that the tasks of a layer write, each its own rows and group.
struct AttnOut(*mut f32);
// SAFETY: tasks write disjoint elements (see `Llama::layers`).
unsafe impl Sync for AttnOut {}

impl AttnOut {
    /// Element `i`.
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Where to cut a batch into two halves that run side by side (see `Llama::forward_here`): the
/// chunk boundary nearest half the rows, or `None` for a single chunk.
fn split_point(batch: &[SeqChunk<'_>]) -> Option<usize> {
    if batch.len() < 2 {
        return None;
    }
    let total: usize = batch.iter().map(|c| c.tokens.len()).sum();
    let mut rows = 0;
    let mut best = (usize::MAX, 1);
    for (i, chunk) in batch[..batch.len() - 1].iter().enumerate() {
        rows += chunk.tokens.len();
        let off = rows.abs_diff(total - rows);
        if off < best.0 {
            best = (off, i + 1);
        }
    }
    Some(best.1)
}

#[cfg(test)]
#[path = "llama_tests.rs"]
mod tests;
