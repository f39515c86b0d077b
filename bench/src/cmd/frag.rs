//! `vkv frag`: arguments (the model's KV shape from a preset or an HF `config.json`, the workload,
//! the policies), and the table, JSON and SVG plots around [`crate::frag`], which runs the study.
//! The plots are drawn with plotters: `composition.svg` (where the KV memory is under load, per
//! policy: the content of Fig. 2 of the vLLM paper) and `batch.svg` (peak concurrent requests
//! against the allocation unit, as in vAttention's batch-size study).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use plotters::prelude::*;
use vkv_engine::presets::{self, KvShape};

use crate::frag::{self, Arrival, FragConfig, FragReport, Policy};
use crate::report::emit;
use crate::units::{format_bytes, parse_bytes};
use crate::workload::Workload;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// A preset (llama-3-8b, yi-6b, yi-34b, opt-13b, llama-2-7b, mistral-7b, smollm2-135m) or an
    /// HF config.json (or the directory holding it).
    #[arg(long, default_value = "llama-3-8b")]
    model: String,
    /// KV memory budget.
    #[arg(long = "kv-memory", default_value = "40GiB", value_parser = parse_bytes)]
    kv_memory: usize,
    /// sharegpt, alpaca, arxiv-summarization, longbench, humaneval, fixed:P,O,
    /// uniform:PMIN-PMAX,OMIN-OMAX, or a JSONL trace of {"prompt_len","output_len"}.
    #[arg(long, default_value = "sharegpt")]
    workload: String,
    #[arg(long = "num-requests", default_value_t = 1000)]
    num_requests: usize,
    /// Maximum request length in tokens (default: the model's context length).
    #[arg(long = "max-len")]
    max_len: Option<usize>,
    /// Poisson arrivals at this many requests per decode step (default: all at once).
    #[arg(long = "request-rate")]
    request_rate: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Policies, comma-separated (default: orca-max, orca-pow2, orca-oracle, paged-8..128,
    /// vmm-per-layer-64KiB, vmm-per-layer-2MiB, vmm-token-major-2MiB).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<Policy>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long = "json-out")]
    json_out: Option<PathBuf>,
    /// Write composition.svg and batch.svg into this directory.
    #[arg(long = "plot-dir")]
    plot_dir: Option<PathBuf>,
    /// Points per policy timeline in the JSON report.
    #[arg(long = "timeline-points", default_value_t = 200)]
    timeline_points: usize,
}

fn model_shape(model: &str) -> Result<KvShape> {
    let path = Path::new(model);
    if !path.exists() {
        return presets::kv_shape(model)
            .map_err(|e| anyhow::anyhow!("{e} (or give a path to an HF config.json)"));
    }
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let name = file
        .parent()
        .and_then(|p| p.file_name())
        .map_or(model.to_string(), |n| n.to_string_lossy().into());
    Ok(presets::kv_shape_from_hf_config(&name, &text)?)
}

pub fn run(args: Args) -> Result<()> {
    let shape = model_shape(&args.model)?;
    let workload = Workload::parse(&args.workload)?;
    let max_len = args.max_len.unwrap_or(shape.max_len);
    if args.num_requests == 0 || max_len < 2 {
        bail!(
            "--num-requests must be > 0 and --max-len at least 2 (found {} and {max_len})",
            args.num_requests
        );
    }
    let arrival = match args.request_rate {
        None => Arrival::AllAtOnce,
        Some(r) if r > 0.0 && r.is_finite() => Arrival::Poisson { per_step: r },
        Some(r) => {
            bail!("--request-rate must be a positive number of requests per step, found {r}")
        }
    };
    let policies = if args.policies.is_empty() {
        Policy::default_set()
    } else {
        args.policies.clone()
    };
    let config = FragConfig {
        requests: workload.sample(args.num_requests, args.seed, Some(max_len)),
        shape,
        kv_memory: args.kv_memory,
        max_len,
        arrival,
        seed: args.seed,
        timeline_points: args.timeline_points,
    };
    eprintln!(
        "vkv frag: {} ({} per token), {} of KV memory, {} × {}, max length {max_len}, {} policies",
        config.shape.name,
        format_bytes(config.shape.bytes_per_token()),
        format_bytes(args.kv_memory),
        args.num_requests,
        workload.name(),
        policies.len()
    );
    let report = frag::run(&config, &policies)?;
    let mut value = serde_json::to_value(&report)?;
    value["workload"] = workload.name().into();
    if let Some(path) = &args.json_out {
        let json = serde_json::to_string_pretty(&value)?;
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    emit(&value, args.json, |_| {
        print_table(&report, &workload.name())
    })?;
    if let Some(dir) = &args.plot_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let title = format!(
            "{}, {}, {}",
            report.model,
            workload.name(),
            format_bytes(report.kv_memory)
        );
        plot_composition(&report, &title, &dir.join("composition.svg"))?;
        plot_batch(&report, &title, &dir.join("batch.svg"))?;
        eprintln!(
            "vkv frag: wrote {0}/composition.svg and {0}/batch.svg",
            dir.display()
        );
    }
    Ok(())
}

fn print_table(r: &FragReport, workload: &str) {
    println!(
        "{} ({} B/token), {} KV memory, {} requests of {workload} (mean prompt {:.0}, output {:.0}), max length {}, {}",
        r.model,
        r.bytes_per_token,
        format_bytes(r.kv_memory),
        r.requests,
        r.mean_prompt,
        r.mean_output,
        r.max_len,
        r.arrival
    );
    println!(
        "Time averages over saturated steps (a request waiting; busy steps where there were none);"
    );
    println!("memory columns are % of the KV budget.");
    println!(
        "{:>22} {:>5} {:>9} {:>10} {:>7} {:>9} {:>9} {:>9} {:>7} {:>6} {:>8} {:>8} {:>7}",
        "policy",
        "avg",
        "tok/unit",
        "tok/alloc",
        "token",
        "reserved",
        "internal",
        "external",
        "free",
        "peak",
        "mean run",
        "preempt",
        "steps"
    );
    let pct = |b: f64| 100.0 * b / r.kv_memory as f64;
    for p in &r.policies {
        let a = p.under_load();
        println!(
            "{:>22} {:>5} {:>9} {:>9.1}% {:>6.1}% {:>8.1}% {:>8.1}% {:>8.1}% {:>6.1}% {:>6} {:>8.1} {:>8} {:>7}",
            p.policy,
            if p.saturated.steps > 0 { "sat" } else { "busy" },
            p.granule_tokens.map_or("-".to_string(), |g| format!("{g:.1}")),
            100.0 * a.token_share_of_allocated,
            pct(a.mean.token_bytes),
            pct(a.mean.reserved_bytes),
            pct(a.mean.internal_bytes),
            pct(a.mean.external_bytes),
            pct(a.mean.free_bytes),
            p.peak_running,
            a.mean_running,
            p.preemptions,
            p.steps
        );
    }
}

const COLORS: [RGBColor; 4] = [
    RGBColor(46, 125, 50),
    RGBColor(255, 179, 0),
    RGBColor(229, 57, 53),
    RGBColor(120, 120, 120),
];

/// Stacked horizontal bars: the share of KV memory in use by tokens, reservations, internal and
/// external fragmentation, per policy (saturated-step averages) — the content of Fig. 2 of the
/// vLLM paper.
fn plot_composition(r: &FragReport, title: &str, path: &Path) -> Result<()> {
    let n = r.policies.len();
    let root = SVGBackend::new(path, (1000, 120 + 36 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let names: Vec<String> = r.policies.iter().map(|p| p.policy.clone()).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("KV memory in use under load, by content — {title}"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(170)
        .build_cartesian_2d(0f64..140f64, (0..n.saturating_sub(1)).into_segmented())?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                names.get(*i).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .y_label_style(("sans-serif", 14))
        .x_labels(8)
        .x_label_formatter(&|x| {
            if *x <= 100.0 {
                format!("{x:.0}")
            } else {
                String::new()
            }
        })
        .x_desc("% of KV memory in use (average over steps with requests waiting)")
        .draw()?;
    let labels = [
        "token states",
        "reserved",
        "internal fragmentation",
        "external fragmentation",
    ];
    let shares: Vec<[f64; 4]> = r
        .policies
        .iter()
        .map(|p| {
            let m = &p.under_load().mean;
            let total = m.in_use().max(1.0);
            [
                m.token_bytes,
                m.reserved_bytes,
                m.internal_bytes,
                m.external_bytes,
            ]
            .map(|b| 100.0 * b / total)
        })
        .collect();
    for (k, label) in labels.iter().enumerate() {
        let color = COLORS[k];
        let before: Vec<f64> = shares.iter().map(|s| s[..k].iter().sum()).collect();
        let bars = Histogram::horizontal(&chart)
            .style(color.filled())
            .margin(6)
            .baseline_func(move |i: &SegmentValue<usize>| match i {
                SegmentValue::Exact(i) | SegmentValue::CenterOf(i) => {
                    before.get(*i).copied().unwrap_or(0.0)
                }
                SegmentValue::Last => 0.0,
            })
            .data(
                shares
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (i, s[..=k].iter().sum::<f64>())),
            );
        chart
            .draw_series(bars)?
            .label(*label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    legend_and_save(
        &mut chart,
        Some(SeriesLabelPosition::UpperRight),
        &root,
        path,
    )
}

/// Peak concurrent requests against the allocation unit's size in tokens, per policy family.
fn plot_batch(r: &FragReport, title: &str, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let points: Vec<(String, f64, f64)> = r
        .policies
        .iter()
        .filter_map(|p| {
            p.granule_tokens
                .map(|g| (p.policy.clone(), g.max(0.25), p.peak_running as f64))
        })
        .collect();
    let max_batch = r.policies.iter().map(|p| p.peak_running).max().unwrap_or(1) as f64 * 1.15;
    let max_g = points.iter().map(|p| p.1).fold(1.0, f64::max) * 2.0;
    let min_g = points
        .iter()
        .map(|p| p.1)
        .fold(f64::INFINITY, f64::min)
        .min(4.0)
        / 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Peak batch vs allocation unit — {title}"),
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((min_g..max_g).log_scale(), 0f64..max_batch)?;
    chart
        .configure_mesh()
        .x_desc("tokens per block / per page and region (log)")
        .y_desc("peak concurrent requests")
        .draw()?;
    let families = [
        ("paged-", COLORS[0]),
        ("vmm-per-layer-", COLORS[2]),
        ("vmm-token-major-", COLORS[1]),
    ];
    for (prefix, color) in families {
        let mut series: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.0.starts_with(prefix))
            .map(|p| (p.1, p.2))
            .collect();
        series.sort_by(|a, b| a.0.total_cmp(&b.0));
        if series.is_empty() {
            continue;
        }
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
            .label(prefix.trim_end_matches('-'))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 15, y)], color.stroke_width(2))
            });
        chart.draw_series(series.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    for (name, g, b) in &points {
        // Labels of vmm policies go under their point, the others above: equal granules coincide.
        let dy = if name.starts_with("vmm-token-major") {
            -0.09
        } else if name.starts_with("vmm-") {
            -0.045
        } else {
            0.02
        };
        chart.draw_series(std::iter::once(Text::new(
            name.clone(),
            (*g * 1.05, *b + max_batch * dy),
            ("sans-serif", 11),
        )))?;
    }
    // Reservations have no unit: draw each as a horizontal line.
    for p in r.policies.iter().filter(|p| p.granule_tokens.is_none()) {
        let y = p.peak_running as f64;
        chart.draw_series(LineSeries::new(
            vec![(min_g, y), (max_g, y)],
            COLORS[3].stroke_width(1),
        ))?;
        chart.draw_series(std::iter::once(Text::new(
            p.policy.clone(),
            (min_g * 1.1, y + max_batch * 0.015),
            ("sans-serif", 11),
        )))?;
    }
    legend_and_save(&mut chart, None, &root, path)
}

/// Draw the chart's legend (at `position`, else plotters' default place) and write the SVG.
pub(super) fn legend_and_save<'a, 'b: 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, SVGBackend<'b>, CT>,
    position: Option<SeriesLabelPosition>,
    root: &DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    path: &Path,
) -> Result<()> {
    let mut legend = chart.configure_series_labels();
    if let Some(position) = position {
        legend.position(position);
    }
    legend
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
