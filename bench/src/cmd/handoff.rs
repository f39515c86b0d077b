//! `vkv bench handoff`: what handing a prompt's KV from a prefill instance to a decode instance
//! costs in each KV mode (disaggregated serving, DistServe). For each prompt length, a prefill
//! half of a seeded random prompt runs on an engine (its TTFT is the prefill it pays for), its
//! KV is read out (`vkv_kv::export_kv`: bytes, the contiguous runs copied, seconds), received
//! as it goes over the wire (one copy into a buffer) and checked, and written into a decode half on the same engine
//! (`import_kv`), which then generates a token. Reported per mode and length, medians over
//! `--repeats`: bytes, copies each way, microseconds each way and the copy bandwidth, the wire
//! encode + decode time, and the handoff (export + import) as a share of the TTFT.
//!
//! The engine is the one `vkv serve` runs (the handoff's copies run on its thread between
//! steps); HTTP transfer between instances is not included.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use vkv_engine::engine::{event_channel, Engine, EventKind, ExportedKv, KvHandoff};
use vkv_engine::kv::KvBlob;
use vkv_engine::model::load_model;

use super::{emit_measured, EngineOptions};
use crate::offline::random_requests;
use crate::workload::RequestShape;

#[derive(Debug, ClapArgs)]
pub struct Args<E: EngineOptions> {
    /// A GGUF file, an HF directory or preset:NAME (random weights). Default: SmolLM2.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt lengths.
    #[arg(long, value_delimiter = ',', default_values_t = [512, 1024, 2048, 4096, 8000])]
    prompt_lens: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// The report as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    engine: E,
}

/// One KV mode at one prompt length (medians over the repeats).
#[derive(Debug, Clone, serde::Serialize)]
pub struct HandoffPoint {
    pub kv: String,
    pub tokens: usize,
    pub bytes: usize,
    pub export_copies: usize,
    pub import_copies: usize,
    pub export_us: f64,
    pub import_us: f64,
    /// Bytes over the export's time (GB/s).
    pub export_gbps: f64,
    pub import_gbps: f64,
    /// Receiving the blob into a buffer and checking it (transport excluded).
    pub wire_us: f64,
    /// The prefill half's time to first token.
    pub ttft_ms: f64,
    /// (export + import) / TTFT.
    pub handoff_share: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct HandoffReport {
    pub device: String,
    pub model: String,
    pub points: Vec<HandoffPoint>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run `request` to its end; its `KvExported` (if any) and its TTFT.
fn run_one(
    engine: &Engine,
    request: vkv_engine::engine::GenerationRequest,
) -> Result<(Option<Arc<ExportedKv>>, f64)> {
    let (tx, mut rx) = event_channel();
    engine.submit(request, tx)?;
    let mut exported = None;
    loop {
        match rx.blocking_recv().context("the engine stopped")?.kind {
            EventKind::KvExported(kv) => exported = Some(kv),
            EventKind::Finished(f) => return Ok((exported, f.timings.ttft)),
            EventKind::Failed(why) => bail!("a handoff request failed: {why}"),
            _ => {}
        }
    }
}

/// One handoff as measured.
struct Measured {
    exported: ExportedKv,
    import_seconds: f64,
    import_copies: usize,
    wire_seconds: f64,
    ttft: f64,
}

/// One handoff of a `len`-token prompt.
fn handoff(engine: &Engine, len: usize, seed: u64) -> Result<Measured> {
    let vocab = engine.model().model.config.vocab_size;
    let shape = RequestShape {
        prompt_len: len,
        output_len: 1,
    };
    let mut prefill = random_requests(&[shape], vocab, seed).remove(0);
    let prompt = prefill.prompt.clone();
    prefill.handoff = Some(KvHandoff::Export);
    let (exported, ttft) = run_one(engine, prefill)?;
    let exported = exported.context("the prefill half handed out no KV")?;
    let start = Instant::now();
    // What crosses the wire: the blob as the prefill instance holds it, read back by the decode
    // instance (here one copy, as receiving it into a buffer of its own would be).
    let kv = KvBlob::decode(exported.kv.encoded().to_vec())?;
    let wire = start.elapsed().as_secs_f64();
    let before = engine.metrics().kv_handoff.imported;
    let mut decode = random_requests(&[shape], vocab, seed).remove(0);
    decode.prompt = prompt;
    decode.max_tokens = 2;
    decode.handoff = Some(KvHandoff::Import {
        first_token: exported.first_token.context("the prefill half's token")?,
        kv: Arc::new(kv),
    });
    run_one(engine, decode)?;
    let after = engine.metrics().kv_handoff.imported;
    Ok(Measured {
        exported: (*exported).clone(),
        import_seconds: after.seconds - before.seconds,
        import_copies: (after.copies - before.copies) as usize,
        wire_seconds: wire,
        ttft,
    })
}

pub fn run<E: EngineOptions>(args: Args<E>) -> Result<()> {
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let device = args.engine.device()?;
    let path = args.engine.model_path(args.model.clone())?;
    let report = (|| {
        let mut points = Vec::new();
        let mut device_name = String::new();
        let mut model_name = String::new();
        for mode in args.engine.kv_modes() {
            let mut config = args.engine.config(mode, device);
            config.enable_prefix_caching = false;
            let longest = args.prompt_lens.iter().max().copied().unwrap_or(1);
            config.max_num_batched_tokens = config.max_num_batched_tokens.max(longest);
            let model = load_model(&path).with_context(|| format!("loading {}", path.display()))?;
            model_name = model.name.clone();
            let engine = Engine::start(model, config).context("starting the engine")?;
            let metrics = engine.metrics();
            device_name = metrics.device.clone();
            let limit = engine.max_model_len().min(engine.kv_capacity_tokens()) - 2;
            // A warm-up: first-touch page faults and kernel caches are not the handoff's.
            handoff(&engine, args.prompt_lens[0].min(limit), 0)?;
            for &len in &args.prompt_lens {
                let len = len.min(limit);
                let mut runs = Vec::new();
                for r in 0..args.repeats {
                    runs.push(handoff(&engine, len, 1 + r as u64)?);
                }
                let pick = |f: fn(&Measured) -> f64| median(runs.iter().map(f).collect());
                let first = &runs[0];
                let bytes = first.exported.stats.bytes;
                let export = pick(|r| r.exported.seconds);
                let import = pick(|r| r.import_seconds);
                let ttft = pick(|r| r.ttft);
                eprintln!("{} {len} tokens: done", metrics.kv_name);
                points.push(HandoffPoint {
                    kv: metrics.kv_name.clone(),
                    tokens: len,
                    bytes,
                    export_copies: first.exported.stats.copies,
                    import_copies: first.import_copies,
                    export_us: export * 1e6,
                    import_us: import * 1e6,
                    export_gbps: bytes as f64 / export.max(1e-12) / 1e9,
                    import_gbps: bytes as f64 / import.max(1e-12) / 1e9,
                    wire_us: pick(|r| r.wire_seconds) * 1e6,
                    ttft_ms: ttft * 1e3,
                    handoff_share: (export + import) / ttft.max(1e-12),
                });
            }
        }
        Ok(HandoffReport {
            device: device_name,
            model: model_name,
            points,
        })
    })();
    emit_measured(report, args.json, |r: &HandoffReport| {
        println!("KV handoff on {} ({}), medians:", r.device, r.model);
        println!(
            "{:<24} {:>6} {:>10} {:>7} {:>7} {:>9} {:>9} {:>7} {:>7} {:>9} {:>9} {:>7}",
            "kv",
            "tokens",
            "bytes",
            "out cp",
            "in cp",
            "out µs",
            "in µs",
            "out GB/s",
            "in GB/s",
            "wire µs",
            "TTFT ms",
            "share"
        );
        for p in &r.points {
            println!(
                "{:<24} {:>6} {:>10} {:>7} {:>7} {:>9.0} {:>9.0} {:>7.2} {:>7.2} {:>9.0} {:>9.1} {:>6.2}%",
                p.kv,
                p.tokens,
                p.bytes,
                p.export_copies,
                p.import_copies,
                p.export_us,
                p.import_us,
                p.export_gbps,
                p.import_gbps,
                p.wire_us,
                p.ttft_ms,
                100.0 * p.handoff_share
            );
        }
    })
}
