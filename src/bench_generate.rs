//! `vkv bench generate`: CPU prefill and decode throughput of a model, one sequence and a batch
//! decoding together, around [`vkv_engine::generate::measure_throughput`]. Its peer for the same
//! measurements with llama.cpp is `benches/peers/llamacpp_cpu.py`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use vkv_engine::generate::measure_throughput;
use vkv_engine::model::load_model;

use crate::engine_args::{model_path, KvArgs};

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// A GGUF file, an HF directory or preset:NAME with random weights (llama-3-8b, llama-2-7b,
    /// mistral-7b, yi-6b, smollm2-135m; the CPU takes up to 2 B parameters). Default:
    /// SmolLM2-135M-Instruct.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long = "prompt-tokens", default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long = "decode-tokens", default_value_t = 64)]
    decode_tokens: usize,
    /// Sequences decoding together in the batched measurement.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[command(flatten)]
    kv: KvArgs,
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let path = model_path(args.model)?;
    let m = load_model(&path).context("loading the model")?;
    let t = measure_throughput(
        &m,
        args.kv.mode()?,
        args.kv.kv_cache_dtype().cpu(),
        args.kv.host_kv_memory(),
        args.prompt_tokens,
        args.decode_tokens,
        args.batch,
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&t)?);
    } else {
        println!(
            "{} on the CPU ({} threads), KV {} {}",
            m.name, t.threads, t.kv, t.kv_dtype
        );
        println!(
            "prefill ({} tokens):           {:>8.1} tokens/s",
            t.prompt_tokens, t.prefill_tokens_per_s
        );
        println!(
            "decode, 1 sequence:            {:>8.1} tokens/s",
            t.decode_tokens_per_s
        );
        println!(
            "decode, {} sequences together: {:>8.1} tokens/s",
            t.batch, t.batch_decode_tokens_per_s
        );
    }
    Ok(())
}
