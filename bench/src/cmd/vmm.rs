//! `vkv bench vmm`: argument parsing, backend choice (`--device auto|cpu|cuda`: `HostVmm` or
//! `CudaVmm`, auto falling back to the CPU when no GPU answers) and printing for [`crate::vmm`],
//! which does the measuring.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args as ClapArgs, ValueEnum};
use vkv_vmm::{HostVmm, KvLayout, PhysicalMemory};

use crate::report::emit;
use crate::units::{format_bytes, parse_bytes};
use crate::vmm::{self, VmmBenchOptions, VmmBenchReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// CUDA if a GPU answers, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutChoice {
    PerLayer,
    TokenMajor,
    Both,
}

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Backend: cpu = HostVmm (mmap + memfd), cuda = CudaVmm (driver VMM API).
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Page sizes, comma-separated (default: 64KiB,2MiB on cpu; 2MiB on cuda).
    #[arg(long = "page-size", value_delimiter = ',', value_parser = parse_bytes)]
    page_sizes: Vec<usize>,
    #[arg(long, value_enum, default_value_t = LayoutChoice::Both)]
    layout: LayoutChoice,
    /// Model whose KV shape sizes the spaces (llama-3-8b, yi-6b, smollm2-135m, ...).
    #[arg(long, default_value = "llama-3-8b")]
    model: String,
    /// Pages per primitive measurement.
    #[arg(long, default_value_t = 256)]
    pages: usize,
    /// Concurrent requests in the space and mapper runs.
    #[arg(long, default_value_t = 8)]
    slots: usize,
    /// Tokens each request grows to.
    #[arg(long, default_value_t = 2048)]
    tokens: usize,
    /// Decode steps in the mapper runs.
    #[arg(long, default_value_t = 512)]
    steps: usize,
    /// Simulated compute per decode step in the mapper runs (microseconds).
    #[arg(long = "step-us", default_value_t = 500)]
    step_us: u64,
    /// Print the report as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

/// The backend for `device`, and a line describing it.
fn backend(device: Device) -> Result<(Arc<dyn PhysicalMemory>, String)> {
    let cpu = || -> Result<(Arc<dyn PhysicalMemory>, String)> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok((
            Arc::new(HostVmm::new()?),
            format!("cpu ({threads} threads)"),
        ))
    };
    match device {
        Device::Cpu => cpu(),
        Device::Cuda => cuda(),
        Device::Auto => match vkv_vmm::probe_cuda() {
            Ok(_) => cuda(),
            Err(e) => {
                eprintln!("vkv: no GPU ({e}); using the CPU backend");
                cpu()
            }
        },
    }
}

#[cfg(feature = "cuda")]
fn cuda() -> Result<(Arc<dyn PhysicalMemory>, String)> {
    let probe = vkv_vmm::probe_cuda().context("--device cuda")?;
    let vmm = vkv_vmm::CudaVmm::new(0).context("opening CUDA device 0")?;
    Ok((
        Arc::new(vmm),
        format!("{} (driver {})", probe.name, probe.driver),
    ))
}

#[cfg(not(feature = "cuda"))]
fn cuda() -> Result<(Arc<dyn PhysicalMemory>, String)> {
    bail!("--device cuda: this vkv was built without the `cuda` feature")
}

pub fn run(args: Args) -> Result<()> {
    let shape = vkv_engine::presets::kv_shape(&args.model)?;
    if args.tokens == 0 || args.slots < 2 || args.pages == 0 {
        bail!(
            "--tokens and --pages must be > 0 and --slots at least 2 (found {}, {}, {})",
            args.tokens,
            args.pages,
            args.slots
        );
    }
    let (backend, device) = backend(args.device)?;
    let page_sizes = if !args.page_sizes.is_empty() {
        args.page_sizes.clone()
    } else if backend.name() == "cuda" {
        vec![backend.granularity().max(2 << 20)]
    } else {
        vec![64 << 10, 2 << 20]
    };
    let layouts = match args.layout {
        LayoutChoice::PerLayer => vec![KvLayout::PerLayer],
        LayoutChoice::TokenMajor => vec![KvLayout::TokenMajor],
        LayoutChoice::Both => KvLayout::ALL.to_vec(),
    };
    let options = VmmBenchOptions {
        page_sizes,
        layouts,
        pages: args.pages,
        num_layers: shape.num_layers,
        num_kv_heads: shape.num_kv_heads,
        head_dim: shape.head_dim,
        dtype_bytes: shape.dtype_bytes,
        slots: args.slots,
        tokens: args.tokens,
        steps: args.steps,
        step_us: args.step_us,
    };
    eprintln!(
        "vkv bench vmm: {} backend on {device}, model {} ({} per token)",
        backend.name(),
        &shape.name,
        format_bytes(shape.bytes_per_token())
    );
    let mut report = vmm::run(backend, device, &options, |what| {
        eprintln!("  running {what} ...")
    })
    .context("benchmark failed")?;
    report.model = format!("{} ({})", shape.name, report.model);
    emit(&report, args.json, print_tables)?;
    Ok(())
}

fn print_tables(r: &VmmBenchReport) {
    println!(
        "backend {} (granularity {}) on {}; model {}",
        r.backend,
        format_bytes(r.granularity),
        r.device,
        r.model
    );
    println!();
    println!("Per-page backend calls, µs (median / p99):");
    println!(
        "{:>8} {:>15} {:>15} {:>15} {:>15} {:>15} {:>12} {:>13} {:>12}",
        "page",
        "create",
        "map",
        "set-access",
        "unmap",
        "release",
        "map+acc/s",
        "run-acc/page",
        "map+run/s"
    );
    for p in &r.primitives {
        let l = |x: &vmm::Latency| format!("{:.1} / {:.1}", x.median_us, x.p99_us);
        println!(
            "{:>8} {:>15} {:>15} {:>15} {:>15} {:>15} {:>12.0} {:>13.2} {:>12.0}",
            format_bytes(p.page_size),
            l(&p.create),
            l(&p.map),
            l(&p.set_access),
            l(&p.unmap),
            l(&p.release),
            p.map_pages_per_s,
            p.set_access_run_us / p.create.calls.max(1) as f64,
            p.map_run_pages_per_s
        );
    }
    println!();
    println!("KvSpace operations (µs per page mapped; decode ensure µs per call median / p99):");
    println!(
        "{:>11} {:>8} {:>8} {:>10} {:>16} {:>10} {:>10} {:>12} {:>10} {:>10}",
        "layout",
        "page",
        "tok/page",
        "create",
        "decode ensure",
        "decode",
        "prefill",
        "reuse pages",
        "share µs",
        "reclaim"
    );
    for s in &r.spaces {
        println!(
            "{:>11} {:>8} {:>8.1} {:>10.2} {:>16} {:>10.2} {:>10.2} {:>12} {:>10.1} {:>10.2}",
            s.layout,
            format_bytes(s.page_size),
            s.tokens_per_page,
            s.create_ahead.us_per_page,
            format!(
                "{:.2} / {:.1}",
                s.decode_ensure.median_us, s.decode_ensure.p99_us
            ),
            s.decode.us_per_page,
            s.prefill.us_per_page,
            s.reuse.pages,
            s.share_us,
            s.reclaim.us_per_page
        );
    }
    println!();
    println!("Mapper in a decode loop:");
    println!(
        "{:>11} {:>8} {:>10} {:>8} {:>8} {:>12} {:>12} {:>12} {:>14}",
        "layout",
        "page",
        "ahead tok",
        "ensures",
        "waits",
        "wait ms",
        "mapped ahead",
        "on wait",
        "mapper pages/s"
    );
    for m in &r.mappers {
        println!(
            "{:>11} {:>8} {:>10} {:>8} {:>8} {:>12.2} {:>12} {:>12} {:>14.0}",
            m.layout,
            format_bytes(m.page_size),
            m.lookahead_tokens,
            m.ensures,
            m.waits,
            m.wait_ms_total,
            m.pages_mapped_ahead,
            m.pages_mapped_on_wait,
            m.mapper_pages_per_s
        );
    }
}
