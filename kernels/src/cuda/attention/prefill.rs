//! Chunked prefill attention on tensor cores: the launcher of attention.cu's `prefill_*` kernels
//! (FlashAttention-2's forward, Dao 2023, on mma.sync; the parent's docs describe the CTA and
//! the grid), its launch shape ([`PrefillShape`], [`PrefillArgs`]) and the parameter struct it
//! passes by value (attention.cu's `PrefillParams`, field for field).
//!
//! It also owns the CTA geometry the host must agree on with the device code: [`PREFILL_ROWS`],
//! the keys per K / V tile and the block-table ring are attention.cu's `PF_BM`, `PF_BN` and
//! `PF_RING_BYTES`, and [`prefill_smem_bytes`] is the dynamic shared memory the kernel lays out
//! from them (the parent raises each prefill kernel's limit to it when the module loads).
//! Invariants the launcher checks before a launch: the shape rules decode has (head dim 64 or
//! 128, a whole GQA ratio), a finite softmax scale > 0 (the kernel keeps raw running maxima and
//! applies the scale inside the exponent), and a grid of at most 65535 query tiles × 2³¹ − 1
//! (sequence, head) pairs.

use cudarc::driver::{CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};

use super::address::aligned;
use super::{check_shape, Attention, DecodeShape, Dtype, KvAddress, THREADS};
use crate::cuda::error::{driver, KernelError, Result};

/// Shape of one prefill launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillShape {
    pub batch: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Upper bound of the chunk lengths (query rows per sequence).
    pub max_q_len: usize,
    /// Upper bound of the context lengths (prefix + chunk).
    pub max_context: usize,
}

/// Device buffers of one prefill launch. `q` and `out` are `[total_q][n_heads][head_dim]` with
/// the chunks of the sequences one after another; `q_start` is `u32[batch + 1]` (sequence `b`'s
/// rows are `q_start[b] .. q_start[b + 1]`); `lens` is `u32[batch]`, each sequence's context
/// length counting its chunk, whose K and V must already be appended: query row `i` of sequence
/// `b` is at position `lens[b] − chunk_len + i` and attends to positions `0 ..= that`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillArgs {
    pub q: u64,
    pub out: u64,
    pub q_start: u64,
    pub lens: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PrefillParams {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    q_start: u64,
    lens: u64,
    index: u64,
    outer_stride: u64,
    token_stride: u64,
    head_stride: u64,
    batch: u32,
    n_heads: u32,
    n_kv_heads: u32,
    group: u32,
    max_blocks: u32,
    max_context: u32,
    scale_log2: f32,
    pad: u32,
}
// SAFETY: plain old data laid out as the C struct `PrefillParams` of attention.cu.
unsafe impl DeviceRepr for PrefillParams {}

impl Attention {
    /// Causal prefill attention of a ragged batch of query chunks over their cached prefix and
    /// themselves (see [`PrefillArgs`]), FlashAttention-2 style on tensor cores. Asynchronous on
    /// `stream`.
    ///
    /// # Safety
    /// All pointers must be device memory of this context, valid for the launch: `q` and `out` of
    /// `q_start[batch] · n_heads · head_dim` elements, chunk lengths ≤ `max_q_len` and ≤ `lens[b]`,
    /// `lens[b]` ≤ `max_context`, and the KV addressed for every sequence must hold `lens[b]`
    /// written tokens.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn prefill(
        &self,
        stream: &CudaStream,
        dtype: Dtype,
        shape: &PrefillShape,
        args: &PrefillArgs,
        kv: &KvAddress,
        scale: f32,
    ) -> Result<()> {
        check_shape(&DecodeShape {
            batch: shape.batch,
            n_heads: shape.n_heads,
            n_kv_heads: shape.n_kv_heads,
            head_dim: shape.head_dim,
            max_context: shape.max_context,
        })?;
        kv.check()?;
        aligned("q pointer", args.q, 16)?;
        aligned("out pointer", args.out, 16)?;
        aligned("q_start pointer", args.q_start, 4)?;
        aligned("lens pointer", args.lens, 4)?;
        // The kernel keeps raw running maxima and applies the scale inside the exponent, which
        // is the softmax only for a positive scale (1/√d in every model).
        if !(scale.is_finite() && scale > 0.0) {
            return Err(KernelError::Shape(format!(
                "softmax scale {scale}: prefill takes a finite scale > 0"
            )));
        }
        if shape.max_q_len == 0 {
            return Ok(());
        }
        let tiles = shape.max_q_len.div_ceil(PREFILL_ROWS);
        let heads = shape.n_heads * shape.batch;
        if tiles > 65535 || heads > i32::MAX as usize {
            return Err(KernelError::Shape(format!(
                "{tiles} query tiles (at most 65535) × {heads} (sequence, head) pairs (at most 2^31 − 1): over the grid limits"
            )));
        }
        kv.check_context(shape.max_context)?;
        let (k, v, index, outer, token, head, max_blocks, addr) = kv.parts();
        let params = PrefillParams {
            q: args.q,
            k,
            v,
            out: args.out,
            q_start: args.q_start,
            lens: args.lens,
            index,
            outer_stride: outer,
            token_stride: token,
            head_stride: head,
            batch: shape.batch as u32,
            n_heads: shape.n_heads as u32,
            n_kv_heads: shape.n_kv_heads as u32,
            group: (shape.n_heads / shape.n_kv_heads) as u32,
            max_blocks,
            max_context: shape.max_context as u32,
            scale_log2: scale * std::f32::consts::LOG2_E,
            pad: 0,
        };
        let f = self.function(&format!(
            "prefill_{}_d{}_{addr}",
            dtype.name(),
            shape.head_dim
        ))?;
        let cfg = LaunchConfig {
            // x: (sequence, head), query heads of one KV head adjacent (their K / V tiles are
            // then read from L2); y: query tiles counted from each sequence's last, so the
            // longest CTAs start first.
            grid_dim: (heads as u32, tiles as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: prefill_smem_bytes(shape.head_dim) as u32,
        };
        let mut launch = stream.launch_builder(f);
        launch.arg(&params);
        // SAFETY: the caller guarantees the memory; the shape was checked above.
        unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(prefill)"))?;
        Ok(())
    }
}

/// Query rows of one prefill CTA (`PF_BM` in attention.cu).
const PREFILL_ROWS: usize = 128;
/// Keys of one prefill K / V tile (`PF_BN` in attention.cu).
const PREFILL_KEYS: usize = 64;

/// Bytes of the prefill CTA's block-table ring (`PF_RING_BYTES` in attention.cu).
const PREFILL_RING_BYTES: usize = 64;

/// Dynamic shared memory of one prefill CTA: (128 query rows + 2 stages × (K, V) × 64 keys) ×
/// (head_dim + 8) elements of 2 bytes, then the block-table ring (as attention.cu lays it out):
/// 102 KiB at head dim 128, so two CTAs fit an H100 multiprocessor.
pub(super) fn prefill_smem_bytes(head_dim: usize) -> usize {
    (PREFILL_ROWS + 2 * 2 * PREFILL_KEYS) * (head_dim + 8) * 2 + PREFILL_RING_BYTES
}
