//! `vkv bench serve`: load an OpenAI-compatible server the way vLLM's `bench serve` does and
//! measure what a client sees.
//!
//! - Requests: the workload's lengths ([`crate::workload`]), prompts of seeded random token ids
//!   ([`random_requests`], vLLM's "random" dataset) sent to `/v1/completions` as token-id arrays,
//!   `max_tokens` = the sampled output length and `ignore_eos`, so every request generates exactly
//!   its length whatever the model says. Greedy, streamed, with `stream_options.include_usage`.
//! - Arrivals: a Gamma process of `request_rate` requests per second with shape `burstiness`
//!   (1 = Poisson; lower is burstier), or all at once for an infinite rate; at most
//!   `max_concurrency` requests in flight when given.
//! - Per request: TTFT = send to the first chunk with text; ITL = every gap between chunks with
//!   text; E2E = send to the end of the stream; TPOT = (E2E − TTFT) / (output tokens − 1), output
//!   tokens from the server's `usage`.
//! - Overall: request and token throughput over the run's duration; goodput = requests meeting
//!   every SLO (`ttft:MS`, `tpot:MS`, `e2el:MS`) per second; mean / median / p99 of each latency
//!   ([`Summary`], shared with `vkv bench offline`). When the server is vkv, its preemptions, map
//!   waits and KV kind are read from `/metrics` before and after.
//!
//! The server's model length and vocabulary come from `/v1/models` (`max_model_len`, as vLLM
//! gives it, and the `vocab_size` vkv adds there; `vocab_size` can be given for other servers).
//!
//! Prefix sharing ([`crate::prefix`]):
//! - `prefix-repetition` is a request list like the others: token-id prompts to
//!   `/v1/completions`, request *i* with prefix *i* mod `NUM_PREFIXES`.
//! - `multi-turn` is closed-loop and goes to `/v1/chat/completions`: a reply comes back as text
//!   (neither endpoint returns token ids), so the conversation is kept as chat messages and the
//!   server's chat template and tokenizer make the prompt. User messages are `USER_LEN` seeded
//!   random common words (about that many tokens; the token counts reported are the server's
//!   `usage`); each reply joins the conversation as the text the server streamed. The arrival
//!   process and `max_concurrency` apply to conversations: one starts at each arrival once fewer
//!   than `max_concurrency` are running, and holds its place until its last turn ends. Turn
//!   *k* + 1 is sent when turn *k*'s stream has ended and the think time passed; a failed turn
//!   ends its conversation (the turns not sent count as failed). TTFT is also reported for
//!   first and later turns apart.
//! - Every response's `usage.prompt_tokens_details.cached_tokens` is summed when the server gives
//!   it, beside the ideal hit rate (exact from the token ids of `prefix-repetition` and the
//!   length workloads; for `multi-turn` estimated from the usage counts, see
//!   [`crate::prefix::estimated_chat_hits`]) in the block size of the server's paged KV cache
//!   (from `/metrics`' `vkv_kv_cache_info{kv="paged-N"}`; else 16, assumed), and the server's
//!   `vkv_prefix_cache_queries_total` / `vkv_prefix_cache_hits_total` when `/metrics` has them.

use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::offline::{workload_requests, Summary};
use crate::prefix::{
    estimated_chat_hits, ideal_hits, user_text, CacheBlock, ChatConversation, IdealHits,
    PrefixCacheReport, TurnLatency,
};
use crate::workload::{MultiTurn, Workload};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Gamma};
use serde_json::{json, Value};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A latency objective for goodput.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Slo {
    pub metric: SloMetric,
    pub ms: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SloMetric {
    Ttft,
    Tpot,
    E2el,
}

/// Why a `--goodput` SLO does not parse.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SloError {
    /// No `:` between the metric and the milliseconds.
    #[error("expected METRIC:MS like ttft:500, found {found:?}")]
    NoColon { found: String },
    /// A metric other than ttft, tpot or e2el.
    #[error("unknown SLO metric {found:?}: use ttft, tpot or e2el")]
    UnknownMetric { found: String },
    /// The milliseconds are not a number.
    #[error("expected milliseconds after {metric}:, found {found:?}")]
    NotANumber { metric: String, found: String },
    /// The milliseconds are zero, negative or not finite.
    #[error("the {metric} SLO must be a positive number of ms, found {ms}")]
    NotPositive { metric: String, ms: f64 },
}

impl FromStr for Slo {
    type Err = SloError;

    /// `ttft:500`, `tpot:50`, `e2el:10000` (milliseconds).
    fn from_str(s: &str) -> Result<Slo, SloError> {
        let (name, ms) = s.split_once(':').ok_or_else(|| SloError::NoColon {
            found: s.to_string(),
        })?;
        let metric = match name.trim() {
            "ttft" => SloMetric::Ttft,
            "tpot" => SloMetric::Tpot,
            "e2el" => SloMetric::E2el,
            other => {
                return Err(SloError::UnknownMetric {
                    found: other.to_string(),
                })
            }
        };
        let ms: f64 = ms.trim().parse().map_err(|_| SloError::NotANumber {
            metric: name.to_string(),
            found: ms.to_string(),
        })?;
        if !(ms > 0.0 && ms.is_finite()) {
            return Err(SloError::NotPositive {
                metric: name.to_string(),
                ms,
            });
        }
        Ok(Slo { metric, ms })
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The server's base URL (`http://127.0.0.1:8000`, with or without `/v1`).
    pub url: String,
    pub workload: Workload,
    pub num_prompts: usize,
    /// Requests per second; infinite: all at once.
    pub request_rate: f64,
    /// Gamma shape of the gaps between arrivals (1: Poisson).
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    pub goodput: Vec<Slo>,
    pub seed: u64,
    pub api_key: Option<String>,
    /// Default: the first model of `/v1/models`.
    pub model: Option<String>,
    /// Token ids of the prompts are drawn below this; default: `vocab_size` from `/v1/models`
    /// (vkv gives it; other servers need it said).
    pub vocab_size: Option<usize>,
}

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("bad URL {url:?}: {why}")]
    Url { url: String, why: String },
    #[error("{what}: {why}")]
    Http { what: String, why: String },
    #[error("{0}")]
    Config(String),
}

/// One request as the client saw it.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RequestOutcome {
    pub success: bool,
    /// Prompt tokens: the server's `usage.prompt_tokens`, else the token ids sent.
    pub prompt_len: usize,
    pub output_tokens: usize,
    /// The server's `usage.prompt_tokens_details.cached_tokens`, when it gave it.
    pub cached_tokens: Option<usize>,
    pub ttft_s: f64,
    pub latency_s: f64,
    pub itl_s: Vec<f64>,
    pub error: Option<String>,
    /// `multi-turn`: the conversation and the turn (from 0); 0 and 0 otherwise.
    pub conversation: usize,
    pub turn: usize,
    /// The text the server streamed.
    #[serde(skip)]
    pub reply: String,
}

impl RequestOutcome {
    fn tpot_s(&self) -> Option<f64> {
        (self.output_tokens > 1)
            .then(|| (self.latency_s - self.ttft_s) / (self.output_tokens - 1) as f64)
    }
}

/// The server's own counters, when it is vkv (from `/metrics`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ServerCounters {
    pub kv: Option<String>,
    pub preemptions: Option<f64>,
    pub map_waits: Option<f64>,
    /// Prompt tokens looked up in the prefix cache, and those found (tokens).
    pub prefix_queries: Option<f64>,
    pub prefix_hits: Option<f64>,
}

impl ServerCounters {
    /// The block of the ideal hit rate: the paged cache's (`kv="paged-N"`), else assumed.
    fn cache_block(&self) -> CacheBlock {
        let paged = self
            .kv
            .as_deref()
            .and_then(|kv| kv.strip_prefix("paged-")?.parse::<usize>().ok());
        match (paged, &self.kv) {
            (Some(size), _) => CacheBlock {
                size,
                from: "the server's paged KV cache".into(),
            },
            (None, Some(kv)) => CacheBlock::assumed(&format!("the server's KV cache is {kv}")),
            (None, None) => CacheBlock::assumed("the server's /metrics does not say"),
        }
    }
}

/// What a run measured (times in ms, throughputs per second).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ServeReport {
    pub model: String,
    pub workload: String,
    pub num_prompts: usize,
    pub request_rate: Option<f64>,
    pub burstiness: f64,
    pub max_concurrency: Option<usize>,
    pub completed: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub goodput_slos: Vec<Slo>,
    /// Requests per second that met every SLO (when SLOs were given).
    pub request_goodput: Option<f64>,
    pub ttft_ms: Summary,
    pub tpot_ms: Summary,
    pub itl_ms: Summary,
    pub e2el_ms: Summary,
    /// vkv servers: the KV cache and the preemptions and map waits during the run.
    pub server_kv: Option<String>,
    pub server_preemptions: Option<f64>,
    pub server_map_waits: Option<f64>,
    /// Cached prompt tokens summed over the responses that gave them, the hit rate, the ideal
    /// one, and the server's prefix-cache counters.
    pub prefix_cache: PrefixCacheReport,
    /// `multi-turn`: TTFT of first and of later turns.
    pub turns: Option<TurnLatency>,
}

struct Target {
    base: String,
    client: HttpClient,
    api_key: Option<String>,
}

impl Target {
    fn uri(&self, path: &str) -> Result<Uri, BenchError> {
        let text = format!("{}{path}", self.base);
        text.parse().map_err(|e| BenchError::Url {
            url: text,
            why: format!("{e}"),
        })
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Request<Full<Bytes>>, BenchError> {
        let mut b = Request::builder().method(method).uri(self.uri(path)?);
        if let Some(key) = &self.api_key {
            b = b.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let body = match body {
            Some(v) => {
                b = b.header(CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        b.body(body).map_err(|e| BenchError::Http {
            what: format!("building a request to {path}"),
            why: e.to_string(),
        })
    }

    async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), BenchError> {
        let what = || format!("GET {}{path}", self.base);
        let response = self
            .client
            .request(self.request(Method::GET, path, None)?)
            .await
            .map_err(|e| BenchError::Http {
                what: what(),
                why: error_chain(&e),
            })?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| BenchError::Http {
                what: what(),
                why: e.to_string(),
            })?
            .to_bytes();
        Ok((status, body))
    }

    async fn counters(&self) -> ServerCounters {
        match self.get("/metrics").await {
            Ok((StatusCode::OK, body)) => parse_counters(&String::from_utf8_lossy(&body)),
            _ => ServerCounters::default(),
        }
    }

    /// Send one streamed completion (`path`: `/v1/completions` or `/v1/chat/completions`) and
    /// time it; `prompt_len` is the token ids sent (0 for chat), replaced by the server's count
    /// when it gives one.
    async fn complete(&self, path: &str, body: Value, prompt_len: usize) -> RequestOutcome {
        let mut out = RequestOutcome {
            prompt_len,
            ..RequestOutcome::default()
        };
        let start = Instant::now();
        let result = async {
            let request = self.request(Method::POST, path, Some(&body))?;
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| BenchError::Http {
                    what: format!("POST {path}"),
                    why: error_chain(&e),
                })?;
            let status = response.status();
            let mut body = response.into_body();
            if status != StatusCode::OK {
                let text = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return Err(BenchError::Http {
                    what: format!("POST {path}: {status}"),
                    why: String::from_utf8_lossy(&text).into_owned(),
                });
            }
            let mut pending = Vec::<u8>::new();
            let mut last = None::<Instant>;
            let mut text_chunks = 0;
            let mut usage_tokens = None;
            loop {
                let frame = match body.frame().await {
                    None => break,
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        return Err(BenchError::Http {
                            what: "reading the stream".into(),
                            why: e.to_string(),
                        })
                    }
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                let now = Instant::now();
                pending.extend_from_slice(&data);
                while let Some(end) = find(&pending, b"\n\n") {
                    let event: Vec<u8> = pending.drain(..end + 2).collect();
                    let event = String::from_utf8_lossy(&event);
                    for line in event.lines() {
                        let Some(payload) = line.strip_prefix("data:") else {
                            continue;
                        };
                        let payload = payload.trim();
                        if payload == "[DONE]" {
                            continue;
                        }
                        let chunk: Value =
                            serde_json::from_str(payload).map_err(|e| BenchError::Http {
                                what: "reading the stream".into(),
                                why: format!("a chunk is not JSON ({e}): {payload}"),
                            })?;
                        if let Some(error) = chunk.get("error") {
                            return Err(BenchError::Http {
                                what: "the stream".into(),
                                why: error.to_string(),
                            });
                        }
                        let choice = &chunk["choices"][0];
                        let text = choice["text"]
                            .as_str()
                            .or_else(|| choice["delta"]["content"].as_str())
                            .unwrap_or("");
                        out.reply.push_str(text);
                        if !text.is_empty() {
                            text_chunks += 1;
                            match last {
                                None => out.ttft_s = (now - start).as_secs_f64(),
                                Some(t) => out.itl_s.push((now - t).as_secs_f64()),
                            }
                            last = Some(now);
                        }
                        let usage = &chunk["usage"];
                        if let Some(n) = usage["completion_tokens"].as_u64() {
                            usage_tokens = Some(n as usize);
                        }
                        if let Some(n) = usage["prompt_tokens"].as_u64() {
                            out.prompt_len = n as usize;
                        }
                        if let Some(n) = usage["prompt_tokens_details"]["cached_tokens"].as_u64() {
                            out.cached_tokens = Some(n as usize);
                        }
                    }
                }
            }
            out.latency_s = start.elapsed().as_secs_f64();
            out.output_tokens = usage_tokens.unwrap_or(text_chunks);
            Ok(())
        }
        .await;
        match result {
            Ok(()) => out.success = true,
            Err(e) => out.error = Some(e.to_string()),
        }
        out
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The KV label and two counters of a vkv `/metrics` page.
fn parse_counters(text: &str) -> ServerCounters {
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    ServerCounters {
        kv: text.lines().find_map(|l| {
            let rest = l.strip_prefix("vkv_kv_cache_info{kv=\"")?;
            Some(rest.split('"').next()?.to_string())
        }),
        preemptions: value("vkv_num_preemptions_total"),
        map_waits: value("vkv_map_waits_total"),
        prefix_queries: value("vkv_prefix_cache_queries_total"),
        prefix_hits: value("vkv_prefix_cache_hits_total"),
    }
}

/// Seconds from the start at which each of `n` requests is sent.
fn arrival_times(n: usize, rate: f64, burstiness: f64, seed: u64) -> Result<Vec<f64>, BenchError> {
    if rate.is_infinite() {
        return Ok(vec![0.0; n]);
    }
    let gamma = Gamma::new(burstiness, 1.0 / (rate * burstiness)).map_err(|e| {
        BenchError::Config(format!("request rate {rate}, burstiness {burstiness}: {e}"))
    })?;
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut at = 0.0;
    Ok((0..n)
        .map(|_| {
            at += gamma.sample(&mut rng);
            at
        })
        .collect())
}

/// Run the benchmark; `on_done(n)` after each request ends with the number ended so far.
pub async fn run(
    config: &BenchConfig,
    on_done: &mut dyn FnMut(usize),
) -> Result<ServeReport, BenchError> {
    if config.num_prompts == 0 {
        return Err(BenchError::Config(
            "--num-prompts must be at least 1".into(),
        ));
    }
    if config.request_rate.is_nan() || config.request_rate <= 0.0 {
        return Err(BenchError::Config(format!(
            "--request-rate must be positive (inf: all at once), found {}",
            config.request_rate
        )));
    }
    if !(config.burstiness > 0.0 && config.burstiness.is_finite()) {
        return Err(BenchError::Config(format!(
            "--burstiness must be a positive number, found {}",
            config.burstiness
        )));
    }
    if config.max_concurrency == Some(0) {
        return Err(BenchError::Config(
            "--max-concurrency must be at least 1".into(),
        ));
    }
    let base = config.url.trim_end_matches('/');
    let base = base.strip_suffix("/v1").unwrap_or(base).to_string();
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let target = std::sync::Arc::new(Target {
        base,
        client: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector),
        api_key: config.api_key.clone(),
    });

    let (status, body) = target.get("/v1/models").await?;
    let models: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if status != StatusCode::OK {
        return Err(BenchError::Http {
            what: format!("GET {}/v1/models: {status}", target.base),
            why: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    let card = &models["data"][0];
    let model = match &config.model {
        Some(m) => m.clone(),
        None => card["id"]
            .as_str()
            .ok_or_else(|| BenchError::Config("/v1/models lists no model".into()))?
            .to_string(),
    };
    let max_model_len = card["max_model_len"].as_u64().map(|n| n as usize);
    if let Some(limit) = max_model_len {
        config
            .workload
            .check_fits(limit)
            .map_err(|e| BenchError::Config(e.to_string()))?;
    }
    if let Workload::MultiTurn(spec) = &config.workload {
        return run_multi_turn(config, &target, model, spec, on_done).await;
    }
    let vocab_size = match (config.vocab_size, card["vocab_size"].as_u64()) {
        (Some(v), _) => v,
        (None, Some(v)) => v as usize,
        (None, None) => {
            return Err(BenchError::Config(
                "/v1/models does not give `vocab_size`, which the token-id prompts need: pass --vocab-size".into(),
            ))
        }
    };
    if vocab_size < 2 {
        return Err(BenchError::Config(format!(
            "a vocabulary of {vocab_size} tokens is too small for random prompts"
        )));
    }

    let requests = workload_requests(
        &config.workload,
        config.num_prompts,
        vocab_size,
        config.seed,
        max_model_len.unwrap_or(usize::MAX),
    );
    // The ideal hit rate in the order sent; the block size comes with the counters below.
    let prompts: Vec<Vec<u32>> = requests.iter().map(|r| r.prompt.clone()).collect();
    let arrivals = arrival_times(
        requests.len(),
        config.request_rate,
        config.burstiness,
        config.seed,
    )?;
    let before = target.counters().await;
    let block = before.cache_block();
    let ideal = ideal_hits(prompts.iter().map(|p| (p.as_slice(), &[][..])), block.size);
    let limit = config
        .max_concurrency
        .map(|c| std::sync::Arc::new(tokio::sync::Semaphore::new(c)));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    let sender = tokio::spawn({
        let target = target.clone();
        let model = model.clone();
        async move {
            for (request, at) in requests.into_iter().zip(arrivals) {
                let wait = at - start.elapsed().as_secs_f64();
                if wait > 0.0 {
                    tokio::time::sleep(Duration::from_secs_f64(wait)).await;
                }
                let permit = match &limit {
                    Some(s) => s.clone().acquire_owned().await.ok(),
                    None => None,
                };
                let body = json!({
                    "model": model,
                    "prompt": request.prompt,
                    "max_tokens": request.max_tokens,
                    "temperature": 0.0,
                    "ignore_eos": true,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                });
                let prompt_len = request.prompt.len();
                let target = target.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let outcome = target.complete("/v1/completions", body, prompt_len).await;
                    drop(permit);
                    let _ = tx.send(outcome);
                });
            }
        }
    });
    let mut outcomes = Vec::with_capacity(config.num_prompts);
    while outcomes.len() < config.num_prompts {
        let Some(outcome) = rx.recv().await else {
            break;
        };
        outcomes.push(outcome);
        on_done(outcomes.len());
    }
    let duration = start.elapsed().as_secs_f64();
    let _ = sender.await;
    let after = target.counters().await;
    Ok(report(
        config,
        model,
        &outcomes,
        duration,
        &before,
        &after,
        Some(ideal),
    ))
}

/// Validated options, then the multi-turn run (see the module documentation).
async fn run_multi_turn(
    config: &BenchConfig,
    target: &std::sync::Arc<Target>,
    model: String,
    spec: &MultiTurn,
    on_done: &mut dyn FnMut(usize),
) -> Result<ServeReport, BenchError> {
    let users = user_text(spec.conversations, spec.turns, spec.user_len, config.seed);
    let arrivals = arrival_times(
        spec.conversations,
        config.request_rate,
        config.burstiness,
        config.seed,
    )?;
    let before = target.counters().await;
    let limit = config
        .max_concurrency
        .map(|c| std::sync::Arc::new(tokio::sync::Semaphore::new(c)));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    for (conversation, (users, at)) in users.into_iter().zip(arrivals).enumerate() {
        let (target, model, limit, tx, spec) = (
            target.clone(),
            model.clone(),
            limit.clone(),
            tx.clone(),
            *spec,
        );
        tokio::spawn(async move {
            let wait = at - start.elapsed().as_secs_f64();
            if wait > 0.0 {
                tokio::time::sleep(Duration::from_secs_f64(wait)).await;
            }
            let _permit = match &limit {
                Some(s) => s.clone().acquire_owned().await.ok(),
                None => None,
            };
            let mut chat = ChatConversation::default();
            let mut failed = None::<String>;
            for (turn, user) in users.iter().enumerate() {
                if let Some(why) = &failed {
                    let _ = tx.send(RequestOutcome {
                        error: Some(format!("not sent: {why}")),
                        conversation,
                        turn,
                        ..RequestOutcome::default()
                    });
                    continue;
                }
                let body = json!({
                    "model": model,
                    "messages": chat.turn_messages(user),
                    "max_tokens": spec.output_len,
                    "temperature": 0.0,
                    "ignore_eos": true,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                });
                let mut outcome = target.complete("/v1/chat/completions", body, 0).await;
                outcome.conversation = conversation;
                outcome.turn = turn;
                if outcome.success {
                    chat.add_reply(&outcome.reply);
                } else {
                    let why = outcome.error.clone().unwrap_or_default();
                    failed = Some(format!("turn {turn} failed: {why}"));
                }
                let _ = tx.send(outcome);
                if failed.is_none() && turn + 1 < spec.turns && spec.think_seconds > 0.0 {
                    tokio::time::sleep(Duration::from_secs_f64(spec.think_seconds)).await;
                }
            }
        });
    }
    drop(tx);
    let mut outcomes = Vec::with_capacity(spec.requests());
    while let Some(outcome) = rx.recv().await {
        outcomes.push(outcome);
        on_done(outcomes.len());
    }
    let duration = start.elapsed().as_secs_f64();
    let after = target.counters().await;
    Ok(report(
        config, model, &outcomes, duration, &before, &after, None,
    ))
}

/// The prefix-cache numbers of the successful requests `ok`: cached tokens where the responses
/// gave them; the ideal hit rate `ideal` (token-id workloads) or, for `multi-turn`, estimated
/// per conversation from the usage counts.
fn prefix_report(
    config: &BenchConfig,
    ok: &[&RequestOutcome],
    block: &CacheBlock,
    ideal: Option<IdealHits>,
    before: &ServerCounters,
    after: &ServerCounters,
) -> PrefixCacheReport {
    let prompt_tokens: usize = ok.iter().map(|o| o.prompt_len).sum();
    let given: Vec<usize> = ok.iter().filter_map(|o| o.cached_tokens).collect();
    let cached = (!given.is_empty()).then(|| given.iter().sum());
    let (ideal, note) = match (&config.workload, ideal) {
        (Workload::MultiTurn(spec), _) => {
            let mut turns = vec![Vec::new(); spec.conversations];
            let mut sorted = ok.to_vec();
            sorted.sort_by_key(|o| (o.conversation, o.turn));
            for o in sorted {
                if let Some(conversation) = turns.get_mut(o.conversation) {
                    conversation.push((o.prompt_len, o.output_tokens));
                }
            }
            let cached_tokens = turns
                .iter()
                .map(|t| estimated_chat_hits(t, block.size))
                .sum();
            let hits = IdealHits {
                block_size: block.size,
                prompt_tokens,
                cached_tokens,
            };
            let note = "estimated from usage counts: each turn reusing the previous turn's prompt and reply (exact if the chat template renders earlier turns unchanged and replies tokenize back to the tokens generated)";
            (Some(hits), Some(note.to_string()))
        }
        (_, ideal) => (ideal, None),
    };
    let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    let mut report = PrefixCacheReport::new(prompt_tokens, cached, block, ideal)
        .with_server_counters(
            delta(before.prefix_queries, after.prefix_queries),
            delta(before.prefix_hits, after.prefix_hits),
        );
    report.ideal_note = note;
    report
}

fn report(
    config: &BenchConfig,
    model: String,
    outcomes: &[RequestOutcome],
    duration: f64,
    before: &ServerCounters,
    after: &ServerCounters,
    ideal: Option<IdealHits>,
) -> ServeReport {
    let ok: Vec<&RequestOutcome> = outcomes.iter().filter(|o| o.success).collect();
    let ms = |v: Vec<f64>| Summary::of(&v).scaled(1e3);
    let input: usize = ok.iter().map(|o| o.prompt_len).sum();
    let output: usize = ok.iter().map(|o| o.output_tokens).sum();
    let good = ok
        .iter()
        .filter(|o| {
            config.goodput.iter().all(|slo| {
                let value_ms = 1e3
                    * match slo.metric {
                        SloMetric::Ttft => o.ttft_s,
                        SloMetric::Tpot => o.tpot_s().unwrap_or(0.0),
                        SloMetric::E2el => o.latency_s,
                    };
                value_ms <= slo.ms
            })
        })
        .count();
    let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    ServeReport {
        model,
        workload: config.workload.name(),
        num_prompts: match &config.workload {
            Workload::MultiTurn(spec) => spec.requests(),
            _ => config.num_prompts,
        },
        request_rate: config
            .request_rate
            .is_finite()
            .then_some(config.request_rate),
        burstiness: config.burstiness,
        max_concurrency: config.max_concurrency,
        completed: ok.len(),
        failed: outcomes.len() - ok.len(),
        first_error: outcomes.iter().find_map(|o| o.error.clone()),
        duration_s: duration,
        total_input_tokens: input,
        total_output_tokens: output,
        request_throughput: ok.len() as f64 / duration,
        output_throughput: output as f64 / duration,
        total_token_throughput: (input + output) as f64 / duration,
        goodput_slos: config.goodput.clone(),
        request_goodput: (!config.goodput.is_empty()).then(|| good as f64 / duration),
        ttft_ms: ms(ok.iter().map(|o| o.ttft_s).collect()),
        tpot_ms: ms(ok.iter().filter_map(|o| o.tpot_s()).collect()),
        itl_ms: ms(ok.iter().flat_map(|o| o.itl_s.iter().copied()).collect()),
        e2el_ms: ms(ok.iter().map(|o| o.latency_s).collect()),
        server_kv: after.kv.clone(),
        server_preemptions: delta(before.preemptions, after.preemptions),
        server_map_waits: delta(before.map_waits, after.map_waits),
        prefix_cache: prefix_report(config, &ok, &before.cache_block(), ideal, before, after),
        turns: match &config.workload {
            Workload::MultiTurn(spec) => {
                let ttft = |first: bool| -> Vec<f64> {
                    ok.iter()
                        .filter(|o| (o.turn == 0) == first)
                        .map(|o| o.ttft_s)
                        .collect()
                };
                Some(TurnLatency::new(spec, &ttft(true), &ttft(false)))
            }
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slos_parse_and_refuse_nonsense() {
        assert_eq!(
            "ttft:500".parse::<Slo>(),
            Ok(Slo {
                metric: SloMetric::Ttft,
                ms: 500.0
            })
        );
        assert!("tpot".parse::<Slo>().is_err());
        assert!("ttft:-1".parse::<Slo>().is_err());
        assert!("speed:5".parse::<Slo>().is_err());
    }

    #[test]
    fn gamma_arrivals_keep_the_rate() {
        for burstiness in [0.5, 1.0, 4.0] {
            let t = arrival_times(4000, 8.0, burstiness, 1).unwrap();
            let rate = t.len() as f64 / t.last().unwrap();
            assert!((rate - 8.0).abs() < 0.6, "burstiness {burstiness}: {rate}");
            assert!(t.windows(2).all(|w| w[0] <= w[1]));
        }
        assert_eq!(
            arrival_times(3, f64::INFINITY, 1.0, 0).unwrap(),
            vec![0.0; 3]
        );
    }

    #[test]
    fn tpot_excludes_the_first_token_and_goodput_counts_slos() {
        let fast = RequestOutcome {
            success: true,
            prompt_len: 10,
            output_tokens: 5,
            ttft_s: 0.1,
            latency_s: 0.5,
            itl_s: vec![0.1; 4],
            ..RequestOutcome::default()
        };
        assert!((fast.tpot_s().unwrap() - 0.1).abs() < 1e-12);
        let slow = RequestOutcome {
            ttft_s: 2.0,
            latency_s: 3.0,
            ..fast.clone()
        };
        let config = BenchConfig {
            url: String::new(),
            workload: Workload::parse("fixed:10,5").unwrap(),
            num_prompts: 2,
            request_rate: f64::INFINITY,
            burstiness: 1.0,
            max_concurrency: None,
            goodput: vec!["ttft:500".parse().unwrap()],
            seed: 0,
            api_key: None,
            model: None,
            vocab_size: None,
        };
        let r = report(
            &config,
            "m".into(),
            &[fast, slow],
            2.0,
            &ServerCounters::default(),
            &ServerCounters::default(),
            None,
        );
        assert_eq!(r.request_goodput, Some(0.5));
        assert_eq!(r.request_throughput, 1.0);
        assert_eq!(r.total_output_tokens, 10);
    }

    #[test]
    fn multi_turn_reports_split_ttft_and_sum_cached_tokens() {
        let turn = |conversation, turn, prompt_len, cached, ttft_s| RequestOutcome {
            success: true,
            prompt_len,
            output_tokens: 10,
            cached_tokens: cached,
            ttft_s,
            latency_s: 1.0,
            conversation,
            turn,
            ..RequestOutcome::default()
        };
        let config = BenchConfig {
            url: String::new(),
            workload: Workload::parse("multi-turn:2,2,30,10").unwrap(),
            num_prompts: 1,
            request_rate: f64::INFINITY,
            burstiness: 1.0,
            max_concurrency: None,
            goodput: Vec::new(),
            seed: 0,
            api_key: None,
            model: None,
            vocab_size: None,
        };
        let outcomes = [
            turn(1, 1, 80, Some(32), 0.1),
            turn(0, 0, 40, Some(0), 0.5),
            turn(1, 0, 40, None, 0.7),
            turn(0, 1, 80, Some(48), 0.2),
        ];
        let before = parse_counters("vkv_kv_cache_info{kv=\"paged-16\"} 1\nvkv_prefix_cache_queries_total 100\nvkv_prefix_cache_hits_total 10\n");
        let after = parse_counters("vkv_kv_cache_info{kv=\"paged-16\"} 1\nvkv_prefix_cache_queries_total 340\nvkv_prefix_cache_hits_total 90\n");
        let r = report(&config, "m".into(), &outcomes, 1.0, &before, &after, None);
        assert_eq!(r.num_prompts, 4);
        let turns = r.turns.unwrap();
        assert!((turns.first_turn_ttft_ms.median - 600.0).abs() < 1e-9);
        assert!((turns.later_turns_ttft_ms.median - 150.0).abs() < 1e-9);
        let p = r.prefix_cache;
        assert_eq!(p.prompt_tokens, 240);
        assert_eq!(p.cached_tokens, Some(80));
        assert_eq!(p.hit_rate, Some(80.0 / 240.0));
        // Each second turn may reuse 40 + 10 - 1 = 49 tokens: 3 blocks of 16.
        assert_eq!(p.block_size, 16);
        assert_eq!(p.ideal_cached_tokens, Some(2 * 48));
        assert!(p.ideal_note.is_some());
        assert_eq!((p.server_queries, p.server_hits), (Some(240.0), Some(80.0)));
    }

    #[test]
    fn the_ideal_block_is_the_servers_paged_block_or_assumed() {
        let block = |kv: Option<&str>| {
            ServerCounters {
                kv: kv.map(String::from),
                ..ServerCounters::default()
            }
            .cache_block()
        };
        assert_eq!(block(Some("paged-32")).size, 32);
        let vmm = block(Some("vmm-token-major-2MiB"));
        assert_eq!(vmm.size, crate::prefix::DEFAULT_BLOCK_SIZE);
        assert!(vmm.from.contains("assumed"), "{}", vmm.from);
        assert!(block(None).from.contains("assumed"));
    }

    #[test]
    fn counters_come_from_vkv_metrics() {
        let c = parse_counters(
            "vkv_kv_cache_info{kv=\"paged-16\"} 1\nvkv_num_preemptions_total 3\nvkv_map_waits_total 0\n",
        );
        assert_eq!(c.kv.as_deref(), Some("paged-16"));
        assert_eq!(c.preemptions, Some(3.0));
        assert_eq!(c.map_waits, Some(0.0));
    }
}
