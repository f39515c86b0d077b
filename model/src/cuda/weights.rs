//! The model's weights on the device: uploading a CPU [`Llama`]'s weights as bf16 (QKV and
//! gate/up fused into one matrix each, so a layer is five GEMMs), or drawing seeded random weights at
//! a real model's shapes directly on the device (for benchmarks of models whose files we do not
//! have), and what they occupy. Invariant: the layout is the one the step's GEMMs expect (row-major,
//! `[out, in]`), and the config is checked first (head dim 64 or 128, what the kernels take).

use std::sync::Arc;

use vkv_kernels::cuda::cudarc::driver::{CudaContext, CudaStream};
use vkv_kernels::cuda::{driver, Attention, DeviceBuffer, Gemm, ModelOps};

use super::{Buffers, CudaLlama, CudaModelError, DecodeGraphs, Result, BF16, MAX_GRAPH_BATCH};
use crate::{Llama, LlamaConfig};

/// One layer's weights on the device, bf16, with Q/K/V and gate/up fused.
pub(super) struct GpuLayer {
    pub(super) attn_norm: DeviceBuffer,
    pub(super) qkv: DeviceBuffer,
    pub(super) wo: DeviceBuffer,
    pub(super) ffn_norm: DeviceBuffer,
    pub(super) gate_up: DeviceBuffer,
    pub(super) w_down: DeviceBuffer,
}

fn bf16_bits(v: &[f32]) -> Vec<u16> {
    v.iter()
        .map(|x| half::bf16::from_f32(*x).to_bits())
        .collect()
}

impl CudaLlama {
    fn with_weights(
        ctx: &Arc<CudaContext>,
        config: LlamaConfig,
        inv_freq: &[f32],
        mut upload: impl FnMut(&CudaLlamaParts) -> Result<GpuWeights>,
    ) -> Result<Self> {
        // A stream of its own (the legacy default stream cannot be captured into a graph).
        let stream = ctx.new_stream().map_err(driver("cuStreamCreate"))?;
        let att = Attention::new(ctx)?;
        let ops = ModelOps::new(ctx)?;
        let gemm = Gemm::new(stream.clone())?;
        let parts = CudaLlamaParts {
            ctx: ctx.clone(),
            stream: stream.clone(),
        };
        let w = upload(&parts)?;
        Ok(CudaLlama {
            inv_freq: DeviceBuffer::from_slice(ctx, inv_freq)?,
            config,
            ctx: ctx.clone(),
            stream,
            att,
            ops,
            gemm,
            embed: w.embed,
            lm_head: w.lm_head,
            norm: w.norm,
            layers: w.layers,
            buf: Buffers::default(),
            pending: None,
            step_done: None,
            graphs: DecodeGraphs {
                on: true,
                max_batch: MAX_GRAPH_BATCH,
                ..DecodeGraphs::default()
            },
        })
    }

    /// Upload a CPU model's weights (dequantized, rounded to bf16).
    pub fn from_cpu(ctx: &Arc<CudaContext>, model: &Llama) -> Result<Self> {
        check_config(&model.config)?;
        let c = model.config.clone();
        Self::with_weights(ctx, c.clone(), model.rope_inv_freq(), |p| {
            let mut layers = Vec::with_capacity(c.num_layers);
            for l in 0..c.num_layers {
                let d = model
                    .dense_layer(l)
                    .ok_or_else(|| CudaModelError::Config(format!("no layer {l}")))?;
                layers.push(GpuLayer {
                    attn_norm: DeviceBuffer::from_slice(&p.ctx, &d.attn_norm)?,
                    qkv: DeviceBuffer::from_slice(&p.ctx, &bf16_bits(&d.qkv))?,
                    wo: DeviceBuffer::from_slice(&p.ctx, &bf16_bits(&d.wo))?,
                    ffn_norm: DeviceBuffer::from_slice(&p.ctx, &d.ffn_norm)?,
                    gate_up: DeviceBuffer::from_slice(&p.ctx, &bf16_bits(&d.gate_up))?,
                    w_down: DeviceBuffer::from_slice(&p.ctx, &bf16_bits(&d.w_down))?,
                });
            }
            Ok(GpuWeights {
                embed: DeviceBuffer::from_slice(&p.ctx, &bf16_bits(&model.dense_embedding()))?,
                lm_head: match model.dense_lm_head() {
                    Some(h) => Some(DeviceBuffer::from_slice(&p.ctx, &bf16_bits(&h))?),
                    None => None,
                },
                norm: DeviceBuffer::from_slice(&p.ctx, model.final_norm())?,
                layers,
            })
        })
    }

    /// Random weights made on the device (no host copy: for benchmarks at real shapes), with the
    /// scales of [`Llama::random`] (not the same values). Norm weights are 1.
    pub fn random_on_device(
        ctx: &Arc<CudaContext>,
        config: LlamaConfig,
        seed: u64,
    ) -> Result<Self> {
        check_config(&config)?;
        let c = config.clone();
        let inv = vkv_kernels::cpu::rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling);
        let ops = ModelOps::new(ctx)?;
        Self::with_weights(ctx, config, &inv, |p| {
            let (h, i) = (c.hidden_size, c.intermediate_size);
            let (q, kv) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
            let mut n = 0u64;
            let mut fill = |len: usize, fan_in: usize| -> Result<DeviceBuffer> {
                let b = DeviceBuffer::new(&p.ctx, len * BF16)?;
                n += 1;
                let scale = if fan_in == 0 {
                    1.0
                } else {
                    (3.0 / fan_in as f32).sqrt()
                };
                // SAFETY: b holds len bf16 values.
                unsafe { ops.fill_bf16(&p.stream, b.ptr(), len, seed.wrapping_add(n), scale)? };
                Ok(b)
            };
            let ones = vec![1f32; h];
            let mut layers = Vec::with_capacity(c.num_layers);
            for _ in 0..c.num_layers {
                layers.push(GpuLayer {
                    attn_norm: DeviceBuffer::from_slice(&p.ctx, &ones)?,
                    qkv: fill((q + 2 * kv) * h, h)?,
                    wo: fill(h * q, q)?,
                    ffn_norm: DeviceBuffer::from_slice(&p.ctx, &ones)?,
                    gate_up: fill(2 * i * h, h)?,
                    w_down: fill(h * i, i)?,
                });
            }
            let embed = fill(c.vocab_size * h, 0)?;
            let lm_head = if c.tie_word_embeddings {
                None
            } else {
                Some(fill(c.vocab_size * h, h)?)
            };
            p.stream
                .synchronize()
                .map_err(driver("cuStreamSynchronize"))?;
            Ok(GpuWeights {
                embed,
                lm_head,
                norm: DeviceBuffer::from_slice(&p.ctx, &ones)?,
                layers,
            })
        })
    }

    /// Bytes of weights on the device.
    pub fn weight_bytes(&self) -> usize {
        let layer: usize = self
            .layers
            .iter()
            .map(|l| {
                [
                    &l.attn_norm,
                    &l.qkv,
                    &l.wo,
                    &l.ffn_norm,
                    &l.gate_up,
                    &l.w_down,
                ]
                .iter()
                .map(|b| b.bytes())
                .sum::<usize>()
            })
            .sum();
        layer
            + self.embed.bytes()
            + self.lm_head.as_ref().map_or(0, |b| b.bytes())
            + self.norm.bytes()
    }
}

/// What weight uploaders get.
struct CudaLlamaParts {
    pub(super) ctx: Arc<CudaContext>,
    pub(super) stream: Arc<CudaStream>,
}

struct GpuWeights {
    pub(super) embed: DeviceBuffer,
    pub(super) lm_head: Option<DeviceBuffer>,
    pub(super) norm: DeviceBuffer,
    pub(super) layers: Vec<GpuLayer>,
}

fn check_config(c: &LlamaConfig) -> Result<()> {
    if c.head_dim != 64 && c.head_dim != 128 {
        return Err(CudaModelError::Config(format!(
            "head dim {}: the CUDA attention kernels take 64 or 128",
            c.head_dim
        )));
    }
    Ok(())
}
