//! `vkv bench model`: the whole bf16 CUDA forward pass (`vkv_engine::model::cuda`) of a model
//! preset with random weights made on the device — prefill of `batch` prompts of `context` tokens
//! (tokens/s), then the median decode step (every sequence one token, greedy on the device, host
//! uploads and the id download included) — in the paged and vmm KV modes, against the roofline of a
//! decode step: (weight bytes + KV bytes read) / the device-to-device copy bandwidth measured in
//! the same run (bytes read + written, GPU.md's convention). It also times the step's GEMMs alone
//! (cuBLASLt as the model runs them, and cuBLAS's `cublasGemmEx`, same shapes) against their
//! weight-bytes floor, to say where the gap is. Decode steps alternate between CUDA graphs (as the
//! engine runs them) and kernel by kernel (`--enforce-eager`), so both are measured at the same
//! contexts. Host clock around a synchronized step; 3 warm-up steps of each; median.
//!
//! Prefill is measured `--prefill-reps` times (every sequence freed between repetitions; the median
//! is reported, and the first repetition apart: it includes the vmm mode's first page mappings,
//! later ones reuse the slots' pages through deferred reclamation). Its ceiling is measured in the
//! same run from the parts that must run: one prefill call's GEMMs alone (the faster of cuBLASLt
//! and cuBLAS, `rows` tokens through every layer, the output head for one row per sequence) and the
//! causal attention kernel alone (strided KV, the same batch and lengths, once per layer); ceiling
//! tokens/s = tokens / (GEMM time) and tokens / (GEMM + attention time). What is left over is
//! norms, RoPE, KV append, SiLU·mul, uploads and (vmm) page mapping.

// Without the cuda feature only `run` (which says so) is reachable.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use anyhow::Result;
use clap::{Args as ClapArgs, ValueEnum};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvChoice {
    Paged,
    Vmm,
    Both,
}

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Model preset (random weights at its real shape).
    #[arg(long, default_value = "llama-3-8b")]
    preset: String,
    /// Batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64")]
    batch: Vec<usize>,
    /// Context length of every sequence before the timed decode steps.
    #[arg(long, default_value_t = 2048)]
    context: usize,
    /// Timed decode steps of each kind (graphs, eager; median reported), after 3 warm-up steps
    /// of each.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// KV mode.
    #[arg(long, value_enum, default_value_t = KvChoice::Both)]
    kv_mode: KvChoice,
    /// Rows per prefill forward call (whole sequences).
    #[arg(long, default_value_t = 8192)]
    prefill_rows: usize,
    /// Prefill repetitions (median reported; sequences freed between them).
    #[arg(long, default_value_t = 3)]
    prefill_reps: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
pub struct Row {
    kv_mode: &'static str,
    batch: usize,
    context: usize,
    /// Median over the repetitions, and the first repetition alone.
    prefill_tokens_per_s: f64,
    prefill_first_tokens_per_s: f64,
    /// Tokens per prefill call, and that call's GEMMs alone and attention kernels alone (ms).
    prefill_call_tokens: usize,
    prefill_gemm_ms: f64,
    /// The prefill call's GEMMs through cuBLASLt (what the model uses) and through cuBLAS
    /// (`cublasGemmEx`); `prefill_gemm_ms` is the faster.
    prefill_gemm_lt_ms: f64,
    prefill_gemm_blas_ms: f64,
    prefill_attention_ms: f64,
    /// Tokens/s if a prefill call were its GEMMs alone, and its GEMMs + attention.
    gemm_ceiling_tokens_per_s: f64,
    gemm_attention_ceiling_tokens_per_s: f64,
    /// prefill_tokens_per_s / gemm_ceiling_tokens_per_s.
    prefill_over_gemm_ceiling: f64,
    /// Decode step with CUDA graphs (median, min), and kernel by kernel (median);
    /// graph_speedup = eager / graphs.
    decode_step_ms: f64,
    decode_step_ms_min: f64,
    decode_step_eager_ms: f64,
    graph_speedup: f64,
    /// Graphs captured for this row's steps.
    graph_captures: u64,
    roofline_ms: f64,
    ratio: f64,
    /// The step's GEMMs alone (median, cuBLASLt as the model runs them; and through cuBLAS),
    /// and their weight-bytes floor.
    gemm_ms: f64,
    gemm_blas_ms: f64,
    weights_floor_ms: f64,
    weight_bytes: usize,
    kv_bytes_read: usize,
}

pub fn run(args: Args) -> Result<()> {
    super::emit_measured(gpu::measure(&args), args.json, print_table)
}

#[derive(Debug, Serialize)]
pub struct Report {
    device: String,
    preset: String,
    copy_tb_per_s: f64,
    rows: Vec<Row>,
}

fn print_table(report: &Report) {
    println!(
        "{} — {} bf16, random weights; copy bandwidth {:.2} TB/s (read + write)",
        report.device, report.preset, report.copy_tb_per_s
    );
    println!(
        "{:>6} {:>6} {:>8} {:>14} {:>10} {:>10} {:>10} {:>12} {:>7} {:>9} {:>9} {:>10}",
        "kv",
        "batch",
        "context",
        "prefill tok/s",
        "step ms",
        "min ms",
        "eager ms",
        "roofline ms",
        "ratio",
        "gemm ms",
        "cublas ms",
        "w floor ms"
    );
    for r in &report.rows {
        println!(
            "{:>6} {:>6} {:>8} {:>14.0} {:>10.3} {:>10.3} {:>10.3} {:>12.3} {:>7.2} {:>9.3} {:>9.3} {:>10.3}",
            r.kv_mode,
            r.batch,
            r.context,
            r.prefill_tokens_per_s,
            r.decode_step_ms,
            r.decode_step_ms_min,
            r.decode_step_eager_ms,
            r.roofline_ms,
            r.ratio,
            r.gemm_ms,
            r.gemm_blas_ms,
            r.weights_floor_ms
        );
    }
    println!(
        "\nprefill: {:>6} {:>6} {:>8} {:>12} {:>12} {:>9} {:>9} {:>14} {:>14} {:>9}",
        "kv",
        "batch",
        "context",
        "tok/s",
        "first tok/s",
        "gemm ms",
        "attn ms",
        "gemm ceil t/s",
        "g+attn ceil",
        "/ gemm"
    );
    for r in &report.rows {
        println!(
            "         {:>6} {:>6} {:>8} {:>12.0} {:>12.0} {:>9.2} {:>9.2} {:>14.0} {:>14.0} {:>9.2}",
            r.kv_mode,
            r.batch,
            r.context,
            r.prefill_tokens_per_s,
            r.prefill_first_tokens_per_s,
            r.prefill_gemm_ms,
            r.prefill_attention_ms,
            r.gemm_ceiling_tokens_per_s,
            r.gemm_attention_ceiling_tokens_per_s,
            r.prefill_over_gemm_ceiling
        );
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;
    use std::time::Instant;

    use anyhow::{bail, Context, Result};
    use vkv_engine::kv::{GpuKv, KvManager, PagedKv, VmmShape};
    use vkv_engine::model::cuda::CudaLlama;
    use vkv_engine::model::reserve_batch;
    use vkv_engine::model::{LlamaConfig, SeqChunk};
    use vkv_kernels::cuda::cudarc::driver::result;
    use vkv_kernels::cuda::{
        Attention, DeviceBuffer, Dtype, GemmLibrary, KvAddress, PrefillArgs, PrefillShape,
    };
    use vkv_vmm::{CudaVmm, KvLayout};

    use super::{Args, KvChoice, Report, Row};

    fn median(v: &mut [f64]) -> f64 {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }

    /// Device-to-device copy of 1 GiB: bytes read + written per second (median of 20).
    fn copy_bandwidth(model: &CudaLlama) -> Result<f64> {
        let ctx = model.context();
        let bytes = 1usize << 30;
        let a = DeviceBuffer::new(ctx, bytes)?;
        let b = DeviceBuffer::new(ctx, bytes)?;
        a.fill_bytes(0x3c)?;
        let mut times = Vec::new();
        for i in 0..23 {
            ctx.synchronize()?;
            let t = Instant::now();
            // SAFETY: two live allocations of `bytes` bytes. A device-to-device copy returns
            // before it is done (on the legacy stream, not the model's): the context is waited for.
            unsafe { result::memcpy_dtod_sync(b.ptr(), a.ptr(), bytes) }?;
            ctx.synchronize()?;
            if i >= 3 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        Ok(2.0 * bytes as f64 / median(&mut times))
    }

    /// The causal prefill attention of one call alone — `batch` sequences of `context` tokens,
    /// the model's heads, strided bf16 KV of random values — once per layer (ms, median of 5
    /// after a warm-up).
    /// Median ms of [`CudaLlama::gemms_only`] through `library` (the first of `reps` a warm-up);
    /// the model's own library is restored after.
    fn gemms_ms(
        model: &mut CudaLlama,
        library: GemmLibrary,
        rows: usize,
        head_rows: usize,
        reps: usize,
    ) -> Result<f64> {
        let own = model.gemm_library();
        model.set_gemm_library(library);
        let mut times = Vec::new();
        for i in 0..reps {
            model.synchronize()?;
            let t = Instant::now();
            model.gemms_only(rows, head_rows)?;
            model.synchronize()?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        model.set_gemm_library(own);
        Ok(median(&mut times))
    }

    fn prefill_attention_ms(model: &CudaLlama, batch: usize, context: usize) -> Result<f64> {
        let c = &model.config;
        let ctx = model.context();
        let stream = ctx.default_stream();
        let att = Attention::new(ctx)?;
        let (qw, kvw) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let rows = batch * context;
        let q = DeviceBuffer::new(ctx, rows * qw * 2)?;
        let out = DeviceBuffer::new(ctx, rows * qw * 2)?;
        let k = DeviceBuffer::new(ctx, rows * kvw * 2)?;
        let v = DeviceBuffer::new(ctx, rows * kvw * 2)?;
        let starts: Vec<u32> = (0..=batch).map(|b| (b * context) as u32).collect();
        let q_start = DeviceBuffer::from_slice(ctx, &starts)?;
        let lens = DeviceBuffer::from_slice(ctx, &vec![context as u32; batch])?;
        let slots: Vec<u32> = (0..batch as u32).collect();
        let slots = DeviceBuffer::from_slice(ctx, &slots)?;
        // SAFETY: each buffer holds the element count filled.
        unsafe {
            att.fill_uniform(&stream, q.ptr(), rows * qw, Dtype::Bf16, 1)?;
            att.fill_uniform(&stream, k.ptr(), rows * kvw, Dtype::Bf16, 2)?;
            att.fill_uniform(&stream, v.ptr(), rows * kvw, Dtype::Bf16, 3)?;
        }
        let kv = KvAddress::Strided {
            k: k.ptr(),
            v: v.ptr(),
            slots: slots.ptr(),
            slot_stride: (context * kvw) as u64,
            token_stride: kvw as u64,
            head_stride: c.head_dim as u64,
        };
        let shape = PrefillShape {
            batch,
            n_heads: c.num_heads,
            n_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            max_q_len: context,
            max_context: context,
        };
        let pargs = PrefillArgs {
            q: q.ptr(),
            out: out.ptr(),
            q_start: q_start.ptr(),
            lens: lens.ptr(),
        };
        let scale = 1.0 / (c.head_dim as f32).sqrt();
        let mut times = Vec::new();
        for i in 0..6 {
            stream.synchronize()?;
            let t = Instant::now();
            for _ in 0..c.num_layers {
                // SAFETY: q/out hold rows × heads, K/V hold batch × context tokens, as described.
                unsafe { att.prefill(&stream, Dtype::Bf16, &shape, &pargs, &kv, scale)? };
            }
            stream.synchronize()?;
            if i > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(median(&mut times))
    }

    pub(super) fn measure(args: &Args) -> Result<Report> {
        let probe = vkv_vmm::probe_cuda().context("no GPU")?;
        if args.batch.is_empty()
            || args.batch.contains(&0)
            || args.context == 0
            || args.steps == 0
            || args.prefill_reps == 0
        {
            bail!("batch sizes, context, steps and prefill repetitions must be positive");
        }
        let config = LlamaConfig::preset(&args.preset)?;
        if args.context + 2 * args.steps + 8 > config.max_position_embeddings {
            bail!(
                "context {} + steps is over {}'s context length {}",
                args.context,
                args.preset,
                config.max_position_embeddings
            );
        }
        let vmm = Arc::new(CudaVmm::new(0)?);
        let ctx = vmm.context().clone();
        let mut model = CudaLlama::random_on_device(&ctx, config.clone(), 1)?;
        let copy = copy_bandwidth(&model)?;
        let dims = config.kv_dims();
        let token_bytes = dims.bytes_per_token_of(2);
        let modes: Vec<&'static str> = match args.kv_mode {
            KvChoice::Paged => vec!["paged"],
            KvChoice::Vmm => vec!["vmm"],
            KvChoice::Both => vec!["paged", "vmm"],
        };
        let mut rows = Vec::new();
        for &batch in &args.batch {
            for &mode in &modes {
                let max_tokens = args.context + 2 * args.steps + 16;
                let mut kv = if mode == "paged" {
                    GpuKv::Paged(PagedKv::on_device(
                        &ctx,
                        dims,
                        batch * max_tokens.div_ceil(16),
                        16,
                    )?)
                } else {
                    let page = 2 << 20;
                    let pages = (batch * max_tokens * token_bytes).div_ceil(page)
                        + 2 * dims.num_layers * batch
                        + 64;
                    GpuKv::vmm(
                        vmm.clone(),
                        dims,
                        VmmShape::new(KvLayout::PerLayer, batch, max_tokens, page, pages),
                    )?
                };
                // Prefill: whole prompts, as many per call as fit prefill_rows.
                let prompt: Vec<u32> = (0..args.context as u32)
                    .map(|i| (i * 7919 + 13) % config.vocab_size as u32)
                    .collect();
                let per_call = (args.prefill_rows / args.context).max(1);
                // Warm-up (cuBLAS heuristics, first launches), then freed.
                let warm = 1u64 << 40;
                let warm_chunk = [SeqChunk {
                    seq: warm,
                    tokens: &prompt[..prompt.len().min(64)],
                    start: 0,
                    all_logits: false,
                }];
                reserve_batch(&mut kv, &warm_chunk)?;
                model.forward_greedy(&warm_chunk, &kv)?;
                kv.free(warm)?;
                let mut next = vec![0u32; batch];
                let mut prefill_s = Vec::new();
                for rep in 0..args.prefill_reps {
                    if rep > 0 {
                        for s in 0..batch {
                            kv.free(s as u64)?;
                        }
                    }
                    model.synchronize()?;
                    let t = Instant::now();
                    for first in (0..batch).step_by(per_call) {
                        let chunks: Vec<SeqChunk<'_>> = (first..(first + per_call).min(batch))
                            .map(|s| SeqChunk {
                                seq: s as u64,
                                tokens: &prompt,
                                start: 0,
                                all_logits: false,
                            })
                            .collect();
                        // Reserved inside the timed region, as the scheduler does every step.
                        reserve_batch(&mut kv, &chunks)?;
                        let ids = model.forward_greedy(&chunks, &kv)?;
                        next[first..first + ids.len()].copy_from_slice(&ids);
                    }
                    prefill_s.push(t.elapsed().as_secs_f64());
                }
                let prefill_first_s = prefill_s[0];
                let prefill_s = median(&mut prefill_s);
                // The ceiling of one full prefill call: its GEMMs and its attention alone.
                let call = per_call.min(batch);
                let call_rows = call * args.context;
                let prefill_gemm_lt_ms =
                    gemms_ms(&mut model, GemmLibrary::CublasLt, call_rows, call, 6)?;
                let prefill_gemm_blas_ms =
                    gemms_ms(&mut model, GemmLibrary::Cublas, call_rows, call, 6)?;
                // The ceiling is the faster library's.
                let prefill_gemm_ms = prefill_gemm_lt_ms.min(prefill_gemm_blas_ms);
                let prefill_attention_ms = prefill_attention_ms(&model, call, args.context)?;
                // Decode: graphs and kernel by kernel, step after step.
                let captures = model.graph_stats().captures;
                let (mut times, mut eager) = (Vec::new(), Vec::new());
                for step in 0..2 * (args.steps + 3) {
                    let graphs = step % 2 == 0;
                    model.set_cuda_graphs(graphs);
                    let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
                    let chunks: Vec<SeqChunk<'_>> = (0..batch)
                        .map(|s| SeqChunk {
                            seq: s as u64,
                            tokens: &toks[s],
                            start: args.context + step,
                            all_logits: false,
                        })
                        .collect();
                    model.synchronize()?;
                    let t = Instant::now();
                    reserve_batch(&mut kv, &chunks)?;
                    next = model.forward_greedy(&chunks, &kv)?;
                    let ms = t.elapsed().as_secs_f64() * 1e3;
                    match (step >= 6, graphs) {
                        (false, _) => {}
                        (true, true) => times.push(ms),
                        (true, false) => eager.push(ms),
                    }
                }
                model.set_cuda_graphs(true);
                let graph_captures = model.graph_stats().captures - captures;
                let min = times.iter().copied().fold(f64::INFINITY, f64::min);
                let med = median(&mut times);
                let eager_med = median(&mut eager);
                let gemm_ms = gemms_ms(&mut model, GemmLibrary::CublasLt, batch, batch, 13)?;
                let gemm_blas_ms = gemms_ms(&mut model, GemmLibrary::Cublas, batch, batch, 13)?;
                let kv_read = batch * (args.context + 6 + args.steps) * token_bytes;
                let roof = (model.weight_bytes() + kv_read) as f64 / copy * 1e3;
                rows.push(Row {
                    kv_mode: mode,
                    batch,
                    context: args.context,
                    prefill_tokens_per_s: (batch * args.context) as f64 / prefill_s,
                    prefill_first_tokens_per_s: (batch * args.context) as f64 / prefill_first_s,
                    prefill_call_tokens: call_rows,
                    prefill_gemm_ms,
                    prefill_gemm_lt_ms,
                    prefill_gemm_blas_ms,
                    prefill_attention_ms,
                    gemm_ceiling_tokens_per_s: call_rows as f64 / prefill_gemm_ms * 1e3,
                    gemm_attention_ceiling_tokens_per_s: call_rows as f64
                        / (prefill_gemm_ms + prefill_attention_ms)
                        * 1e3,
                    prefill_over_gemm_ceiling: (batch * args.context) as f64
                        / prefill_s
                        / (call_rows as f64 / prefill_gemm_ms * 1e3),
                    decode_step_ms: med,
                    decode_step_ms_min: min,
                    decode_step_eager_ms: eager_med,
                    graph_speedup: eager_med / med,
                    graph_captures,
                    roofline_ms: roof,
                    ratio: med / roof,
                    gemm_ms,
                    gemm_blas_ms,
                    weights_floor_ms: model.weight_bytes() as f64 / copy * 1e3,
                    weight_bytes: model.weight_bytes(),
                    kv_bytes_read: kv_read,
                });
                drop(kv);
            }
        }
        Ok(Report {
            device: probe.name,
            preset: args.preset.clone(),
            copy_tb_per_s: copy / 1e12,
            rows,
        })
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    pub use crate::cmd::without_cuda as measure;
}
