//! The routes: one hyper service over the shared [`AppState`] (the engine handle, the
//! configuration, the metrics, the OpenAPI document), answering `POST /v1/completions`,
//! `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /metrics` and
//! `GET /openapi.json` (and `HEAD` wherever `GET` goes). The request's method and path become a
//! [`Route`] once; each route has one handler function whose `#[utoipa::path]` attribute is its
//! operation in the OpenAPI document ([`crate::openapi`]).
//!
//! A generation request goes: API key → body (at most `max_body_bytes`, else 413) → typed request
//! and its checks ([`parse_request`], 400 naming the field) → model name → tokens
//! ([`ValidRequest::to_generation`](crate::openai::ValidRequest::to_generation)) →
//! [`Engine::submit`] with a channel of its own. Then either the whole answer is collected, or the
//! channel becomes the response body ([`EventStream`], SSE). Either way an [`AbortOnDrop`] guard
//! holds the request id: if the client goes away (hyper drops the handler's future or the body),
//! the guard aborts the request in the engine at once, which frees its KV memory within a step.
//! (vLLM does the same with `request.is_disconnected()`; here it is a drop guard.)

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{
    HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE,
};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use tracing::Instrument;
use vkv_engine::engine::FinishReason;
use vkv_engine::engine::{
    event_channel, Engine, EventKind, EventReceiver, ExportedKv, Finished, GenerationRequest,
    KvHandoff, RequestId, Usage,
};

use crate::error::{ApiError, ErrorBody};
use crate::handoff::{HeldKv, Role, KV_PULL_PATH};
use crate::metrics::ServerMetrics;
use crate::openai::request::{
    ChatCompletionRequest, CompletionRequest, Handoff, Input, KvTransferParams, Prompt,
    ValidRequest,
};
use crate::openai::response::{
    json_text, ChatCompletion, ChatCompletionChunk, ChoiceText, Completion, CompletionChunk, Echo,
    Health, HealthStatus, ListObject, ModelCard, ModelList, ModelObject, TokenLogprobText,
};
use crate::openai::{parse_request, Endpoint, ResponseHead};
use crate::route::Route;
use crate::ServerConfig;
use vkv_engine::kv::prompt_hash;

/// What every connection shares.
pub struct AppState {
    pub engine: Arc<Engine>,
    pub config: ServerConfig,
    pub metrics: ServerMetrics,
    /// Unix seconds at start (the model's `created`).
    started: u64,
    next_id: AtomicU64,
    /// `/openapi.json`, written once.
    openapi: Bytes,
    /// Prefill role: prompt KV held for decode instances.
    pub held_kv: HeldKv,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl AppState {
    pub fn new(engine: Arc<Engine>, config: ServerConfig) -> AppState {
        let vocab_size = engine.model().model.config.vocab_size;
        let openapi = Bytes::from(
            crate::openapi::document(
                &config.served_model_name,
                vocab_size,
                engine.max_num_seqs().min(crate::openai::request::MAX_N),
            )
            .to_string(),
        );
        AppState {
            openapi,
            held_kv: HeldKv::new(config.kv_handoff_timeout),
            engine,
            config,
            metrics: ServerMetrics::default(),
            started: unix_now(),
            next_id: AtomicU64::new(0),
        }
    }

    /// Answer one HTTP request (never fails: errors are OpenAI-shaped responses), inside a
    /// span of its own — the parent of the engine's span for the request it submits — ending
    /// with one log line: status and the time to the response's head (a stream goes on after).
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ApiBody> {
        let start = std::time::Instant::now();
        let span = tracing::info_span!("http", method = %req.method(), path = req.uri().path());
        let head = req.method() == Method::HEAD;
        if self.config.role == Role::Prefill
            && req.method() == Method::POST
            && req.uri().path() == KV_PULL_PATH
        {
            let response = self.kv_pull(req).instrument(span.clone()).await;
            let response = response.unwrap_or_else(|e| error_response(&e));
            tracing::debug!(parent: &span, status = response.status().as_u16(), "KV pull");
            return response;
        }
        let (route, result) = match Route::parse(req.method(), req.uri().path()) {
            Ok(route) => (
                Some(route),
                self.dispatch(route, req).instrument(span.clone()).await,
            ),
            Err((route, e)) => (route, Err(e)),
        };
        let ms = (start.elapsed().as_secs_f64() * 1e4).round() / 10.0;
        match &result {
            Err(e) if e.status.is_server_error() => {
                tracing::warn!(parent: &span, status = e.status.as_u16(), error = %e.message, ms, "response")
            }
            Err(e) => {
                tracing::info!(parent: &span, status = e.status.as_u16(), error = %e.message, ms, "response")
            }
            // Probes and scrapes at debug: monitoring polls them all day.
            Ok(r) if matches!(route, Some(Route::Health | Route::Metrics)) => {
                tracing::debug!(parent: &span, status = r.status().as_u16(), ms, "response")
            }
            Ok(r) => tracing::info!(parent: &span, status = r.status().as_u16(), ms, "response"),
        }
        let mut response = result.unwrap_or_else(|e| error_response(&e));
        if head {
            // As GET, without the body (RFC 9110 section 9.3.2): its length stays in the header.
            let length = response.body().size_hint().exact();
            if let Some(length) = length {
                response
                    .headers_mut()
                    .insert(CONTENT_LENGTH, HeaderValue::from(length));
            }
            *response.body_mut() = ApiBody::Full(None);
        }
        self.metrics.response(
            route.map_or("other", Route::path),
            response.status().as_u16(),
        );
        response
    }

    async fn dispatch(
        self: &Arc<Self>,
        route: Route,
        req: Request<Incoming>,
    ) -> Result<Response<ApiBody>, ApiError> {
        match route {
            Route::Health => Ok(health(self)),
            Route::Metrics => Ok(metrics(self)),
            Route::OpenApi => Ok(openapi_json(self)),
            Route::Models => models(self, &req),
            Route::Completions => completions(self, req).await,
            Route::ChatCompletions => chat_completions(self, req).await,
        }
    }

    /// `Authorization: Bearer KEY` when the server has a key.
    fn check_key(&self, req: &Request<Incoming>) -> Result<(), ApiError> {
        check_bearer(req, self.config.api_key.as_deref())
    }

    /// `POST /v1/kv/pull` (prefill role): the prompt KV held under the body's `ticket`, once.
    async fn kv_pull(&self, req: Request<Incoming>) -> Result<Response<ApiBody>, ApiError> {
        self.check_key(&req)?;
        let body = self.read_body(req).await?;
        let ticket = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["ticket"].as_str().map(str::to_string))
            .ok_or_else(|| ApiError::field("ticket", "expected {\"ticket\": \"...\"}"))?;
        let Some(blob) = self.held_kv.take(&ticket) else {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                ..ApiError::field(
                    "ticket",
                    format!("no KV is held under ticket {ticket}: pulled already, expired (--kv-handoff-timeout) or never held"),
                )
            });
        };
        let mut r = Response::new(ApiBody::Full(Some(blob)));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        Ok(r)
    }

    /// A disaggregated request's half against this instance's role: refused unless the role
    /// serves it; the decode half pulls its prompt KV here, before it is submitted.
    async fn handoff(
        &self,
        request: &ValidRequest,
        generation: &mut GenerationRequest,
    ) -> Result<(), ApiError> {
        let Some(handoff) = &request.handoff else {
            return Ok(());
        };
        let role = self.config.role;
        let (needs, what) = match handoff {
            Handoff::Prefill => (Role::Prefill, "do_remote_decode"),
            Handoff::Decode { .. } => (Role::Decode, "do_remote_prefill"),
        };
        if role != needs {
            return Err(ApiError::field(
                "kv_transfer_params",
                format!(
                    "`kv_transfer_params.{what}` needs a server started with --role {}; this one runs --role {}",
                    needs.as_str(),
                    role.as_str()
                ),
            ));
        }
        if let Handoff::Decode {
            remote_url,
            ticket,
            first_token,
        } = handoff
        {
            let timeout = self.config.kv_handoff_timeout;
            let key = self.config.api_key.as_deref();
            let (kv, _) = crate::handoff::pull(remote_url, ticket, key, timeout)
                .await
                .map_err(|e| ApiError::bad_gateway(format!("pulling the prompt's KV: {e}")))?;
            // KV of another prompt (a prefill instance with another tokenizer or model, or a
            // ticket of another request) would give wrong answers silently: refused.
            if kv.prompt_hash() != prompt_hash(&generation.prompt) {
                return Err(ApiError::field(
                    "kv_transfer_params",
                    format!(
                        "the KV held under ticket {ticket} is of another prompt than this request's {} tokens (another request's ticket, or a prefill instance with another model or tokenizer)",
                        generation.prompt.len()
                    ),
                ));
            }
            generation.handoff = Some(KvHandoff::Import {
                first_token: *first_token,
                kv: Arc::new(kv),
            });
        }
        Ok(())
    }

    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, ApiError> {
        let limit = self.config.max_body_bytes;
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::too_large(limit));
        }
        let timeout = self.config.request_timeout;
        let body = tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect());
        let Ok(body) = body.await else {
            return Err(ApiError::body_timeout(timeout));
        };
        match body {
            Ok(body) => Ok(body.to_bytes()),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                Err(ApiError::too_large(limit))
            }
            Err(e) => Err(ApiError::invalid(
                None,
                format!("reading the request body: {e}"),
            )),
        }
    }

    async fn generate(
        self: &Arc<Self>,
        req: Request<Incoming>,
        endpoint: Endpoint,
    ) -> Result<Response<ApiBody>, ApiError> {
        let body = self.read_body(req).await?;
        let request = parse_request(&body, endpoint)?;
        let name = &self.config.served_model_name;
        if let Some(model) = &request.model {
            if model != name {
                return Err(ApiError::field(
                    "model",
                    format!("The model `{model}` does not exist: this server serves `{name}`"),
                )
                .with_code("model_not_found"));
            }
        }
        let engine = &self.engine;
        let limit = engine.max_model_len().min(engine.kv_capacity_tokens());
        // Tokenizing (and the chat template) and compiling a structured output's grammar are
        // CPU work: off the async workers.
        let (request, generation) = tokio::task::spawn_blocking({
            let engine = engine.clone();
            move || {
                let generation = request
                    .to_generation(&engine.model().tokenizer, limit)
                    .and_then(|mut g| {
                        if let Some(format) = &request.response_format {
                            let grammar = engine.compile_grammar(format).map_err(|e| {
                                ApiError::field(
                                    "response_format",
                                    format!("`response_format`: {e}"),
                                )
                            })?;
                            g.grammar = Some(grammar);
                        }
                        Ok(g)
                    });
                (request, generation)
            }
        })
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?;
        let mut generation = generation?;
        self.handoff(&request, &mut generation).await?;
        let max_n = engine.max_num_seqs();
        for (field, count) in [("n", request.n), ("best_of", request.best_of)] {
            if count > max_n {
                return Err(ApiError::field(
                    field,
                    format!(
                        "`{field}` must be at most {max_n} on this server (--max-num-seqs: every choice runs at once), found {count}"
                    ),
                ));
            }
        }
        // `best_of`: rank the samples by cumulative log-probability, so every one reports its
        // tokens' (those not asked for are dropped from the answer).
        if request.best_of > request.n {
            generation.logprobs = Some(request.logprobs.unwrap_or(0));
        }
        // `echo`: the prompt as the client wrote it (token ids written out), and its first
        // token (which has no log-probability).
        let echo = request.echo.then(|| {
            let text = match &request.input {
                Input::Prompt(Prompt::Text(t)) => t.clone(),
                _ => engine
                    .model()
                    .tokenizer
                    .decode(&generation.prompt, false)
                    .unwrap_or_default(),
            };
            (text, generation.prompt[0])
        });
        // The prefill half's KV carries which prompt it is of.
        let prefill_half =
            (request.handoff == Some(Handoff::Prefill)).then(|| prompt_hash(&generation.prompt));
        let (tx, rx) = event_channel();
        let submitted = match request.beam {
            Some(beam) => engine.submit_beam_search(generation, beam, tx),
            None => engine.submit_samples(generation, request.best_of, tx),
        };
        let ids = submitted.map_err(|e| {
            ApiError::from_engine(e, endpoint.prompt_field(), request.max_tokens_field)
        })?;
        let choices = Choices::new(ids.clone());
        let guard = AbortOnDrop {
            engine: engine.clone(),
            ids,
            armed: true,
        };
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let head = ResponseHead {
            endpoint,
            id: match endpoint {
                Endpoint::Completions => format!("cmpl-{:x}{n:08x}", self.started),
                Endpoint::ChatCompletions => format!("chatcmpl-{:x}{n:08x}", self.started),
            },
            created: unix_now(),
            model: name.clone(),
        };
        // The prefill half of a disaggregated request is answered whole (to the router).
        if request.stream && request.handoff != Some(Handoff::Prefill) {
            let stream = EventStream {
                rx,
                guard,
                head,
                include_usage: request.include_usage,
                roles_sent: match endpoint {
                    Endpoint::Completions if !request.echo => choices.len(),
                    _ => 0,
                },
                logprobs: request.logprobs.map(|_| vec![0; choices.len()]),
                echo: echo.map(|e| e.0),
                choices,
                phase: Phase::Open,
                state: self.clone(),
            };
            let mut r = Response::new(ApiBody::Stream(Box::new(stream)));
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            return Ok(r);
        }
        let answer = Answer {
            with_logprobs: request.logprobs.is_some(),
            echo,
            best: request.n,
            prefill_half,
        };
        self.collect(rx, guard, head, choices, answer).await
    }

    /// Wait for the whole answer, every choice (dropped with the connection if the client goes
    /// away).
    async fn collect(
        &self,
        mut rx: EventReceiver,
        mut guard: AbortOnDrop,
        head: ResponseHead,
        mut choices: Choices,
        answer: Answer,
    ) -> Result<Response<ApiBody>, ApiError> {
        let Answer {
            with_logprobs,
            echo,
            best,
            prefill_half,
        } = answer;
        let mut prompt_logprobs = None;
        let mut exported = None;
        let mut texts = vec![String::new(); choices.len()];
        let mut reasons = vec![FinishReason::Abort; choices.len()];
        let mut logprobs: Vec<Vec<TokenLogprobText>> = vec![Vec::new(); choices.len()];
        let tokenizer = &self.engine.model().tokenizer;
        loop {
            let Some(event) = rx.recv().await else {
                return Err(ApiError::unavailable(
                    "the engine stopped before the request ended",
                ));
            };
            let Some(index) = choices.index(event.id) else {
                continue;
            };
            match event.kind {
                EventKind::Delta {
                    text: t,
                    logprobs: l,
                    ..
                } => {
                    texts[index].push_str(&t);
                    logprobs[index].extend(l.iter().map(|l| TokenLogprobText::new(tokenizer, l)));
                }
                // Computed once, by the first choice, for all of them.
                EventKind::PromptLogprobs(l) => {
                    let texts = l
                        .iter()
                        .flatten()
                        .map(|l| TokenLogprobText::new(tokenizer, l));
                    prompt_logprobs = Some(texts.collect::<Vec<_>>());
                }
                EventKind::KvExported(kv) => exported = Some(kv),
                EventKind::Finished(f) => {
                    self.metrics.finished(&f, index == 0);
                    if f.reason == FinishReason::Abort {
                        return Err(ApiError::unavailable(
                            "the request was aborted: the server is shutting down",
                        ));
                    }
                    reasons[index] = f.reason;
                    if choices.finished(index, &f) {
                        guard.armed = false;
                        let mut whole: Vec<(f64, ChoiceText)> = texts
                            .into_iter()
                            .zip(reasons)
                            .zip(logprobs)
                            .map(|((text, reason), l)| {
                                let cum = l.iter().map(|t| t.logprob as f64).sum();
                                let choice = ChoiceText {
                                    text,
                                    reason,
                                    logprobs: with_logprobs.then_some(l),
                                    echo: echo.clone().map(|(text, first)| {
                                        let first = tokenizer.decode(&[first], false);
                                        let lp = prompt_logprobs.clone().filter(|_| with_logprobs);
                                        Echo {
                                            text,
                                            logprobs: lp.map(|lp| (first.unwrap_or_default(), lp)),
                                        }
                                    }),
                                };
                                (cum, choice)
                            })
                            .collect();
                        // `best_of`: the `best` samples with the highest cumulative
                        // log-probability, in that order.
                        if best < whole.len() {
                            whole.sort_by(|a, b| b.0.total_cmp(&a.0));
                            whole.truncate(best);
                        }
                        let whole: Vec<ChoiceText> = whole.into_iter().map(|w| w.1).collect();
                        let body = head.response(&whole, choices.usage);
                        if let Some(prompt) = prefill_half {
                            return self.prefill_answer(&body, exported.take(), prompt);
                        }
                        return Ok(json_response(StatusCode::OK, &body));
                    }
                }
                // The guard aborts the other choices.
                EventKind::Failed(why) => {
                    return Err(ApiError::internal(format!("the engine failed: {why}")));
                }
            }
        }
    }
}

/// `Authorization: Bearer KEY` when there is a key (compared in constant time): the check of
/// `vkv serve` and of `vkv route`.
pub(crate) fn check_bearer<B>(req: &Request<B>, key: Option<&str>) -> Result<(), ApiError> {
    let Some(key) = key else {
        return Ok(());
    };
    let Some(given) = req.headers().get(AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "no API key: send the header `Authorization: Bearer YOUR_KEY`",
        ));
    };
    // `Bearer KEY`, the scheme in any case (RFC 9110 section 11.1); a key without it is no key.
    let given = given.as_bytes();
    let token = match given.split_at_checked(7) {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case(b"bearer ") => token.trim_ascii(),
        _ => {
            return Err(ApiError::unauthorized(
                "the Authorization header must be `Bearer YOUR_KEY`",
            ))
        }
    };
    let same = token.len() == key.len()
        && token
            .iter()
            .zip(key.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::unauthorized("incorrect API key"))
    }
}

/// What a whole answer is made of besides the choices' events: whether the client asked for
/// log-probabilities, completions' `echo` (the prompt's text and first token), how many of
/// the choices to answer with (`n`, below their number with `best_of`), and whether it is the
/// prefill half of a disaggregated request (answered with where its KV is held; the hash of
/// its prompt goes with the KV).
struct Answer {
    with_logprobs: bool,
    echo: Option<(String, u32)>,
    best: usize,
    prefill_half: Option<u64>,
}

impl AppState {
    /// The prefill half's answer: the usual body plus `kv_transfer_params` naming the ticket
    /// its prompt KV is held under and its one token (which the decode half sends first).
    fn prefill_answer(
        &self,
        body: &impl Serialize,
        exported: Option<Arc<ExportedKv>>,
        prompt: u64,
    ) -> Result<Response<ApiBody>, ApiError> {
        let Some(exported) = exported else {
            return Err(ApiError::internal(
                "the prefill half ended without handing out its KV",
            ));
        };
        let mut body = serde_json::to_value(body).map_err(|e| ApiError::internal(e.to_string()))?;
        let (first_token, tokens) = (exported.first_token, exported.kv.tokens);
        // The event's KV is this answer's alone: held as it is, not copied.
        let mut kv = match Arc::try_unwrap(exported) {
            Ok(exported) => exported.kv,
            Err(shared) => shared.kv.clone(),
        };
        kv.set_prompt_hash(prompt);
        let encoded = kv.into_encoded();
        let ticket = self.held_kv.hold(Bytes::from(encoded));
        let params = KvTransferParams {
            do_remote_prefill: true,
            ticket: Some(ticket),
            first_token,
            tokens: Some(tokens),
            ..KvTransferParams::default()
        };
        body["kv_transfer_params"] =
            serde_json::to_value(params).map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(json_response(StatusCode::OK, &body))
    }
}

/// The choices of one response (`n` of them): which engine request is which choice, how many
/// are still running, and the usage they add up to — the prompt counted once (it was computed
/// once), completion tokens summed.
struct Choices {
    ids: Vec<RequestId>,
    running: usize,
    usage: Usage,
}

impl Choices {
    fn new(ids: Vec<RequestId>) -> Choices {
        Choices {
            running: ids.len(),
            ids,
            usage: Usage::default(),
        }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    /// The choice request `id` is.
    fn index(&self, id: RequestId) -> Option<usize> {
        self.ids.iter().position(|&i| i == id)
    }

    /// Choice `index` ended with `f`; returns whether it was the last one running.
    fn finished(&mut self, index: usize, f: &Finished) -> bool {
        if index == 0 {
            self.usage.prompt_tokens = f.usage.prompt_tokens;
            self.usage.cached_tokens = f.usage.cached_tokens;
        }
        self.usage.completion_tokens += f.usage.completion_tokens;
        self.running -= 1;
        self.running == 0
    }
}

// The route handlers. Their `#[utoipa::path]` attributes are the document's operations.

// The refusals the operations list (the answers themselves are `ApiError`s: these types are
// never built).

/// The refusal of every `/v1/*` operation.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
#[response(status = 401, description = "Missing or wrong API key.")]
struct Unauthorized(ErrorBody);

/// The other refusals of both generation endpoints.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum GenerationRefusals {
    #[response(
        status = 400,
        description = "A mistake in the request; `param` names the field."
    )]
    BadRequest(ErrorBody),
    #[response(status = 413, description = "The body is over the size limit.")]
    TooLarge(ErrorBody),
    #[response(
        status = 503,
        description = "The engine has stopped or is shutting down."
    )]
    Unavailable(ErrorBody),
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    summary = "Continue a prompt.",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The whole completion, or (`stream: true`) server-sent events: one `data:` line per chunk, then `data: [DONE]`.",
         content((Completion = "application/json"), (CompletionChunk = "text/event-stream"))),
        GenerationRefusals,
        Unauthorized,
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn completions(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
    state.check_key(&req)?;
    state.generate(req, Endpoint::Completions).await
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    summary = "Answer a conversation, through the model's chat template.",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The whole chat completion, or (`stream: true`) server-sent events: one `data:` line per chunk, then `data: [DONE]`.",
         content((ChatCompletion = "application/json"), (ChatCompletionChunk = "text/event-stream"))),
        GenerationRefusals,
        Unauthorized,
    ),
    security((), ("bearer" = []))
)]
pub(crate) async fn chat_completions(
    state: &Arc<AppState>,
    req: Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
    state.check_key(&req)?;
    state.generate(req, Endpoint::ChatCompletions).await
}

#[utoipa::path(
    method(get, head),
    path = "/v1/models",
    summary = "The served model.",
    responses(
        (status = 200, description = "The one served model.", body = ModelList),
        Unauthorized,
    ),
    security((), ("bearer" = []))
)]
pub(crate) fn models(
    state: &AppState,
    req: &Request<Incoming>,
) -> Result<Response<ApiBody>, ApiError> {
    state.check_key(req)?;
    let c = &state.engine.model().model.config;
    let list = ModelList {
        object: ListObject::List,
        data: vec![ModelCard {
            id: state.config.served_model_name.clone(),
            object: ModelObject::Model,
            created: state.started,
            owned_by: "vkv".into(),
            max_model_len: state.engine.max_model_len(),
            vocab_size: c.vocab_size,
        }],
    };
    Ok(json_response(StatusCode::OK, &list))
}

#[utoipa::path(
    method(get, head),
    path = "/health",
    summary = "Whether the engine thread runs (no API key needed).",
    responses(
        (status = 200, description = "The engine thread runs.", body = Health),
        (status = 503, description = "The engine thread has stopped.", body = ErrorBody),
    )
)]
pub(crate) fn health(state: &AppState) -> Response<ApiBody> {
    if state.engine.is_alive() {
        json_response(
            StatusCode::OK,
            &Health {
                status: HealthStatus::Ok,
            },
        )
    } else {
        error_response(&ApiError::unavailable("the engine thread has stopped"))
    }
}

#[utoipa::path(
    method(get, head),
    path = "/metrics",
    summary = "Prometheus text: requests by route and status and by finish reason, running and waiting requests, KV bytes, TTFT/TPOT/ITL/E2E histograms, preemptions, map waits (no API key needed).",
    responses(
        (status = 200, description = "Prometheus text exposition, version 0.0.4.",
         body = String, content_type = "text/plain; version=0.0.4; charset=utf-8"),
    )
)]
pub(crate) fn metrics(state: &AppState) -> Response<ApiBody> {
    let engine = state.engine.metrics();
    let mut text = state.metrics.render(&engine, state.engine.is_alive());
    state.held_kv.render(&mut text, &engine.kv_handoff);
    let mut r = Response::new(ApiBody::full(text));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

#[utoipa::path(
    method(get, head),
    path = "/openapi.json",
    summary = "This document.",
    responses(
        (status = 200, description = "OpenAPI 3.1, generated from the server's own types.", body = Object),
    )
)]
pub(crate) fn openapi_json(state: &AppState) -> Response<ApiBody> {
    json_bytes(StatusCode::OK, state.openapi.clone())
}

/// Aborts its requests (a response's choices) in the engine when dropped while armed: the
/// client went away, or one choice failed. Aborting one that has ended does nothing.
struct AbortOnDrop {
    engine: Arc<Engine>,
    ids: Vec<RequestId>,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if self.armed {
            for &id in &self.ids {
                self.engine.abort(id);
            }
        }
    }
}

/// Where a stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// The last chunk is out; `data: [DONE]` is next.
    Done,
    Closed,
}

/// A streamed response: the request's events as SSE `data:` lines, each chunk one choice's
/// (`index`), then `data: [DONE]` once every choice has ended.
pub struct EventStream {
    rx: EventReceiver,
    guard: AbortOnDrop,
    head: ResponseHead,
    include_usage: bool,
    /// Chat: each choice's first chunk carries `role: assistant`, sent at once, as OpenAI
    /// does; choices below this have had theirs.
    roles_sent: usize,
    choices: Choices,
    /// With `logprobs`: per choice, the bytes of token text sent so far (completions'
    /// `text_offset`).
    logprobs: Option<Vec<usize>>,
    /// Completions' `echo`: the prompt's text, each choice's first chunk.
    echo: Option<String>,
    phase: Phase,
    state: Arc<AppState>,
}

fn sse<T: Serialize>(value: &T) -> String {
    format!("data: {}\n\n", json_text(value))
}

impl EventStream {
    /// Choice `index`'s last chunk, and after the last choice's, the usage chunk if asked.
    fn finish(&mut self, index: usize, f: &Finished) -> String {
        self.state.metrics.finished(f, index == 0);
        let last = self.choices.finished(index, f);
        let chunk = self.head.chunk(
            index as u32,
            "",
            false,
            Some(f.reason),
            self.include_usage,
            None,
        );
        let mut out = sse(&chunk);
        if last {
            self.guard.armed = false;
            self.phase = Phase::Done;
            if self.include_usage {
                out.push_str(&sse(&self.head.usage_chunk(self.choices.usage)));
            }
        }
        out
    }

    fn next_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<String>> {
        loop {
            match self.phase {
                Phase::Closed => return Poll::Ready(None),
                Phase::Done => {
                    self.phase = Phase::Closed;
                    return Poll::Ready(Some("data: [DONE]\n\n".to_string()));
                }
                Phase::Open => {}
            }
            if self.roles_sent < self.choices.len() {
                let index = self.roles_sent as u32;
                self.roles_sent += 1;
                let text = self.echo.as_deref().unwrap_or("");
                let chunk = self
                    .head
                    .chunk(index, text, true, None, self.include_usage, None);
                return Poll::Ready(Some(sse(&chunk)));
            }
            let Some(event) = std::task::ready!(self.rx.poll_recv(cx)) else {
                self.phase = Phase::Done;
                let e = ApiError::unavailable("the engine stopped before the request ended");
                return Poll::Ready(Some(sse(&e.body())));
            };
            let Some(index) = self.choices.index(event.id) else {
                continue;
            };
            match event.kind {
                EventKind::Delta { text, logprobs, .. }
                    if text.is_empty() && logprobs.is_empty() =>
                {
                    continue
                }
                // Streams do not take `echo` with `logprobs` (a 400 before).
                EventKind::PromptLogprobs(_) | EventKind::KvExported(_) => continue,
                EventKind::Delta { text, logprobs, .. } => {
                    let tokenizer = &self.state.engine.model().tokenizer;
                    let texts: Vec<TokenLogprobText> = logprobs
                        .iter()
                        .map(|l| TokenLogprobText::new(tokenizer, l))
                        .collect();
                    let offset = self.logprobs.as_mut().map(|sent| {
                        let at = sent[index];
                        sent[index] += texts.iter().map(|t| t.token.len()).sum::<usize>();
                        at
                    });
                    let chunk = self.head.chunk(
                        index as u32,
                        &text,
                        false,
                        None,
                        self.include_usage,
                        offset.map(|at| (texts.as_slice(), at)),
                    );
                    return Poll::Ready(Some(sse(&chunk)));
                }
                EventKind::Finished(f) => return Poll::Ready(Some(self.finish(index, &f))),
                // The guard, still armed, aborts the other choices when the stream is dropped.
                EventKind::Failed(why) => {
                    self.phase = Phase::Done;
                    let e = ApiError::internal(format!("the engine failed: {why}"));
                    return Poll::Ready(Some(sse(&e.body())));
                }
            }
        }
    }
}

/// Every response body: whole, or a stream of events.
pub enum ApiBody {
    Full(Option<Bytes>),
    Stream(Box<EventStream>),
}

impl ApiBody {
    fn full(text: impl Into<Bytes>) -> ApiBody {
        ApiBody::Full(Some(text.into()))
    }
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ApiBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ApiBody::Stream(s) => s
                .next_frame(cx)
                .map(|text| text.map(|t| Ok(Frame::data(Bytes::from(t))))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ApiBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ApiBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ApiBody::Full(None) => SizeHint::with_exact(0),
            ApiBody::Stream(_) => SizeHint::default(),
        }
    }
}

fn json_bytes(status: StatusCode, body: impl Into<Bytes>) -> Response<ApiBody> {
    let mut r = Response::new(ApiBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<ApiBody> {
    json_bytes(status, json_text(value))
}

fn error_response(e: &ApiError) -> Response<ApiBody> {
    let mut r = json_bytes(e.status, e.json());
    if let Some(allow) = e.allow {
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(allow));
    }
    r
}
