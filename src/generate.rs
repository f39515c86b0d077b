//! `vkv generate`: load a model (the default one is fetched on first use), tokenize the prompt
//! (through the chat template with `--chat`), stream the generated text, and end with token counts
//! and speeds. The work is [`vkv_engine::generate`]'s.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use vkv_engine::engine::FinishReason;
use vkv_engine::generate::generate;
use vkv_engine::kv::{KvBudget, KvDims};
use vkv_engine::model::load_model;
use vkv_engine::sampler::SamplingParams;
use vkv_engine::tokenizer::ChatMessage;

use crate::engine_args::{model_path, KvArgs};

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// A GGUF file, an HF directory or preset:NAME with random weights (llama-3-8b, llama-2-7b,
    /// mistral-7b, yi-6b, smollm2-135m; the CPU takes up to 2 B parameters). Default:
    /// SmolLM2-135M-Instruct, fetched on first use.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long = "max-tokens", default_value_t = 128)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long = "top-k", default_value_t = 0)]
    top_k: usize,
    #[arg(long = "top-p", default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    kv: KvArgs,
}

pub fn run(args: Args) -> Result<()> {
    let path = model_path(args.model)?;
    let loaded = load_model(&path).context("loading the model")?;
    // `vkv generate` runs on the CPU: a model without host weights is refused here, clearly.
    loaded.model.cpu()?;
    let c = &loaded.model.config;
    let text = if args.chat {
        loaded
            .tokenizer
            .apply_chat_template(&[ChatMessage::new("user", args.prompt.clone())], true)?
    } else {
        args.prompt.clone()
    };
    let prompt = loaded.tokenizer.encode(&text, true)?;
    let dims = KvDims {
        num_layers: c.num_layers,
        num_kv_heads: c.num_kv_heads,
        head_dim: c.head_dim,
    };
    let mut kv = args.kv.mode()?.build(
        dims,
        args.kv.kv_cache_dtype().cpu(),
        KvBudget::new(1, c.max_position_embeddings, args.kv.host_kv_memory()),
    )?;
    eprintln!(
        "vkv: {} ({} layers, {} heads / {} KV heads), KV {} on the CPU, {} threads",
        loaded.name,
        c.num_layers,
        c.num_heads,
        c.num_kv_heads,
        kv.name(),
        rayon_threads()
    );
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut out = std::io::stdout();
    let g = generate(
        &loaded,
        kv.as_mut(),
        &prompt,
        args.max_tokens,
        params,
        &mut |piece| {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        },
    )?;
    println!();
    let decode_tps = if g.tokens.len() > 1 {
        (g.tokens.len() - 1) as f64 / g.decode_seconds
    } else {
        0.0
    };
    eprintln!(
        "vkv: prompt {} tokens ({:.1} tokens/s), generated {} tokens ({:.1} tokens/s), stopped by {}",
        g.prompt_tokens,
        g.prompt_tokens as f64 / g.prefill_seconds,
        g.tokens.len(),
        decode_tps,
        match g.finish {
            FinishReason::Stop => "a stop token",
            FinishReason::Length => "max tokens",
            FinishReason::Abort => "an abort",
        }
    );
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
