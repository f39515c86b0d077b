//! `vkv bench serve`: vLLM's `bench serve` against a running OpenAI-compatible server (`vkv serve`
//! or another): Gamma arrivals, streamed completions, TTFT / TPOT / ITL / E2E, throughput,
//! goodput, and the prefix cache's hit rate beside the workload's ideal one (`multi-turn`: TTFT
//! of first and later turns too). The measurement is [`crate::serve`]'s; this file builds its configuration, shows
//! progress, and prints.

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use indicatif::{ProgressBar, ProgressStyle};

use crate::offline::Summary;
use crate::report::emit;
use crate::serve::{BenchConfig, ServeReport, Slo};
use crate::workload::Workload;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    /// Request lengths: sharegpt, alpaca, arxiv-summarization, longbench, humaneval,
    /// fixed:P,O, uniform:PMIN-PMAX,OMIN-OMAX, a JSONL trace; or prefix sharing:
    /// prefix-repetition:NUM_PREFIXES,PREFIX_LEN,SUFFIX_LEN,OUTPUT_LEN (request i takes prefix
    /// i mod NUM_PREFIXES), multi-turn:CONVERSATIONS,TURNS,USER_LEN,OUTPUT_LEN[,THINK_SECONDS]
    /// (chat completions).
    #[arg(long, default_value = "sharegpt")]
    workload: String,
    /// Requests (multi-turn: not used; it sends CONVERSATIONS × TURNS).
    #[arg(long = "num-prompts", default_value_t = 100)]
    num_prompts: usize,
    /// Requests per second (`inf`: all at once; multi-turn: conversations per second).
    #[arg(long = "request-rate", default_value_t = f64::INFINITY)]
    request_rate: f64,
    /// Shape of the Gamma distribution of gaps between arrivals: 1 is Poisson, lower burstier.
    #[arg(long, default_value_t = 1.0)]
    burstiness: f64,
    /// Requests in flight at most (multi-turn: conversations).
    #[arg(long = "max-concurrency")]
    max_concurrency: Option<usize>,
    /// Service-level objectives for goodput, in ms: `--goodput ttft:500 tpot:50` (also e2el).
    #[arg(long, num_args = 1..)]
    goodput: Vec<Slo>,
    /// Seed of the request lengths, the prompts' token ids and the arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long = "api-key")]
    api_key: Option<String>,
    /// The model to ask for (default: the server's first).
    #[arg(long)]
    model: Option<String>,
    /// Prompt token ids are drawn below this (default: the server's `vocab_size` in /v1/models,
    /// which vkv gives).
    #[arg(long = "vocab-size")]
    vocab_size: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let config = BenchConfig {
        url: args.url.clone(),
        workload: Workload::parse(&args.workload)?,
        num_prompts: args.num_prompts,
        request_rate: args.request_rate,
        burstiness: args.burstiness,
        max_concurrency: args.max_concurrency,
        goodput: args.goodput.clone(),
        seed: args.seed,
        api_key: args.api_key.clone(),
        model: args.model.clone(),
        vocab_size: args.vocab_size,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let requests = match &config.workload {
        Workload::MultiTurn(m) => m.requests(),
        _ => args.num_prompts,
    };
    let bar = ProgressBar::new(requests as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} requests {elapsed}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(args.url.clone());
    let report = runtime
        .block_on(crate::serve::run(&config, &mut |done| {
            bar.set_position(done as u64)
        }))
        .with_context(|| format!("benchmarking {}", args.url))?;
    bar.finish_and_clear();
    if report.failed > 0 {
        eprintln!(
            "vkv: {} of {} requests failed; the first: {}",
            report.failed,
            report.num_prompts,
            report.first_error.as_deref().unwrap_or("?")
        );
    }
    emit(&report, args.json, print_report)?;
    Ok(())
}

fn print_report(r: &ServeReport) {
    let line = |name: &str, value: String| println!("{name:<40}{value:>16}");
    println!("{:=^56}", " Serving Benchmark Result ");
    line("Model:", r.model.clone());
    line(
        "Server KV cache:",
        r.server_kv.clone().unwrap_or("?".into()),
    );
    line("Workload:", r.workload.clone());
    line(
        "Request rate (req/s):",
        r.request_rate.map_or("inf".into(), |x| format!("{x}")),
    );
    line("Burstiness:", format!("{}", r.burstiness));
    line(
        "Max concurrency:",
        r.max_concurrency.map_or("-".into(), |c| c.to_string()),
    );
    line("Successful requests:", r.completed.to_string());
    line("Failed requests:", r.failed.to_string());
    line("Benchmark duration (s):", format!("{:.2}", r.duration_s));
    line("Total input tokens:", r.total_input_tokens.to_string());
    line("Total generated tokens:", r.total_output_tokens.to_string());
    line(
        "Request throughput (req/s):",
        format!("{:.2}", r.request_throughput),
    );
    if let Some(g) = r.request_goodput {
        line("Request goodput (req/s):", format!("{g:.2}"));
    }
    line(
        "Output token throughput (tok/s):",
        format!("{:.2}", r.output_throughput),
    );
    line(
        "Total token throughput (tok/s):",
        format!("{:.2}", r.total_token_throughput),
    );
    if let Some(p) = r.server_preemptions {
        line("Server preemptions:", format!("{p}"));
    }
    if let Some(w) = r.server_map_waits {
        line("Server map waits:", format!("{w}"));
    }
    let summary = |title: &str, short: &str, s: Summary| {
        println!("{:-^56}", format!(" {title} "));
        line(&format!("Mean {short} (ms):"), format!("{:.2}", s.mean));
        line(&format!("Median {short} (ms):"), format!("{:.2}", s.median));
        line(&format!("P99 {short} (ms):"), format!("{:.2}", s.p99));
    };
    summary("Time to First Token", "TTFT", r.ttft_ms);
    summary("Time per Output Token (excl. 1st token)", "TPOT", r.tpot_ms);
    summary("Inter-token Latency", "ITL", r.itl_ms);
    summary("End-to-end Latency", "E2EL", r.e2el_ms);
    if let Some(t) = &r.turns {
        println!("{:-^56}", " Multi-turn TTFT ");
        for (label, ms) in t.lines() {
            line(&format!("{label}:"), format!("{ms:.2}"));
        }
    }
    println!("{:-^56}", " Prefix Cache ");
    for (label, value) in r.prefix_cache.lines() {
        line(&label, value);
    }
    println!(
        "Ideal hit rate: a perfect cache in blocks of {} tokens ({}).",
        r.prefix_cache.block_size, r.prefix_cache.block_size_from
    );
    if let Some(note) = &r.prefix_cache.ideal_note {
        println!("Ideal hit rate {note}.");
    }
    println!("{:=^56}", "");
}
