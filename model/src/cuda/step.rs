//! One forward step on the device: the host-side inputs of a batch of [`SeqChunk`]s (tokens,
//! positions, chunk bounds, KV addresses or block tables) flattened once, the device buffers they
//! are uploaded into, and the per-layer kernel sequence queued on the model's stream (RMSNorm, QKV
//! GEMM, RoPE, KV append, decode or prefill attention, output GEMM, FFN). Invariant: a step only
//! reads KV addressing the scheduler reserved; it writes KV rows only at the positions of its chunks.

use vkv_kernels::cpu::RopeStyle;
use vkv_kernels::cuda::{
    AppendArgs, DecodeArgs, DecodeShape, DecodeWorkspace, Dtype, KvAddress, PrefillArgs,
    PrefillShape,
};

use super::{CudaLlama, CudaModelError, Result, BF16};
use crate::SeqChunk;
use vkv_kv::{GpuKvAddressing, SeqId};

impl CudaLlama {
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
    pub(super) fn step_buffers(&mut self, inp: &StepInputs) -> Result<StepBuffers> {
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
    pub(super) fn queue_step(
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
pub(super) struct StepInputs {
    pub(super) tokens: Vec<u32>,
    pub(super) pos: Vec<u32>,
    pub(super) row_seq: Vec<u32>,
    pub(super) q_start: Vec<u32>,
    pub(super) lens: Vec<u32>,
    pub(super) wanted: Vec<u32>,
    /// Per sequence its slot (vmm), or its block-table row (paged).
    pub(super) index: Vec<u32>,
    pub(super) shape: StepShape,
    /// Rows of the batch itself that want logits (the first of `wanted`; the rest pad).
    pub(super) real_wanted: usize,
}

/// What one step's kernels are launched for (a captured graph bakes it in).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StepShape {
    /// Token rows, sequences (chunks), and rows that want logits.
    pub(super) rows: usize,
    pub(super) chunks: usize,
    pub(super) wanted: usize,
    /// The paged block table's width (0 for vmm slots).
    pub(super) width: usize,
    max_context: usize,
    max_q: usize,
    /// Every chunk is one token: the decode kernel, else the prefill kernel.
    pub(super) decode: bool,
}

impl StepInputs {
    /// The batch's inputs; `pad` = `(rows, max_context)` rounds a decode batch up to a captured
    /// shape: padding rows have position `u32::MAX` (the KV append skips them), context length 0
    /// (attention reads nothing for them) and no KV (slot and table entries `u32::MAX`); their
    /// outputs are computed and never read.
    pub(super) fn new(
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
pub(super) struct StepBuffers {
    pub(super) tokens: u64,
    pub(super) pos: u64,
    pub(super) row_seq: u64,
    pub(super) q_start: u64,
    pub(super) lens: u64,
    pub(super) index: u64,
    pub(super) wanted: u64,
    pub(super) x: u64,
    pub(super) xn: u64,
    pub(super) qkv: u64,
    pub(super) q: u64,
    pub(super) k: u64,
    pub(super) v: u64,
    pub(super) attn: u64,
    pub(super) o: u64,
    pub(super) gu: u64,
    pub(super) act: u64,
    pub(super) sel: u64,
    pub(super) logits: u64,
    pub(super) ids: u64,
    /// The decode split workspace (0: none).
    pub(super) workspace: u64,
}
