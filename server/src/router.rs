//! `vkv route`: the OpenAI-compatible front of disaggregated serving (DistServe; the shape of
//! vLLM's disaggregated proxy and SGLang's router). Each generation request is split in two:
//!
//! 1. its **prefill half** goes to a prefill instance (`vkv serve --role prefill`) — the body with
//!    `max_tokens` 1, not streamed, and `kv_transfer_params: {"do_remote_decode": true}`; the
//!    answer's `kv_transfer_params` name the ticket its prompt KV is held under and the first
//!    token;
//! 2. its **decode half** goes to a decode instance (`--role decode`) — the client's body with
//!    `kv_transfer_params` saying where to pull the KV from and the first token — whose answer
//!    (whole or streamed) goes back to the client as it comes.
//!
//! Requests a split cannot serve (`n` or `best_of` above 1, beam search, `echo`) go whole to a
//! decode instance (every instance serves whole requests too). Instances are picked by load
//! among those up ([`Instance::load`]): a prefill instance by the prompt tokens queued there
//! (this router's in flight, estimated from the bodies, and what the instance reports waiting),
//! a decode instance by its requests, then its KV memory in use. Every instance's `/health` and
//! `/metrics` are polled (`health_interval`), an instance that fails a request or a probe is marked
//! down until a probe answers again, and a prefill half that finds its instance down is tried on
//! the next one. Everything between router and instances is HTTP, so instances may live on
//! other hosts. A decode instance that fails mid-stream ends the stream with an OpenAI-shaped
//! `error` event (a whole answer: a 502). The router's own `/metrics` counts requests by outcome
//! and shows each instance's state.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::api::check_bearer;
use crate::error::ApiError;
use crate::metrics::single;
use crate::{accept_connections, ServerError};

/// How the router is set up (`vkv route`'s options).
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// Base URLs (`http://host:port`) of the prefill instances.
    pub prefill: Vec<String>,
    /// Base URLs of the decode instances.
    pub decode: Vec<String>,
    /// Required of clients on `/v1/*` as `Authorization: Bearer KEY`, and sent to the instances
    /// (router and instances share one key).
    pub api_key: Option<String>,
    /// Seconds between `/health` probes of every instance.
    pub health_interval: Duration,
    /// Larger request bodies are refused with 413.
    pub max_body_bytes: usize,
    /// Connections open at once; one more is answered 503 and closed (as `vkv serve`'s).
    pub max_connections: usize,
}

/// One instance as the router sees it.
#[derive(Debug)]
pub struct Instance {
    url: String,
    role: &'static str,
    up: AtomicBool,
    /// Requests this router has in flight there.
    in_flight: AtomicU64,
    /// Prefill: the prompt tokens of those requests (estimated, see [`prompt_tokens`]).
    prompt_tokens: AtomicU64,
    /// Reported by the instance's `/metrics` at the last probe: requests waiting, and the share
    /// of its KV memory allocated (per mille).
    waiting: AtomicU64,
    kv_use: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
}

impl Instance {
    fn new(url: &str, role: &'static str) -> Instance {
        Instance {
            url: url.trim_end_matches('/').to_string(),
            role,
            up: AtomicBool::new(true),
            in_flight: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            kv_use: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// How loaded it is, smaller first: a prefill instance by the prompt tokens queued there
    /// (this router's, plus a typical prompt per request the instance reports waiting); a decode
    /// instance by the requests there, then by its KV memory in use.
    fn load(&self) -> (u64, u64) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        match self.role {
            "prefill" => (
                get(&self.prompt_tokens) + TYPICAL_PROMPT * get(&self.waiting),
                get(&self.in_flight),
            ),
            _ => (get(&self.in_flight) + get(&self.waiting), get(&self.kv_use)),
        }
    }

    fn down(&self, why: &str) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(instance = %self.url, role = self.role, error = why, "instance marked down");
        }
        self.failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// Prompt tokens counted for each request an instance reports waiting (its own queue, which
/// other routers may fill): about a sharegpt prompt.
const TYPICAL_PROMPT: u64 = 256;

/// The least loaded instance of `pool` ([`Instance::load`]) among those up, not in `tried`.
fn pick<'a>(pool: &'a [Arc<Instance>], tried: &[usize]) -> Option<(usize, &'a Arc<Instance>)> {
    pool.iter()
        .enumerate()
        .filter(|(i, x)| x.up.load(Ordering::Relaxed) && !tried.contains(i))
        .min_by_key(|(_, x)| x.load())
}

/// The prompt tokens of a request body, estimated without its tokenizer: token ids counted,
/// text at 4 bytes a token (a chat's message contents summed).
fn prompt_tokens(body: &Value) -> u64 {
    fn text_tokens(v: &Value) -> u64 {
        match v {
            Value::String(s) => (s.len() as u64).div_ceil(4),
            Value::Number(_) => 1,
            Value::Array(items) => items.iter().map(text_tokens).sum(),
            Value::Object(o) => o.get("content").or(o.get("text")).map_or(0, text_tokens),
            _ => 0,
        }
    }
    text_tokens(
        body.get("prompt")
            .or(body.get("messages"))
            .unwrap_or(&Value::Null),
    )
}

/// Counts one request (and its prompt tokens) in flight at an instance while alive.
pub struct InFlight(Arc<Instance>, u64);

impl InFlight {
    fn new(x: &Arc<Instance>, prompt_tokens: u64) -> InFlight {
        x.in_flight.fetch_add(1, Ordering::Relaxed);
        x.prompt_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
        x.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(x.clone(), prompt_tokens)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.prompt_tokens.fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// How a routed request ended (the `outcome` label of `vkv_router_requests_total`); the
/// discriminant indexes `Router::outcomes` and `OUTCOME_LABELS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Split and answered.
    Disaggregated,
    /// Sent whole to a decode instance.
    Whole,
    /// Refused by the router or an instance as the client's mistake (4xx).
    ClientError,
    /// No instance could serve it (502/503).
    Failed,
}

const OUTCOME_LABELS: [&str; 4] = ["disaggregated", "whole", "client_error", "failed"];

/// The router's state, shared by every connection.
pub struct Router {
    config: RouterConfig,
    prefill: Vec<Arc<Instance>>,
    decode: Vec<Arc<Instance>>,
    client: Client<HttpConnector, Full<Bytes>>,
    outcomes: [AtomicU64; 4],
    /// Seconds spent in prefill halves (request to the prefill answer), summed, for /metrics.
    prefill_seconds: Mutex<f64>,
}

/// The body of a routed response: the router's own bytes, or an instance's body passed on.
pub enum RouterBody {
    Full(Option<Bytes>),
    /// A decode instance's body; an error mid-way becomes an SSE `error` event, then the end.
    /// The instance's load counts the request until the body is done or dropped.
    Upstream {
        body: Incoming,
        failed: bool,
        in_flight: InFlight,
    },
}

impl Body for RouterBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            RouterBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            RouterBody::Upstream { failed: true, .. } => Poll::Ready(None),
            RouterBody::Upstream { body, failed, .. } => match Pin::new(body).poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => {
                    *failed = true;
                    tracing::warn!(error = %e, "the decode instance failed mid-stream");
                    let e = ApiError::bad_gateway(format!(
                        "the decode instance failed mid-answer: {e}"
                    ));
                    let event = format!("data: {}\n\n", e.json());
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
                }
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<RouterBody> {
    let mut r = Response::new(RouterBody::Full(Some(body.into())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn error_response(e: &ApiError) -> Response<RouterBody> {
    respond(e.status, "application/json", e.json())
}

/// Generation requests the router does not split: several choices, beam search, `echo`.
fn whole_only(body: &Value) -> bool {
    let above_one = |k: &str| body[k].as_i64().is_some_and(|n| n > 1);
    above_one("n")
        || above_one("best_of")
        || body["use_beam_search"].as_bool() == Some(true)
        || body["echo"].as_bool() == Some(true)
}

impl Router {
    pub fn new(config: RouterConfig) -> Router {
        let pool = |urls: &[String], role| {
            urls.iter()
                .map(|u| Arc::new(Instance::new(u, role)))
                .collect()
        };
        Router {
            prefill: pool(&config.prefill, "prefill"),
            decode: pool(&config.decode, "decode"),
            client: Client::builder(TokioExecutor::new()).build_http(),
            outcomes: Default::default(),
            prefill_seconds: Mutex::new(0.0),
            config,
        }
    }

    fn count(&self, outcome: Outcome) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// One request to an instance.
    async fn send(
        &self,
        x: &Instance,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<Response<Incoming>, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", x.url))
            .header(CONTENT_TYPE, "application/json");
        if let Some(key) = &self.config.api_key {
            req = req.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        self.client
            .request(req)
            .await
            .map_err(|e| format!("{}: {e}", x.url))
    }

    /// Poll every instance's `/health` once (up is a 200), and read the load it reports from
    /// its `/metrics`.
    async fn probe(&self) {
        for x in self.prefill.iter().chain(&self.decode) {
            let get = |path| {
                tokio::time::timeout(
                    Duration::from_secs(2),
                    self.send(x, Method::GET, path, Bytes::new()),
                )
            };
            let ok = get("/health")
                .await
                .is_ok_and(|r| r.is_ok_and(|r| r.status() == StatusCode::OK));
            if ok {
                if let Ok(Ok(r)) = get("/metrics").await {
                    if let Ok(body) = r.into_body().collect().await {
                        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
                        let value = |name: &str| {
                            text.lines()
                                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                                .and_then(|v| v.trim().parse::<f64>().ok())
                                .unwrap_or(0.0)
                        };
                        let capacity = value("vkv_kv_capacity_bytes").max(1.0);
                        let use_permille = 1000.0 * value("vkv_kv_allocated_bytes") / capacity;
                        x.waiting
                            .store(value("vkv_num_requests_waiting") as u64, Ordering::Relaxed);
                        x.kv_use.store(use_permille as u64, Ordering::Relaxed);
                    }
                }
            }
            let was = x.up.swap(ok, Ordering::Relaxed);
            if ok && !was {
                tracing::info!(instance = %x.url, role = x.role, "instance up");
            } else if !ok && was {
                tracing::warn!(instance = %x.url, role = x.role, "instance down (health probe)");
            }
        }
    }

    /// Answer one HTTP request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<RouterBody> {
        let path = req.uri().path().to_string();
        if path.starts_with("/v1/") {
            if let Err(e) = check_bearer(&req, self.config.api_key.as_deref()) {
                return error_response(&e);
            }
        }
        match (req.method().clone(), path.as_str()) {
            (Method::GET | Method::HEAD, "/health") => self.health(),
            (Method::GET | Method::HEAD, "/metrics") => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics(),
            ),
            (Method::GET, "/v1/models") => self.pass_whole(Method::GET, &path, Bytes::new()).await,
            (Method::POST, "/v1/completions" | "/v1/chat/completions") => {
                let answer = self.generate(req, &path).await;
                answer.unwrap_or_else(|(outcome, e)| {
                    self.count(outcome);
                    error_response(&e)
                })
            }
            (
                _,
                "/health" | "/metrics" | "/v1/models" | "/v1/completions" | "/v1/chat/completions",
            ) => error_response(&ApiError::method_not_allowed(
                req.method().as_str(),
                &path,
                "POST, GET",
            )),
            _ => error_response(&ApiError::not_found(&path)),
        }
    }

    fn health(&self) -> Response<RouterBody> {
        let up =
            |pool: &[Arc<Instance>]| pool.iter().filter(|x| x.up.load(Ordering::Relaxed)).count();
        let (p, d) = (up(&self.prefill), up(&self.decode));
        let status = if d > 0 {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = json!({
            "status": if status == StatusCode::OK { "ok" } else { "unavailable" },
            "prefill_up": p, "decode_up": d,
        });
        respond(status, "application/json", body.to_string())
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP vkv_router_requests_total Generation requests by how they ended: split between a prefill and a decode instance, sent whole to a decode instance, refused as the client's mistake, or failed.\n# TYPE vkv_router_requests_total counter\n");
        for (label, n) in OUTCOME_LABELS.iter().zip(&self.outcomes) {
            out.push_str(&format!(
                "vkv_router_requests_total{{outcome=\"{label}\"}} {}\n",
                n.load(Ordering::Relaxed)
            ));
        }
        let prefill_seconds = *self
            .prefill_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        single(&mut out, "vkv_router_prefill_seconds_total", "Seconds from sending prefill halves to their answers (TTFT's prefill part, handoff excluded).", "counter", prefill_seconds);
        for (name, help, kind, get) in [
            (
                "vkv_router_instance_up",
                "1 while the instance answers its health probe and requests.",
                "gauge",
                (|x: &Instance| u64::from(x.up.load(Ordering::Relaxed))) as fn(&Instance) -> u64,
            ),
            (
                "vkv_router_instance_in_flight",
                "Requests this router has in flight at the instance.",
                "gauge",
                |x: &Instance| x.in_flight.load(Ordering::Relaxed),
            ),
            (
                "vkv_router_instance_prompt_tokens_in_flight",
                "Prefill: estimated prompt tokens of this router's requests in flight at the instance.",
                "gauge",
                |x: &Instance| x.prompt_tokens.load(Ordering::Relaxed),
            ),
            (
                "vkv_router_instance_waiting",
                "Requests the instance reported waiting at the last probe.",
                "gauge",
                |x: &Instance| x.waiting.load(Ordering::Relaxed),
            ),
            (
                "vkv_router_instance_kv_use_permille",
                "The instance's KV memory allocated at the last probe, per mille of its capacity.",
                "gauge",
                |x: &Instance| x.kv_use.load(Ordering::Relaxed),
            ),
            (
                "vkv_router_instance_requests_total",
                "Requests sent to the instance.",
                "counter",
                |x: &Instance| x.requests.load(Ordering::Relaxed),
            ),
            (
                "vkv_router_instance_failures_total",
                "Requests or probes the instance failed (connection errors and 5xx).",
                "counter",
                |x: &Instance| x.failures.load(Ordering::Relaxed),
            ),
        ] {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for x in self.prefill.iter().chain(&self.decode) {
                out.push_str(&format!(
                    "{name}{{instance=\"{}\",role=\"{}\"}} {}\n",
                    x.url,
                    x.role,
                    get(x)
                ));
            }
        }
        out
    }

    /// A request sent whole to a decode instance, its answer passed on.
    async fn pass_whole(&self, method: Method, path: &str, body: Bytes) -> Response<RouterBody> {
        let mut tried = Vec::new();
        while let Some((i, x)) = pick(&self.decode, &tried) {
            tried.push(i);
            let in_flight = InFlight::new(x, 0);
            match self.send(x, method.clone(), path, body.clone()).await {
                Ok(r) => return pass_on(r, in_flight),
                Err(e) => x.down(&e),
            }
        }
        error_response(&ApiError::unavailable("no decode instance is up"))
    }

    async fn generate(
        &self,
        req: Request<Incoming>,
        path: &str,
    ) -> Result<Response<RouterBody>, (Outcome, ApiError)> {
        let client_error = |e| (Outcome::ClientError, e);
        let limit = self.config.max_body_bytes;
        let body = Limited::new(req.into_body(), limit)
            .collect()
            .await
            .map_err(|_| client_error(ApiError::too_large(limit)))?
            .to_bytes();
        let parsed: Value = serde_json::from_slice(&body)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| {
                client_error(ApiError::invalid(None, "the body must be a JSON object"))
            })?;
        if parsed.get("kv_transfer_params").is_some() {
            return Err(client_error(ApiError::field(
                "kv_transfer_params",
                "`kv_transfer_params` is the router's to write",
            )));
        }
        if whole_only(&parsed) {
            self.count(Outcome::Whole);
            return Ok(self.pass_whole(Method::POST, path, body).await);
        }
        // The prefill half, on the least loaded prefill instance up (the next on failure): the
        // client's request as it is, so the instance checks every field (it generates one
        // token and answers whole whatever `max_tokens` and `stream` say).
        let mut half = parsed.clone();
        half["kv_transfer_params"] = json!({ "do_remote_decode": true });
        let half = Bytes::from(half.to_string());
        let prompt = prompt_tokens(&parsed);
        let mut tried = Vec::new();
        let (prefill, params) = loop {
            let Some((i, x)) = pick(&self.prefill, &tried) else {
                return Err((
                    Outcome::Failed,
                    ApiError::unavailable("no prefill instance is up"),
                ));
            };
            tried.push(i);
            let start = Instant::now();
            let _in_flight = InFlight::new(x, prompt);
            let r = match self.send(x, Method::POST, path, half.clone()).await {
                Ok(r) => r,
                Err(e) => {
                    x.down(&e);
                    continue;
                }
            };
            let status = r.status();
            let bytes = match r.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    x.down(&e.to_string());
                    continue;
                }
            };
            if status.is_client_error() {
                // The client's mistake (the instance checked the request): passed on as it is.
                self.count(Outcome::ClientError);
                return Ok(respond(status, "application/json", bytes));
            }
            let params = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .map(|v| v["kv_transfer_params"].clone())
                .filter(|p| p["ticket"].is_string() && p["first_token"].is_u64());
            match params {
                Some(p) if status == StatusCode::OK => {
                    *self
                        .prefill_seconds
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) += start.elapsed().as_secs_f64();
                    break (x.clone(), p);
                }
                _ => {
                    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned();
                    x.down(&format!("prefill half answered {status}: {text}"));
                }
            }
        };
        // The decode half: the client's request, told where its prompt KV is.
        let mut full = parsed;
        full["kv_transfer_params"] = json!({
            "do_remote_prefill": true,
            "remote_url": prefill.url,
            "ticket": params["ticket"],
            "first_token": params["first_token"],
        });
        let full = Bytes::from(full.to_string());
        let mut tried = Vec::new();
        while let Some((i, x)) = pick(&self.decode, &tried) {
            tried.push(i);
            let in_flight = InFlight::new(x, 0);
            match self.send(x, Method::POST, path, full.clone()).await {
                Ok(r) => {
                    if r.status().is_server_error() {
                        x.failures.fetch_add(1, Ordering::Relaxed);
                    }
                    self.count(match r.status() {
                        s if s.is_client_error() => Outcome::ClientError,
                        s if s.is_server_error() => Outcome::Failed,
                        _ => Outcome::Disaggregated,
                    });
                    return Ok(pass_on(r, in_flight));
                }
                // Not connected: the KV was not pulled, another decode instance may take it.
                Err(e) => x.down(&e),
            }
        }
        Err((
            Outcome::Failed,
            ApiError::unavailable("no decode instance is up"),
        ))
    }
}

/// An instance's answer, passed on with its status and content type.
fn pass_on(r: Response<Incoming>, in_flight: InFlight) -> Response<RouterBody> {
    let (parts, body) = r.into_parts();
    let mut out = Response::new(RouterBody::Upstream {
        body,
        failed: false,
        in_flight,
    });
    *out.status_mut() = parts.status;
    for h in [CONTENT_TYPE, hyper::header::CACHE_CONTROL] {
        if let Some(v) = parts.headers.get(&h) {
            out.headers_mut().insert(h, v.clone());
        }
    }
    out
}

/// Route on `listener` until `shutdown` resolves (through `vkv serve`'s accept loop, with its
/// connection cap); then stop accepting and let the answers in flight finish (up to 30 s).
pub async fn route(
    config: RouterConfig,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServerError> {
    let router = Arc::new(Router::new(config));
    let prober = tokio::spawn({
        let router = router.clone();
        async move {
            loop {
                router.probe().await;
                tokio::time::sleep(router.config.health_interval).await;
            }
        }
    });
    let graceful = GracefulShutdown::new();
    let max_connections = router.config.max_connections;
    let accepted = accept_connections(&listener, shutdown, max_connections, &graceful, {
        let router = router.clone();
        move |req| router.clone().handle(req)
    })
    .await;
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    prober.abort();
    accepted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_are_estimated_from_ids_or_text() {
        assert_eq!(prompt_tokens(&json!({"prompt": [1, 2, 3]})), 3);
        assert_eq!(prompt_tokens(&json!({"prompt": "abcdefgh"})), 2);
        assert_eq!(prompt_tokens(&json!({"prompt": ["abcd", "abcde"]})), 3);
        let chat = json!({"messages": [{"role": "user", "content": "abcdefgh"},
                                       {"role": "user", "content": [{"type": "text", "text": "abcd"}]}]});
        assert_eq!(prompt_tokens(&chat), 3);
        assert_eq!(prompt_tokens(&json!({})), 0);
    }

    #[test]
    fn the_least_loaded_instance_up_is_picked() {
        let pool: Vec<Arc<Instance>> = (0..3)
            .map(|i| Arc::new(Instance::new(&format!("http://h:{i}"), "prefill")))
            .collect();
        // A long prompt in flight at 0 and two short ones at 1: 1 carries fewer prompt tokens.
        let _a = InFlight::new(&pool[0], 4000);
        let _b = InFlight::new(&pool[1], 100);
        let _c = InFlight::new(&pool[1], 100);
        let _d = InFlight::new(&pool[2], 150);
        pool[2].waiting.store(1, Ordering::Relaxed); // + a typical prompt queued there
        assert_eq!(pick(&pool, &[]).unwrap().0, 1);
        assert_eq!(pick(&pool, &[1]).unwrap().0, 2);
        pool[2].up.store(false, Ordering::Relaxed);
        assert_eq!(pick(&pool, &[1]).unwrap().0, 0);
        assert!(pick(&pool, &[0, 1]).is_none());
        drop(_b);
        drop(_c);
        assert_eq!(pool[1].load(), (0, 0), "in-flight counts go back to 0");
        // Decode instances: by requests, then KV use.
        let decode: Vec<Arc<Instance>> = (0..2)
            .map(|i| Arc::new(Instance::new(&format!("http://d:{i}"), "decode")))
            .collect();
        decode[0].kv_use.store(900, Ordering::Relaxed);
        decode[1].kv_use.store(100, Ordering::Relaxed);
        assert_eq!(pick(&decode, &[]).unwrap().0, 1);
        let _e = InFlight::new(&decode[1], 0);
        assert_eq!(pick(&decode, &[]).unwrap().0, 0);
    }
}
