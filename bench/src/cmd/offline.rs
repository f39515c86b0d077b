//! `vkv bench offline`: a workload served by the engine in process, in one KV mode or both
//! (interleaved runs, so drift of a noisy machine hits both), with throughput, TTFT/TPOT/E2E,
//! preemptions, map waits, KV use, the prefix cache's hit rate beside the workload's ideal one
//! (in the paged cache's `--block-size`; vmm: 16 assumed), and for `multi-turn` the TTFT of
//! first and later turns, per mode and their ratio. The measurement is [`crate::offline`]'s; this
//! file checks the options, repeats, shows progress, and prints.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use indicatif::{ProgressBar, ProgressStyle};
use vkv_engine::engine::Engine;
use vkv_engine::model::load_model;
use vkv_engine::structured_output::ResponseFormat;
use vkv_kernels::cpu::HugePageUse;

use super::EngineOptions;
use crate::offline::{
    run_multi_turn, run_offline, workload_requests, Arrivals, OfflineReport, Samples, Summary,
};
use crate::prefix::CacheBlock;
use crate::report::emit;
use crate::workload::Workload;

#[derive(Debug, ClapArgs)]
pub struct Args<E: EngineOptions> {
    /// A GGUF file, an HF directory or preset:NAME with random weights (llama-3-8b, llama-2-7b,
    /// mistral-7b, yi-6b, smollm2-135m; the CPU takes up to 2 B parameters, CUDA any). Default:
    /// SmolLM2-135M-Instruct.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Request lengths: sharegpt, alpaca, arxiv-summarization, longbench, humaneval,
    /// fixed:P,O, uniform:PMIN-PMAX,OMIN-OMAX, a JSONL trace; or prefix sharing:
    /// prefix-repetition:NUM_PREFIXES,PREFIX_LEN,SUFFIX_LEN,OUTPUT_LEN (request i takes prefix
    /// i mod NUM_PREFIXES), multi-turn:CONVERSATIONS,TURNS,USER_LEN,OUTPUT_LEN[,THINK_SECONDS].
    #[arg(long, default_value = "sharegpt")]
    workload: String,
    /// Requests (multi-turn: not used; it sends CONVERSATIONS × TURNS).
    #[arg(long = "num-prompts", default_value_t = 100)]
    num_prompts: usize,
    /// Requests per second (Poisson arrivals; multi-turn: conversations per second); default:
    /// all at once.
    #[arg(long = "request-rate")]
    request_rate: Option<f64>,
    /// Runs per mode; with `--kv-mode both` they alternate paged, vmm, paged, vmm, ...
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Parallel sampling: samples per request (OpenAI's `n`), sharing the prompt's KV (forked
    /// once computed); the report has the memory sharing saves (`kv_sharing_saving_mean`).
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// With `--n`: submit the samples as independent requests instead (each computes and holds
    /// the prompt) — the baseline sharing is measured against.
    #[arg(long)]
    unshared_samples: bool,
    /// Beam search of width `--n` instead of sampling (vLLM's `use_beam_search`): the beams
    /// share their common prefix's KV, and the report's `kv_sharing_saving_mean` is what that
    /// saves against every beam holding its own copy.
    #[arg(long, conflicts_with = "unshared_samples")]
    beam_search: bool,
    /// Structured outputs: every request's output constrained to `json_object` (any JSON
    /// object) or to the JSON Schema in this file; the grammar ends a request once its value is
    /// complete, so outputs are at most the workload's lengths (and `ignore_eos` no longer holds
    /// them there). Compiled once and cloned for each request.
    #[arg(long, conflicts_with = "beam_search")]
    response_format: Option<String>,
    #[command(flatten)]
    engine: E,
    /// Print JSON (every run, the median run of each mode, and the ratios).
    #[arg(long)]
    json: bool,
}

pub fn run<E: EngineOptions>(args: Args<E>) -> Result<()> {
    if args.num_prompts == 0 || args.repeats == 0 || args.n == 0 {
        bail!(
            "--num-prompts, --repeats and --n must be at least 1 (found {}, {} and {})",
            args.num_prompts,
            args.repeats,
            args.n
        );
    }
    let arrivals = match args.request_rate {
        None => Arrivals::AllAtOnce,
        Some(rate) if rate > 0.0 && rate.is_finite() => Arrivals::Poisson { rate },
        Some(rate) => {
            bail!("--request-rate must be a positive number of requests per second, found {rate}")
        }
    };
    let workload = Workload::parse(&args.workload)?;
    if args.n > 1 && matches!(workload, Workload::MultiTurn(_)) {
        bail!("--n (parallel sampling) takes a list of requests, not a multi-turn workload");
    }
    if args.response_format.is_some() && matches!(workload, Workload::MultiTurn(_)) {
        bail!("--response-format takes a list of requests, not a multi-turn workload");
    }
    if let Some(format) = &args.response_format {
        response_format(format)?;
    }
    let path = args.engine.model_path(args.model.clone())?;
    let modes = args.engine.kv_modes();
    let device = args.engine.device()?;
    let mut device_name = String::new();
    let mut runs: Vec<OfflineReport> = Vec::new();
    let mut huge_pages = Vec::new();
    let mut model_name = String::new();
    let mut shapes_info = (0.0, 0.0);
    let requests_per_run = match &workload {
        Workload::MultiTurn(m) => {
            eprintln!(
                "vkv: {}: {} conversations × {} turns = {} requests (--num-prompts is not used)",
                workload.name(),
                m.conversations,
                m.turns,
                m.requests()
            );
            m.requests()
        }
        _ => args.num_prompts,
    };
    for round in 0..args.repeats {
        for &mode in &modes {
            let model = load_model(&path).context("loading the model")?;
            model_name.clone_from(&model.name);
            let config = args.engine.config(mode, device);
            let prefix_caching = config.enable_prefix_caching;
            let engine = Engine::start(model, config)?;
            device_name = engine.device_name();
            eprintln!(
                "vkv: {} on {}, KV {} holds {} tokens",
                engine.model().name,
                device_name,
                engine.metrics().kv_name,
                engine.kv_capacity_tokens()
            );
            let vocab_size = engine.model().model.config.vocab_size;
            workload.check_fits(engine.max_model_len())?;
            let block = CacheBlock::of_kv_mode(mode);
            let bar = ProgressBar::new((requests_per_run * args.n) as u64).with_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} requests {elapsed}")
                    .expect("a valid template")
                    .progress_chars("=> "),
            );
            bar.set_message(format!(
                "{} ({}/{})",
                engine.metrics().kv_name,
                round + 1,
                args.repeats
            ));
            let mut progress = |done: usize| bar.set_position(done as u64);
            let mut report = match &workload {
                Workload::MultiTurn(spec) => run_multi_turn(
                    &engine,
                    spec,
                    vocab_size,
                    arrivals,
                    args.seed,
                    &block,
                    &mut progress,
                )?,
                _ => {
                    let mut requests = workload_requests(
                        &workload,
                        args.num_prompts,
                        vocab_size,
                        args.seed,
                        engine.max_model_len(),
                    );
                    if let Some(format) = &args.response_format {
                        let grammar = engine
                            .compile_grammar(&response_format(format)?)
                            .context("--response-format")?;
                        for r in &mut requests {
                            r.grammar = Some(grammar.clone());
                        }
                    }
                    let samples = Samples {
                        n: args.n,
                        shared: !args.unshared_samples,
                        beam_search: args.beam_search,
                    };
                    run_offline(
                        &engine,
                        requests,
                        arrivals,
                        samples,
                        args.seed,
                        &block,
                        &mut progress,
                    )?
                }
            };
            bar.finish_and_clear();
            report.prefix_cache.enabled = Some(prefix_caching);
            // Per request (a prompt) and per sequence (a sample's output).
            let n = report.requests.max(1) as f64;
            shapes_info = (
                report.prompt_tokens as f64 * report.samples_per_request as f64 / n,
                report.output_tokens as f64 / n,
            );
            if report.failed > 0 {
                eprintln!(
                    "vkv: {} of {} requests failed; the first: {}",
                    report.failed,
                    report.requests,
                    report.first_error.as_deref().unwrap_or("?")
                );
            }
            // What the run's weights and KV memory sat on (the modes can differ: see
            // `vkv_kernels::cpu::HugeBuffer`), read while the engine still holds them.
            let pages = HugePageUse::now();
            if let Some(p) = &pages {
                eprintln!("vkv: huge pages in use: {p}");
            }
            huge_pages.push(pages.map(|p| {
                serde_json::json!({
                    "kv": report.kv,
                    "anon_bytes": p.anon_bytes,
                    "shmem_bytes": p.shmem_bytes,
                    "anon_mode": p.anon_mode,
                    "shmem_mode": p.shmem_mode,
                })
            }));
            runs.push(report);
        }
    }
    // Per mode, the run with the median output throughput.
    let medians: Vec<OfflineReport> = (0..modes.len())
        .map(|m| {
            let mut mine: Vec<&OfflineReport> = runs.iter().skip(m).step_by(modes.len()).collect();
            mine.sort_by(|a, b| a.output_tokens_per_s.total_cmp(&b.output_tokens_per_s));
            mine[mine.len() / 2].clone()
        })
        .collect();
    let ratio = (medians.len() == 2).then(|| {
        let (p, v) = (&medians[0], &medians[1]);
        serde_json::json!({
            "output_tokens_per_s": v.output_tokens_per_s / p.output_tokens_per_s,
            "requests_per_s": v.requests_per_s / p.requests_per_s,
            "ttft_median": v.ttft_ms.median / p.ttft_ms.median,
            "tpot_median": v.tpot_ms.median / p.tpot_ms.median,
        })
    });
    let value = serde_json::json!({
        "model": model_name,
        "workload": workload.name(),
        "num_prompts": requests_per_run,
        "request_rate": args.request_rate,
        "threads": rayon_threads(),
        "device": device_name,
        "runs": runs,
        "huge_pages": huge_pages,
        "median": medians,
        "ratio_vmm_over_paged": ratio,
    });
    emit(&value, args.json, |_| {
        println!(
            "{model_name}, {} requests{} of {} (mean prompt {:.0}, output {:.0} tokens), {}, device {device_name}, CPU {} threads, {} run(s) per mode (median shown)",
            requests_per_run,
            match (args.n, args.unshared_samples, args.beam_search) {
                (n, _, true) => format!(" × beam search of width {n}"),
                (1, _, _) => String::new(),
                (n, false, _) => format!(" × {n} samples sharing the prompt"),
                (n, true, _) => format!(" × {n} samples, unshared"),
            },
            workload.name(),
            shapes_info.0,
            shapes_info.1,
            args.request_rate
                .map_or("all at once".to_string(), |r| format!("{r} requests/s")),
            rayon_threads(),
            args.repeats
        );
        print_table(&medians);
    })?;
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn print_table(reports: &[OfflineReport]) {
    let mut header = format!("{:<24}", "");
    for r in reports {
        header.push_str(&format!("{:>24}", r.kv));
    }
    if reports.len() == 2 {
        header.push_str(&format!("{:>12}", "vmm/paged"));
    }
    println!("{header}");
    let row = |name: &str, value: &dyn Fn(&OfflineReport) -> f64, digits: usize| {
        let mut line = format!("{name:<24}");
        for r in reports {
            line.push_str(&format!("{:>24.digits$}", value(r)));
        }
        if let [p, v] = reports {
            let (a, b) = (value(p), value(v));
            if a != 0.0 {
                line.push_str(&format!("{:>12.3}", b / a));
            }
        }
        println!("{line}");
    };
    row("requests/s", &|r| r.requests_per_s, 3);
    row("output tokens/s", &|r| r.output_tokens_per_s, 1);
    row("total tokens/s", &|r| r.total_tokens_per_s, 1);
    let summary = |name: &str, s: &dyn Fn(&OfflineReport) -> Summary| {
        row(&format!("{name} mean ms"), &|r| s(r).mean, 1);
        row(&format!("{name} median ms"), &|r| s(r).median, 1);
        row(&format!("{name} p90 ms"), &|r| s(r).p90, 1);
        row(&format!("{name} p99 ms"), &|r| s(r).p99, 1);
    };
    summary("TTFT", &|r| r.ttft_ms);
    summary("TPOT", &|r| r.tpot_ms);
    summary("E2E", &|r| r.e2e_ms);
    if reports.iter().any(|r| r.turns.is_some()) {
        let lines = |r: &OfflineReport| r.turns.as_ref().map(|t| t.lines()).unwrap_or_default();
        for (i, (label, _)) in lines(&reports[0]).iter().enumerate() {
            row(label, &|r| lines(r).get(i).map_or(f64::NAN, |l| l.1), 1);
        }
    }
    row("preemptions", &|r| r.preemptions as f64, 0);
    row(
        "map waits",
        &|r| r.map_waits.map_or(f64::NAN, |w| w as f64),
        0,
    );
    row(
        "  of them growth",
        &|r| r.map_waits_growth.map_or(f64::NAN, |w| w as f64),
        0,
    );
    row("peak running", &|r| r.peak_running as f64, 0);
    row("KV used mean %", &|r| 100.0 * r.kv_used_mean, 1);
    row("KV used peak %", &|r| 100.0 * r.kv_used_peak, 1);
    row("KV token share %", &|r| 100.0 * r.kv_token_share_mean, 1);
    row(
        "KV saved by sharing %",
        &|r| 100.0 * r.kv_sharing_saving_mean,
        1,
    );
    let on = |r: &OfflineReport| r.prefix_cache.enabled == Some(true);
    row("prefix caching on", &|r| if on(r) { 1.0 } else { 0.0 }, 0);
    row(
        "cached prompt tokens",
        &|r| r.prefix_cache.cached_tokens.map_or(f64::NAN, |c| c as f64),
        0,
    );
    row(
        "prefix hit %",
        &|r| r.prefix_cache.hit_rate.map_or(f64::NAN, |h| 100.0 * h),
        1,
    );
    if let Some(first) = reports.first() {
        let same = reports
            .iter()
            .all(|r| r.prefix_cache.block_size == first.prefix_cache.block_size);
        let label = if same {
            format!("ideal hit % (block {})", first.prefix_cache.block_size)
        } else {
            "ideal hit % (own block)".to_string()
        };
        row(
            &label,
            &|r| {
                r.prefix_cache
                    .ideal_hit_rate
                    .map_or(f64::NAN, |h| 100.0 * h)
            },
            1,
        );
    }
    row("duration s", &|r| r.duration_s, 1);
    for r in reports {
        println!(
            "{}: ideal hit rate = a perfect cache with unlimited memory in blocks of {} tokens ({})",
            r.kv, r.prefix_cache.block_size, r.prefix_cache.block_size_from
        );
    }
}

/// `json_object`, or a file holding a JSON Schema.
fn response_format(spec: &str) -> Result<ResponseFormat> {
    if spec == "json_object" {
        return Ok(ResponseFormat::JsonObject);
    }
    let text = std::fs::read_to_string(spec).with_context(|| {
        format!("--response-format: json_object or a JSON Schema file, found {spec:?}")
    })?;
    let schema = serde_json::from_str(&text)
        .with_context(|| format!("--response-format: {spec} is not JSON"))?;
    Ok(ResponseFormat::JsonSchema(schema))
}
