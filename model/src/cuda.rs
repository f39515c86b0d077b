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

use std::sync::Arc;

use vkv_kernels::cuda::cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use vkv_kernels::cuda::{
    driver, Attention, DecodeWorkspace, DeviceBuffer, Gemm, GemmLibrary, KernelError, KvAddress,
    ModelOps,
};
use vkv_vmm::VmmError;

use super::llama::{check_batch, logits_per_chunk};
use super::{LlamaConfig, SeqChunk};
use crate::Next;
use vkv_kv::{GpuKv, GpuKvAddressing, KvError};

mod graphs;
mod step;
mod weights;
use graphs::{batch_bucket, context_bucket, DecodeGraphs, GraphStats, MAX_GRAPH_BATCH};
use step::{StepBuffers, StepInputs, StepShape};
use weights::GpuLayer;

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

/// A launched batch's rows of logits per chunk, and whether they come back as logits (else as
/// the argmax of its one row).
type ChunkRows = Vec<(usize, bool)>;

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
    pending: Option<(usize, ChunkRows, bool)>,
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

impl CudaLlama {
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
        Ok(logits_per_chunk(batch, &logits, vocab))
    }

    /// Run one batch and return the greedy token (argmax, on the device) of every row that
    /// [`CudaLlama::forward`] would return logits for; only the ids cross to the host.
    pub fn forward_greedy(&mut self, batch: &[SeqChunk<'_>], kv: &GpuKv) -> Result<Vec<u32>> {
        let wanted = self.run(batch, kv, true)?;
        self.synchronize()?;
        self.download_ids(wanted)
    }

    /// The first `n` token ids the last step's argmax wrote (after the stream is synchronized).
    fn download_ids(&self, n: usize) -> Result<Vec<u32>> {
        let mut ids = vec![0u32; n];
        let buf = self.buf.ids.0.as_ref();
        buf.expect("written by run").download(0, &mut ids)?;
        Ok(ids)
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
        if logits_for.len() != batch.len() {
            return Err(CudaModelError::Batch(format!(
                "forward_next takes one flag per chunk ({} for {} chunks)",
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
        // Per chunk: its rows of logits (all its tokens' with `all_logits`, which always come
        // back as logits), or one row, as logits where asked for, else as the argmax.
        let rows = batch
            .iter()
            .zip(logits_for)
            .map(|(c, &want)| (c.logit_rows(), want || c.all_logits))
            .collect();
        self.pending = Some((wanted, rows, recorded));
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
        let (wanted, rows, _) = self
            .pending
            .take()
            .ok_or_else(|| CudaModelError::Batch("finish_next without a launched batch".into()))?;
        // The copies below are synchronous on the legacy stream, which does not wait for ours.
        self.synchronize()?;
        let ids = self.download_ids(wanted)?;
        let vocab = self.config.vocab_size;
        let logits = self.buf.logits.0.as_ref().expect("written by run");
        let mut row = 0;
        rows.iter()
            .map(|&(n, want)| {
                let first = row;
                row += n;
                if !want {
                    return Ok(Next::Token(ids[first]));
                }
                let mut out = vec![0f32; n * vocab];
                logits.download(first * vocab * 4, &mut out)?;
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
}
