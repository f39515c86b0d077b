//! `vkv`: the command line. Parsing (clap) and dispatch to the crates only; what a command does
//! lives in the crate that owns it (see docs/architecture.md):
//!
//! - `vkv serve` → `src/serve.rs` (model, engine, bind, signals) → `vkv-server`;
//! - `vkv generate` → `src/generate.rs` → `vkv_engine::generate`;
//! - `vkv bench kernels|model|vmm|generate|offline|serve` and `vkv frag` → `vkv_bench::cmd`, which
//!   owns their flags, measurements and reports;
//! - `vkv devices` here.
//!
//! The model-running options `serve`, `generate`, `bench offline` and `bench generate` share
//! (`--model` resolution, KV cache, device, engine limits) are `src/engine_args.rs`'s; the two bench
//! commands take them through `vkv_bench::cmd::{EngineOptions, KvOptions}`.

mod engine_args;
mod generate;
mod route;
mod serve;

use anyhow::Result;
use clap::{Parser, Subcommand};
use vkv_bench::cmd::{
    frag, generate as bench_generate, handoff, kernels, model, offline, plan, profile,
    serve as bench_serve, vmm,
};

use crate::engine_args::{EngineArgs, KvArgs};

#[derive(Parser)]
#[command(
    name = "vkv",
    version,
    about = "LLM serving with a virtual-memory KV cache (vAttention) beside PagedAttention"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API (completions, chat completions, streaming, metrics).
    Serve(serve::Args),
    /// Disaggregated serving's front (DistServe): an OpenAI-compatible server that sends each
    /// request's prefill to a `vkv serve --role prefill` instance and its decode, with the
    /// prompt's KV, to a `--role decode` instance.
    Route(route::Args),
    /// Benchmarks: `vkv bench vmm`, `vkv bench generate`, `vkv bench offline`, `vkv bench serve`,
    /// `vkv bench kernels`.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
    /// KV-memory fragmentation study: how much memory each allocation policy wastes and how many
    /// requests it holds at once, replayed through the real allocators.
    Frag(frag::Args),
    /// Generate text for one prompt on the CPU, streaming it as it is produced.
    Generate(generate::Args),
    /// Measure a model's prefill and decode step latencies on a device and fit DistServe's
    /// latency models to them: the profile (JSON) `vkv plan` reads.
    Profile(profile::Args<EngineArgs>),
    /// DistServe's placement search: from profiles, the colocated and disaggregated
    /// (prefill / decode instance) placements that serve a workload within TTFT and TPOT
    /// targets on a GPU budget, by simulated per-GPU goodput.
    Plan(plan::Args),
    /// Say which devices vkv can use here.
    Devices,
}

#[derive(Subcommand)]
enum Bench {
    /// Costs of the virtual-memory KV machinery: per-page driver calls, KvSpace operations per
    /// layout and page size, and whether the Mapper keeps ahead of a decode loop.
    Vmm(vmm::Args),
    /// CPU prefill and decode throughput of a model: one sequence, and a batch decoding together.
    Generate(bench_generate::Args<KvArgs>),
    /// Serving throughput and latency of a workload submitted to the engine in process (all at
    /// once or at a request rate), in one KV mode or both, interleaved, with their ratio.
    Offline(offline::Args<EngineArgs>),
    /// Disaggregated serving's KV handoff per prompt length and KV mode: bytes, memory copies,
    /// time each way, and its share of the prefill's TTFT.
    Handoff(handoff::Args<EngineArgs>),
    /// Load a running OpenAI-compatible server (vLLM's `bench serve`): Gamma arrivals, streamed
    /// responses, TTFT / TPOT / ITL / E2E latency, throughput and goodput.
    Serve(bench_serve::Args),
    /// CUDA decode attention in every KV addressing mode (vmm strided, plain strided, paged) over a
    /// grid of batch × context × heads × head dim, against the device's copy bandwidth.
    Kernels(kernels::Args),
    /// The bf16 CUDA forward pass of a model preset (random weights): prefill tokens/s and the
    /// decode step time in both KV modes, against the weight + KV bytes / copy bandwidth roofline.
    Model(model::Args),
}

fn main() {
    let cli = Cli::parse();
    init_logs(matches!(cli.command, Command::Serve(_) | Command::Route(_)));
    if let Err(e) = run(cli) {
        // The cause chain, one line; no backtrace for a user's mistake.
        eprintln!("vkv: error: {e:#}");
        std::process::exit(1);
    }
}

/// Logs go to stderr through `tracing`, filtered by `RUST_LOG` (e.g. `RUST_LOG=vkv_engine=debug`
/// adds each request's admission and prefill chunks, `trace` its decode steps). Without it:
/// `info` for `vkv serve` (a line per HTTP exchange and per finished request, inside their
/// spans), `warn` for the other commands, whose output is their report.
fn init_logs(serving: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if serving { "info" } else { "warn" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Bench { which } => match which {
            Bench::Vmm(args) => vmm::run(args),
            Bench::Generate(args) => bench_generate::run(args),
            Bench::Offline(args) => offline::run(args),
            Bench::Handoff(args) => handoff::run(args),
            Bench::Serve(args) => bench_serve::run(args),
            Bench::Kernels(args) => kernels::run(args),
            Bench::Model(args) => model::run(args),
        },
        Command::Frag(args) => frag::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Profile(args) => profile::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Route(args) => route::run(args),
        Command::Devices => {
            match vkv_vmm::probe_cuda() {
                Ok(p) => println!(
                    "cuda: {} device(s), device 0 = {}, driver {}",
                    p.devices, p.name, p.driver
                ),
                Err(e) => println!("cuda: unavailable ({e})"),
            }
            println!(
                "cpu: {} thread(s)",
                std::thread::available_parallelism().map_or(1, |n| n.get())
            );
            Ok(())
        }
    }
}
