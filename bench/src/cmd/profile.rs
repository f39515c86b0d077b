//! `vkv profile`: measure a model's step latencies through the engine on a device and write a
//! [`Profile`] (JSON) for `vkv plan`. Prefill: `n` prompts of `len` random tokens, each asking
//! for one token, submitted at once — the step's time is the last one's TTFT (the engine runs
//! them in one step: its step budget is raised to hold the largest point). Decode: `batch`
//! prompts of `context` tokens, all admitted together and generating until each has decoded 17
//! tokens after the last prompt was computed — a step's time is the median gap between
//! consecutive tokens from then on (every step a decode step of the whole batch). Every point is measured `--repeats` times (median),
//! after one warm-up run. The instance limits recorded are the serving options given
//! (`--max-num-batched-tokens`, `--max-num-seqs`), not the raised measuring budget.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use vkv_engine::engine::{event_channel, Engine, EventKind};
use vkv_engine::model::{load_model, LlamaConfig};

use super::EngineOptions;
use crate::offline::random_requests;
use crate::plan::profile::{
    fit_decode, fit_mixed_saving, fit_prefill, DecodeSample, MixedSample, PrefillSample,
};
use crate::plan::simulate::step_seconds;
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
    /// Mixed steps: a prefill chunk of each of these lengths computed in the same step as a
    /// decode batch of `--mixed-batch` sequences at `--mixed-context` tokens (what `vkv plan`
    /// checks its rule for mixed steps against; empty: none).
    #[arg(long, value_delimiter = ',', default_values_t = [256, 1024])]
    mixed_chunks: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    mixed_batch: usize,
    #[arg(long, default_value_t = 512)]
    mixed_context: usize,
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

/// One mixed step: `batch` sequences of `context` prompt tokens decoding, then — once every one
/// has two tokens — a prompt of `chunk` tokens asking for one token, computed (the budget
/// holding it whole) in one step with the decodes. That step's time is the gap each decoding
/// sequence sees between its token before and its token of that step; the median of the gaps.
fn mixed_step(
    engine: &Engine,
    batch: usize,
    context: usize,
    chunk: usize,
    seed: u64,
) -> Result<f64> {
    let vocab = engine.model().model.config.vocab_size;
    let (tx, mut rx) = event_channel();
    let decoding = vec![
        RequestShape {
            prompt_len: context,
            output_len: 64,
        };
        batch
    ];
    let start = Instant::now();
    let mut decoders = HashMap::new();
    for request in random_requests(&decoding, vocab, seed) {
        decoders.insert(engine.submit(request, tx.clone())?, 0usize);
    }
    let mut prefill = None;
    let mut finished = Vec::new();
    while finished.len() < batch + 1 {
        let event = rx.blocking_recv().context("the engine stopped")?;
        match event.kind {
            EventKind::Delta { token_ids, .. } => {
                if let Some(n) = decoders.get_mut(&event.id) {
                    *n += token_ids.len();
                }
                if prefill.is_none() && decoders.values().all(|&n| n >= 2) {
                    let shape = [RequestShape {
                        prompt_len: chunk,
                        output_len: 1,
                    }];
                    let request = random_requests(&shape, vocab, seed ^ 0xc4a2).remove(0);
                    let at = start.elapsed().as_secs_f64();
                    prefill = Some((engine.submit(request, tx.clone())?, at));
                }
            }
            EventKind::Finished(f) => finished.push((event.id, f.timings.token_times)),
            EventKind::Failed(why) => bail!("a profiling request failed: {why}"),
            _ => {}
        }
    }
    let (id, at) = prefill.context("the decoding sequences finished before the prefill")?;
    let step_end = finished
        .iter()
        .find(|f| f.0 == id)
        .and_then(|f| f.1.first())
        .map(|t| at + t)
        .context("the prefill request produced no token")?;
    // Each decoder's token nearest the prefill's (the same step, up to when each was timed) and
    // the gap before it.
    let gaps: Vec<f64> = finished
        .iter()
        .filter(|f| f.0 != id)
        .filter_map(|(_, times)| {
            let k = (1..times.len()).min_by(|&a, &b| {
                (times[a] - step_end)
                    .abs()
                    .total_cmp(&(times[b] - step_end).abs())
            })?;
            Some(times[k] - times[k - 1])
        })
        .collect();
    if gaps.is_empty() {
        bail!("no decoding sequence shared a step with the prefill");
    }
    Ok(median(gaps))
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
    let measured = super::plan::read_profile(from)?;
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
    let mut mixed = Vec::new();
    for &chunk in &args.mixed_chunks {
        let (batch, context) = (args.mixed_batch, args.mixed_context);
        if chunk + batch > budget
            || context + 64 >= limit
            || batch * (context + 65) + chunk > metrics.kv_capacity_tokens
        {
            continue;
        }
        mixed_step(&engine, batch, context, chunk, 0)?;
        let seconds = median(
            (0..args.repeats)
                .map(|r| mixed_step(&engine, batch, context, chunk, r as u64 + 1))
                .collect::<Result<Vec<f64>>>()?,
        );
        eprintln!(
            "mixed {chunk} + {batch} × {context}: {:.2} ms",
            seconds * 1e3
        );
        mixed.push(MixedSample {
            lens: vec![chunk],
            batch,
            // The decoders are a few tokens past their prompts when the prefill comes.
            context_sum: batch * (context + 3),
            seconds,
        });
    }
    let (prefill_model, decode_model) = (fit_prefill(&prefill)?, fit_decode(&decode)?);
    let mixed_saving = fit_mixed_saving(&prefill_model, &decode_model, &mixed);
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
        prefill: prefill_model,
        decode: decode_model,
        prefill_samples: prefill,
        decode_samples: decode,
        mixed_samples: mixed,
        mixed_saving,
    };
    engine.shutdown(false);
    if let Some(saving) = profile.mixed_saving {
        eprintln!(
            "mixing saves {:.2} ms a step (the decode constant is {:.2} ms)",
            saving * 1e3,
            profile.decode.a * 1e3
        );
    }
    for m in &profile.mixed_samples {
        let chunks: Vec<(usize, usize)> = m.lens.iter().map(|&l| (0, l)).collect();
        let rule = step_seconds(&profile, &chunks, m.batch, m.context_sum);
        eprintln!(
            "mixed {:?} + {} decodes: measured {:.2} ms, the simulation's rule {:.2} ms ({:+.0} %)",
            m.lens,
            m.batch,
            m.seconds * 1e3,
            rule * 1e3,
            (rule / m.seconds - 1.0) * 100.0
        );
    }
    write(&profile, args.out.as_deref())
}
