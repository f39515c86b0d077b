//! `vkv profile`: measure a model's step latencies through the engine on a device and write a
//! [`Profile`] (JSON) for `vkv plan`. Prefill: `n` prompts of `len` random tokens, each asking
//! for one token, submitted at once — the step's time is the last one's TTFT (the engine runs
//! them in one step: its step budget is raised to hold the largest point). Decode: `batch`
//! prompts of `context` tokens, all admitted together and generating until each has decoded 17
//! tokens after the last prompt was computed — a step's time is the median gap between
//! consecutive tokens from then on (every step a decode step of the whole batch). Every point is measured `--repeats` times (median),
//! after one warm-up run. The instance limits recorded are the serving options given
//! (`--max-num-batched-tokens`, `--max-num-seqs`), not the raised measuring budget.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use vkv_engine::engine::{event_channel, Engine, EventKind};
use vkv_engine::model::{load_model, LlamaConfig};

use super::EngineOptions;
use crate::offline::random_requests;
use crate::plan::profile::{fit_decode, fit_prefill, DecodeSample, PrefillSample};
use crate::plan::{ModelShape, Profile, Scaling};
use crate::workload::RequestShape;

#[derive(Debug, ClapArgs)]
pub struct Args<E: EngineOptions> {
    /// A GGUF file, an HF directory or preset:NAME (random weights). Default: SmolLM2.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt lengths of the prefill points.
    #[arg(long, value_delimiter = ',', default_values_t = [128, 512, 1024, 2048, 4096])]
    prefill_lens: Vec<usize>,
    /// Prompts per prefill step.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4])]
    prefill_batches: Vec<usize>,
    /// Sequences per decode step.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32, 64])]
    decode_batches: Vec<usize>,
    /// Context of each decoding sequence.
    #[arg(long, value_delimiter = ',', default_values_t = [256, 1024, 4096])]
    contexts: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Where to write the profile (JSON); also printed.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure nothing: model a profile of `--model` (a preset or an HF directory) at
    /// `--tensor-parallel` GPUs per instance from this measured profile of another model on
    /// the same card (see `Profile::modelled` for the rules). Marked as modelled in the file
    /// and in every plan made with it.
    #[arg(long)]
    modelled_from: Option<PathBuf>,
    /// With `--modelled-from`: GPUs per instance.
    #[arg(long, default_value_t = 1)]
    tensor_parallel: usize,
    /// With `--modelled-from`: all-reduce bus bandwidth, bytes/s (default 300 GB/s, an
    /// assumption for NVLink 4; measure it with nccl-tests' all_reduce_perf).
    #[arg(long, default_value_t = 300e9)]
    allreduce_bandwidth: f64,
    /// With `--modelled-from`: seconds of one all-reduce besides its bytes.
    #[arg(long, default_value_t = 10e-6)]
    allreduce_latency: f64,
    /// With `--modelled-from`: device memory bandwidth, bytes/s (default: the H100's copy
    /// bandwidth measured by `vkv bench kernels`, 2.95 TB/s).
    #[arg(long, default_value_t = 2.95e12)]
    memory_bandwidth: f64,
    #[command(flatten)]
    engine: E,
}

/// Submit `shapes` at once; every request's token times (seconds from its arrival).
fn token_times(engine: &Engine, shapes: &[RequestShape], seed: u64) -> Result<Vec<Vec<f64>>> {
    let vocab = engine.model().model.config.vocab_size;
    let (tx, mut rx) = event_channel();
    let n = shapes.len();
    for request in random_requests(shapes, vocab, seed) {
        engine.submit(request, tx.clone())?;
    }
    let mut times = Vec::with_capacity(n);
    while times.len() < n {
        match rx.blocking_recv().context("the engine stopped")?.kind {
            EventKind::Finished(f) => times.push(f.timings.token_times),
            EventKind::Failed(why) => bail!("a profiling request failed: {why}"),
            _ => {}
        }
    }
    Ok(times)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The shape of the model at `path` without loading its weights: a preset or an HF directory.
fn model_shape(path: &std::path::Path) -> Result<(String, ModelShape)> {
    let text = path.to_string_lossy();
    let config = if let Some(name) = text.strip_prefix("preset:") {
        LlamaConfig::preset(name)?
    } else if path.join("config.json").is_file() {
        let json = std::fs::read_to_string(path.join("config.json"))
            .with_context(|| format!("reading {}/config.json", path.display()))?;
        LlamaConfig::from_hf_json(&json)?
    } else {
        bail!(
            "--modelled-from needs --model preset:NAME or an HF directory (with config.json), found {}",
            path.display()
        );
    };
    let name = text.strip_prefix("preset:").unwrap_or(&text).to_string();
    Ok((name, ModelShape::of(&config)))
}

/// Write `profile` to `out` (if given) and print it.
fn write(profile: &Profile, out: Option<&std::path::Path>) -> Result<()> {
    let text = serde_json::to_string_pretty(profile)?;
    if let Some(out) = out {
        std::fs::write(out, &text).with_context(|| format!("writing {}", out.display()))?;
    }
    println!("{text}");
    Ok(())
}

fn modelled<E: EngineOptions>(args: &Args<E>, from: &std::path::Path) -> Result<()> {
    let text = std::fs::read_to_string(from)
        .with_context(|| format!("reading the profile {}", from.display()))?;
    let measured: Profile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a vkv profile", from.display()))?;
    let path = args
        .model
        .as_deref()
        .context("--modelled-from needs --model: the model to model")?;
    let (name, shape) = model_shape(path)?;
    let profile = measured
        .modelled(
            &name,
            &shape,
            Scaling {
                tensor_parallel: args.tensor_parallel,
                allreduce_bandwidth: args.allreduce_bandwidth,
                allreduce_latency: args.allreduce_latency,
                memory_bandwidth: args.memory_bandwidth,
            },
        )
        .with_context(|| format!("modelling {name} from {}", from.display()))?;
    write(&profile, args.out.as_deref())
}

pub fn run<E: EngineOptions>(args: Args<E>) -> Result<()> {
    if let Some(from) = &args.modelled_from {
        return modelled(&args, from);
    }
    if args.tensor_parallel != 1 {
        bail!("vkv profile measures at tensor parallel 1 (one GPU); model other degrees with --modelled-from");
    }
    let device = args.engine.device()?;
    let path = args.engine.model_path(args.model.clone())?;
    let kv_mode = *args
        .engine
        .kv_modes()
        .first()
        .context("one KV mode to profile")?;
    let serving = args.engine.config(kv_mode, device);
    // The largest prefill point runs as one step; decode points may take several steps to
    // prefill, and are timed only once every sequence decodes.
    let largest = args.prefill_lens.iter().max().copied().unwrap_or(1)
        * args.prefill_batches.iter().max().copied().unwrap_or(1);
    let mut config = serving.clone();
    config.max_num_batched_tokens = config.max_num_batched_tokens.max(largest);
    let budget = config.max_num_batched_tokens;
    config.max_num_seqs = config
        .max_num_seqs
        .max(args.decode_batches.iter().max().copied().unwrap_or(1));
    config.enable_prefix_caching = false;
    let model = load_model(&path).with_context(|| format!("loading {}", path.display()))?;
    let name = model.name.clone();
    let shape = ModelShape::of(&model.model.config);
    let engine = Engine::start(model, config).context("starting the engine")?;
    let limit = engine.max_model_len();
    let metrics = engine.metrics();
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let mut prefill = Vec::new();
    for &n in &args.prefill_batches {
        for &len in args.prefill_lens.iter().filter(|&&l| l < limit) {
            let shapes = vec![
                RequestShape {
                    prompt_len: len,
                    output_len: 1
                };
                n
            ];
            if n * (len + 1) > metrics.kv_capacity_tokens {
                continue;
            }
            token_times(&engine, &shapes, 0)?;
            let seconds = median(
                (0..args.repeats)
                    .map(|r| {
                        let times = token_times(&engine, &shapes, r as u64 + 1)?;
                        Ok(times.iter().map(|t| t[0]).fold(0.0, f64::max))
                    })
                    .collect::<Result<Vec<f64>>>()?,
            );
            eprintln!("prefill {n} × {len}: {:.2} ms", seconds * 1e3);
            prefill.push(PrefillSample {
                lens: vec![len; n],
                seconds,
            });
        }
    }
    const STEPS: usize = 17;
    let mut decode = Vec::new();
    for &batch in &args.decode_batches {
        for &context in args.contexts.iter().filter(|&&c| c + STEPS < limit) {
            if batch * (context + STEPS + (batch * context).div_ceil(budget) + 1)
                > metrics.kv_capacity_tokens
            {
                continue;
            }
            // Long enough that every sequence still decodes STEPS tokens after the last one's
            // prompt is computed (the prompts may take several steps).
            let output_len = STEPS + (batch * context).div_ceil(budget) + 1;
            let shapes = vec![
                RequestShape {
                    prompt_len: context,
                    output_len
                };
                batch
            ];
            token_times(&engine, &shapes, 0)?;
            let mut gaps = Vec::new();
            for r in 0..args.repeats {
                let times = token_times(&engine, &shapes, r as u64 + 1)?;
                // All were submitted together: from the last first token on, every step is a
                // decode step of the whole batch.
                let all_decoding = times.iter().map(|t| t[0]).fold(0.0, f64::max);
                for t in &times {
                    let decoding: Vec<f64> =
                        t.iter().copied().filter(|&x| x >= all_decoding).collect();
                    gaps.extend(decoding.windows(2).map(|w| w[1] - w[0]));
                }
            }
            if gaps.is_empty() {
                continue;
            }
            let seconds = median(gaps);
            eprintln!("decode {batch} × {context}: {:.2} ms", seconds * 1e3);
            decode.push(DecodeSample {
                batch,
                context_sum: batch * (context + STEPS / 2),
                seconds,
            });
        }
    }
    let profile = Profile {
        device: metrics.device.clone(),
        model: name,
        date: crate::report::utc_date(),
        tensor_parallel: 1,
        kv_bytes_per_token: metrics.kv_bytes_per_token,
        kv_capacity_tokens: metrics.kv_capacity_tokens,
        max_model_len: limit,
        max_num_batched_tokens: serving.max_num_batched_tokens,
        max_num_seqs: serving.max_num_seqs,
        // `paged-16`: 16-token blocks; the vmm caches reserve whole pages, which the books of
        // the simulation approximate with blocks of the default size.
        kv_block_tokens: metrics
            .kv_name
            .strip_prefix("paged-")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        shape: Some(shape),
        modelled: None,
        prefill: fit_prefill(&prefill)?,
        decode: fit_decode(&decode)?,
        prefill_samples: prefill,
        decode_samples: decode,
    };
    engine.shutdown(false);
    write(&profile, args.out.as_deref())
}
