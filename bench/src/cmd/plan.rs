//! `vkv plan`: DistServe's placement search over profiles (`vkv profile`'s JSON, one per
//! instance type — e.g. the same model at tensor-parallel 1 and 2) for a workload, latency
//! targets and a GPU budget: every placement found, best per-GPU goodput first, with the rate
//! it sustains and its P90 TTFT and TPOT there (see [`crate::plan`]); or, with `--rates`, one
//! placement simulated at given request rates. `--json` prints them as JSON with the inputs.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use serde::Serialize;

use crate::plan::profile::{fit_decode, fit_mixed_saving, fit_prefill};
use crate::plan::search::{Arrivals, HandoffCosts, HandoffPath};
use crate::plan::{
    at_rates, placements, KvLayout, Placement, PlacementResult, Profile, RatePoint, Slo,
};
use crate::report::emit;
use crate::workload::Workload;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// A profile from `vkv profile` (repeat for several instance types).
    #[arg(long, required = true)]
    profile: Vec<PathBuf>,
    /// Request lengths (as `vkv bench offline --workload`).
    #[arg(long, default_value = "sharegpt")]
    workload: String,
    /// TTFT target, seconds.
    #[arg(long, default_value_t = 0.25)]
    ttft: f64,
    /// TPOT target, seconds.
    #[arg(long, default_value_t = 0.1)]
    tpot: f64,
    /// Share of requests that must meet both.
    #[arg(long, default_value_t = 0.9)]
    attainment: f64,
    /// GPUs to place instances on.
    #[arg(long, default_value_t = 1)]
    gpus: usize,
    /// GPUs per node: no instance spans nodes, and a disaggregated placement whose prefill and
    /// decode instances cannot share nodes in its ratio hands KV over the network
    /// (`--network-bandwidth`); the best unit that fits one node, repeated, is tried too
    /// (DistServe's high node-affinity placement). Default: all GPUs in one node.
    #[arg(long)]
    gpus_per_node: Option<usize>,
    /// Requests simulated per evaluation (at least: see `--min-duration`).
    #[arg(long, default_value_t = 1000)]
    num_requests: usize,
    /// Seconds of arrivals simulated at the least: at a rate R, at least R × this many requests
    /// (the workload's repeated), so that a rate is judged in its steady state rather than as
    /// one burst. 0: exactly `--num-requests` (as a `vkv bench offline` run to compare with).
    #[arg(long, default_value_t = 60.0)]
    min_duration: f64,
    /// Bytes/s of the KV handoff between a prefill and a decode instance in one node (default:
    /// NVLink-class 100 GB/s).
    #[arg(long, default_value_t = 100e9)]
    handoff_bandwidth: f64,
    /// Bytes/s of the KV handoff across nodes (default: one 200 Gb/s NIC, 25 GB/s).
    #[arg(long, default_value_t = 25e9)]
    network_bandwidth: f64,
    /// Seconds per handoff besides the bytes.
    #[arg(long, default_value_t = 0.0005)]
    handoff_latency: f64,
    /// The prefill instances' KV layout, which sets the copies of a handoff: token-major (vmm,
    /// one copy), per-layer (vmm, 2 per layer) or paged (one per 16-token block, layer, K/V
    /// and KV head).
    #[arg(long, default_value = "token-major")]
    kv_layout: String,
    /// Seconds each copy of a handoff costs besides its bytes (a copy call's issue cost).
    #[arg(long, default_value_t = 2e-6)]
    handoff_copy_seconds: f64,
    /// Every instance's step token budget (the prefill chunk size), instead of the one each
    /// profile was measured with: plan with `--max-num-batched-tokens 512` what a smaller
    /// chunk does to decodes beside prefills (Sarathi-Serve).
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    /// Every instance's limit on running sequences, instead of the profile's.
    #[arg(long)]
    max_num_seqs: Option<usize>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Instead of the search: simulate one placement at these request rates (its P90 TTFT and
    /// TPOT and attainment at each; e.g. to set beside `vkv bench offline --request-rate`).
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// With `--rates`: `colocated:R` (R replicas of the first profile) or `disaggregated:P,D`
    /// (P prefill instances of the first profile, D decode instances of the last).
    #[arg(long, default_value = "colocated:1")]
    placement: String,
    /// With the search: draw each placement's SLO attainment against the request rate (from
    /// a quarter of its rate to one and a half times it) into this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

/// The profile at `path`, its models fitted again from the samples it holds (so every profile
/// is fitted by this version's rule); a profile without samples keeps its models.
pub fn read_profile(path: &std::path::Path) -> Result<Profile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the profile {}", path.display()))?;
    let mut p: Profile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a vkv profile", path.display()))?;
    if !p.prefill_samples.is_empty() {
        p.prefill = fit_prefill(&p.prefill_samples)
            .with_context(|| format!("fitting {}", path.display()))?;
    }
    if !p.decode_samples.is_empty() {
        p.decode =
            fit_decode(&p.decode_samples).with_context(|| format!("fitting {}", path.display()))?;
    }
    if !p.mixed_samples.is_empty() {
        p.mixed_saving = fit_mixed_saving(&p.prefill, &p.decode, &p.mixed_samples);
    }
    Ok(p)
}

/// `colocated:R` or `disaggregated:P,D`.
fn parse_placement(spec: &str) -> Result<Placement> {
    let bad = || {
        anyhow::anyhow!(
            "--placement must be colocated:R or disaggregated:P,D with counts of at least 1, found {spec:?}"
        )
    };
    let count = |s: &str| {
        s.trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n >= 1)
            .ok_or_else(bad)
    };
    match spec.split_once(':') {
        Some(("colocated", r)) => Ok(Placement::Colocated {
            replicas: count(r)?,
        }),
        Some(("disaggregated", pd)) => {
            let (p, d) = pd.split_once(',').ok_or_else(bad)?;
            Ok(Placement::Disaggregated {
                prefill: count(p)?,
                decode: count(d)?,
            })
        }
        _ => Err(bad()),
    }
}

#[derive(Debug, Serialize)]
struct RatesReport {
    workload: String,
    slo: Slo,
    placement: Placement,
    points: Vec<RatePoint>,
}

#[derive(Debug, Serialize)]
struct PlanReport {
    workload: String,
    slo: Slo,
    gpus: usize,
    gpus_per_node: Option<usize>,
    profiles: Vec<String>,
    placements: Vec<PlacementResult>,
    /// The profiles that are modelled, and how.
    modelled: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    if args.gpus == 0 || args.num_requests == 0 {
        bail!("--gpus and --num-requests must be at least 1");
    }
    if !(args.ttft > 0.0 && args.tpot > 0.0 && (0.0..=1.0).contains(&args.attainment)) {
        bail!(
            "--ttft and --tpot must be positive and --attainment in [0, 1], found {}, {} and {}",
            args.ttft,
            args.tpot,
            args.attainment
        );
    }
    if args.gpus_per_node == Some(0) {
        bail!("--gpus-per-node must be at least 1");
    }
    let layout = KvLayout::parse(&args.kv_layout).with_context(|| {
        format!(
            "--kv-layout must be token-major, per-layer or paged, found {:?}",
            args.kv_layout
        )
    })?;
    let costs = HandoffCosts {
        in_node_bandwidth: args.handoff_bandwidth,
        network_bandwidth: args.network_bandwidth,
        latency: args.handoff_latency,
        layout,
        copy_seconds: args.handoff_copy_seconds,
    };
    let mut profiles = Vec::new();
    if args.max_num_batched_tokens == Some(0) || args.max_num_seqs == Some(0) {
        bail!("--max-num-batched-tokens and --max-num-seqs must be at least 1");
    }
    for path in &args.profile {
        let mut p = read_profile(path)?;
        p.max_num_batched_tokens = args
            .max_num_batched_tokens
            .unwrap_or(p.max_num_batched_tokens);
        p.max_num_seqs = args.max_num_seqs.unwrap_or(p.max_num_seqs);
        // Named by the file: `llama8b-tp2.json` is `llama8b-tp2`.
        let name = path.file_stem().map_or_else(
            || path.display().to_string(),
            |s| s.to_string_lossy().into_owned(),
        );
        profiles.push((name, p));
    }
    let workload = Workload::parse(&args.workload)?;
    // Clamped to the first profile's context, as `vkv bench offline` clamps to its engine's.
    let max_len = Some(profiles[0].1.max_model_len).filter(|&l| l > 0);
    let shapes = workload.sample(args.num_requests, args.seed, max_len);
    if !(args.min_duration >= 0.0 && args.min_duration.is_finite()) {
        bail!(
            "--min-duration must be a number of seconds, found {}",
            args.min_duration
        );
    }
    let arrivals = Arrivals::new(&shapes, args.seed, args.min_duration);
    let slo = Slo {
        ttft: args.ttft,
        tpot: args.tpot,
        attainment: args.attainment,
    };
    if !args.rates.is_empty() {
        if args.rates.iter().any(|&r| !(r > 0.0 && r.is_finite())) {
            bail!(
                "--rates must be positive request rates, found {:?}",
                args.rates
            );
        }
        let placement = parse_placement(&args.placement)?;
        let (prefill, decode) = (&profiles[0].1, &profiles[profiles.len() - 1].1);
        let handoff = costs.of(prefill, HandoffPath::InNode);
        let report = RatesReport {
            workload: workload.name(),
            slo,
            placement,
            points: at_rates(
                placement,
                prefill,
                decode,
                handoff,
                &arrivals,
                slo,
                &args.rates,
            ),
        };
        return Ok(emit(&report, args.json, |r| {
            println!("{} on {:?} (simulated):", r.workload, r.placement);
            println!(
                "{:>8} {:>20} {:>20} {:>9} {:>11}",
                "req/s", "TTFT ms p50/p90/p99", "TPOT ms p50/p90/p99", "attained", "preemptions"
            );
            for p in &r.points {
                let ms = |a: f64, b: f64, c: f64| {
                    format!("{:.1}/{:.1}/{:.1}", a * 1e3, b * 1e3, c * 1e3)
                };
                println!(
                    "{:>8.2} {:>20} {:>20} {:>8.1}% {:>11}",
                    p.rate,
                    ms(p.median_ttft, p.p90_ttft, p.p99_ttft),
                    ms(p.median_tpot, p.p90_tpot, p.p99_tpot),
                    p.attainment * 100.0,
                    p.preemptions
                );
            }
        })?);
    }
    let report = PlanReport {
        workload: workload.name(),
        slo,
        gpus: args.gpus,
        profiles: profiles.iter().map(|p| p.0.clone()).collect(),
        gpus_per_node: args.gpus_per_node,
        placements: placements(
            &profiles,
            args.gpus,
            args.gpus_per_node,
            &arrivals,
            slo,
            &costs,
        ),
        modelled: profiles
            .iter()
            .filter_map(|(name, p)| p.modelled.as_ref().map(|m| format!("{name}: {m}")))
            .collect(),
    };
    if let Some(path) = &args.svg {
        let profile = |name: &str| {
            profiles
                .iter()
                .find(|p| p.0 == name)
                .map(|p| &p.1)
                .expect("a profile of the search")
        };
        let curves: Vec<(String, Vec<RatePoint>)> = report
            .placements
            .iter()
            .map(|r| {
                let (prefill, decode) = (profile(&r.prefill_profile), profile(&r.decode_profile));
                let rates: Vec<f64> = (1..=12).map(|k| r.rate * k as f64 / 8.0).collect();
                let points = at_rates(
                    r.placement,
                    prefill,
                    decode,
                    costs.of(prefill, r.handoff.unwrap_or(HandoffPath::InNode)),
                    &arrivals,
                    slo,
                    &rates,
                );
                (placement_name(r), points)
            })
            .collect();
        plot_attainment(&curves, &report, path)?;
    }
    Ok(emit(&report, args.json, |r| {
        println!(
            "{} on {} GPU(s), P90 TTFT ≤ {} s and TPOT ≤ {} s for {:.0} % of requests:",
            r.workload,
            r.gpus,
            r.slo.ttft,
            r.slo.tpot,
            r.slo.attainment * 100.0
        );
        println!(
            "{:<44} {:>5} {:>10} {:>10} {:>10} {:>10} {:>8}",
            "placement", "GPUs", "req/s", "req/s/GPU", "P90 TTFT", "P90 TPOT", "attained"
        );
        for p in &r.placements {
            let what = placement_name(p);
            println!(
                "{what:<44} {:>5} {:>10.2} {:>10.2} {:>8.0}ms {:>8.1}ms {:>7.1}%",
                p.gpus,
                p.rate,
                p.goodput_per_gpu,
                p.p90_ttft * 1e3,
                p.p90_tpot * 1e3,
                p.attainment * 100.0
            );
        }
        for m in &r.modelled {
            println!("modelled, not measured: {m}");
        }
    })?)
}

/// `2 colocated (h100)`, `1P (h100) + 3D (h100)`.
fn placement_name(p: &PlacementResult) -> String {
    match p.placement {
        Placement::Colocated { replicas } => {
            format!("{replicas} colocated ({})", p.prefill_profile)
        }
        Placement::Disaggregated { prefill, decode } => format!(
            "{prefill}P ({}) + {decode}D ({}){}",
            p.prefill_profile,
            p.decode_profile,
            match p.handoff {
                Some(HandoffPath::Network) => ", KV over network",
                _ => "",
            }
        ),
    }
}

/// SLO attainment against request rate, a line per placement, the target as a dashed line.
fn plot_attainment(
    curves: &[(String, Vec<RatePoint>)],
    report: &PlanReport,
    path: &std::path::Path,
) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_rate = curves
        .iter()
        .flat_map(|c| c.1.iter().map(|p| p.rate))
        .fold(0.0, f64::max)
        .max(1e-3);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "SLO attainment vs rate — {} on {} GPU(s), TTFT ≤ {} s, TPOT ≤ {} s (simulated)",
                report.workload, report.gpus, report.slo.ttft, report.slo.tpot
            ),
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_rate * 1.02, 0f64..101.0)?;
    chart
        .configure_mesh()
        .x_desc("requests per second")
        .y_desc("requests meeting both targets (%)")
        .draw()?;
    let target = report.slo.attainment * 100.0;
    chart.draw_series(DashedLineSeries::new(
        vec![(0.0, target), (max_rate, target)],
        6,
        4,
        BLACK.stroke_width(1),
    ))?;
    for (i, (name, points)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let series: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.rate, p.attainment * 100.0))
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2))
            });
        chart.draw_series(series.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    super::frag::legend_and_save(
        &mut chart,
        Some(SeriesLabelPosition::LowerLeft),
        &root,
        path,
    )
}
