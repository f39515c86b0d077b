//! The Llama forward pass on a CUDA GPU, in bf16: [`CudaLlama`] runs the same flattened batches of
//! [`SeqChunk`]s as the CPU [`Llama::forward`] (prefill chunks and decode tokens mixed, each at its
//! own position) over a [`GpuKv`] — the device KV cache the `kv` module owns, paged (vLLM's
//! PagedAttention: block pools and block tables) or vmm (vAttention: a `KvSpace` on `CudaVmm`).
//! The pass reads the cache's addressing ([`GpuKvAddressing`]) and never reserves: the scheduler
//! (or [`super::reserve_batch`]) reserves every chunk's tokens first, and the pass checks.
//!
//! Per step: the batch's tokens, positions, chunk bounds and KV addressing are uploaded once;
//! then per layer: RMSNorm (residual add fused) → one QKV GEMM (cuBLASLt, bf16 in, f32 accumulate)
//! → RoPE fused with the split into Q, K, V → KV append → attention (the decode kernel when every
//! chunk is one token, else the ragged prefill kernel, which also serves mixed batches) → output
//! GEMM → RMSNorm (+ residual) → gate/up GEMM → SiLU·mul → down GEMM. The residual stream is
//! f32; every matrix and activation crossing a GEMM is bf16 (as vLLM and HF run bf16 models).
//! Logits are f32 (the GEMM writes f32). Everything runs on one stream of the model's own (a
//! non-blocking one: the legacy default stream cannot be captured); the step's inputs are uploaded
//! on it (`cuMemcpyHtoDAsync`), and results are downloaded after synchronizing it.
//!
//! Decode steps run as CUDA graphs (vLLM's CUDA-graph runner; [`DecodeGraphs`]): the batch is
//! padded up to a bucket of rows and the longest context up to a bucket, so a step of a shape seen
//! before is one `cuGraphLaunch` instead of ~11 launches per layer. `set_cuda_graphs(false)`
//! (`--enforce-eager`) runs every step kernel by kernel.
//!
//! Invariants: every chunk's tokens are reserved before the pass (checked); the pass changes no
//! KV books. Errors are [`CudaModelError`]s, never panics.

use std::collections::HashMap;
use std::sync::Arc;

use vkv_kernels::cpu::RopeStyle;
use vkv_kernels::cuda::cudarc::driver::{CudaContext, CudaEvent, CudaGraph, CudaStream};
use vkv_kernels::cuda::{
    driver, AppendArgs, Attention, DecodeArgs, DecodeShape, DecodeWorkspace, DeviceBuffer, Dtype,
    Gemm, GemmLibrary, KernelError, KvAddress, ModelOps, PrefillArgs, PrefillShape,
};
use vkv_vmm::VmmError;

use super::llama::check_batch;
use super::{Llama, LlamaConfig, SeqChunk};
use crate::device::Next;
use crate::kv::{GpuKv, GpuKvAddressing, KvError, SeqId};

/// Errors of the CUDA model and its KV cache.
#[derive(Debug, thiserror::Error)]
pub enum CudaModelError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
    #[error("batch: {0}")]
    Batch(String),
    #[error("model: {0}")]
    Config(String),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Model(#[from] super::ModelError),
}

type Result<T, E = CudaModelError> = std::result::Result<T, E>;

const BF16: usize = 2;

struct GpuLayer {
    attn_norm: DeviceBuffer,
    qkv: DeviceBuffer,
    wo: DeviceBuffer,
    ffn_norm: DeviceBuffer,
    gate_up: DeviceBuffer,
    w_down: DeviceBuffer,
}

/// A grow-only device buffer.
#[derive(Default)]
struct Scratch(Option<DeviceBuffer>);

impl Scratch {
    fn get(&mut self, ctx: &Arc<CudaContext>, bytes: usize) -> Result<u64> {
        if self.0.as_ref().is_none_or(|b| b.bytes() < bytes) {
            self.0 = None;
            self.0 = Some(DeviceBuffer::new(ctx, bytes.max(256))?);
        }
        Ok(self.0.as_ref().expect("set above").ptr())
    }

    /// Copy `data` in, ordered on `stream`.
    fn upload(&mut self, ctx: &Arc<CudaContext>, stream: &CudaStream, data: &[u32]) -> Result<u64> {
        let p = self.get(ctx, data.len() * 4)?;
        self.0
            .as_ref()
            .expect("set above")
            .upload_on(stream, 0, data)?;
        Ok(p)
    }
}

#[derive(Default)]
struct Buffers {
    x: Scratch,
    xn: Scratch,
    qkv: Scratch,
    q: Scratch,
    k: Scratch,
    v: Scratch,
    attn: Scratch,
    o: Scratch,
    gu: Scratch,
    act: Scratch,
    sel: Scratch,
    logits: Scratch,
    ids: Scratch,
    tokens: Scratch,
    pos: Scratch,
    row_seq: Scratch,
    q_start: Scratch,
    lens: Scratch,
    index: Scratch,
    wanted: Scratch,
    workspace: Option<(usize, usize, DecodeWorkspace)>,
}

/// A Llama-family model on a CUDA GPU (see the module docs).
pub struct CudaLlama {
    pub config: LlamaConfig,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    att: Attention,
    ops: ModelOps,
    gemm: Gemm,
    embed: DeviceBuffer,
    lm_head: Option<DeviceBuffer>,
    norm: DeviceBuffer,
    inv_freq: DeviceBuffer,
    layers: Vec<GpuLayer>,
    buf: Buffers,
    /// The batch [`CudaLlama::launch_next`] queued and [`CudaLlama::finish_next`] has not
    /// collected: its row count, which rows want logits, and whether `step_done` was recorded
    /// after it.
    pending: Option<(usize, Vec<bool>, bool)>,
    /// One event, recorded again after every launched batch (made on the first).
    step_done: Option<CudaEvent>,
    /// Decode steps as CUDA graphs.
    graphs: DecodeGraphs,
}

/// Device addresses of the operands [`CudaLlama::queue_gemms`] multiplies (benchmarks).
struct GemmOperands {
    rows: usize,
    head_rows: usize,
    xn: u64,
    qkv: u64,
    attn: u64,
    o: u64,
    gu: u64,
    act: u64,
    logits: u64,
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

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Wait for the stream.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver("cuStreamSynchronize")(e).into())
    }

    /// Run one batch (see [`Llama::forward`]): per chunk, the f32 logits of its last token
    /// (`vocab_size` values) or of all its tokens when `all_logits`.
    pub fn forward(&mut self, batch: &[SeqChunk<'_>], kv: &GpuKv) -> Result<Vec<Vec<f32>>> {
        let wanted = self.run(batch, kv, false)?;
        self.synchronize()?;
        let vocab = self.config.vocab_size;
        let mut logits = vec![0f32; wanted * vocab];
        self.buf
            .logits
            .0
            .as_ref()
            .expect("written by run")
            .download(0, &mut logits)?;
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
        Ok(out)
    }

    /// Run one batch and return the greedy token (argmax, on the device) of every row that
    /// [`CudaLlama::forward`] would return logits for; only the ids cross to the host.
    pub fn forward_greedy(&mut self, batch: &[SeqChunk<'_>], kv: &GpuKv) -> Result<Vec<u32>> {
        let wanted = self.run(batch, kv, true)?;
        self.synchronize()?;
        let mut out = vec![0u32; wanted];
        self.buf
            .ids
            .0
            .as_ref()
            .expect("set above")
            .download(0, &mut out)?;
        Ok(out)
    }

    /// Run one batch and return, per chunk, its next token: the greedy one (argmax on the
    /// device), or — where `logits_for[i]` — the logits of its last token, downloaded alone for
    /// sampling on the host. Only the ids and those rows cross to the host.
    /// ([`CudaLlama::launch_next`] then [`CudaLlama::finish_next`].)
    pub fn forward_next(
        &mut self,
        batch: &[SeqChunk<'_>],
        kv: &GpuKv,
        logits_for: &[bool],
    ) -> Result<Vec<Next>> {
        self.launch_next(batch, kv, logits_for)?;
        self.finish_next()
    }

    /// The first half of [`CudaLlama::forward_next`]: upload the batch's inputs
    /// and queue its kernels and the argmax, without waiting for the device. The host is free
    /// until [`CudaLlama::finish_next`] (the engine admits requests meanwhile);
    /// [`CudaLlama::is_done`] says whether that would wait.
    pub fn launch_next(
        &mut self,
        batch: &[SeqChunk<'_>],
        kv: &GpuKv,
        logits_for: &[bool],
    ) -> Result<()> {
        if logits_for.len() != batch.len() || batch.iter().any(|c| c.all_logits) {
            return Err(CudaModelError::Batch(format!(
                "forward_next takes one flag per chunk ({} for {} chunks) and last-token logits only",
                logits_for.len(),
                batch.len()
            )));
        }
        if self.pending.is_some() {
            return Err(CudaModelError::Batch(
                "a batch is already launched and not finished".into(),
            ));
        }
        let wanted = self.run(batch, kv, true)?;
        // Without an event `is_done` says yes and `finish_next` simply waits.
        let recorded = match &self.step_done {
            Some(event) => event.record(&self.stream).is_ok(),
            None => {
                self.step_done = self.stream.record_event(None).ok();
                self.step_done.is_some()
            }
        };
        self.pending = Some((wanted, logits_for.to_vec(), recorded));
        Ok(())
    }

    /// Whether the launched batch has finished on the device (so [`CudaLlama::finish_next`]
    /// would not wait); true when nothing is launched, or when the device reports an error
    /// (which `finish_next` then returns).
    pub fn is_done(&self) -> bool {
        match (&self.pending, &self.step_done) {
            (Some((_, _, true)), Some(event)) => event.try_is_complete().unwrap_or(true),
            _ => true,
        }
    }

    /// The second half of [`CudaLlama::forward_next`]: wait for the launched batch and bring
    /// back its ids (and the logits rows asked for).
    pub fn finish_next(&mut self) -> Result<Vec<Next>> {
        let (wanted, logits_for, _) = self
            .pending
            .take()
            .ok_or_else(|| CudaModelError::Batch("finish_next without a launched batch".into()))?;
        // The copies below are synchronous on the legacy stream, which does not wait for ours.
        self.synchronize()?;
        let mut ids = vec![0u32; wanted];
        self.buf
            .ids
            .0
            .as_ref()
            .expect("written by launch_next")
            .download(0, &mut ids)?;
        let vocab = self.config.vocab_size;
        let logits = self.buf.logits.0.as_ref().expect("written by run");
        ids.into_iter()
            .zip(&logits_for)
            .enumerate()
            .map(|(row, (id, &want))| {
                if !want {
                    return Ok(Next::Token(id));
                }
                let mut out = vec![0f32; vocab];
                logits.download(row * vocab * 4, &mut out)?;
                Ok(Next::Logits(out))
            })
            .collect()
    }

    /// Allocate every activation buffer for batches of up to `max_rows` tokens and `max_seqs`
    /// chunks now, so a step never allocates (and the KV sizing after this sees them as used).
    pub fn preallocate(&mut self, max_rows: usize, max_seqs: usize) -> Result<()> {
        let c = self.config.clone();
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let (qw, kvw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        // Decode graphs pad the batch up to its bucket.
        let seqs = batch_bucket(max_seqs.max(1));
        let rows = max_rows.max(seqs);
        let ctx = self.ctx.clone();
        let b = &mut self.buf;
        b.x.get(&ctx, rows * h * 4)?;
        b.xn.get(&ctx, rows * h * BF16)?;
        b.qkv.get(&ctx, rows * (qw + 2 * kvw) * BF16)?;
        b.q.get(&ctx, rows * qw * BF16)?;
        b.k.get(&ctx, rows * kvw * BF16)?;
        b.v.get(&ctx, rows * kvw * BF16)?;
        b.attn.get(&ctx, rows * qw * BF16)?;
        b.o.get(&ctx, rows * h * BF16)?;
        b.gu.get(&ctx, rows * 2 * inter * BF16)?;
        b.act.get(&ctx, rows * inter * BF16)?;
        b.sel.get(&ctx, seqs * h * BF16)?;
        b.logits.get(&ctx, seqs * c.vocab_size * 4)?;
        b.ids.get(&ctx, seqs * 4)?;
        for s in [&mut b.tokens, &mut b.pos, &mut b.row_seq] {
            s.get(&ctx, rows * 4)?;
        }
        for s in [&mut b.q_start, &mut b.lens, &mut b.wanted] {
            s.get(&ctx, (seqs + 1) * 4)?;
        }
        Ok(())
    }

    /// Make the model's context current on the calling thread (the engine thread, before its
    /// first step).
    pub fn bind_to_thread(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver("cuCtxSetCurrent")(e).into())
    }

    /// Free and total device memory in bytes (`cuMemGetInfo`).
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.bind_to_thread()?;
        vkv_kernels::cuda::cudarc::driver::result::mem_get_info()
            .map_err(|e| driver("cuMemGetInfo")(e).into())
    }

    /// The library the matrix products go through (cuBLASLt unless `VKV_GEMM=cublas`).
    pub fn gemm_library(&self) -> GemmLibrary {
        self.gemm.library()
    }

    /// Run decode steps as CUDA graphs (the default) or kernel by kernel (`false`: vLLM's
    /// `--enforce-eager`). Captured graphs are kept while off.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.graphs.on = on;
    }

    /// Whether decode steps run as graphs, and how often they were captured and replayed.
    pub fn graph_stats(&self) -> GraphStats {
        let g = &self.graphs;
        GraphStats {
            on: g.on && g.max_batch > 0,
            captures: g.captures,
            replays: g.replays,
            graphs: g.steps.len(),
        }
    }

    /// Route the matrix products through `library` (benchmarks compare the two).
    pub fn set_gemm_library(&mut self, library: GemmLibrary) {
        self.gemm.set_library(library);
    }

    /// Buffers for the matrix products of one forward pass over `rows` tokens (the output head
    /// over `head_rows`), sized and filled with random activations on the model's stream.
    fn gemm_operands(&mut self, rows: usize, head_rows: usize) -> Result<GemmOperands> {
        let c = &self.config;
        let (h, inter, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let (qw, kvw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let ctx = self.ctx.clone();
        let b = &mut self.buf;
        let g = GemmOperands {
            rows,
            head_rows,
            xn: b.xn.get(&ctx, rows * h * BF16)?,
            qkv: b.qkv.get(&ctx, rows * (qw + 2 * kvw) * BF16)?,
            attn: b.attn.get(&ctx, rows * qw * BF16)?,
            o: b.o.get(&ctx, rows * h * BF16)?,
            gu: b.gu.get(&ctx, rows * 2 * inter * BF16)?,
            act: b.act.get(&ctx, rows * inter * BF16)?,
            logits: b.logits.get(&ctx, head_rows.max(1) * vocab * 4)?,
        };
        let s = &self.stream;
        // SAFETY: the buffers are sized above for `rows`.
        unsafe {
            self.ops.fill_bf16(s, g.xn, rows * h, 1, 1.0)?;
            self.ops.fill_bf16(s, g.attn, rows * qw, 2, 1.0)?;
            self.ops.fill_bf16(s, g.act, rows * inter, 3, 1.0)?;
        }
        Ok(g)
    }

    /// Queue every layer's four GEMMs and the output head over `g` through `gemm`; returns the
    /// launches queued.
    ///
    /// # Safety
    /// `g` must come from [`CudaLlama::gemm_operands`] of this model (its buffers still live).
    unsafe fn queue_gemms(&self, gemm: &Gemm, g: &GemmOperands) -> Result<usize> {
        let c = &self.config;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let (qw, kvw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let rows = g.rows;
        // SAFETY: the buffers are sized for `rows` (the logits for `head_rows`): the caller's
        // promise.
        unsafe {
            for layer in &self.layers {
                gemm.matmul_t(g.xn, layer.qkv.ptr(), g.qkv, rows, qw + 2 * kvw, h, false)?;
                gemm.matmul_t(g.attn, layer.wo.ptr(), g.o, rows, h, qw, false)?;
                gemm.matmul_t(g.xn, layer.gate_up.ptr(), g.gu, rows, 2 * inter, h, false)?;
                gemm.matmul_t(g.act, layer.w_down.ptr(), g.o, rows, h, inter, false)?;
            }
            if g.head_rows > 0 {
                let head = self.lm_head.as_ref().unwrap_or(&self.embed);
                gemm.matmul_t(
                    g.xn,
                    head.ptr(),
                    g.logits,
                    g.head_rows,
                    c.vocab_size,
                    h,
                    true,
                )?;
            }
        }
        Ok(4 * self.layers.len() + usize::from(g.head_rows > 0))
    }

    /// Only the matrix products of one forward pass over `rows` tokens (every layer's four GEMMs
    /// for `rows` rows, the output head for `head_rows`: `rows` in a decode step, one per
    /// sequence in a prefill), on random activations, queued on the stream: how much of a step
    /// the GEMM library takes (benchmarks).
    pub fn gemms_only(&mut self, rows: usize, head_rows: usize) -> Result<()> {
        let g = self.gemm_operands(rows, head_rows.min(rows))?;
        // SAFETY: `g` was just made by `gemm_operands`.
        unsafe { self.queue_gemms(&self.gemm, &g) }.map(|_| ())
    }

    /// Check the batch against the model and the cache: the cache's shape, and every chunk's
    /// tokens reserved (the pass only reads the addressing).
    fn admit(&self, batch: &[SeqChunk<'_>], kv: GpuKvAddressing<'_>) -> Result<()> {
        let c = &self.config;
        if kv.dims() != c.kv_dims() {
            return Err(CudaModelError::Batch(format!(
                "KV cache shaped {:?} does not fit the model",
                kv.dims()
            )));
        }
        if batch.is_empty() {
            return Err(CudaModelError::Batch("an empty batch".into()));
        }
        check_batch(batch, c, |seq| kv.reserved(seq))
            .map_err(|e| CudaModelError::Batch(e.to_string()))?;
        Ok(())
    }

    /// The forward pass up to the logits (left in `buf.logits`) and, with `argmax`, the greedy
    /// id of every row that wants logits (in `buf.ids`); returns how many such rows the batch has.
    /// A decode step with `argmax` goes through a CUDA graph when graphs are on (see
    /// [`DecodeGraphs`]); anything else is launched kernel by kernel.
    fn run(&mut self, batch: &[SeqChunk<'_>], kv: &GpuKv, argmax: bool) -> Result<usize> {
        let kv = kv.addressing();
        self.admit(batch, kv)?;
        let decode = batch
            .iter()
            .all(|ch| ch.tokens.len() == 1 && !ch.all_logits);
        let g = &self.graphs;
        let key = (g.on && argmax && decode && batch.len() <= g.max_batch).then(|| {
            let longest = batch.iter().map(|ch| ch.start + 1).max().unwrap_or(1);
            (
                batch_bucket(batch.len()),
                kv.graph_context(longest, context_bucket(longest)),
            )
        });
        let inputs = StepInputs::new(batch, kv, key)?;
        let bufs = self.step_buffers(&inputs)?;
        let shape = inputs.shape;
        let addrs: Vec<KvAddress> = (0..self.layers.len())
            .map(|l| kv.address(l, bufs.index, shape.width))
            .collect();
        match key {
            None => self.queue_step(&shape, &bufs, &addrs, argmax)?,
            Some(key) => {
                let mut graphs = std::mem::take(&mut self.graphs);
                let stepped = self.graph_step(&mut graphs, key, &shape, &bufs, &addrs);
                self.graphs = graphs;
                stepped?;
            }
        }
        Ok(inputs.real_wanted)
    }

    /// Replay the graph captured for `key` if it was captured for this shape and still points at
    /// these buffers and KV addresses. Otherwise run the step kernel by kernel — which also makes
    /// cuBLASLt's plans for its shapes before anything is captured — and capture it for the next
    /// step of this shape; a capture that fails turns graphs off (with a message) and leaves the
    /// eager step's result.
    fn graph_step(
        &self,
        graphs: &mut DecodeGraphs,
        key: (usize, usize),
        shape: &StepShape,
        bufs: &StepBuffers,
        addrs: &[KvAddress],
    ) -> Result<()> {
        use vkv_kernels::cuda::cudarc::driver::sys::{
            CUgraphInstantiate_flags, CUstreamCaptureMode,
        };
        if let Some(g) = graphs.steps.get(&key) {
            if g.shape == *shape && g.buffers == *bufs && g.kv == addrs {
                g.graph.0.launch().map_err(driver("cuGraphLaunch"))?;
                graphs.replays += 1;
                return Ok(());
            }
        }
        self.queue_step(shape, bufs, addrs, true)?;
        let captured = (|| -> Result<CudaGraph> {
            // Relaxed: the Mapper thread keeps mapping pages (cuMemMap) while this one captures.
            self.stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
                .map_err(driver("cuStreamBeginCapture"))?;
            let queued = self.queue_step(shape, bufs, addrs, true);
            let graph = self
                .stream
                .end_capture(CUgraphInstantiate_flags(0))
                .map_err(driver("cuStreamEndCapture"));
            queued?;
            let graph =
                graph?.ok_or_else(|| CudaModelError::Batch("an empty capture".to_string()))?;
            graph.upload().map_err(driver("cuGraphUpload"))?;
            Ok(graph)
        })();
        match captured {
            Ok(graph) => {
                if graphs.steps.len() >= MAX_GRAPHS {
                    graphs.steps.clear();
                }
                graphs.steps.insert(
                    key,
                    CapturedStep {
                        graph: StepGraph(graph),
                        shape: *shape,
                        buffers: *bufs,
                        kv: addrs.to_vec(),
                    },
                );
                graphs.captures += 1;
            }
            Err(e) => {
                eprintln!("vkv: capturing a decode step as a CUDA graph failed ({e}); running without graphs");
                graphs.max_batch = 0;
                graphs.steps.clear();
            }
        }
        Ok(())
    }

    fn decode_shape(&self, shape: &StepShape) -> DecodeShape {
        DecodeShape {
            batch: shape.chunks,
            n_heads: self.config.num_heads,
            n_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
            max_context: shape.max_context,
        }
    }

    /// Size every buffer for the step (growing only), upload its inputs on the model's stream,
    /// and make room for the decode kernel's split partials; returns the buffers' addresses.
    fn step_buffers(&mut self, inp: &StepInputs) -> Result<StepBuffers> {
        let c = &self.config;
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let (qw, kvw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let (rows, wanted) = (inp.shape.rows, inp.shape.wanted);
        let splits = if inp.shape.decode {
            self.att.plan(&self.decode_shape(&inp.shape), None)?.splits
        } else {
            1
        };
        let vocab = c.vocab_size;
        let (ctx, stream) = (&self.ctx, &self.stream);
        let b = &mut self.buf;
        let heads = inp.shape.chunks * c.num_heads;
        let (r, s) = b.workspace.as_ref().map_or((0, 0), |w| (w.0, w.1));
        if splits > 1 && (r < heads || s < splits) {
            // Both dimensions only grow, so shapes taking turns do not reallocate it (and
            // recapture their graphs) every step. Splits come only with small batches.
            let (heads, splits) = (heads.max(r), splits.max(s));
            b.workspace = None;
            b.workspace = Some((
                heads,
                splits,
                DecodeWorkspace::new(ctx, heads, c.head_dim, splits)?,
            ));
        }
        Ok(StepBuffers {
            tokens: b.tokens.upload(ctx, stream, &inp.tokens)?,
            pos: b.pos.upload(ctx, stream, &inp.pos)?,
            row_seq: b.row_seq.upload(ctx, stream, &inp.row_seq)?,
            q_start: b.q_start.upload(ctx, stream, &inp.q_start)?,
            lens: b.lens.upload(ctx, stream, &inp.lens)?,
            index: b.index.upload(ctx, stream, &inp.index)?,
            wanted: b.wanted.upload(ctx, stream, &inp.wanted)?,
            x: b.x.get(ctx, rows * h * 4)?,
            xn: b.xn.get(ctx, rows * h * BF16)?,
            qkv: b.qkv.get(ctx, rows * (qw + 2 * kvw) * BF16)?,
            q: b.q.get(ctx, rows * qw * BF16)?,
            k: b.k.get(ctx, rows * kvw * BF16)?,
            v: b.v.get(ctx, rows * kvw * BF16)?,
            attn: b.attn.get(ctx, rows * qw * BF16)?,
            o: b.o.get(ctx, rows * h * BF16)?,
            gu: b.gu.get(ctx, rows * 2 * inter * BF16)?,
            act: b.act.get(ctx, rows * inter * BF16)?,
            sel: b.sel.get(ctx, wanted * h * BF16)?,
            logits: b.logits.get(ctx, wanted * vocab * 4)?,
            ids: b.ids.get(ctx, wanted * 4)?,
            workspace: b.workspace.as_ref().map_or(0, |w| w.2.ptr()),
        })
    }

    /// Queue one step's kernels on the model's stream: embedding, every layer, the final norm,
    /// the output head over the rows that want logits and, with `argmax`, their greedy ids.
    /// Allocates nothing and touches no host memory, so it can be captured into a graph.
    fn queue_step(
        &self,
        shape: &StepShape,
        p: &StepBuffers,
        addrs: &[KvAddress],
        argmax: bool,
    ) -> Result<()> {
        let c = &self.config;
        let (h, nh, nkv, hd, inter) = (
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.intermediate_size,
        );
        let (qw, kvw) = (nh * hd, nkv * hd);
        let (rows, wanted) = (shape.rows, shape.wanted);
        let dshape = self.decode_shape(shape);
        let workspace = self.buf.workspace.as_ref().map(|w| &w.2);
        let s = &self.stream;
        let ops = &self.ops;
        let scale = 1.0 / (hd as f32).sqrt();
        // SAFETY: every pointer is a live buffer sized by `step_buffers` for this shape; token
        // ids, positions, slots and block-table entries were checked or built on the host (each
        // sequence is reserved through its last position; padding rows write and read no KV).
        unsafe {
            ops.gather_rows(
                s,
                self.embed.ptr(),
                p.tokens,
                p.x,
                rows,
                h,
                c.vocab_size,
                true,
            )?;
            for ((l, layer), addr) in self.layers.iter().enumerate().zip(addrs) {
                let delta = if l == 0 { 0 } else { p.o };
                ops.add_rms_norm(
                    s,
                    p.x,
                    delta,
                    layer.attn_norm.ptr(),
                    p.xn,
                    rows,
                    h,
                    c.rms_norm_eps,
                )?;
                self.gemm
                    .matmul_t(p.xn, layer.qkv.ptr(), p.qkv, rows, qw + 2 * kvw, h, false)?;
                ops.rope_split(
                    s,
                    p.qkv,
                    p.q,
                    p.k,
                    p.v,
                    p.pos,
                    self.inv_freq.ptr(),
                    rows,
                    nh,
                    nkv,
                    hd,
                    c.rope_style == RopeStyle::Half,
                )?;
                self.att.append(
                    s,
                    &AppendArgs {
                        k_new: p.k,
                        v_new: p.v,
                        seq: p.row_seq,
                        pos: p.pos,
                        n_tokens: rows,
                    },
                    addr,
                    nkv,
                    hd,
                )?;
                if shape.decode {
                    self.att.decode(
                        s,
                        Dtype::Bf16,
                        &dshape,
                        &DecodeArgs {
                            q: p.q,
                            out: p.attn,
                            lens: p.lens,
                        },
                        addr,
                        scale,
                        None,
                        workspace,
                    )?;
                } else {
                    self.att.prefill(
                        s,
                        Dtype::Bf16,
                        &PrefillShape {
                            batch: shape.chunks,
                            n_heads: nh,
                            n_kv_heads: nkv,
                            head_dim: hd,
                            max_q_len: shape.max_q,
                            max_context: shape.max_context,
                        },
                        &PrefillArgs {
                            q: p.q,
                            out: p.attn,
                            q_start: p.q_start,
                            lens: p.lens,
                        },
                        addr,
                        scale,
                    )?;
                }
                self.gemm
                    .matmul_t(p.attn, layer.wo.ptr(), p.o, rows, h, qw, false)?;
                ops.add_rms_norm(
                    s,
                    p.x,
                    p.o,
                    layer.ffn_norm.ptr(),
                    p.xn,
                    rows,
                    h,
                    c.rms_norm_eps,
                )?;
                self.gemm
                    .matmul_t(p.xn, layer.gate_up.ptr(), p.gu, rows, 2 * inter, h, false)?;
                ops.silu_mul(s, p.gu, p.act, rows, inter)?;
                self.gemm
                    .matmul_t(p.act, layer.w_down.ptr(), p.o, rows, h, inter, false)?;
            }
            ops.add_rms_norm(s, p.x, p.o, self.norm.ptr(), p.xn, rows, h, c.rms_norm_eps)?;
            ops.gather_rows(s, p.xn, p.wanted, p.sel, wanted, h, rows, false)?;
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            self.gemm
                .matmul_t(p.sel, head.ptr(), p.logits, wanted, c.vocab_size, h, true)?;
            if argmax {
                ops.argmax_rows(s, p.logits, p.ids, wanted, c.vocab_size)?;
            }
        }
        Ok(())
    }
}

/// The host side of one step: what is uploaded, and the shape its kernels take.
struct StepInputs {
    tokens: Vec<u32>,
    pos: Vec<u32>,
    row_seq: Vec<u32>,
    q_start: Vec<u32>,
    lens: Vec<u32>,
    wanted: Vec<u32>,
    /// Per sequence its slot (vmm), or its block-table row (paged).
    index: Vec<u32>,
    shape: StepShape,
    /// Rows of the batch itself that want logits (the first of `wanted`; the rest pad).
    real_wanted: usize,
}

/// What one step's kernels are launched for (a captured graph bakes it in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StepShape {
    /// Token rows, sequences (chunks), and rows that want logits.
    rows: usize,
    chunks: usize,
    wanted: usize,
    /// The paged block table's width (0 for vmm slots).
    width: usize,
    max_context: usize,
    max_q: usize,
    /// Every chunk is one token: the decode kernel, else the prefill kernel.
    decode: bool,
}

impl StepInputs {
    /// The batch's inputs; `pad` = `(rows, max_context)` rounds a decode batch up to a captured
    /// shape: padding rows have position `u32::MAX` (the KV append skips them), context length 0
    /// (attention reads nothing for them) and no KV (slot and table entries `u32::MAX`); their
    /// outputs are computed and never read.
    fn new(
        batch: &[SeqChunk<'_>],
        kv: GpuKvAddressing<'_>,
        pad: Option<(usize, usize)>,
    ) -> Result<Self> {
        let mut s = StepInputs {
            tokens: Vec::new(),
            pos: Vec::new(),
            row_seq: Vec::new(),
            q_start: vec![0],
            lens: Vec::new(),
            wanted: Vec::new(),
            index: Vec::new(),
            shape: StepShape {
                rows: 0,
                chunks: batch.len(),
                wanted: 0,
                width: 0,
                max_context: 0,
                max_q: batch.iter().map(|ch| ch.tokens.len()).max().unwrap_or(1),
                decode: batch.iter().all(|ch| ch.tokens.len() == 1),
            },
            real_wanted: 0,
        };
        for (b, ch) in batch.iter().enumerate() {
            let first = s.tokens.len() as u32;
            for (j, &t) in ch.tokens.iter().enumerate() {
                s.tokens.push(t);
                s.pos.push((ch.start + j) as u32);
                s.row_seq.push(b as u32);
            }
            let n = ch.tokens.len() as u32;
            if ch.all_logits {
                s.wanted.extend(first..first + n);
            } else {
                s.wanted.push(first + n - 1);
            }
            s.q_start.push(s.tokens.len() as u32);
            s.lens.push((ch.start + ch.tokens.len()) as u32);
        }
        s.real_wanted = s.wanted.len();
        let mut max_context = s.lens.iter().copied().max().unwrap_or(1) as usize;
        let mut min_width = 1;
        if let Some((rows, context)) = pad {
            for b in batch.len() as u32..rows as u32 {
                s.tokens.push(0);
                s.pos.push(u32::MAX);
                s.row_seq.push(b);
                s.wanted.push(b);
                s.q_start.push(b + 1);
                s.lens.push(0);
            }
            s.shape.chunks = rows;
            max_context = context;
            min_width = kv.table_width(context);
        }
        let seqs: Vec<SeqId> = batch.iter().map(|ch| ch.seq).collect();
        let (index, width) = kv.index_for(&seqs, s.shape.chunks, min_width);
        if max_context > kv.capacity(width) {
            return Err(CudaModelError::Batch(format!(
                "context {max_context} over the cache's capacity {}",
                kv.capacity(width)
            )));
        }
        s.index = index;
        s.shape.rows = s.tokens.len();
        s.shape.wanted = s.wanted.len();
        s.shape.width = width;
        s.shape.max_context = max_context;
        Ok(s)
    }
}

/// Device addresses of one step's buffers (a captured graph bakes them in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StepBuffers {
    tokens: u64,
    pos: u64,
    row_seq: u64,
    q_start: u64,
    lens: u64,
    index: u64,
    wanted: u64,
    x: u64,
    xn: u64,
    qkv: u64,
    q: u64,
    k: u64,
    v: u64,
    attn: u64,
    o: u64,
    gu: u64,
    act: u64,
    sel: u64,
    logits: u64,
    ids: u64,
    /// The decode split workspace (0: none).
    workspace: u64,
}

/// Decode batches are padded up to one of these sizes for their graphs (vLLM's capture sizes:
/// 1, 2, 4, then multiples of 8).
fn batch_bucket(n: usize) -> usize {
    match n {
        0 | 1 => 1,
        2 => 2,
        3 | 4 => 4,
        _ => n.next_multiple_of(8),
    }
}

/// ... and their longest context up to a multiple of a quarter of its next power of two, at
/// least 512: at most four graphs per doubling of the context, planned for at most half again the
/// longest sequence (the decode kernel stops at each sequence's own length; splits beyond it do
/// nothing).
fn context_bucket(n: usize) -> usize {
    n.max(1)
        .next_multiple_of((n.max(1).next_power_of_two() / 4).max(512))
}

/// Decode batches of up to this many sequences run as graphs (vLLM's largest capture size).
const MAX_GRAPH_BATCH: usize = 512;

/// Graphs kept at most; past that they are all dropped and captured again as they recur.
const MAX_GRAPHS: usize = 512;

/// CUDA graphs of decode steps (vLLM's CUDA-graph runner): a step's ~11 launches per layer cost
/// the host about as much as a small batch's kernels take on the device, so a decode step whose
/// shape was seen before is replayed from one graph launch. The shape is fixed per graph: the
/// batch is padded up to [`batch_bucket`] rows, the longest context up to [`context_bucket`]
/// (which fixes the decode kernel's splits and the paged table's width), and inputs are uploaded
/// into the same buffers every step. A graph remembers the buffer and KV addresses it was
/// captured with and is captured again when any moved (a buffer grew).
#[derive(Default)]
pub(crate) struct DecodeGraphs {
    /// Graphs in use (`vkv serve --enforce-eager` turns them off).
    on: bool,
    /// Decode batches of more sequences run kernel by kernel (0: graphs off after a failure).
    max_batch: usize,
    steps: HashMap<(usize, usize), CapturedStep>,
    captures: u64,
    replays: u64,
}

/// A captured step and what it baked in: replayed only while all of it still holds.
struct CapturedStep {
    graph: StepGraph,
    shape: StepShape,
    buffers: StepBuffers,
    kv: Vec<KvAddress>,
}

/// A captured step. cudarc's `CudaGraph` holds raw driver handles and so is not `Send`.
struct StepGraph(CudaGraph);
// SAFETY: the graph is owned by its `CudaLlama` and used only through it, from the one thread that
// holds the model at a time, with the model's context current (as its stream is).
unsafe impl Send for StepGraph {}

/// How often decode steps were captured and replayed (see [`DecodeGraphs`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Decode steps run as graphs (off: `--enforce-eager`, or after a failed capture).
    pub on: bool,
    pub captures: u64,
    pub replays: u64,
    /// Graphs held now.
    pub graphs: usize,
}

/// What weight uploaders get.
struct CudaLlamaParts {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

struct GpuWeights {
    embed: DeviceBuffer,
    lm_head: Option<DeviceBuffer>,
    norm: DeviceBuffer,
    layers: Vec<GpuLayer>,
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
