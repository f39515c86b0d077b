//! Launchers of the CUDA attention kernels (`kernels/cuda/attention.cu`): decode, prefill and KV
//! append, each in the two addressing modes of [`KvAddress`] (the child module `address`).
//!
//! Decode is flash-decoding (Dao et al., 2023, "Flash-Decoding for long-context inference"): one
//! CTA per (KV head, sequence, split) reads each K and V row once for every query head of its GQA
//! group (up to 8; larger groups take several CTAs per KV head, each with 8 heads), with an online
//! softmax (FlashAttention); when the batch and head count give too few CTAs to fill the GPU, the
//! context is split and `decode_reduce_*` combines the partial results by their log-sum-exp.
//! Strided addressing is vAttention's point: one contiguous kernel serves a vmm `KvSpace` in either
//! layout and a plain tensor; paged addressing is vLLM's PagedAttention block table.
//!
//! Prefill (chunked: a ragged batch of query chunks over their cached prefix) is FlashAttention-2's
//! forward (Dao, 2023) on mma.sync tensor cores, in its head-dim-128 configuration: CTAs of 4 warps
//! and 128 query rows (32 a warp, so each shared-memory K / V fragment feeds two MMAs), K / V tiles
//! of 64 keys double-buffered with cp.async, Q staged once in shared memory. The grid puts a
//! sequence's query heads side by side (one KV head's tiles are then shared through L2) and counts
//! query tiles from the last, so the causal mask's longest CTAs are scheduled first. Its
//! launcher is the child module `prefill`.
//!
//! Every launcher checks what the host can check — head dim, GQA ratio, block size, 16-byte
//! alignment of pointers and strides, grid limits, workspace size — and returns a
//! [`KernelError`]; it never panics. What only the device holds (context lengths, slot indices,
//! block-table entries) is the caller's promise, which is why the launchers are `unsafe`; the
//! kernels still clamp each length to `max_context` and to the block table's capacity.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{
    sys, CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
};

use super::buffer::DeviceBuffer;
use super::compile::{compile_module, CacheOutcome};
use super::error::{driver, KernelError, Result};

mod address;
mod prefill;

use address::aligned;
pub use address::KvAddress;
use prefill::prefill_smem_bytes;
pub use prefill::{PrefillArgs, PrefillShape};

/// The CUDA source of the attention kernels.
pub const ATTENTION_SOURCE: &str = include_str!("../../cuda/attention.cu");

/// Query heads one CTA serves at most (the kernels' largest GMAX).
pub const MAX_GROUP_PER_CTA: usize = 8;
const THREADS: u32 = 128;

/// Element type of Q, K, V and the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bf16,
    F16,
}

impl Dtype {
    fn name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "bf16",
            Dtype::F16 => "f16",
        }
    }
}

/// Shape of one decode launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeShape {
    pub batch: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Upper bound of the context lengths in the batch (the split size is derived from it).
    pub max_context: usize,
}

/// Device buffers of one decode launch. `q` and `out` are `[batch][n_heads][head_dim]`; `lens` is
/// `u32[batch]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeArgs {
    pub q: u64,
    pub out: u64,
    pub lens: u64,
}

/// How a decode launch was (or would be) run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodePlan {
    pub splits: usize,
    pub split_tokens: usize,
    pub head_chunks: usize,
    pub ctas: usize,
    /// Query heads per CTA the chosen kernel is built for (1, 2, 4 or 8).
    pub gmax: usize,
}

/// Scratch space for split-KV decode: partial outputs and their (max, sum), f32.
#[derive(Debug)]
pub struct DecodeWorkspace {
    part_o: DeviceBuffer,
    part_ml: DeviceBuffer,
    rows: usize,
    head_dim: usize,
    max_splits: usize,
}

impl DecodeWorkspace {
    /// The device address of its partial outputs (identifies the workspace, e.g. to tell whether
    /// a captured CUDA graph still points at it).
    pub fn ptr(&self) -> u64 {
        self.part_o.ptr()
    }

    /// Room for `rows = batch · n_heads` query rows of `head_dim` with up to `max_splits` splits.
    pub fn new(
        ctx: &Arc<CudaContext>,
        rows: usize,
        head_dim: usize,
        max_splits: usize,
    ) -> Result<Self> {
        let n = rows
            .checked_mul(max_splits.max(1))
            .ok_or_else(|| KernelError::Shape("workspace size overflows".into()))?;
        Ok(DecodeWorkspace {
            part_o: DeviceBuffer::new(ctx, n * head_dim * 4)?,
            part_ml: DeviceBuffer::new(ctx, n * 2 * 4)?,
            rows,
            head_dim,
            max_splits: max_splits.max(1),
        })
    }
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DecodeParams {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    part_o: u64,
    part_ml: u64,
    lens: u64,
    index: u64,
    outer_stride: u64,
    token_stride: u64,
    head_stride: u64,
    batch: u32,
    n_heads: u32,
    n_kv_heads: u32,
    group: u32,
    splits: u32,
    split_tokens: u32,
    max_blocks: u32,
    max_context: u32,
    scale_log2: f32,
    head_chunks: u32,
}
// SAFETY: plain old data laid out as the C struct `DecodeParams` of attention.cu.
unsafe impl DeviceRepr for DecodeParams {}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct AppendParams {
    k_new: u64,
    v_new: u64,
    k: u64,
    v: u64,
    seq: u64,
    pos: u64,
    index: u64,
    outer_stride: u64,
    token_stride: u64,
    head_stride: u64,
    n_tokens: u32,
    n_kv_heads: u32,
    head_dim: u32,
    max_blocks: u32,
}
// SAFETY: plain old data laid out as the C struct `AppendParams` of attention.cu.
unsafe impl DeviceRepr for AppendParams {}

/// Device buffers of one append: `k_new` and `v_new` are `[n_tokens][n_kv_heads][head_dim]`;
/// `seq` and `pos` are `u32[n_tokens]` (the sequence — slot index or block-table row — and the
/// position of each new token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendArgs {
    pub k_new: u64,
    pub v_new: u64,
    pub seq: u64,
    pub pos: u64,
    pub n_tokens: usize,
}

/// The compiled attention kernels of one device.
#[derive(Debug)]
pub struct Attention {
    ctx: Arc<CudaContext>,
    functions: HashMap<String, CudaFunction>,
    sms: usize,
    /// CTAs of the decode kernel per multiprocessor, by (head dim, query heads per CTA).
    occupancy: HashMap<(usize, usize), usize>,
    /// Whether the module came from the disk cache.
    pub outcome: CacheOutcome,
    /// The architecture compiled for (`sm_90a` on H100).
    pub arch: String,
}

impl Attention {
    /// Compile (or load from the cache) the attention kernels for `ctx`'s device.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        let compiled = compile_module(ctx, "attention", ATTENTION_SOURCE, &[])?;
        let mut names = vec![
            "append_strided".to_string(),
            "append_paged16".to_string(),
            "append_paged32".to_string(),
            "fill_uniform".to_string(),
            "spin".to_string(),
        ];
        for t in ["bf16", "f16"] {
            for d in [64, 128] {
                for a in ["strided", "paged16", "paged32"] {
                    names.push(format!("prefill_{t}_d{d}_{a}"));
                }
                names.push(format!("decode_reduce_{t}_d{d}"));
                for g in [1, 2, 4, 8] {
                    for a in ["strided", "paged16", "paged32"] {
                        names.push(format!("decode_{t}_d{d}_g{g}_{a}"));
                    }
                }
            }
        }
        let mut functions = HashMap::new();
        for n in names {
            let f = compiled
                .module
                .load_function(&n)
                .map_err(driver("cuModuleGetFunction"))?;
            functions.insert(n, f);
        }
        // Prefill's double-buffered tiles are over the 48 KiB a kernel gets without asking.
        for (name, f) in &functions {
            if let Some(d) = name
                .strip_prefix("prefill_")
                .and_then(|n| n.split('_').nth(1))
                .and_then(|d| d.strip_prefix('d'))
                .and_then(|d| d.parse::<usize>().ok())
            {
                f.set_attribute(
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    prefill_smem_bytes(d) as i32,
                )
                .map_err(driver("cuFuncSetAttribute(max dynamic shared memory)"))?;
            }
        }
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver("cuDeviceGetAttribute(multiprocessors)"))?
            .max(1) as usize;
        let mut occupancy = HashMap::new();
        for d in [64, 128] {
            for g in [1, 2, 4, 8] {
                let f = &functions[&format!("decode_bf16_d{d}_g{g}_strided")];
                let per_sm = f
                    .occupancy_max_active_blocks_per_multiprocessor(THREADS, 0, None)
                    .map_err(driver("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
                occupancy.insert((d, g), per_sm.max(1) as usize);
            }
        }
        Ok(Attention {
            ctx: ctx.clone(),
            functions,
            sms,
            occupancy,
            outcome: compiled.outcome,
            arch: compiled.arch,
        })
    }

    /// The context the kernels were loaded in.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Multiprocessors of the device.
    pub fn multiprocessors(&self) -> usize {
        self.sms
    }

    fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| KernelError::Shape(format!("no kernel named {name}")))
    }

    /// The split plan for a shape: no split when the (KV head, sequence) CTAs already fill 90 % of
    /// what the GPU holds at once (multiprocessors × the kernel's occupancy); otherwise as many
    /// splits as fit in that one wave, with at least 64 tokens per split. (Measured on H100, 32/8
    /// heads: batch 64 × context 2048, 1 split 185 µs, 2 splits 191 µs; batch 8 × 16384, 8 splits
    /// (one wave) 189 µs, 9 splits (a second, partial wave) 255 µs, 1 split 727 µs.) `splits`
    /// forces a number instead.
    pub fn plan(&self, shape: &DecodeShape, splits: Option<usize>) -> Result<DecodePlan> {
        check_shape(shape)?;
        let gmax = gmax_for(shape.n_heads / shape.n_kv_heads);
        let per_sm = self
            .occupancy
            .get(&(shape.head_dim, gmax))
            .copied()
            .unwrap_or(1);
        split_plan(shape, self.sms * per_sm, splits)
    }

    /// Decode attention: for each sequence `b` and query head `h`, `out[b][h] = softmax(scale ·
    /// q[b][h] · K[b][g]ᵀ) · V[b][g]` over the first `lens[b]` tokens, `g = h / (n_heads /
    /// n_kv_heads)`. Asynchronous on `stream`. `workspace` is needed when the plan has more than one
    /// split (see [`Attention::plan`]; `splits` forces a count).
    ///
    /// # Safety
    /// All pointers must be device memory of this context, valid for the launch: `q`, `out` of
    /// `batch · n_heads · head_dim` elements, `lens` of `batch` u32 each ≤ `max_context`, the slot
    /// indices / block-table rows must address backed KV memory holding `lens[b]` written tokens,
    /// and nothing else may write `out` or read the workspace concurrently.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn decode(
        &self,
        stream: &CudaStream,
        dtype: Dtype,
        shape: &DecodeShape,
        args: &DecodeArgs,
        kv: &KvAddress,
        scale: f32,
        splits: Option<usize>,
        workspace: Option<&DecodeWorkspace>,
    ) -> Result<DecodePlan> {
        let plan = self.plan(shape, splits)?;
        kv.check()?;
        aligned("q pointer", args.q, 16)?;
        aligned("out pointer", args.out, 16)?;
        aligned("lens pointer", args.lens, 4)?;
        if !scale.is_finite() {
            return Err(KernelError::Shape(format!("softmax scale {scale}")));
        }
        kv.check_context(shape.max_context)?;
        let rows = shape.batch * shape.n_heads;
        let (part_o, part_ml) = if plan.splits > 1 {
            let ws = workspace.ok_or(KernelError::TooSmall {
                what: "decode workspace (none given)",
                needed: plan.splits,
                available: 0,
            })?;
            if ws.rows < rows || ws.head_dim != shape.head_dim || ws.max_splits < plan.splits {
                return Err(KernelError::TooSmall {
                    what: "decode workspace (rows × splits)",
                    needed: rows * plan.splits,
                    available: ws.rows * ws.max_splits,
                });
            }
            (ws.part_o.ptr(), ws.part_ml.ptr())
        } else {
            (0, 0)
        };
        let (k, v, index, outer, token, head, max_blocks, addr) = kv.parts();
        let params = DecodeParams {
            q: args.q,
            k,
            v,
            out: args.out,
            part_o,
            part_ml,
            lens: args.lens,
            index,
            outer_stride: outer,
            token_stride: token,
            head_stride: head,
            batch: shape.batch as u32,
            n_heads: shape.n_heads as u32,
            n_kv_heads: shape.n_kv_heads as u32,
            group: (shape.n_heads / shape.n_kv_heads) as u32,
            splits: plan.splits as u32,
            split_tokens: plan.split_tokens as u32,
            max_blocks,
            max_context: shape.max_context as u32,
            scale_log2: scale * std::f32::consts::LOG2_E,
            head_chunks: plan.head_chunks as u32,
        };
        let name = format!(
            "decode_{}_d{}_g{}_{addr}",
            dtype.name(),
            shape.head_dim,
            plan.gmax
        );
        let f = self.function(&name)?;
        let cfg = LaunchConfig {
            grid_dim: (
                (shape.n_kv_heads * plan.head_chunks) as u32,
                shape.batch as u32,
                plan.splits as u32,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(f);
        launch.arg(&params);
        // SAFETY: the caller guarantees the memory; the shape was checked above.
        unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(decode)"))?;
        if plan.splits > 1 {
            let name = format!("decode_reduce_{}_d{}", dtype.name(), shape.head_dim);
            let f = self.function(&name)?;
            let cfg = LaunchConfig {
                grid_dim: (shape.n_heads as u32, shape.batch as u32, 1),
                block_dim: (shape.head_dim as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut launch = stream.launch_builder(f);
            launch.arg(&params);
            // SAFETY: as above; the workspace holds rows × splits partials (checked).
            unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(decode_reduce)"))?;
        }
        Ok(plan)
    }

    /// KV append: write each new token's K and V (`[n_kv_heads][head_dim]`, any 2-byte dtype) at
    /// its sequence's position. Asynchronous on `stream`.
    ///
    /// # Safety
    /// `k_new`, `v_new` must hold `n_tokens · n_kv_heads · head_dim` elements, `seq` and `pos`
    /// `n_tokens` u32 each; every `(seq, pos)` must address backed KV memory (a backed slot token,
    /// or a block-table row whose block at `pos / block_size` is allocated) that nothing reads or
    /// writes concurrently, and no two new tokens may share a `(seq, pos)`. A `pos` of `u32::MAX`
    /// marks a padding row (a captured decode step's batch rounded up): nothing is written for it.
    pub unsafe fn append(
        &self,
        stream: &CudaStream,
        args: &AppendArgs,
        kv: &KvAddress,
        n_kv_heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        kv.check()?;
        if head_dim == 0 || !head_dim.is_multiple_of(8) || n_kv_heads == 0 {
            return Err(KernelError::Shape(format!(
                "append of {n_kv_heads} KV heads × {head_dim}: head dim must be a positive multiple of 8"
            )));
        }
        aligned("k_new pointer", args.k_new, 16)?;
        aligned("v_new pointer", args.v_new, 16)?;
        aligned("seq pointer", args.seq, 4)?;
        aligned("pos pointer", args.pos, 4)?;
        if args.n_tokens == 0 {
            return Ok(());
        }
        let n_tokens = u32::try_from(args.n_tokens)
            .map_err(|_| KernelError::Shape(format!("{} tokens in one append", args.n_tokens)))?;
        let (k, v, index, outer, token, head, max_blocks, addr) = kv.parts();
        let params = AppendParams {
            k_new: args.k_new,
            v_new: args.v_new,
            k,
            v,
            seq: args.seq,
            pos: args.pos,
            index,
            outer_stride: outer,
            token_stride: token,
            head_stride: head,
            n_tokens,
            n_kv_heads: n_kv_heads as u32,
            head_dim: head_dim as u32,
            max_blocks,
        };
        let total = args.n_tokens as u64 * n_kv_heads as u64 * (head_dim as u64 / 8);
        let blocks = total.div_ceil(256).clamp(1, 32 * self.sms as u64) as u32;
        let f = self.function(&format!("append_{addr}"))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(f);
        launch.arg(&params);
        // SAFETY: the caller guarantees the memory; sizes were checked above.
        unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(append)"))?;
        Ok(())
    }
}

impl Attention {
    /// Fill `n` elements at `ptr` with pseudo-random values uniform in [-1, 1) of `dtype`
    /// (benchmark and test data: never zeros). Asynchronous on `stream`.
    ///
    /// # Safety
    /// `ptr .. ptr + 2n` must be writable device memory of this context.
    pub unsafe fn fill_uniform(
        &self,
        stream: &CudaStream,
        ptr: u64,
        n: usize,
        dtype: Dtype,
        seed: u32,
    ) -> Result<()> {
        aligned("fill pointer", ptr, 2)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function("fill_uniform")?;
        let blocks = (n as u64).div_ceil(256).clamp(1, 64 * self.sms as u64) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n, is_f16) = (n as u64, u32::from(dtype == Dtype::F16));
        let mut launch = stream.launch_builder(f);
        launch.arg(&ptr).arg(&n).arg(&seed).arg(&is_f16);
        // SAFETY: the caller guarantees the range.
        unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(fill_uniform)"))?;
        Ok(())
    }

    /// Keep `stream` busy for about `micros` µs (a benchmark queues its timed launches behind
    /// this, so that events time the device and not the host's launch overhead).
    pub fn spin(&self, stream: &CudaStream, micros: u64) -> Result<()> {
        let f = self.function("spin")?;
        let ns = micros.saturating_mul(1000);
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = stream.launch_builder(f);
        launch.arg(&ns);
        // SAFETY: the kernel touches no memory.
        unsafe { launch.launch(cfg) }.map_err(driver("cuLaunchKernel(spin)"))?;
        Ok(())
    }
}

/// Query heads per CTA of the kernel that serves a GQA group of `group` heads.
fn gmax_for(group: usize) -> usize {
    [1, 2, 4, 8]
        .into_iter()
        .find(|&g| g >= group)
        .unwrap_or(MAX_GROUP_PER_CTA)
}

/// The split plan of [`Attention::plan`] for a device that holds `resident` decode CTAs at once.
fn split_plan(shape: &DecodeShape, resident: usize, splits: Option<usize>) -> Result<DecodePlan> {
    let group = shape.n_heads / shape.n_kv_heads;
    let gmax = gmax_for(group);
    let head_chunks = group.div_ceil(gmax);
    let base = shape.batch * shape.n_kv_heads * head_chunks;
    let max_ctx = shape.max_context.max(1);
    let splits = match splits {
        Some(s) => s.clamp(1, max_ctx),
        // Round down: a second, partial wave costs more than a few idle slots.
        None if base * 10 < resident * 9 => (resident / base).clamp(1, max_ctx.div_ceil(64)),
        None => 1,
    };
    let split_tokens = max_ctx.div_ceil(splits).next_multiple_of(32);
    let splits = max_ctx.div_ceil(split_tokens);
    if splits > 65535 {
        return Err(KernelError::Shape(format!(
            "{splits} splits: at most 65535"
        )));
    }
    Ok(DecodePlan {
        splits,
        split_tokens,
        head_chunks,
        ctas: base * splits,
        gmax,
    })
}

fn check_shape(s: &DecodeShape) -> Result<()> {
    if s.head_dim != 64 && s.head_dim != 128 {
        return Err(KernelError::Shape(format!(
            "head dim {}: the decode kernels take 64 or 128",
            s.head_dim
        )));
    }
    if s.n_kv_heads == 0 || s.n_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return Err(KernelError::Shape(format!(
            "{} query heads over {} KV heads: need a positive whole ratio",
            s.n_heads, s.n_kv_heads
        )));
    }
    if s.batch == 0 || s.batch > 65535 {
        return Err(KernelError::Shape(format!(
            "batch {}: 1 to 65535 sequences per launch",
            s.batch
        )));
    }
    if s.max_context > u32::MAX as usize / 2 {
        return Err(KernelError::Shape(format!(
            "max_context {} too large",
            s.max_context
        )));
    }
    if s.n_heads.checked_mul(s.batch).is_none() || s.n_kv_heads * s.n_heads > (1 << 30) {
        return Err(KernelError::Shape("too many heads".into()));
    }
    Ok(())
}

#[cfg(test)]
#[path = "attention_tests.rs"]
mod tests;
