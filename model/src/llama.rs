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

use rayon::prelude::*;
use vkv_kernels::cpu::{self, Activations, KvRef, Weight};

use super::{LlamaConfig, ModelError};
use vkv_kv::{KvCache, SeqId};

/// One sequence's part of a batch: `tokens` at positions `start..start + tokens.len()`.
mod load;
pub use load::DenseLayer;
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    pub start: usize,
    /// Return logits for every token of the chunk, not only the last.
    pub all_logits: bool,
}

impl SeqChunk<'_> {
    /// Rows of logits the chunk asks for: all its tokens' with `all_logits`, else its last's.
    pub fn logit_rows(&self) -> usize {
        if self.all_logits {
            self.tokens.len()
        } else {
            1
        }
    }
}

/// A step's `[rows][vocab]` logits, the rows each chunk asked for in batch order, split per chunk.
pub(crate) fn logits_per_chunk(
    batch: &[SeqChunk<'_>],
    logits: &[f32],
    vocab: usize,
) -> Vec<Vec<f32>> {
    let mut at = 0;
    batch
        .iter()
        .map(|chunk| {
            let n = chunk.logit_rows();
            at += n;
            logits[(at - n) * vocab..at * vocab].to_vec()
        })
        .collect()
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

impl Llama {
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
        logits_per_chunk(batch, &logits, vocab)
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
