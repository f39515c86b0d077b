//! `vkv bench kernels`: the CUDA decode-attention kernel (and the prefill kernel, in TFLOP/s of
//! the causal (query, key) pairs) over a grid of (batch, context, heads,
//! head dim), in every addressing mode — strided on a `CudaVmm` `KvSpace` (per-layer and
//! token-major, real 2 MiB pages), strided on a plain allocation, paged with blocks of 16 and 32
//! scattered at random over the pool (as after hours of serving) — reporting the median time, KV
//! bytes read per second and the ratio to the device-to-device copy bandwidth measured in the
//! same run (bytes read + written, GPU.md's convention).
//!
//! Method (../shared/GPU.md): CUDA events around each launch, warm-up first, median of many runs,
//! the timed launches queued behind a spinning kernel (so host launch overhead is not timed);
//! when one batch's KV is smaller than 256 MiB, several copies of it (other slots / block tables)
//! are used in turn so that timings are not L2 hits. KV holds random values (never zeros).
//!
//! `--shared-prefix P` makes every sequence of a batch read its first `P` tokens from the same
//! KV as the batch's first sequence, as prefix caching and parallel samples do: paged tables
//! name the same blocks (one address per byte), vmm slots map the same physical pages at their
//! own addresses (an alias per sequence). Against `P = 0` it shows what sharing costs or saves
//! each addressing mode (the question behind vmm's slower decode with prefix hits, issue 18).

// Without the cuda feature only `run` (which says so) is reachable.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use anyhow::{bail, Result};
use clap::{Args as ClapArgs, ValueEnum};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModeChoice {
    /// Strided over a CudaVmm KvSpace, per-layer layout.
    VmmPerLayer,
    /// Strided over a CudaVmm KvSpace, token-major layout.
    VmmTokenMajor,
    /// Strided over a plain cuMemAlloc tensor.
    Plain,
    /// Block table, 16 tokens per block.
    Paged16,
    /// Block table, 32 tokens per block.
    Paged32,
}

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Batch sizes (sequences decoding together), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    batch: Vec<usize>,
    /// Context lengths (every sequence of the batch has this many tokens), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "512,2048,8192")]
    context: Vec<usize>,
    /// Query heads / KV heads pairs, comma-separated (Llama-3-8B: 32/8).
    #[arg(long, value_delimiter = ',', default_value = "32/8")]
    heads: Vec<String>,
    /// Head dims (64 or 128), comma-separated.
    #[arg(long = "head-dim", value_delimiter = ',', default_value = "128")]
    head_dim: Vec<usize>,
    /// Addressing modes (default: all five).
    #[arg(long, value_enum, value_delimiter = ',')]
    modes: Vec<ModeChoice>,
    /// Context splits: "auto" (the launcher's plan) or numbers, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "auto")]
    splits: Vec<String>,
    /// Tokens at the start of every sequence that are the same KV as the batch's first
    /// sequence's (prefix caching, parallel samples), comma-separated: vmm slots map its
    /// physical pages (`KvSpace::share_prefix`: one page aliased at many addresses), paged
    /// block tables name its blocks; plain KV cannot share and is skipped. 0: nothing shared.
    #[arg(long = "shared-prefix", value_delimiter = ',', default_value = "0")]
    shared_prefix: Vec<usize>,
    /// Layers of the token-major space (its token stride spans them all).
    #[arg(long = "token-major-layers", default_value_t = 8)]
    token_major_layers: usize,
    /// Timed launches per point (the median is reported).
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Prefill: batch sizes (each sequence one causal chunk), comma-separated; `0` skips prefill.
    #[arg(long = "prefill-batch", value_delimiter = ',', default_value = "1,4")]
    prefill_batch: Vec<usize>,
    /// Prefill: context lengths, comma-separated.
    #[arg(
        long = "prefill-context",
        value_delimiter = ',',
        default_value = "1024,4096"
    )]
    prefill_context: Vec<usize>,
    /// Prefill: chunk lengths (query tokens at the end of each context; 0 = the whole context).
    #[arg(long = "prefill-chunk", value_delimiter = ',', default_value = "0,512")]
    prefill_chunk: Vec<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct PrefillRow {
    mode: ModeChoice,
    batch: usize,
    context: usize,
    chunk: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    median_us: f64,
    min_us: f64,
    /// 4 · head_dim · n_heads · (query, key) pairs under the causal mask.
    flops: f64,
    tflop_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    mode: ModeChoice,
    batch: usize,
    context: usize,
    /// Tokens of each sequence shared with the batch's first (`--shared-prefix`).
    shared_prefix: usize,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    splits: usize,
    ctas: usize,
    copies: usize,
    median_us: f64,
    min_us: f64,
    kv_bytes: u64,
    kv_tb_per_s: f64,
    ratio_to_copy: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    device: String,
    arch: String,
    multiprocessors: usize,
    copy_bytes: u64,
    copy_median_us: f64,
    /// Device-to-device copy: (bytes read + bytes written) / median time.
    copy_tb_per_s: f64,
    rows: Vec<Row>,
    prefill: Vec<PrefillRow>,
}

pub fn run(args: Args) -> Result<()> {
    super::emit_measured(gpu::measure(&args), args.json, print_table)
}

fn print_table(r: &Report) {
    println!(
        "device: {} ({}, {} SMs); device-to-device copy {:.3} TB/s (read + write, {} MiB, median {:.1} us)",
        r.device,
        r.arch,
        r.multiprocessors,
        r.copy_tb_per_s,
        r.copy_bytes >> 20,
        r.copy_median_us
    );
    println!(
        "{:<16} {:>5} {:>7} {:>7} {:>6} {:>4} {:>6} {:>6} {:>10} {:>10} {:>8} {:>8}",
        "mode",
        "batch",
        "context",
        "shared",
        "heads",
        "dim",
        "splits",
        "copies",
        "median us",
        "KV MB",
        "KV TB/s",
        "vs copy"
    );
    for x in &r.rows {
        println!(
            "{:<16} {:>5} {:>7} {:>7} {:>6} {:>4} {:>6} {:>6} {:>10.1} {:>10.1} {:>8.3} {:>7.1}%",
            format!("{:?}", x.mode),
            x.batch,
            x.context,
            x.shared_prefix,
            format!("{}/{}", x.n_heads, x.n_kv_heads),
            x.head_dim,
            x.splits,
            x.copies,
            x.median_us,
            x.kv_bytes as f64 / 1e6,
            x.kv_tb_per_s,
            100.0 * x.ratio_to_copy
        );
    }
    if !r.prefill.is_empty() {
        println!(
            "{:<16} {:>5} {:>7} {:>6} {:>6} {:>4} {:>10} {:>9}",
            "prefill mode", "batch", "context", "chunk", "heads", "dim", "median us", "TFLOP/s"
        );
    }
    for x in &r.prefill {
        println!(
            "{:<16} {:>5} {:>7} {:>6} {:>6} {:>4} {:>10.1} {:>9.1}",
            format!("{:?}", x.mode),
            x.batch,
            x.context,
            x.chunk,
            format!("{}/{}", x.n_heads, x.n_kv_heads),
            x.head_dim,
            x.median_us,
            x.tflop_per_s
        );
    }
}

fn parse_heads(s: &str) -> Result<(usize, usize)> {
    let Some((a, b)) = s.split_once('/') else {
        bail!("heads {s:?}: expected Q/KV, e.g. 32/8")
    };
    Ok((a.trim().parse()?, b.trim().parse()?))
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;

    use anyhow::{bail, Context, Result};
    use vkv_kernels::cuda::cudarc::driver::{result, sys, CudaContext, CudaStream};
    use vkv_kernels::cuda::{
        Attention, DecodeArgs, DecodeShape, DecodeWorkspace, DeviceBuffer, Dtype, KvAddress,
        PrefillArgs, PrefillShape,
    };
    use vkv_vmm::{CudaVmm, KvLayout, KvSpace, KvSpaceConfig};

    use super::{parse_heads, Args, ModeChoice, PrefillRow, Report, Row};

    /// Bytes of KV one timed launch should not fit under (L2 is 50 MB on H100).
    const ROTATE_BYTES: u64 = 256 << 20;

    fn median(v: &mut [f64]) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// Median and minimum of `iters` event-timed runs of `f(i)` after `warm` untimed ones (µs).
    /// The timed runs are queued behind a spinning kernel, so the device runs them back to back
    /// and the events time the device, not the host's launch overhead.
    fn time<F: FnMut(usize) -> Result<()>>(
        att: &Attention,
        stream: &Arc<CudaStream>,
        warm: usize,
        iters: usize,
        mut f: F,
    ) -> Result<(f64, f64)> {
        let ctx = att.context();
        for i in 0..warm {
            f(i)?;
        }
        stream.synchronize()?;
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let events: Vec<_> = (0..iters)
            .map(|_| Ok((ctx.new_event(flags)?, ctx.new_event(flags)?)))
            .collect::<Result<_>>()?;
        att.spin(stream, 2000 + 100 * iters as u64)?;
        for (i, (a, b)) in events.iter().enumerate() {
            a.record(stream)?;
            f(warm + i)?;
            b.record(stream)?;
        }
        stream.synchronize()?;
        let mut t: Vec<f64> = events
            .iter()
            .map(|(a, b)| a.elapsed_ms(b).map(|ms| ms as f64 * 1e3))
            .collect::<Result<_, _>>()?;
        let min = t.iter().copied().fold(f64::INFINITY, f64::min);
        Ok((median(&mut t), min))
    }

    /// KV memory for `copies × batch` sequences of `context` tokens in one mode, filled with
    /// random values; `kv(copy)` addresses copy `copy`'s batch.
    struct Kv {
        addrs: Vec<KvAddress>,
        _bufs: Vec<DeviceBuffer>,
        _space: Option<KvSpace>,
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        vmm: &Arc<CudaVmm>,
        att: &Attention,
        stream: &Arc<CudaStream>,
        mode: ModeChoice,
        copies: usize,
        batch: usize,
        context: usize,
        shared: usize,
        n_kv: usize,
        d: usize,
        tm_layers: usize,
        seed: &mut u64,
    ) -> Result<Kv> {
        let ctx = vmm.context();
        let n = copies * batch;
        let row = n_kv * d;
        let mut rng = *seed | 1;
        let mut fill = |ptr: u64, elems: usize| -> Result<()> {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            unsafe { att.fill_uniform(stream, ptr, elems, Dtype::Bf16, (*seed >> 33) as u32) }?;
            Ok(())
        };
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        match mode {
            ModeChoice::Plain => {
                let slot_stride = context * row;
                let k = DeviceBuffer::new(ctx, n * slot_stride * 2)?;
                let v = DeviceBuffer::new(ctx, n * slot_stride * 2)?;
                fill(k.ptr(), n * slot_stride)?;
                fill(v.ptr(), n * slot_stride)?;
                let mut bufs = Vec::new();
                let mut addrs = Vec::new();
                for c in 0..copies {
                    let slots: Vec<u32> = (0..batch).map(|b| (c * batch + b) as u32).collect();
                    let sl = DeviceBuffer::from_slice(ctx, &slots)?;
                    addrs.push(KvAddress::Strided {
                        k: k.ptr(),
                        v: v.ptr(),
                        slots: sl.ptr(),
                        slot_stride: slot_stride as u64,
                        token_stride: row as u64,
                        head_stride: d as u64,
                    });
                    bufs.push(sl);
                }
                bufs.push(k);
                bufs.push(v);
                Ok(Kv {
                    addrs,
                    _bufs: bufs,
                    _space: None,
                })
            }
            ModeChoice::VmmPerLayer | ModeChoice::VmmTokenMajor => {
                let (layout, layers) = if mode == ModeChoice::VmmPerLayer {
                    (KvLayout::PerLayer, 1)
                } else {
                    (KvLayout::TokenMajor, tm_layers)
                };
                let mut config = KvSpaceConfig {
                    layout,
                    num_layers: layers,
                    num_kv_heads: n_kv,
                    head_dim: d,
                    dtype_bytes: 2,
                    max_slots: n,
                    max_tokens: context,
                    page_size: 2 << 20,
                    max_pages: 0,
                };
                config.max_pages = config.num_regions() * n * config.pages_for(context);
                let mut space =
                    KvSpace::new(config.clone(), vmm.clone()).context("KvSpace on CudaVmm")?;
                let mut slots = Vec::new();
                for _ in 0..n {
                    let s = space.acquire()?;
                    space.ensure(s, context)?;
                    slots.push(s.0 as u32);
                }
                // Each sequence past a batch's first maps the first's prefix pages, then backs
                // its own tail again.
                if shared > 0 {
                    for c in 0..copies {
                        let first = vkv_vmm::SlotId(slots[c * batch] as usize);
                        for &s in &slots[c * batch + 1..(c + 1) * batch] {
                            let s = vkv_vmm::SlotId(s as usize);
                            space.share_prefix(first, s, shared)?;
                            space.ensure(s, context)?;
                        }
                    }
                }
                let view = space.layer_view(layers - 1);
                // Fill every backed byte of every slot (all layers of token-major).
                let slot_elems = config.slot_stride() / 2;
                let backed = config.pages_for(context) * config.page_size / 2;
                let bases: Vec<u64> = match layout {
                    KvLayout::PerLayer => vec![view.k, view.v],
                    KvLayout::TokenMajor => vec![space.layer_view(0).k],
                };
                for base in bases {
                    for &s in &slots {
                        fill(base + (s as usize * slot_elems * 2) as u64, backed)?;
                    }
                }
                let mut bufs = Vec::new();
                let mut addrs = Vec::new();
                for c in 0..copies {
                    let sl = DeviceBuffer::from_slice(ctx, &slots[c * batch..(c + 1) * batch])?;
                    addrs.push(KvAddress::Strided {
                        k: view.k,
                        v: view.v,
                        slots: sl.ptr(),
                        slot_stride: view.slot_stride as u64,
                        token_stride: view.token_stride as u64,
                        head_stride: view.head_stride as u64,
                    });
                    bufs.push(sl);
                }
                Ok(Kv {
                    addrs,
                    _bufs: bufs,
                    _space: Some(space),
                })
            }
            ModeChoice::Paged16 | ModeChoice::Paged32 => {
                let bs = if mode == ModeChoice::Paged16 { 16 } else { 32 };
                let per_seq = context.div_ceil(bs);
                let n_blocks = n * per_seq;
                let block_stride = bs * row;
                let k = DeviceBuffer::new(ctx, n_blocks * block_stride * 2)?;
                let v = DeviceBuffer::new(ctx, n_blocks * block_stride * 2)?;
                fill(k.ptr(), n_blocks * block_stride)?;
                fill(v.ptr(), n_blocks * block_stride)?;
                // Blocks scattered at random over the whole pool (Fisher-Yates).
                let mut ids: Vec<u32> = (0..n_blocks as u32).collect();
                for i in (1..ids.len()).rev() {
                    let j = (next() % (i as u64 + 1)) as usize;
                    ids.swap(i, j);
                }
                // Each sequence past a batch's first names the first's prefix blocks.
                let shared_blocks = shared / bs;
                for c in 0..copies {
                    let first = c * batch * per_seq;
                    for b in 1..batch {
                        for j in 0..shared_blocks {
                            ids[first + b * per_seq + j] = ids[first + j];
                        }
                    }
                }
                let mut bufs = Vec::new();
                let mut addrs = Vec::new();
                for c in 0..copies {
                    let table = &ids[c * batch * per_seq..(c + 1) * batch * per_seq];
                    let tb = DeviceBuffer::from_slice(ctx, table)?;
                    addrs.push(KvAddress::Paged {
                        k: k.ptr(),
                        v: v.ptr(),
                        block_table: tb.ptr(),
                        max_blocks: per_seq as u32,
                        block_size: bs as u32,
                        block_stride: block_stride as u64,
                        token_stride: row as u64,
                        head_stride: d as u64,
                    });
                    bufs.push(tb);
                }
                bufs.push(k);
                bufs.push(v);
                Ok(Kv {
                    addrs,
                    _bufs: bufs,
                    _space: None,
                })
            }
        }
    }

    fn copy_bandwidth(
        att: &Attention,
        ctx: &Arc<CudaContext>,
        stream: &Arc<CudaStream>,
    ) -> Result<(u64, f64)> {
        let bytes = 1usize << 30;
        let a = DeviceBuffer::new(ctx, bytes)?;
        let b = DeviceBuffer::new(ctx, bytes)?;
        a.fill_bytes(0x3c)?;
        let (med, _) = time(att, stream, 3, 20, |_| {
            // SAFETY: two live allocations of `bytes` bytes.
            unsafe { result::memcpy_dtod_async(b.ptr(), a.ptr(), bytes, stream.cu_stream()) }?;
            Ok(())
        })?;
        Ok((bytes as u64, med))
    }

    pub(super) fn measure(args: &Args) -> Result<Report> {
        let probe = vkv_vmm::probe_cuda().context("no GPU")?;
        let vmm = Arc::new(CudaVmm::new(0)?);
        let ctx = vmm.context().clone();
        let stream = ctx.default_stream();
        let att = Attention::new(&ctx).context("compiling the attention kernels")?;
        let (copy_bytes, copy_us) = copy_bandwidth(&att, &ctx, &stream)?;
        let copy_tbps = 2.0 * copy_bytes as f64 / (copy_us * 1e-6) / 1e12;
        let modes = if args.modes.is_empty() {
            vec![
                ModeChoice::VmmPerLayer,
                ModeChoice::VmmTokenMajor,
                ModeChoice::Plain,
                ModeChoice::Paged16,
                ModeChoice::Paged32,
            ]
        } else {
            args.modes.clone()
        };
        let splits: Vec<Option<usize>> = args
            .splits
            .iter()
            .map(|s| match s.as_str() {
                "auto" => Ok(None),
                n => n.parse().map(Some).context("--splits: auto or a number"),
            })
            .collect::<Result<_>>()?;
        let mut rows = Vec::new();
        let mut seed = 0x5eed_u64;
        for h in &args.heads {
            let (hq, hk) = parse_heads(h)?;
            for &d in &args.head_dim {
                for &batch in &args.batch {
                    for &context in &args.context {
                        let kv_bytes = (batch * context * hk * d * 2 * 2) as u64;
                        let copies = ROTATE_BYTES.div_ceil(kv_bytes).clamp(1, 16) as usize;
                        let shape = DecodeShape {
                            batch,
                            n_heads: hq,
                            n_kv_heads: hk,
                            head_dim: d,
                            max_context: context,
                        };
                        let q = DeviceBuffer::new(&ctx, batch * hq * d * 2)?;
                        unsafe {
                            att.fill_uniform(&stream, q.ptr(), batch * hq * d, Dtype::Bf16, 7)
                        }?;
                        let out = DeviceBuffer::new(&ctx, batch * hq * d * 2)?;
                        let lens = DeviceBuffer::from_slice(&ctx, &vec![context as u32; batch])?;
                        let ws = DecodeWorkspace::new(&ctx, batch * hq, d, 64)?;
                        let dargs = DecodeArgs {
                            q: q.ptr(),
                            out: out.ptr(),
                            lens: lens.ptr(),
                        };
                        for (&shared, &mode) in args
                            .shared_prefix
                            .iter()
                            .flat_map(|p| modes.iter().map(move |m| (p, m)))
                        {
                            if shared > context || (shared > 0 && mode == ModeChoice::Plain) {
                                continue;
                            }
                            let kv = build(
                                &vmm,
                                &att,
                                &stream,
                                mode,
                                copies,
                                batch,
                                context,
                                shared,
                                hk,
                                d,
                                args.token_major_layers,
                                &mut seed,
                            )
                            .with_context(|| {
                                format!("{mode:?} b{batch} ctx{context} shared {shared}")
                            })?;
                            stream.synchronize()?;
                            for &sp in &splits {
                                let plan = att.plan(&shape, sp)?;
                                let scale = 1.0 / (d as f32).sqrt();
                                let (med, min) = time(&att, &stream, 5, args.iters.max(1), |i| {
                                    let a = &kv.addrs[i % kv.addrs.len()];
                                    unsafe {
                                        att.decode(
                                            &stream,
                                            Dtype::Bf16,
                                            &shape,
                                            &dargs,
                                            a,
                                            scale,
                                            sp,
                                            Some(&ws),
                                        )
                                    }?;
                                    Ok(())
                                })?;
                                let tbps = kv_bytes as f64 / (med * 1e-6) / 1e12;
                                let row = Row {
                                    mode,
                                    batch,
                                    context,
                                    shared_prefix: shared,
                                    n_heads: hq,
                                    n_kv_heads: hk,
                                    head_dim: d,
                                    splits: plan.splits,
                                    ctas: plan.ctas,
                                    copies,
                                    median_us: med,
                                    min_us: min,
                                    kv_bytes,
                                    kv_tb_per_s: tbps,
                                    ratio_to_copy: tbps / copy_tbps,
                                };
                                eprintln!(
                                    "{:?} b{batch} ctx{context} shared {shared} {hq}/{hk} d{d} splits {}: {med:.1} us, {tbps:.3} TB/s",
                                    mode, plan.splits
                                );
                                rows.push(row);
                            }
                            drop(kv);
                        }
                    }
                }
            }
        }
        let mut prefill = Vec::new();
        for h in &args.heads {
            let (hq, hk) = parse_heads(h)?;
            for &d in &args.head_dim {
                for &batch in args.prefill_batch.iter().filter(|&&b| b > 0) {
                    for &context in &args.prefill_context {
                        for &chunk in &args.prefill_chunk {
                            let q_len = if chunk == 0 {
                                context
                            } else {
                                chunk.min(context)
                            };
                            if chunk > context {
                                continue;
                            }
                            let total = batch * q_len;
                            let q = DeviceBuffer::new(&ctx, total * hq * d * 2)?;
                            unsafe {
                                att.fill_uniform(&stream, q.ptr(), total * hq * d, Dtype::Bf16, 9)
                            }?;
                            let out = DeviceBuffer::new(&ctx, total * hq * d * 2)?;
                            let starts: Vec<u32> =
                                (0..=batch).map(|b| (b * q_len) as u32).collect();
                            let q_start = DeviceBuffer::from_slice(&ctx, &starts)?;
                            let lens =
                                DeviceBuffer::from_slice(&ctx, &vec![context as u32; batch])?;
                            let shape = PrefillShape {
                                batch,
                                n_heads: hq,
                                n_kv_heads: hk,
                                head_dim: d,
                                max_q_len: q_len,
                                max_context: context,
                            };
                            let pargs = PrefillArgs {
                                q: q.ptr(),
                                out: out.ptr(),
                                q_start: q_start.ptr(),
                                lens: lens.ptr(),
                            };
                            // Causal (query, key) pairs: query i of the chunk sees context − q_len + i + 1 keys.
                            let pairs: f64 = (0..q_len)
                                .map(|i| (context - q_len + i + 1) as f64)
                                .sum::<f64>()
                                * batch as f64;
                            let flops = 4.0 * d as f64 * hq as f64 * pairs;
                            for &mode in &modes {
                                let kv = build(
                                    &vmm,
                                    &att,
                                    &stream,
                                    mode,
                                    1,
                                    batch,
                                    context,
                                    0,
                                    hk,
                                    d,
                                    args.token_major_layers,
                                    &mut seed,
                                )?;
                                stream.synchronize()?;
                                let scale = 1.0 / (d as f32).sqrt();
                                let (med, min) =
                                    time(&att, &stream, 3, args.iters.clamp(1, 20), |_| {
                                        unsafe {
                                            att.prefill(
                                                &stream,
                                                Dtype::Bf16,
                                                &shape,
                                                &pargs,
                                                &kv.addrs[0],
                                                scale,
                                            )
                                        }?;
                                        Ok(())
                                    })?;
                                let tflops = flops / (med * 1e-6) / 1e12;
                                eprintln!(
                                    "prefill {mode:?} b{batch} ctx{context} chunk{q_len} {hq}/{hk} d{d}: {med:.1} us, {tflops:.1} TFLOP/s"
                                );
                                prefill.push(PrefillRow {
                                    mode,
                                    batch,
                                    context,
                                    chunk: q_len,
                                    n_heads: hq,
                                    n_kv_heads: hk,
                                    head_dim: d,
                                    median_us: med,
                                    min_us: min,
                                    flops,
                                    tflop_per_s: tflops,
                                });
                            }
                        }
                    }
                }
            }
        }
        if rows.is_empty() && prefill.is_empty() {
            bail!("empty grid");
        }
        Ok(Report {
            device: probe.name,
            arch: att.arch.clone(),
            multiprocessors: att.multiprocessors(),
            copy_bytes,
            copy_median_us: copy_us,
            copy_tb_per_s: copy_tbps,
            rows,
            prefill,
        })
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    pub use crate::cmd::without_cuda as measure;
}
