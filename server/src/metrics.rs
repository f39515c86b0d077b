//! `GET /metrics`: the server's counters and latency histograms, and the engine's state, in the
//! Prometheus text exposition format (version 0.0.4). Names follow vLLM's `vllm:*` metrics with a
//! `vkv_` prefix (`vkv_time_to_first_token_seconds`, `vkv_num_requests_running`, ...).
//!
//! The latency histograms are filled here, from the timings in each request's `Finished` event
//! (TTFT, TPOT = mean gap after the first token, every inter-token gap, E2E, queue time), so the
//! engine stays free of any exporter. Aborted requests are kept out of the latency histograms
//! (their times measure the client, not the server). Counts by finish reason, running / waiting,
//! KV bytes, preemptions and map waits are the engine's ([`EngineMetrics`], read when scraped):
//! the engine sees the end of a request whose client went away, the server does not.
//!
//! Invariants: histogram buckets are cumulative and end with `+Inf` equal to `_count`; every
//! metric has one `# HELP` and one `# TYPE` line before its samples.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use vkv_engine::engine::FinishReason;
use vkv_engine::engine::{EngineMetrics, Finished};

/// Bucket bounds in seconds (vLLM's, trimmed to what a CPU or GPU server sees).
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
const TOKEN_GAP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
];
const REQUEST_BUCKETS: &[f64] = &[
    0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0, 300.0,
];

/// A Prometheus histogram: counts per upper bound (not cumulative here), sum and count.
#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub(crate) fn single(
    out: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    value: impl std::fmt::Display,
) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {value}");
}

struct Books {
    /// (route, status) → responses.
    http: BTreeMap<(&'static str, u16), u64>,
    prompt_tokens: u64,
    generation_tokens: u64,
    ttft: Histogram,
    tpot: Histogram,
    itl: Histogram,
    e2e: Histogram,
    queue: Histogram,
}

/// The server's own counters (see the module docs).
pub struct ServerMetrics {
    books: Mutex<Books>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            books: Mutex::new(Books {
                http: BTreeMap::new(),
                prompt_tokens: 0,
                generation_tokens: 0,
                ttft: Histogram::new(TTFT_BUCKETS),
                tpot: Histogram::new(TOKEN_GAP_BUCKETS),
                itl: Histogram::new(TOKEN_GAP_BUCKETS),
                e2e: Histogram::new(REQUEST_BUCKETS),
                queue: Histogram::new(REQUEST_BUCKETS),
            }),
        }
    }
}

impl ServerMetrics {
    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One HTTP response on `route` (a fixed route name, `other` for unknown paths).
    pub fn response(&self, route: &'static str, status: u16) {
        *self.books().http.entry((route, status)).or_default() += 1;
    }

    /// A request's final event (its latencies; the counts by reason are the engine's).
    /// Count a finished sequence: one choice of a response; the prompt's tokens are counted
    /// with the first choice only (`n > 1` computes the prompt once).
    pub fn finished(&self, f: &Finished, first_choice: bool) {
        let mut b = self.books();
        if first_choice {
            b.prompt_tokens += f.usage.prompt_tokens as u64;
        }
        b.generation_tokens += f.usage.completion_tokens as u64;
        if f.reason == FinishReason::Abort {
            return;
        }
        let t = &f.timings;
        if !t.token_times.is_empty() {
            b.ttft.observe(t.ttft);
        }
        if let Some(tpot) = t.tpot() {
            b.tpot.observe(tpot);
        }
        for gap in t.token_times.windows(2) {
            b.itl.observe(gap[1] - gap[0]);
        }
        b.e2e.observe(t.e2e);
        b.queue.observe(t.queue);
    }

    /// The exposition text: these counters and `engine`'s snapshot.
    pub fn render(&self, engine: &EngineMetrics, engine_alive: bool) -> String {
        let b = self.books();
        let mut out = String::new();
        header(
            &mut out,
            "vkv_http_requests_total",
            "HTTP responses by route and status code.",
            "counter",
        );
        for ((route, status), n) in &b.http {
            let _ = writeln!(
                out,
                "vkv_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        header(
            &mut out,
            "vkv_request_success_total",
            "Generation requests that ended, by finish reason (abort: the client went away, or shutdown).",
            "counter",
        );
        for (reason, n) in [
            ("stop", engine.finished_stop),
            ("length", engine.finished_length),
            ("abort", engine.finished_abort),
        ] {
            let _ = writeln!(
                out,
                "vkv_request_success_total{{finished_reason=\"{reason}\"}} {n}"
            );
        }
        single(
            &mut out,
            "vkv_request_failure_total",
            "Generation requests the engine accepted but could not run.",
            "counter",
            engine.failed,
        );
        single(
            &mut out,
            "vkv_prompt_tokens_total",
            "Prompt tokens of ended requests.",
            "counter",
            b.prompt_tokens,
        );
        single(
            &mut out,
            "vkv_generation_tokens_total",
            "Generated tokens of ended requests.",
            "counter",
            b.generation_tokens,
        );
        b.ttft.render(
            &mut out,
            "vkv_time_to_first_token_seconds",
            "Arrival to first generated token.",
        );
        b.tpot.render(
            &mut out,
            "vkv_time_per_output_token_seconds",
            "Mean gap between generated tokens after the first, per request.",
        );
        b.itl.render(
            &mut out,
            "vkv_inter_token_latency_seconds",
            "Every gap between two generated tokens.",
        );
        b.e2e.render(
            &mut out,
            "vkv_e2e_request_latency_seconds",
            "Arrival to the end of a request.",
        );
        b.queue.render(
            &mut out,
            "vkv_request_queue_time_seconds",
            "Arrival to the first step that computed the request.",
        );
        drop(b);

        let e = engine;
        single(
            &mut out,
            "vkv_engine_alive",
            "1 while the engine thread runs.",
            "gauge",
            u8::from(engine_alive),
        );
        single(
            &mut out,
            "vkv_num_requests_running",
            "Requests in the running batch.",
            "gauge",
            e.running,
        );
        single(
            &mut out,
            "vkv_num_requests_waiting",
            "Requests waiting to be admitted.",
            "gauge",
            e.waiting,
        );
        header(
            &mut out,
            "vkv_kv_cache_info",
            "The KV cache's kind (label), 1.",
            "gauge",
        );
        let _ = writeln!(out, "vkv_kv_cache_info{{kv=\"{}\"}} 1", e.kv_name);
        header(
            &mut out,
            "vkv_device_info",
            "The device the model runs on (label), 1.",
            "gauge",
        );
        let _ = writeln!(out, "vkv_device_info{{device=\"{}\"}} 1", e.device);
        header(
            &mut out,
            "vkv_runtime_info",
            "The runtime switches the process resolved at start (labels), 1.",
            "gauge",
        );
        let labels: Vec<String> = vkv_engine::RuntimeSwitches::get()
            .pairs()
            .into_iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        let _ = writeln!(out, "vkv_runtime_info{{{}}} 1", labels.join(","));
        single(
            &mut out,
            "vkv_kv_capacity_tokens",
            "Tokens the KV cache holds in all.",
            "gauge",
            e.kv_capacity_tokens,
        );
        single(
            &mut out,
            "vkv_kv_capacity_bytes",
            "Bytes of the KV cache's capacity in tokens (the device's element size: f16 or f32 on the CPU, bf16 on the GPU).",
            "gauge",
            e.kv_capacity_bytes,
        );
        single(
            &mut out,
            "vkv_kv_bytes_per_token",
            "Bytes of K and V of one token over all layers (the cache's element size).",
            "gauge",
            e.kv_bytes_per_token,
        );
        single(
            &mut out,
            "vkv_kv_allocated_bytes",
            "KV bytes set aside for sequences (blocks held, pages mapped for them).",
            "gauge",
            e.kv.bytes_allocated,
        );
        single(
            &mut out,
            "vkv_kv_holding_tokens_bytes",
            "KV bytes holding tokens.",
            "gauge",
            e.kv.bytes_holding_tokens,
        );
        single(
            &mut out,
            "vkv_kv_without_sharing_bytes",
            "KV bytes the sequences would take with nothing shared (a block or page held by several counted for each); minus vkv_kv_allocated_bytes: what parallel sampling and prefix caching save.",
            "gauge",
            e.kv.bytes_without_sharing,
        );
        single(
            &mut out,
            "vkv_kv_sequences",
            "Sequences holding KV memory.",
            "gauge",
            e.kv.sequences,
        );
        single(
            &mut out,
            "vkv_num_preemptions_total",
            "Sequences preempted (and recomputed) because KV memory ran out.",
            "counter",
            e.preemptions,
        );
        let map = e.map.unwrap_or_default();
        single(
            &mut out,
            "vkv_map_waits_total",
            "vmm: KV reserves that mapped pages themselves, on the critical path (admissions of fresh slots included; 0 in paged mode).",
            "counter",
            map.waits,
        );
        single(
            &mut out,
            "vkv_map_growth_waits_total",
            "vmm: of those waits, the ones of running sequences (decode growth; the rest are admissions). Target 0.",
            "counter",
            map.growth_waits,
        );
        single(
            &mut out,
            "vkv_map_wait_seconds_total",
            "vmm: time spent in those waits.",
            "counter",
            map.wait_seconds,
        );
        single(
            &mut out,
            "vkv_pages_mapped_ahead_total",
            "vmm: KV pages the Mapper thread mapped ahead of need.",
            "counter",
            map.pages_mapped_ahead,
        );
        single(
            &mut out,
            "vkv_mapper_restarts_total",
            "vmm: times the Mapper thread died (a panic in a driver call) and was started again.",
            "counter",
            map.mapper_restarts,
        );
        let prefix = e.prefix.unwrap_or_default();
        single(
            &mut out,
            "vkv_prefix_cache_queries_total",
            "Prefix caching: prompt tokens looked up in the prefix cache (vLLM's prefix_cache_queries; 0 when caching is off).",
            "counter",
            prefix.queried_tokens,
        );
        single(
            &mut out,
            "vkv_prefix_cache_hits_total",
            "Prefix caching: of those, tokens whose KV was found cached (vLLM's prefix_cache_hits).",
            "counter",
            prefix.hit_tokens,
        );
        single(
            &mut out,
            "vkv_prefix_cache_evictions_total",
            "Prefix caching: cached units (paged blocks, vmm pages) evicted to make room.",
            "counter",
            prefix.evictions,
        );
        single(
            &mut out,
            "vkv_prefix_cache_cached_units",
            "Prefix caching: units (paged blocks, vmm page rows) holding a cached block, referenced or not.",
            "gauge",
            prefix.cached_units,
        );
        single(
            &mut out,
            "vkv_prefix_cache_evictable_units",
            "Prefix caching: cached units no request holds (free memory, evicted on demand).",
            "gauge",
            prefix.evictable_units,
        );
        single(
            &mut out,
            "vkv_kv_warm_pages",
            "vmm: KV pages backed before the first request (eager allocation), reclaimable.",
            "gauge",
            e.kv_warm_pages,
        );
        single(
            &mut out,
            "vkv_cuda_graph_replays_total",
            "CUDA: decode steps replayed from a captured CUDA graph.",
            "counter",
            e.cuda_graph_replays,
        );
        single(
            &mut out,
            "vkv_cuda_graph_captures_total",
            "CUDA: decode steps captured as CUDA graphs (one per batch and context bucket).",
            "counter",
            e.cuda_graph_captures,
        );
        single(
            &mut out,
            "vkv_engine_steps_total",
            "Engine steps (forward passes).",
            "counter",
            e.steps,
        );
        single(
            &mut out,
            "vkv_engine_busy_seconds_total",
            "Time spent in engine steps.",
            "counter",
            e.busy_seconds,
        );
        single(
            &mut out,
            "vkv_prefill_tokens_total",
            "Prompt tokens computed, recomputation after preemption included.",
            "counter",
            e.prefill_tokens,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vkv_engine::engine::{Timings, Usage};

    #[test]
    fn histograms_are_cumulative_and_end_at_the_count() {
        let m = ServerMetrics::default();
        m.finished(
            &Finished {
                reason: FinishReason::Length,
                usage: Usage {
                    prompt_tokens: 5,
                    completion_tokens: 3,
                    cached_tokens: 0,
                },
                timings: Timings {
                    queue: 0.0005,
                    ttft: 0.003,
                    e2e: 0.5,
                    token_times: vec![0.003, 0.103, 0.5],
                },
                preemptions: 0,
            },
            true,
        );
        let engine = EngineMetrics {
            finished_length: 1,
            kv_capacity_tokens: 10,
            kv_capacity_bytes: 230_400,
            kv_bytes_per_token: 23_040,
            ..EngineMetrics::default()
        };
        let text = m.render(&engine, true);
        assert!(text.contains("vkv_kv_capacity_bytes 230400"));
        assert!(text.contains("vkv_kv_bytes_per_token 23040"));
        assert!(text.contains("vkv_time_to_first_token_seconds_bucket{le=\"0.001\"} 0"));
        assert!(text.contains("vkv_time_to_first_token_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("vkv_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1"));
        assert!(text.contains("vkv_inter_token_latency_seconds_count 2"));
        assert!(text.contains("vkv_request_success_total{finished_reason=\"length\"} 1"));
        assert!(text.contains("vkv_generation_tokens_total 3"));
    }
}
