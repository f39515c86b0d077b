//! `vkv bench model`: the whole bf16 CUDA forward pass (`vkv_engine::model::cuda`) of a model
//! preset with random weights made on the device — prefill of `batch` prompts of `context`
//! tokens (tokens/s), then the median decode step (every sequence one token, greedy on the
//! device, host uploads and the id download included) — in the paged and vmm KV modes, against
//! the roofline of a decode step: (weight bytes + KV bytes read) / the device-to-device copy
//! bandwidth measured in the same run (bytes read + written, GPU.md's convention). It also times
//! the step's GEMMs alone (cuBLAS, same shapes) against their weight-bytes floor, to say where
//! the gap is. Host clock around a synchronized step; 3 warm-up steps; median.

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
    /// Timed decode steps (median reported), after 3 warm-up steps.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// KV mode.
    #[arg(long, value_enum, default_value_t = KvChoice::Both)]
    kv_mode: KvChoice,
    /// Rows per prefill forward call (whole sequences).
    #[arg(long, default_value_t = 8192)]
    prefill_rows: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
pub struct Row {
    kv_mode: &'static str,
    batch: usize,
    context: usize,
    prefill_tokens_per_s: f64,
    decode_step_ms: f64,
    decode_step_ms_min: f64,
    roofline_ms: f64,
    ratio: f64,
    /// The step's GEMMs alone (median), and their weight-bytes floor.
    gemm_ms: f64,
    weights_floor_ms: f64,
    weight_bytes: usize,
    kv_bytes_read: usize,
}

#[derive(Debug, Serialize)]
pub struct Report {
    device: String,
    preset: String,
    copy_tb_per_s: f64,
    rows: Vec<Row>,
}

pub fn run(args: Args) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        let report = gpu::measure(&args)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!(
                "{} — {} bf16, random weights; copy bandwidth {:.2} TB/s (read + write)",
                report.device, report.preset, report.copy_tb_per_s
            );
            println!(
                "{:>6} {:>6} {:>8} {:>14} {:>10} {:>10} {:>12} {:>7} {:>9} {:>10}",
                "kv",
                "batch",
                "context",
                "prefill tok/s",
                "step ms",
                "min ms",
                "roofline ms",
                "ratio",
                "gemm ms",
                "w floor ms"
            );
            for r in &report.rows {
                println!(
                    "{:>6} {:>6} {:>8} {:>14.0} {:>10.3} {:>10.3} {:>12.3} {:>7.2} {:>9.3} {:>10.3}",
                    r.kv_mode,
                    r.batch,
                    r.context,
                    r.prefill_tokens_per_s,
                    r.decode_step_ms,
                    r.decode_step_ms_min,
                    r.roofline_ms,
                    r.ratio,
                    r.gemm_ms,
                    r.weights_floor_ms
                );
            }
        }
        Ok(())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = args;
        anyhow::bail!("this vkv was built without the cuda feature")
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::sync::Arc;
    use std::time::Instant;

    use anyhow::{bail, Context, Result};
    use vkv_engine::model::cuda::{CudaLlama, GpuKv, GpuKvDims};
    use vkv_engine::model::{LlamaConfig, SeqChunk};
    use vkv_kernels::cuda::cudarc::driver::result;
    use vkv_kernels::cuda::DeviceBuffer;
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
            model.synchronize()?;
            let t = Instant::now();
            // SAFETY: two live allocations of `bytes` bytes; synchronous on the null stream.
            unsafe { result::memcpy_dtod_sync(b.ptr(), a.ptr(), bytes) }?;
            model.synchronize()?;
            if i >= 3 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        Ok(2.0 * bytes as f64 / median(&mut times))
    }

    pub(super) fn measure(args: &Args) -> Result<Report> {
        let probe = vkv_vmm::probe_cuda().context("no GPU")?;
        if args.batch.is_empty() || args.batch.contains(&0) || args.context == 0 || args.steps == 0
        {
            bail!("batch sizes, context and steps must be positive");
        }
        let config = LlamaConfig::preset(&args.preset)?;
        if args.context + args.steps + 4 > config.max_position_embeddings {
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
        let dims = GpuKvDims::of(&config);
        let token_bytes = 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * 2;
        let modes: Vec<&'static str> = match args.kv_mode {
            KvChoice::Paged => vec!["paged"],
            KvChoice::Vmm => vec!["vmm"],
            KvChoice::Both => vec!["paged", "vmm"],
        };
        let mut rows = Vec::new();
        for &batch in &args.batch {
            for &mode in &modes {
                let max_tokens = args.context + args.steps + 8;
                let mut kv = if mode == "paged" {
                    GpuKv::paged(&ctx, dims, batch * max_tokens.div_ceil(16), 16)?
                } else {
                    let page = 2 << 20;
                    let pages = (batch * max_tokens * token_bytes).div_ceil(page)
                        + 2 * dims.num_layers * batch
                        + 64;
                    GpuKv::vmm(
                        vmm.clone(),
                        dims,
                        KvLayout::PerLayer,
                        batch,
                        max_tokens,
                        page,
                        pages,
                    )?
                };
                // Prefill: whole prompts, as many per call as fit prefill_rows.
                let prompt: Vec<u32> = (0..args.context as u32)
                    .map(|i| (i * 7919 + 13) % config.vocab_size as u32)
                    .collect();
                let per_call = (args.prefill_rows / args.context).max(1);
                // Warm-up (cuBLAS heuristics, first launches), then freed.
                let warm = 1u64 << 40;
                model.forward_greedy(
                    &[SeqChunk {
                        seq: warm,
                        tokens: &prompt[..prompt.len().min(64)],
                        start: 0,
                        all_logits: false,
                    }],
                    &mut kv,
                )?;
                kv.free(warm)?;
                model.synchronize()?;
                let t = Instant::now();
                let mut next = vec![0u32; batch];
                for first in (0..batch).step_by(per_call) {
                    let chunks: Vec<SeqChunk<'_>> = (first..(first + per_call).min(batch))
                        .map(|s| SeqChunk {
                            seq: s as u64,
                            tokens: &prompt,
                            start: 0,
                            all_logits: false,
                        })
                        .collect();
                    let ids = model.forward_greedy(&chunks, &mut kv)?;
                    next[first..first + ids.len()].copy_from_slice(&ids);
                }
                let prefill_s = t.elapsed().as_secs_f64();
                // Decode.
                let mut times = Vec::new();
                for step in 0..args.steps + 3 {
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
                    next = model.forward_greedy(&chunks, &mut kv)?;
                    if step >= 3 {
                        times.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
                let min = times.iter().copied().fold(f64::INFINITY, f64::min);
                let med = median(&mut times);
                let mut gt = Vec::new();
                for i in 0..13 {
                    model.synchronize()?;
                    let t = Instant::now();
                    model.gemms_only(batch)?;
                    model.synchronize()?;
                    if i >= 3 {
                        gt.push(t.elapsed().as_secs_f64() * 1e3);
                    }
                }
                let gemm_ms = median(&mut gt);
                let kv_read = batch * (args.context + 3 + args.steps / 2) * token_bytes;
                let roof = (model.weight_bytes() + kv_read) as f64 / copy * 1e3;
                rows.push(Row {
                    kv_mode: mode,
                    batch,
                    context: args.context,
                    prefill_tokens_per_s: (batch * args.context) as f64 / prefill_s,
                    decode_step_ms: med,
                    decode_step_ms_min: min,
                    roofline_ms: roof,
                    ratio: med / roof,
                    gemm_ms,
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
