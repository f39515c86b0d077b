//! The OpenAI request and response shapes of `/v1/completions` and `/v1/chat/completions`: reading
//! a JSON body into an engine [`GenerationRequest`] with every check a client's mistake needs, and
//! writing responses and stream chunks (OpenAI's API reference; vLLM's `protocol.py` for the
//! extras it accepts: `top_k`, `ignore_eos`, `stop_token_ids`).
//!
//! Fields are read one by one from the JSON object rather than through a derived struct, so a
//! wrong type or value names its field (`param`) and what was found. Unknown fields are refused
//! as OpenAI refuses them ("Unrecognized request argument supplied"); fields OpenAI has but vkv
//! does not implement (`n` > 1, `logprobs`, penalties, ...) are accepted at their neutral value
//! and refused otherwise, so a request never silently means something else.
//!
//! `max_tokens` (or `max_completion_tokens`) left out means the rest of the context, as in vLLM.

use serde_json::{json, Map, Value};
use vkv_engine::engine::{GenerationRequest, StopConditions, Usage};
use vkv_engine::generate::FinishReason;
use vkv_engine::sampler::SamplingParams;
use vkv_engine::tokenizer::{ChatMessage, Tokenizer};

use crate::error::ApiError;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
}

impl Endpoint {
    /// The field that holds the input.
    pub fn prompt_field(self) -> &'static str {
        match self {
            Endpoint::Completions => "prompt",
            Endpoint::ChatCompletions => "messages",
        }
    }

    /// Whether OpenAI (or vLLM, for its extras) has this request field.
    fn knows_field(self, name: &str) -> bool {
        const COMMON: [&str; 20] = [
            "model",
            "max_tokens",
            "temperature",
            "top_p",
            "n",
            "stream",
            "stream_options",
            "stop",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "user",
            "seed",
            // vLLM's extras.
            "top_k",
            "ignore_eos",
            "stop_token_ids",
            // Accepted and ignored, as OpenAI does where they do not apply.
            "metadata",
            "store",
            "service_tier",
        ];
        const COMPLETIONS: [&str; 4] = ["prompt", "echo", "best_of", "suffix"];
        const CHAT: [&str; 8] = [
            "messages",
            "max_completion_tokens",
            "top_logprobs",
            "response_format",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "add_generation_prompt",
        ];
        COMMON.contains(&name)
            || match self {
                Endpoint::Completions => COMPLETIONS.contains(&name),
                Endpoint::ChatCompletions => CHAT.contains(&name),
            }
    }
}

/// The prompt as the client gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// A request read and checked, not yet tokenized.
#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub endpoint: Endpoint,
    pub model: Option<String>,
    pub prompt: PromptInput,
    /// Chat only: the conversation (turned into `prompt` by the chat template).
    pub messages: Vec<ChatMessage>,
    pub add_generation_prompt: bool,
    /// `None`: the rest of the context.
    pub max_tokens: Option<usize>,
    /// The name the client used for it (`max_tokens` or `max_completion_tokens`).
    pub max_tokens_field: &'static str,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    pub stream: bool,
    pub include_usage: bool,
}

/// The JSON object of a request body, read field by field.
struct Fields {
    map: Map<String, Value>,
}

fn kind_of(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.chars().count() > 40 => "a string".into(),
        Value::String(s) => format!("the string {s:?}"),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

fn wrong_type(name: &str, expected: &str, found: &Value) -> ApiError {
    ApiError::field(
        name,
        format!("`{name}` must be {expected}, found {}", kind_of(found)),
    )
}

impl Fields {
    fn parse(body: &[u8], endpoint: Endpoint) -> Result<Fields, ApiError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::invalid(None, format!("the request body is not valid JSON: {e}"))
        })?;
        let Value::Object(map) = value else {
            return Err(ApiError::invalid(
                None,
                format!(
                    "the request body must be a JSON object, found {}",
                    kind_of(&value)
                ),
            ));
        };
        if let Some(unknown) = map.keys().find(|k| !endpoint.knows_field(k)) {
            return Err(ApiError::field(
                unknown,
                format!("Unrecognized request argument supplied: {unknown}"),
            ));
        }
        Ok(Fields { map })
    }

    /// The field, `None` when absent or null.
    fn get(&self, name: &str) -> Option<&Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    fn number(&self, name: &str) -> Result<Option<f64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => Ok(n.as_f64()),
            Some(v) => Err(wrong_type(name, "a number", v)),
        }
    }

    fn integer(&self, name: &str) -> Result<Option<i64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => Ok(Some(i)),
                None if n.as_u64().is_some() => Ok(Some(i64::MAX)),
                None => Err(wrong_type(name, "an integer", &Value::Number(n.clone()))),
            },
            Some(v) => Err(wrong_type(name, "an integer", v)),
        }
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong_type(name, "a boolean", v)),
        }
    }

    fn string(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong_type(name, "a string", v)),
        }
    }

    /// A field vkv does not implement: allowed only at `neutral(value)`.
    fn only_neutral(
        &self,
        name: &str,
        neutral: impl Fn(&Value) -> bool,
        what: &str,
    ) -> Result<(), ApiError> {
        match self.get(name) {
            Some(v) if !neutral(v) => Err(ApiError::field(
                name,
                format!(
                    "`{name}` is not supported by this server ({what}), found {}",
                    kind_of(v)
                ),
            )),
            _ => Ok(()),
        }
    }
}

fn token_ids(name: &str, items: &[Value]) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .map(|v| {
            v.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| wrong_type(name, "an array of token ids (integers ≥ 0)", v))
        })
        .collect()
}

fn prompt_input(value: &Value) -> Result<PromptInput, ApiError> {
    const N1: &str = "this server takes one prompt per request (n = 1); send one string or one array of token ids";
    match value {
        Value::String(s) => Ok(PromptInput::Text(s.clone())),
        Value::Array(items) => match items.first() {
            None => Err(ApiError::field("prompt", "the prompt is empty")),
            Some(Value::Number(_)) => Ok(PromptInput::Tokens(token_ids("prompt", items)?)),
            Some(Value::String(_)) | Some(Value::Array(_)) if items.len() > 1 => {
                Err(ApiError::field("prompt", N1))
            }
            Some(Value::String(s)) => Ok(PromptInput::Text(s.clone())),
            Some(Value::Array(ids)) => Ok(PromptInput::Tokens(token_ids("prompt", ids)?)),
            Some(v) => Err(wrong_type(
                "prompt",
                "a string, an array of token ids, or an array of one of those",
                v,
            )),
        },
        v => Err(wrong_type("prompt", "a string or an array of token ids", v)),
    }
}

fn chat_messages(value: &Value) -> Result<Vec<ChatMessage>, ApiError> {
    let Value::Array(items) = value else {
        return Err(wrong_type("messages", "an array of messages", value));
    };
    if items.is_empty() {
        return Err(ApiError::field(
            "messages",
            "`messages` is empty: give at least one message",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let name = format!("messages[{i}]");
            let Value::Object(m) = m else {
                return Err(ApiError::field(
                    &name,
                    format!("`{name}` must be an object with `role` and `content`, found {}", kind_of(m)),
                ));
            };
            if let Some(k) = m
                .keys()
                .find(|k| !["role", "content", "name"].contains(&k.as_str()))
            {
                return Err(ApiError::field(
                    &format!("{name}.{k}"),
                    format!("Unrecognized argument in `{name}`: {k} (this server takes role, content and name)"),
                ));
            }
            let role = match m.get("role") {
                Some(Value::String(r)) if ["system", "developer", "user", "assistant"].contains(&r.as_str()) => {
                    if r == "developer" { "system".to_string() } else { r.clone() }
                }
                Some(v) => {
                    return Err(ApiError::field(
                        &format!("{name}.role"),
                        format!("`{name}.role` must be one of system, developer, user, assistant; found {}", kind_of(v)),
                    ))
                }
                None => return Err(ApiError::field(&format!("{name}.role"), format!("`{name}.role` is missing"))),
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None if role == "assistant" => String::new(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::field(
                                    &format!("{name}.content[{j}]"),
                                    format!("`{name}.content[{j}]` must be a text part ({{\"type\": \"text\", \"text\": ...}}): this server reads text only"),
                                ))
                            }
                        }
                    }
                    text
                }
                Some(v) => {
                    return Err(wrong_type(&format!("{name}.content"), "a string or an array of text parts", v))
                }
                None => {
                    return Err(ApiError::field(&format!("{name}.content"), format!("`{name}.content` is missing")))
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

impl ApiRequest {
    /// Read and check a request body for `endpoint`.
    pub fn parse(body: &[u8], endpoint: Endpoint) -> Result<ApiRequest, ApiError> {
        let f = Fields::parse(body, endpoint)?;
        let model = f.string("model")?.map(str::to_string);

        let (prompt, messages) = match endpoint {
            Endpoint::Completions => {
                let value = f
                    .get("prompt")
                    .ok_or_else(|| ApiError::field("prompt", "`prompt` is missing"))?;
                (prompt_input(value)?, Vec::new())
            }
            Endpoint::ChatCompletions => {
                let value = f
                    .get("messages")
                    .ok_or_else(|| ApiError::field("messages", "`messages` is missing"))?;
                (PromptInput::Text(String::new()), chat_messages(value)?)
            }
        };
        if prompt == PromptInput::Text(String::new()) && endpoint == Endpoint::Completions
            || prompt == PromptInput::Tokens(Vec::new())
        {
            return Err(ApiError::field(
                "prompt",
                "the prompt is empty: it must have at least one token",
            ));
        }

        let mut max_tokens_field = "max_tokens";
        let mut max_tokens = f.integer("max_tokens")?;
        if endpoint == Endpoint::ChatCompletions {
            if let Some(m) = f.integer("max_completion_tokens")? {
                max_tokens = Some(m);
                max_tokens_field = "max_completion_tokens";
            }
        }
        let max_tokens = match max_tokens {
            None => None,
            Some(m) if m >= 1 => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            Some(m) => {
                return Err(ApiError::field(
                    max_tokens_field,
                    format!("`{max_tokens_field}` must be at least 1, found {m}"),
                ))
            }
        };

        let temperature = f.number("temperature")?.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::field(
                "temperature",
                format!("`temperature` must be in [0, 2], found {temperature}"),
            ));
        }
        let top_p = f.number("top_p")?.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::field(
                "top_p",
                format!("`top_p` must be in (0, 1], found {top_p}"),
            ));
        }
        let top_k = match f.integer("top_k")? {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ApiError::field(
                    "top_k",
                    format!("`top_k` must be -1 or 0 (all tokens) or at least 1, found {k}"),
                ))
            }
        };
        // OpenAI's seed is any 64-bit integer; the bits are what matters.
        let seed = f.integer("seed")?.map(|s| s as u64);

        let n = f.integer("n")?.unwrap_or(1);
        if n != 1 {
            return Err(ApiError::field(
                "n",
                format!("`n` must be 1 (one choice per request on this server), found {n}"),
            ));
        }
        let zero = |v: &Value| v.as_f64() == Some(0.0);
        f.only_neutral("presence_penalty", zero, "0 only")?;
        f.only_neutral("frequency_penalty", zero, "0 only")?;
        f.only_neutral(
            "logit_bias",
            |v| v.as_object().is_some_and(Map::is_empty),
            "empty only",
        )?;
        match endpoint {
            Endpoint::Completions => {
                f.only_neutral("logprobs", zero, "no log probabilities")?;
                f.only_neutral("echo", |v| v == &Value::Bool(false), "false only")?;
                f.only_neutral("best_of", |v| v.as_f64() == Some(1.0), "1 only")?;
                f.only_neutral("suffix", |_| false, "no suffix")?;
            }
            Endpoint::ChatCompletions => {
                f.only_neutral("logprobs", |v| v == &Value::Bool(false), "false only")?;
                f.only_neutral("top_logprobs", zero, "0 only")?;
                f.only_neutral(
                    "response_format",
                    |v| v.get("type").and_then(Value::as_str) == Some("text"),
                    "{\"type\": \"text\"} only",
                )?;
                f.only_neutral(
                    "tools",
                    |v| v.as_array().is_some_and(Vec::is_empty),
                    "no tools",
                )?;
                f.only_neutral(
                    "tool_choice",
                    |v| v.as_str() == Some("none"),
                    "\"none\" only",
                )?;
            }
        }
        f.string("user")?;

        let stop = match f.get("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| wrong_type("stop", "a string or an array of strings", v))
                })
                .collect::<Result<_, _>>()?,
            Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
        };
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::field("stop", "`stop` strings must not be empty"));
        }
        let stop_token_ids = match f.get("stop_token_ids") {
            None => Vec::new(),
            Some(Value::Array(items)) => token_ids("stop_token_ids", items)?,
            Some(v) => return Err(wrong_type("stop_token_ids", "an array of token ids", v)),
        };
        let ignore_eos = f.boolean("ignore_eos")?.unwrap_or(false);

        let stream = f.boolean("stream")?.unwrap_or(false);
        let include_usage = match f.get("stream_options") {
            None => false,
            Some(Value::Object(o)) => {
                if !stream {
                    return Err(ApiError::field(
                        "stream_options",
                        "`stream_options` is only allowed when `stream` is true",
                    ));
                }
                if let Some(k) = o.keys().find(|k| k.as_str() != "include_usage") {
                    return Err(ApiError::field(
                        "stream_options",
                        format!("Unrecognized argument in `stream_options`: {k}"),
                    ));
                }
                match o.get("include_usage") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(v) => {
                        return Err(wrong_type("stream_options.include_usage", "a boolean", v))
                    }
                }
            }
            Some(v) => return Err(wrong_type("stream_options", "an object", v)),
        };
        let add_generation_prompt = f.boolean("add_generation_prompt")?.unwrap_or(true);

        Ok(ApiRequest {
            endpoint,
            model,
            prompt,
            messages,
            add_generation_prompt,
            max_tokens,
            max_tokens_field,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_k,
                top_p: top_p as f32,
                seed,
            },
            stop: StopConditions {
                stop,
                stop_token_ids,
                ignore_eos,
            },
            stream,
            include_usage,
        })
    }

    /// The engine request: tokenize (through the chat template for chat), and fill in
    /// `max_tokens` as the rest of the context (`limit` tokens: the smaller of the context length
    /// and the KV capacity) when it was left out.
    pub fn to_generation(
        &self,
        tokenizer: &Tokenizer,
        limit: usize,
    ) -> Result<GenerationRequest, ApiError> {
        let field = self.endpoint.prompt_field();
        let prompt = match (&self.prompt, self.endpoint) {
            (PromptInput::Tokens(ids), _) => ids.clone(),
            (PromptInput::Text(text), Endpoint::Completions) => tokenizer
                .encode(text, true)
                .map_err(|e| ApiError::field(field, format!("tokenizing the prompt: {e}")))?,
            (PromptInput::Text(_), Endpoint::ChatCompletions) => {
                let text = tokenizer
                    .apply_chat_template(&self.messages, self.add_generation_prompt)
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
            return Err(ApiError::field(
                field,
                "the prompt is empty: it must have at least one token",
            ));
        }
        let max_tokens = match self.max_tokens {
            Some(m) => m,
            None if prompt.len() < limit => limit - prompt.len(),
            None => {
                return Err(ApiError::field(
                    field,
                    format!(
                        "the prompt has {} tokens, which leaves no room for output in the context length of {limit} tokens",
                        prompt.len()
                    ),
                )
                .with_code("context_length_exceeded"))
            }
        };
        Ok(GenerationRequest {
            prompt,
            max_tokens,
            sampling: self.sampling,
            stop: self.stop.clone(),
        })
    }
}

/// What a response needs besides the generated text: names, id and time.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub endpoint: Endpoint,
    /// `cmpl-...` or `chatcmpl-...`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
}

/// OpenAI's finish reasons; an abort (a shutdown that could not wait) is vLLM's `abort`.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    reason.as_str()
}

pub fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

impl ResponseHead {
    /// The whole (not streamed) response.
    pub fn response(&self, text: &str, reason: FinishReason, usage: Usage) -> Value {
        match self.endpoint {
            Endpoint::Completions => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": finish_reason(reason),
                }],
                "usage": usage_json(usage),
            }),
            Endpoint::ChatCompletions => json!({
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": finish_reason(reason),
                }],
                "usage": usage_json(usage),
            }),
        }
    }

    /// One stream chunk with `text` (chat: as `delta.content`; `role` on the first chunk) and,
    /// on the last one, the finish reason. With `include_usage` every chunk carries
    /// `"usage": null` and a final chunk (see [`ResponseHead::usage_chunk`]) the counts.
    pub fn chunk(
        &self,
        text: &str,
        first: bool,
        reason: Option<FinishReason>,
        include_usage: bool,
    ) -> Value {
        let mut chunk = match self.endpoint {
            Endpoint::Completions => json!({
                "id": self.id,
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{
                    "index": 0,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": reason.map(finish_reason),
                }],
            }),
            Endpoint::ChatCompletions => {
                let delta = match (first, reason) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, Some(_)) if text.is_empty() => json!({}),
                    _ => json!({"content": text}),
                };
                json!({
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "choices": [{
                        "index": 0,
                        "delta": delta,
                        "logprobs": null,
                        "finish_reason": reason.map(finish_reason),
                    }],
                })
            }
        };
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// The last chunk of a stream with `include_usage`: no choices, the token counts.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let object = match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::ChatCompletions => "chat.completion.chunk",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage_json(usage),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(body: &str) -> Result<ApiRequest, ApiError> {
        ApiRequest::parse(body.as_bytes(), Endpoint::Completions)
    }

    fn chat(body: &str) -> Result<ApiRequest, ApiError> {
        ApiRequest::parse(body.as_bytes(), Endpoint::ChatCompletions)
    }

    fn param(r: Result<ApiRequest, ApiError>) -> String {
        let e = r.expect_err("should be refused");
        assert_eq!(e.status, hyper::StatusCode::BAD_REQUEST, "{e}");
        e.param.unwrap_or_default()
    }

    #[test]
    fn a_full_completion_request_reads_every_field() {
        let r = completion(
            r#"{"model": "m", "prompt": "Hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                "top_k": 40, "seed": 3, "stop": ["\n", "END"], "stream": true,
                "stream_options": {"include_usage": true}, "n": 1, "ignore_eos": true,
                "presence_penalty": 0, "logprobs": null, "user": "me"}"#,
        )
        .unwrap();
        assert_eq!(r.model.as_deref(), Some("m"));
        assert_eq!(r.prompt, PromptInput::Text("Hi".into()));
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(r.sampling.temperature, 0.5);
        assert_eq!(r.sampling.top_k, 40);
        assert_eq!(r.sampling.seed, Some(3));
        assert_eq!(r.stop.stop, vec!["\n".to_string(), "END".to_string()]);
        assert!(r.stop.ignore_eos && r.stream && r.include_usage);
    }

    #[test]
    fn prompts_may_be_token_ids() {
        let r = completion(r#"{"prompt": [1, 2, 3]}"#).unwrap();
        assert_eq!(r.prompt, PromptInput::Tokens(vec![1, 2, 3]));
        let r = completion(r#"{"prompt": [[4, 5]]}"#).unwrap();
        assert_eq!(r.prompt, PromptInput::Tokens(vec![4, 5]));
        assert_eq!(param(completion(r#"{"prompt": [1, -2]}"#)), "prompt");
        assert_eq!(param(completion(r#"{"prompt": ["a", "b"]}"#)), "prompt");
    }

    #[test]
    fn mistakes_name_their_field() {
        assert_eq!(param(completion(r#"{"prompt": ""}"#)), "prompt");
        assert_eq!(param(completion(r#"{"prompt": []}"#)), "prompt");
        assert_eq!(param(completion(r#"{}"#)), "prompt");
        assert_eq!(param(completion(r#"{"prompt": 5}"#)), "prompt");
        assert_eq!(
            param(completion(r#"{"prompt": "a", "temperature": "hot"}"#)),
            "temperature"
        );
        assert_eq!(
            param(completion(r#"{"prompt": "a", "temperature": 3}"#)),
            "temperature"
        );
        assert_eq!(param(completion(r#"{"prompt": "a", "top_p": 0}"#)), "top_p");
        assert_eq!(
            param(completion(r#"{"prompt": "a", "top_k": -5}"#)),
            "top_k"
        );
        assert_eq!(
            param(completion(r#"{"prompt": "a", "max_tokens": 0}"#)),
            "max_tokens"
        );
        assert_eq!(
            param(completion(r#"{"prompt": "a", "max_tokens": 1.5}"#)),
            "max_tokens"
        );
        assert_eq!(param(completion(r#"{"prompt": "a", "n": 2}"#)), "n");
        assert_eq!(param(completion(r#"{"prompt": "a", "stop": [1]}"#)), "stop");
        assert_eq!(param(completion(r#"{"prompt": "a", "stop": ""}"#)), "stop");
        assert_eq!(
            param(completion(r#"{"prompt": "a", "stream": "yes"}"#)),
            "stream"
        );
        assert_eq!(
            param(completion(r#"{"prompt": "a", "echo": true}"#)),
            "echo"
        );
        assert_eq!(param(completion(r#"{"prompt": "a", "bogus": 1}"#)), "bogus");
        assert_eq!(
            param(completion(
                r#"{"prompt": "a", "stream_options": {"include_usage": true}}"#
            )),
            "stream_options"
        );
        assert_eq!(param(chat(r#"{"messages": []}"#)), "messages");
        assert_eq!(
            param(chat(r#"{"messages": [{"role": "cat", "content": "x"}]}"#)),
            "messages[0].role"
        );
        assert_eq!(
            param(chat(r#"{"messages": [{"role": "user"}]}"#)),
            "messages[0].content"
        );
        assert_eq!(
            param(chat(
                r#"{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}"#
            )),
            "max_completion_tokens"
        );
        let e = completion("{not json").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{e}");
        let e = completion("[1]").unwrap_err();
        assert!(e.message.contains("JSON object"), "{e}");
    }

    #[test]
    fn chat_content_may_be_text_parts() {
        let r = chat(
            r#"{"messages": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
                "max_completion_tokens": 5}"#,
        )
        .unwrap();
        assert_eq!(r.messages[1], ChatMessage::new("user", "Hi there"));
        assert_eq!(
            (r.max_tokens, r.max_tokens_field),
            (Some(5), "max_completion_tokens")
        );
    }

    #[test]
    fn stream_chunks_have_openai_shapes() {
        let head = ResponseHead {
            endpoint: Endpoint::ChatCompletions,
            id: "chatcmpl-1".into(),
            created: 1,
            model: "m".into(),
        };
        let first = head.chunk("", true, None, false);
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(first.get("usage").is_none());
        let last = head.chunk("", false, Some(FinishReason::Stop), true);
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(last["usage"], Value::Null);
        let usage = head.usage_chunk(Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
        });
        assert_eq!(usage["usage"]["total_tokens"], 7);
        assert_eq!(usage["choices"], json!([]));
    }
}
