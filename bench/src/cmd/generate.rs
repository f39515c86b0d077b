//! `vkv bench generate`: CPU prefill and decode throughput of a model, one sequence and a batch
//! decoding together, around [`crate::generate::measure_throughput`]. Its peer for the same
//! measurements with llama.cpp is `benches/peers/llamacpp_cpu.py`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use vkv_engine::model::load_model;

use super::KvOptions;
use crate::generate::measure_throughput;
use crate::report::emit;

#[derive(Debug, ClapArgs)]
pub struct Args<K: KvOptions> {
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
    kv: K,
    #[arg(long)]
    json: bool,
}

pub fn run<K: KvOptions>(args: Args<K>) -> Result<()> {
    let path = args.kv.model_path(args.model)?;
    let m = load_model(&path).context("loading the model")?;
    let t = measure_throughput(
        &m,
        args.kv.kv_mode()?,
        args.kv.kv_cache_dtype().cpu(),
        args.kv.host_kv_memory(),
        args.prompt_tokens,
        args.decode_tokens,
        args.batch,
    )?;
    emit(&t, args.json, |t| {
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
    })?;
    Ok(())
}
