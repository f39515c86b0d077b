//! The request bodies of `/v1/completions` ([`CompletionRequest`]) and `/v1/chat/completions`
//! ([`ChatCompletionRequest`]) as typed structs, the checks a client's mistake needs (their
//! `validate`, into a [`ValidRequest`]), and tokenizing into the engine's [`GenerationRequest`].
//!
//! Invariants: the schema each type gives the OpenAPI document is what `validate` accepts, where
//! JSON Schema can say it (types, required fields, ranges, lengths, neutral-only values); what it
//! cannot (the prompt and `max_tokens` fitting the context, a text prompt tokenizing to at least
//! one token, token ids below the vocabulary size, which the served document states) is checked
//! here or by the engine and named in the field's description. Every refusal is a 400 naming its
//! field.

use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
use utoipa::ToSchema;
use vkv_engine::engine::{BeamSearch, GenerationRequest, KvHandoff, StopConditions};
use vkv_engine::sampler::{LogitsAdjustments, SamplingParams, MAX_TOP_LOGPROBS};
use vkv_engine::structured_output::ResponseFormat as EngineFormat;
use vkv_engine::tokenizer::{ChatMessage, Tokenizer};

use super::{optional_object, Endpoint, Object};
use crate::error::ApiError;

mod kv_transfer;
mod messages;
mod prompt;
mod response_format;
pub use kv_transfer::{Handoff, KvTransferParams};
pub use messages::{
    ContentPart, Message, MessageContent, MissingContent, RawMessage, Role, StreamOptions,
};
use prompt::{ids, text_or_array, TextOrArray};
pub use prompt::{Prompt, Stop, TokenId};
pub use response_format::{JsonSchemaFormat, ResponseFormat};

/// The smallest `top_p` the sampler keeps apart from 0: it samples in `f32`, where a smaller
/// positive number is subnormal or rounds to 0 (`f32::MIN_POSITIVE`, exactly).
pub const MIN_TOP_P: f64 = 1.1754943508222875e-38;

// Schemas of the fields accepted at their neutral value only.

/// `kind` or null, `value` only (or null).
fn only(kind: Type, value: Value, description: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([kind, Type::Null]))
        .enum_values(Some([value, Value::Null]))
        .description(Some(description))
}

fn only_null() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Null)
        .description(Some("Not supported by this server: null only."))
}

/// `logit_bias`: token ids (decimal, no leading zeros) to a bias in [-100, 100]. The served
/// document bounds the ids by the vocabulary (`propertyNames`, see `crate::openapi`).
fn logit_bias_schema() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Object, Type::Null]))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::Number)
                .minimum(Some(-100.0))
                .maximum(Some(100.0)),
        ))
        .description(Some(
            "Token id (decimal) → bias added to its logit before sampling, in [-100, 100].",
        ))
}

fn only_no_tool() -> ObjectBuilder {
    only(
        Type::String,
        Value::String("none".into()),
        r#"Not supported by this server: "none" only."#,
    )
}

/// The neutral-only values, checked (the schema above and the field attributes say the same).
fn neutral(name: &str, ok: bool, what: &str, found: impl fmt::Display) -> Result<(), ApiError> {
    if ok {
        Ok(())
    } else {
        Err(ApiError::field(
            name,
            format!("`{name}` is not supported by this server ({what}), found {found}"),
        ))
    }
}

fn json_kind(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() <= 40 => format!("the string {s:?}"),
        Value::String(_) => "a string".into(),
        Value::Array(a) if a.is_empty() => "an empty array".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
        v => v.to_string(),
    }
}

/// The fields both endpoints share, then one endpoint's own (the macro keeps them one list, and
/// one check, for both structs: `deny_unknown_fields` does not work with `#[serde(flatten)]`).
macro_rules! generation_request {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(
                $(#[$field_meta:meta])*
                pub $field:ident: $ty:ty,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Deserialize, ToSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $(
                $(#[$field_meta])*
                pub $field: $ty,
            )*
            /// The served model's name (see /v1/models); another name is refused.
            pub model: Option<String>,
            /// Tokens to generate at most; left out: the rest of the context. Generation also
            /// ends (`length`) where the context does (`max_model_len` in /v1/models), so a
            /// larger value is cut to the room the prompt leaves.
            #[schema(minimum = 1)]
            pub max_tokens: Option<i64>,
            /// 0: greedy (the most likely token).
            #[schema(minimum = 0, maximum = 2, default = 1)]
            pub temperature: Option<f64>,
            /// Keep the smallest set of most likely tokens whose probability reaches `top_p`. At
            /// least the smallest normal f32 (the sampler's precision).
            #[schema(minimum = 1.1754943508222875e-38, maximum = 1, default = 1)]
            pub top_p: Option<f64>,
            /// vLLM extra: keep the `top_k` most likely tokens; -1 or 0: all.
            #[schema(minimum = -1, default = -1)]
            pub top_k: Option<i64>,
            /// Same seed, same prompt, same parameters: the same output.
            pub seed: Option<i64>,
            pub stop: Option<Stop>,
            /// vLLM extra: token ids that also end the output.
            pub stop_token_ids: Option<Vec<TokenId>>,
            /// vLLM extra: keep generating past end-of-sequence tokens.
            #[schema(default = false)]
            pub ignore_eos: Option<bool>,
            /// Server-sent events: one `data:` line per chunk, then `data: [DONE]`.
            #[schema(default = false)]
            pub stream: Option<bool>,
            /// Only with `stream: true`.
            #[serde(default, deserialize_with = "optional_object")]
            pub stream_options: Option<StreamOptions>,
            /// Choices per request (parallel sampling): the prompt is computed once and its KV
            /// shared by every choice. With a `seed`, choice `i` samples with `seed + i`.
            #[schema(minimum = 1, maximum = 128, default = 1)]
            pub n: Option<i64>,
            /// Lowers the logit of every token already generated, once.
            #[schema(minimum = -2, maximum = 2, default = 0)]
            pub presence_penalty: Option<f64>,
            /// Lowers the logit of every token already generated, per time it was.
            #[schema(minimum = -2, maximum = 2, default = 0)]
            pub frequency_penalty: Option<f64>,
            #[schema(schema_with = logit_bias_schema)]
            pub logit_bias: Option<Map<String, Value>>,
            /// Accepted and not used.
            pub user: Option<String>,
            /// Accepted and not used.
            #[schema(value_type = Option<Object>)]
            pub metadata: Option<Map<String, Value>>,
            /// Accepted and not used.
            pub store: Option<bool>,
            /// Accepted and not used.
            pub service_tier: Option<String>,
            /// vLLM extra: with prefix caching, reuse only the cached KV of requests with the
            /// same salt (give each tenant a long random one, so that no tenant can learn from
            /// timings whether another sent a prompt).
            #[schema(min_length = 1)]
            pub cache_salt: Option<String>,
            /// Structured outputs: free text (the default), any JSON object, or JSON that
            /// validates against a JSON Schema (every sample; not with `use_beam_search`).
            #[serde(default, deserialize_with = "optional_object")]
            pub response_format: Option<ResponseFormat>,
            /// Disaggregated serving, between `vkv route` and the instances (see
            /// `kv_transfer`): not in the OpenAPI document.
            #[serde(default)]
            #[schema(ignore)]
            pub kv_transfer_params: Option<KvTransferParams>,
        }

        impl $name {
            /// The checks of the fields both endpoints share.
            fn shared(&self, max_tokens_field: &'static str) -> Result<Shared, ApiError> {
                let max_tokens = match self.max_tokens {
                    None => None,
                    Some(m) if m >= 1 => Some(usize::try_from(m).unwrap_or(usize::MAX)),
                    Some(m) => {
                        return Err(ApiError::field(
                            max_tokens_field,
                            format!("`{max_tokens_field}` must be at least 1, found {m}"),
                        ))
                    }
                };
                let temperature = self.temperature.unwrap_or(1.0);
                if !(0.0..=2.0).contains(&temperature) {
                    return Err(ApiError::field(
                        "temperature",
                        format!("`temperature` must be in [0, 2], found {temperature}"),
                    ));
                }
                let top_p = self.top_p.unwrap_or(1.0);
                if !(MIN_TOP_P..=1.0).contains(&top_p) {
                    return Err(ApiError::field(
                        "top_p",
                        format!(
                            "`top_p` must be in (0, 1] and at least {MIN_TOP_P:?} (the smallest normal f32), found {top_p:?}"
                        ),
                    ));
                }
                let top_k = match self.top_k {
                    None | Some(-1) | Some(0) => 0,
                    Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
                    Some(k) => {
                        return Err(ApiError::field(
                            "top_k",
                            format!("`top_k` must be -1 or 0 (all tokens) or at least 1, found {k}"),
                        ))
                    }
                };
                let n = match self.n {
                    None => 1,
                    Some(n) if (1..=MAX_N as i64).contains(&n) => n as usize,
                    Some(n) => {
                        return Err(ApiError::field(
                            "n",
                            format!("`n` must be between 1 and {MAX_N} (choices per request), found {n}"),
                        ))
                    }
                };
                let mut adjust = LogitsAdjustments::default();
                for (name, value, into) in [
                    ("presence_penalty", self.presence_penalty, &mut adjust.presence_penalty),
                    ("frequency_penalty", self.frequency_penalty, &mut adjust.frequency_penalty),
                ] {
                    match value {
                        None => {}
                        Some(v) if (-2.0..=2.0).contains(&v) => *into = v as f32,
                        Some(v) => {
                            return Err(ApiError::field(
                                name,
                                format!("`{name}` must be in [-2, 2], found {v}"),
                            ))
                        }
                    }
                }
                for (key, value) in self.logit_bias.iter().flatten() {
                    adjust.logit_bias.push(logit_bias_entry(key, value)?);
                }
                let stop = self.stop.clone().map(|s| s.0).unwrap_or_default();
                if stop.iter().any(String::is_empty) {
                    return Err(ApiError::field("stop", "`stop` strings must not be empty"));
                }
                if self.cache_salt.as_deref() == Some("") {
                    return Err(ApiError::field(
                        "cache_salt",
                        "`cache_salt` must be a non-empty string when given, found \"\"",
                    ));
                }
                let stream = self.stream.unwrap_or(false);
                let include_usage = match &self.stream_options {
                    None => false,
                    Some(_) if !stream => {
                        return Err(ApiError::field(
                            "stream_options",
                            "`stream_options` is only allowed when `stream` is true",
                        ))
                    }
                    Some(o) => o.include_usage.unwrap_or(false),
                };
                let response_format = match &self.response_format {
                    Some(f) => f.to_engine()?,
                    None => None,
                };
                let handoff = self.kv_transfer_params.as_ref().map(KvTransferParams::handoff).transpose()?;
                if handoff.is_some() && n > 1 {
                    return Err(ApiError::field(
                        "n",
                        format!("`n` must be 1 in disaggregated serving, found {n}"),
                    ));
                }
                Ok(Shared {
                    handoff,
                    model: self.model.clone(),
                    response_format,
                    n,
                    beam: None,
                    adjust,
                    max_tokens,
                    sampling: SamplingParams {
                        temperature: temperature as f32,
                        top_k,
                        top_p: top_p as f32,
                        // OpenAI's seed is any 64-bit integer; the bits are what matters.
                        seed: self.seed.map(|s| s as u64),
                    },
                    stop: StopConditions {
                        stop,
                        stop_token_ids: self.stop_token_ids.as_deref().map(ids).unwrap_or_default(),
                        ignore_eos: self.ignore_eos.unwrap_or(false),
                    },
                    stream,
                    include_usage,
                    cache_salt: self.cache_salt.clone(),
                })
            }
        }
    };
}

/// What the shared fields come to.
struct Shared {
    handoff: Option<Handoff>,
    model: Option<String>,
    response_format: Option<EngineFormat>,
    n: usize,
    beam: Option<BeamSearch>,
    adjust: LogitsAdjustments,
    max_tokens: Option<usize>,
    sampling: SamplingParams,
    stop: StopConditions,
    stream: bool,
    include_usage: bool,
    cache_salt: Option<String>,
}

generation_request! {
    /// `POST /v1/completions`: continue a prompt.
    pub struct CompletionRequest {
        pub prompt: Prompt,
        /// Begin each choice's text with the prompt; with `logprobs` (not streamed), its
        /// `logprobs` begin with the prompt tokens' (the first one's null): the prompt is then
        /// computed whole, not taken from the prefix cache.
        #[schema(default = false)]
        pub echo: Option<bool>,
        /// Sample this many choices (sharing the prompt's KV) and answer with the `n` of them
        /// with the highest cumulative log-probability; below `n` it is `n`. Not streamed, not
        /// with `use_beam_search`.
        #[schema(minimum = 1, maximum = 128, default = 1)]
        pub best_of: Option<i64>,
        /// vLLM extra: beam search of width `n` instead of sampling; the `n` choices are the
        /// best beams, best first, each sent whole when the search ends. The beams share their
        /// common prefix's KV. Not with stop strings, penalties, `logit_bias`, log-probabilities
        /// or `best_of`.
        #[schema(default = false)]
        pub use_beam_search: Option<bool>,
        /// vLLM extra, with `use_beam_search`: beams are ranked by cumulative log-probability
        /// over `length ^ length_penalty`.
        #[schema(minimum = -100, maximum = 100, default = 1.0)]
        pub length_penalty: Option<f64>,
        /// Not supported by this server: null only.
        #[schema(schema_with = only_null)]
        pub suffix: Option<String>,
        /// Log-probabilities of the generated tokens, with this many most likely alternatives
        /// per token (0: the sampled token's only).
        #[schema(minimum = 0, maximum = 20)]
        pub logprobs: Option<i64>,
    }
}

generation_request! {
    /// `POST /v1/chat/completions`: answer a conversation, through the model's chat template.
    pub struct ChatCompletionRequest {
        #[schema(min_items = 1)]
        pub messages: Vec<Message>,
        /// The same as `max_tokens` (it wins when both are given).
        #[schema(minimum = 1)]
        pub max_completion_tokens: Option<i64>,
        /// Log-probabilities of the generated tokens (`choices[].logprobs.content`).
        #[schema(default = false)]
        pub logprobs: Option<bool>,
        /// With `logprobs: true`: the most likely alternatives to report per token (unused
        /// without it).
        #[schema(minimum = 0, maximum = 20)]
        pub top_logprobs: Option<i64>,
        /// Not supported by this server: empty only.
        #[schema(value_type = Option<Vec<Object>>, max_items = 0)]
        pub tools: Option<Vec<Value>>,
        #[schema(schema_with = only_no_tool)]
        pub tool_choice: Option<Value>,
        /// Accepted and not used.
        pub parallel_tool_calls: Option<bool>,
        /// vLLM extra: end the templated prompt with the assistant's turn.
        #[schema(default = true)]
        pub add_generation_prompt: Option<bool>,
    }
}

/// What is given to the model, not yet tokenized.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Prompt(Prompt),
    Chat {
        messages: Vec<ChatMessage>,
        add_generation_prompt: bool,
    },
}

/// A request read and checked, not yet tokenized.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub endpoint: Endpoint,
    pub model: Option<String>,
    pub input: Input,
    /// Choices (parallel samples of one prompt, or the best beams).
    pub n: usize,
    /// Beam search of width `n` instead of sampling.
    pub beam: Option<BeamSearch>,
    /// Completions: begin the text (and the log-probabilities) with the prompt's.
    pub echo: bool,
    /// Choices sampled (at least `n`): the `n` with the highest cumulative log-probability
    /// are answered.
    pub best_of: usize,
    /// Log-probabilities of the generated tokens, with this many alternatives each.
    pub logprobs: Option<usize>,
    /// Penalties and `logit_bias` (token ids checked against the vocabulary in
    /// `to_generation`).
    pub adjust: LogitsAdjustments,
    /// `None`: the rest of the context.
    pub max_tokens: Option<usize>,
    /// The name the client used for it (`max_tokens` or `max_completion_tokens`).
    pub max_tokens_field: &'static str,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    pub stream: bool,
    pub include_usage: bool,
    pub cache_salt: Option<String>,
    /// Structured outputs: the format the output follows (compiled in `api`, with the engine).
    pub response_format: Option<EngineFormat>,
    /// Disaggregated serving: this request is the prefill or the decode half.
    pub handoff: Option<Handoff>,
}

impl ValidRequest {
    fn new(
        endpoint: Endpoint,
        input: Input,
        shared: Shared,
        max_tokens_field: &'static str,
        logprobs: Option<usize>,
    ) -> Result<ValidRequest, ApiError> {
        if shared.beam.is_some() && logprobs.is_some() {
            return Err(ApiError::field(
                "use_beam_search",
                "`use_beam_search` cannot be combined with `logprobs`",
            ));
        }
        if shared.beam.is_some() && shared.response_format.is_some() {
            return Err(ApiError::field(
                "use_beam_search",
                "`use_beam_search` cannot be combined with a JSON `response_format`",
            ));
        }
        if shared.beam.is_some() && shared.handoff.is_some() {
            return Err(ApiError::field(
                "use_beam_search",
                "`use_beam_search` is not served disaggregated",
            ));
        }
        Ok(ValidRequest {
            endpoint,
            model: shared.model,
            input,
            n: shared.n,
            beam: shared.beam,
            echo: false,
            best_of: shared.n,
            logprobs,
            adjust: shared.adjust,
            max_tokens: shared.max_tokens,
            max_tokens_field,
            sampling: shared.sampling,
            stop: shared.stop,
            stream: shared.stream,
            include_usage: shared.include_usage,
            cache_salt: shared.cache_salt,
            response_format: shared.response_format,
            handoff: shared.handoff,
        })
    }
}

/// One `logit_bias` entry: a token id written in decimal without leading zeros (the schema's
/// pattern; the vocabulary bound is checked with the tokenizer) and a bias in [-100, 100].
fn logit_bias_entry(key: &str, value: &Value) -> Result<(u32, f32), ApiError> {
    let canonical =
        key == "0" || (!key.starts_with('0') && key.bytes().all(|b| b.is_ascii_digit()));
    let token = match key.parse::<u32>() {
        Ok(t) if canonical => t,
        _ => {
            return Err(ApiError::field(
                "logit_bias",
                format!("`logit_bias` keys must be token ids in decimal, found {key:?}"),
            ))
        }
    };
    match value.as_f64() {
        Some(b) if (-100.0..=100.0).contains(&b) => Ok((token, b as f32)),
        _ => Err(ApiError::field(
            "logit_bias",
            format!("`logit_bias` values must be numbers in [-100, 100], found {value} for token {token}"),
        )),
    }
}

/// A count of alternatives per token (`logprobs` on completions, `top_logprobs` on chat).
fn alternatives(field: &str, k: i64) -> Result<usize, ApiError> {
    match usize::try_from(k) {
        Ok(k) if k <= MAX_TOP_LOGPROBS => Ok(k),
        _ => Err(ApiError::field(
            field,
            format!("`{field}` must be between 0 and {MAX_TOP_LOGPROBS}, found {k}"),
        )),
    }
}

/// Most choices one request may ask for (`n`).
pub const MAX_N: usize = 128;

const EMPTY_PROMPT: &str = "the prompt is empty: it must have at least one token";

impl CompletionRequest {
    /// `use_beam_search` and `length_penalty`, checked against the fields beam search cannot
    /// take.
    fn beam_search(&self, shared: &Shared) -> Result<Option<BeamSearch>, ApiError> {
        let length_penalty = self.length_penalty.unwrap_or(1.0);
        if !(-100.0..=100.0).contains(&length_penalty) {
            return Err(ApiError::field(
                "length_penalty",
                format!("`length_penalty` must be in [-100, 100], found {length_penalty}"),
            ));
        }
        if self.use_beam_search != Some(true) {
            return Ok(None);
        }
        let adjust = &shared.adjust;
        let conflict = [
            ("stop", !shared.stop.stop.is_empty()),
            ("presence_penalty", adjust.presence_penalty != 0.0),
            ("frequency_penalty", adjust.frequency_penalty != 0.0),
            ("logit_bias", !adjust.logit_bias.is_empty()),
        ];
        if let Some((field, _)) = conflict.iter().find(|c| c.1) {
            return Err(ApiError::field(
                "use_beam_search",
                format!("`use_beam_search` cannot be combined with `{field}`"),
            ));
        }
        Ok(Some(BeamSearch {
            width: shared.n,
            length_penalty: length_penalty as f32,
        }))
    }

    /// Check every field; the error names the field at fault.
    pub fn validate(self) -> Result<ValidRequest, ApiError> {
        let mut shared = self.shared("max_tokens")?;
        shared.beam = self.beam_search(&shared)?;
        match &self.prompt {
            Prompt::Text(t) if t.is_empty() => return Err(ApiError::field("prompt", EMPTY_PROMPT)),
            Prompt::Tokens(t) if t.is_empty() => {
                return Err(ApiError::field("prompt", EMPTY_PROMPT))
            }
            _ => {}
        }
        let echo = self.echo.unwrap_or(false);
        if echo && shared.stream && self.logprobs.is_some() {
            return Err(ApiError::field(
                "echo",
                "`echo` with `logprobs` is answered whole only: leave out `stream` or set it to false",
            ));
        }
        let best_of = match self.best_of {
            None | Some(1) => shared.n,
            Some(b)
                if (1..=MAX_N as i64).contains(&b) && (shared.stream || shared.beam.is_some()) =>
            {
                let with = if shared.stream {
                    "`stream`"
                } else {
                    "`use_beam_search`"
                };
                return Err(ApiError::field(
                    "best_of",
                    format!("`best_of` above 1 cannot be combined with {with}, found {b}"),
                ));
            }
            Some(b) if (1..=MAX_N as i64).contains(&b) => shared.n.max(b as usize),
            Some(b) => {
                return Err(ApiError::field(
                    "best_of",
                    format!("`best_of` must be between 1 and {MAX_N}, found {b}"),
                ))
            }
        };
        if let Some(s) = &self.suffix {
            neutral(
                "suffix",
                false,
                "no suffix",
                json_kind(&Value::String(s.clone())),
            )?;
        }
        let logprobs = self
            .logprobs
            .map(|k| alternatives("logprobs", k))
            .transpose()?;
        let mut valid = ValidRequest::new(
            Endpoint::Completions,
            Input::Prompt(self.prompt),
            shared,
            "max_tokens",
            logprobs,
        )?;
        valid.echo = echo;
        valid.best_of = best_of;
        Ok(valid)
    }
}

impl ChatCompletionRequest {
    /// Check every field; the error names the field at fault.
    pub fn validate(mut self) -> Result<ValidRequest, ApiError> {
        let mut max_tokens_field = "max_tokens";
        if let Some(m) = self.max_completion_tokens {
            // The deprecated `max_tokens` gives way, but is still checked.
            if let Some(old) = self.max_tokens.filter(|&t| t < 1) {
                return Err(ApiError::field(
                    "max_tokens",
                    format!("`max_tokens` must be at least 1, found {old}"),
                ));
            }
            self.max_tokens = Some(m);
            max_tokens_field = "max_completion_tokens";
        }
        let shared = self.shared(max_tokens_field)?;
        if self.messages.is_empty() {
            return Err(ApiError::field(
                "messages",
                "`messages` is empty: give at least one message",
            ));
        }
        let top = self
            .top_logprobs
            .map(|k| alternatives("top_logprobs", k))
            .transpose()?;
        let logprobs = (self.logprobs == Some(true)).then(|| top.unwrap_or(0));
        if let Some(t) = &self.tools {
            neutral(
                "tools",
                t.is_empty(),
                "no tools",
                json_kind(&Value::Array(t.clone())),
            )?;
        }
        if let Some(c) = &self.tool_choice {
            neutral("tool_choice", c == "none", r#""none" only"#, json_kind(c))?;
        }
        let input = Input::Chat {
            messages: self.messages.iter().map(Message::to_chat).collect(),
            add_generation_prompt: self.add_generation_prompt.unwrap_or(true),
        };
        ValidRequest::new(
            Endpoint::ChatCompletions,
            input,
            shared,
            max_tokens_field,
            logprobs,
        )
    }
}

impl ValidRequest {
    /// The engine request: tokenize (through the chat template for chat), and bound
    /// `max_tokens` by the rest of the context (`limit` tokens: the smaller of the context length
    /// and the KV capacity); left out, it is that rest.
    pub fn to_generation(
        &self,
        tokenizer: &Tokenizer,
        limit: usize,
    ) -> Result<GenerationRequest, ApiError> {
        let field = self.endpoint.prompt_field();
        let prompt = match &self.input {
            Input::Prompt(Prompt::Tokens(ids)) => ids.clone(),
            Input::Prompt(Prompt::Text(text)) => tokenizer
                .encode(text, true)
                .map_err(|e| ApiError::field(field, format!("tokenizing the prompt: {e}")))?,
            Input::Chat {
                messages,
                add_generation_prompt,
            } => {
                let text = tokenizer
                    .apply_chat_template(messages, *add_generation_prompt)
                    .map_err(|e| {
                        ApiError::field(field, format!("applying the chat template: {e}"))
                    })?;
                // The template writes the special tokens itself.
                tokenizer
                    .encode(&text, false)
                    .map_err(|e| ApiError::field(field, format!("tokenizing the messages: {e}")))?
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::field(field, EMPTY_PROMPT));
        }
        let vocab = tokenizer.vocab_size();
        if let Some(&(id, _)) = self
            .adjust
            .logit_bias
            .iter()
            .find(|b| b.0 as usize >= vocab)
        {
            return Err(ApiError::field(
                "logit_bias",
                format!("logit_bias token id {id} is outside the vocabulary of {vocab} tokens"),
            ));
        }
        let stop_ids = &self.stop.stop_token_ids;
        if let Some(&id) = stop_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::field(
                "stop_token_ids",
                format!("stop token id {id} is outside the vocabulary of {vocab} tokens"),
            ));
        }
        // Output gets the rest of the context at most: a larger `max_tokens` (or none) is cut
        // to the room left, and the request ends with `length` there (as SGLang and llama.cpp
        // do; vLLM and OpenAI refuse it). No request the OpenAPI document admits is refused
        // for a sum of two fields that no schema can state.
        let Some(room) = limit.checked_sub(prompt.len()).filter(|&r| r > 0) else {
            return Err(ApiError::field(
                field,
                format!(
                    "the prompt has {} tokens, which leaves no room for output in the context length of {limit} tokens",
                    prompt.len()
                ),
            )
            .with_code("context_length_exceeded"));
        };
        let mut max_tokens = self.max_tokens.map_or(room, |m| m.min(room));
        // The prefill half generates the first token only (the decode half pulls the KV
        // itself, in `api`, before it is submitted).
        let handoff = match self.handoff {
            Some(Handoff::Prefill) => {
                max_tokens = 1;
                Some(KvHandoff::Export)
            }
            _ => None,
        };
        Ok(GenerationRequest {
            prompt,
            max_tokens,
            sampling: self.sampling,
            stop: self.stop.clone(),
            cache_salt: self.cache_salt.clone(),
            share_prompt_with: None,
            logprobs: self.logprobs,
            adjust: self.adjust.clone(),
            prompt_logprobs: self.logprobs.filter(|_| self.echo),
            grammar: None,
            handoff,
        })
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
