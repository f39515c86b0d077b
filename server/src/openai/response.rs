//! The response bodies as typed structs: whole completions and chat completions, their stream
//! chunks, the `/v1/models` list and `/health`. [`ResponseHead`] (id, time, model) builds the
//! completion bodies; [`json_text`] writes any of them.
//!
//! Invariants: `logprobs` is `null` unless the request asked for them, then one entry per
//! generated token of the choice (of the chunk's tokens in a stream); a chunk has no `usage` key unless the
//! client asked for `include_usage`, then `null` on every chunk but the last, which has no choices
//! and the counts.

use serde::Serialize;
use utoipa::ToSchema;
use vkv_engine::engine::FinishReason;
use vkv_engine::engine::Usage;
use vkv_engine::sampler::TokenLogprob;
use vkv_engine::tokenizer::Tokenizer;

use super::Endpoint;

/// Serialize a response body. These types cannot fail to serialize (no maps, no custom
/// serializers), but should one ever, the client gets an OpenAI-shaped server error, not a panic.
pub fn json_text<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| {
        let message = serde_json::Value::String(format!("writing the response: {e}"));
        format!(
            r#"{{"error":{{"message":{message},"type":"server_error","param":null,"code":null}}}}"#
        )
    })
}

/// A log-probability as JSON has it: `-inf` (a token the model rules out) as -9999, vLLM's
/// stand-in (JSON has no infinities).
fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        -9999.0
    }
}

/// One generated token's log-probability with its text, and the most likely alternatives'
/// (the engine's [`vkv_engine::sampler::TokenLogprob`] with token ids written out): what both
/// endpoints' `logprobs` are made of.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobText {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

impl TokenLogprobText {
    /// `lp` with its tokens as text: each token decoded alone (special tokens as their text; a
    /// token that is part of a character decodes to U+FFFD).
    pub fn new(tokenizer: &Tokenizer, lp: &TokenLogprob) -> TokenLogprobText {
        let text = |id: u32| tokenizer.decode(&[id], false).unwrap_or_default();
        TokenLogprobText {
            token: text(lp.token),
            logprob: lp.logprob,
            top: lp.top.iter().map(|&(id, l)| (text(id), l)).collect(),
        }
    }
}

/// A chat choice's `logprobs`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    /// Natural log of the token's probability under the model (before temperature, top-k and
    /// top-p); -9999 for a token the model rules out.
    pub logprob: f32,
    /// The token's text as UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at this place, most likely first (`top_logprobs` of them).
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl ChatLogprobs {
    pub fn new(tokens: &[TokenLogprobText]) -> ChatLogprobs {
        ChatLogprobs {
            content: tokens
                .iter()
                .map(|t| ChatTokenLogprob {
                    token: t.token.clone(),
                    logprob: finite(t.logprob),
                    bytes: t.token.as_bytes().to_vec(),
                    top_logprobs: t
                        .top
                        .iter()
                        .map(|(token, logprob)| ChatTopLogprob {
                            token: token.clone(),
                            logprob: finite(*logprob),
                            bytes: token.as_bytes().to_vec(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// A completion choice's `logprobs` (the legacy shape): parallel lists, one entry per token.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// Null only for an echoed prompt's first token (nothing comes before it).
    pub token_logprobs: Vec<Option<f32>>,
    /// Per token, the most likely alternatives: text → log-probability (`logprobs` of them;
    /// alternatives with the same text keep the likelier); null where `token_logprobs` is.
    #[schema(value_type = Vec<Option<Object>>)]
    pub top_logprobs: Vec<Option<serde_json::Map<String, serde_json::Value>>>,
    /// Where each token's text starts in the choice's text (bytes; in a stream, in the text
    /// streamed so far).
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// The shape of `tokens`, the first one's text starting at byte `offset` of the choice.
    pub fn new(tokens: &[TokenLogprobText], mut offset: usize) -> CompletionLogprobs {
        let mut out = CompletionLogprobs {
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            text_offset: Vec::new(),
        };
        for t in tokens {
            out.tokens.push(t.token.clone());
            out.token_logprobs.push(Some(finite(t.logprob)));
            let mut top = serde_json::Map::new();
            for (token, logprob) in &t.top {
                top.entry(token.clone())
                    .or_insert_with(|| finite(*logprob).into());
            }
            out.top_logprobs.push(Some(top));
            out.text_offset.push(offset);
            offset += t.token.len();
        }
        out
    }

    /// `echo` with `logprobs`: the prompt's first token (no log-probability), the prompt's
    /// other tokens, then the generated ones, offsets from the start of the echoed text.
    pub fn echoed(
        first: &str,
        prompt: &[TokenLogprobText],
        generated: &[TokenLogprobText],
    ) -> CompletionLogprobs {
        let rest: Vec<TokenLogprobText> = prompt.iter().chain(generated).cloned().collect();
        let mut out = CompletionLogprobs::new(&rest, first.len());
        out.tokens.insert(0, first.to_string());
        out.token_logprobs.insert(0, None);
        out.top_logprobs.insert(0, None);
        out.text_offset.insert(0, 0);
        out
    }
}

/// What one choice of a whole response is: its text, why it ended, its tokens' logprobs if
/// asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceText {
    pub text: String,
    pub reason: FinishReason,
    pub logprobs: Option<Vec<TokenLogprobText>>,
    pub echo: Option<Echo>,
}

/// Completions' `echo`: the prompt's text, and with `logprobs` its first token's text and the
/// other tokens' log-probabilities (the choice's text and `logprobs` begin with them).
#[derive(Debug, Clone, PartialEq)]
pub struct Echo {
    pub text: String,
    pub logprobs: Option<(String, Vec<TokenLogprobText>)>,
}

/// Why the output ended; `abort`: cancelled (vLLM's; a shutdown that could not wait).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
#[schema(as = FinishReason)]
pub enum ApiFinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
    Abort,
}

impl From<FinishReason> for ApiFinishReason {
    fn from(r: FinishReason) -> ApiFinishReason {
        match r {
            FinishReason::Stop => ApiFinishReason::Stop,
            FinishReason::Length => ApiFinishReason::Length,
            FinishReason::Abort => ApiFinishReason::Abort,
        }
    }
}

/// Token counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = Usage)]
pub struct ApiUsage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// Where the prompt's tokens came from (OpenAI's `usage.prompt_tokens_details`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache instead of being computed.
    pub cached_tokens: usize,
}

impl From<Usage> for ApiUsage {
    fn from(u: Usage) -> ApiUsage {
        ApiUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
        }
    }
}

/// `object` of a completion and of its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum CompletionObject {
    #[serde(rename = "text_completion")]
    TextCompletion,
}

/// `object` of a whole chat completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum ChatCompletionObject {
    #[serde(rename = "chat.completion")]
    ChatCompletion,
}

/// `object` of a chat completion's chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum ChatCompletionChunkObject {
    #[serde(rename = "chat.completion.chunk")]
    ChatCompletionChunk,
}

/// The role of what the model writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AssistantRole {
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    /// Only when the request asked for `logprobs`; else null.
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: ApiFinishReason,
}

/// `POST /v1/completions`, whole.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Completion {
    /// `cmpl-...`
    pub id: String,
    pub object: CompletionObject,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    pub usage: ApiUsage,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CompletionChunkChoice {
    pub index: u32,
    /// The new text (may be empty on the last chunk).
    pub text: String,
    /// The chunk's tokens', when the request asked for `logprobs`; else null.
    pub logprobs: Option<CompletionLogprobs>,
    /// Null until the last chunk with choices.
    pub finish_reason: Option<ApiFinishReason>,
}

/// One server-sent event of `POST /v1/completions` with `stream: true`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct CompletionChunk {
    pub id: String,
    pub object: CompletionObject,
    pub created: u64,
    pub model: String,
    /// One choice; none on the usage chunk.
    pub choices: Vec<CompletionChunkChoice>,
    /// Only with `stream_options.include_usage`: null, then the counts on a last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<ApiUsage>)]
    pub usage: Option<Option<ApiUsage>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct AssistantMessage {
    pub role: AssistantRole,
    pub content: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    /// Only when the request asked for `logprobs`; else null.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: ApiFinishReason,
}

/// `POST /v1/chat/completions`, whole.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatCompletion {
    /// `chatcmpl-...`
    pub id: String,
    pub object: ChatCompletionObject,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: ApiUsage,
}

/// What a chat chunk adds: the role on the first chunk, then text; empty on the last one.
#[derive(Debug, Clone, PartialEq, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<AssistantRole>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    /// The chunk's tokens', when the request asked for `logprobs`; else null.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<ApiFinishReason>,
}

/// One server-sent event of `POST /v1/chat/completions` with `stream: true`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: ChatCompletionChunkObject,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Only with `stream_options.include_usage`: null, then the counts on a last chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<ApiUsage>)]
    pub usage: Option<Option<ApiUsage>>,
}

/// A whole response of either endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Whole {
    Completion(Completion),
    Chat(ChatCompletion),
}

/// A stream chunk of either endpoint.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Chunk {
    Completion(CompletionChunk),
    Chat(ChatCompletionChunk),
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

impl ResponseHead {
    /// The whole (not streamed) response: choice `i` is `choices[i]`.
    pub fn response(&self, choices: &[ChoiceText], usage: Usage) -> Whole {
        let (id, created, model) = (self.id.clone(), self.created, self.model.clone());
        let indexed = choices.iter().enumerate().map(|(i, c)| (i as u32, c));
        match self.endpoint {
            Endpoint::Completions => Whole::Completion(Completion {
                id,
                object: CompletionObject::TextCompletion,
                created,
                model,
                choices: indexed
                    .map(|(index, c)| {
                        let (text, logprobs) = match (&c.echo, &c.logprobs) {
                            (
                                Some(Echo {
                                    text,
                                    logprobs: Some((first, lp)),
                                }),
                                Some(l),
                            ) => (
                                format!("{text}{}", c.text),
                                Some(CompletionLogprobs::echoed(first, lp, l)),
                            ),
                            (Some(Echo { text, .. }), l) => (
                                format!("{text}{}", c.text),
                                l.as_deref().map(|l| CompletionLogprobs::new(l, text.len())),
                            ),
                            (None, l) => (
                                c.text.clone(),
                                l.as_deref().map(|l| CompletionLogprobs::new(l, 0)),
                            ),
                        };
                        CompletionChoice {
                            index,
                            text,
                            logprobs,
                            finish_reason: c.reason.into(),
                        }
                    })
                    .collect(),
                usage: usage.into(),
            }),
            Endpoint::ChatCompletions => Whole::Chat(ChatCompletion {
                id,
                object: ChatCompletionObject::ChatCompletion,
                created,
                model,
                choices: indexed
                    .map(|(index, c)| ChatChoice {
                        index,
                        message: AssistantMessage {
                            role: AssistantRole::Assistant,
                            content: c.text.clone(),
                        },
                        logprobs: c.logprobs.as_deref().map(ChatLogprobs::new),
                        finish_reason: c.reason.into(),
                    })
                    .collect(),
                usage: usage.into(),
            }),
        }
    }

    /// One stream chunk of choice `index` with `text` (chat: as `delta.content`; `role` on the
    /// choice's first chunk) and, on its last one, the finish reason. With `include_usage` every
    /// chunk carries `"usage": null` and a final chunk (see [`ResponseHead::usage_chunk`]) the
    /// counts. `logprobs`: the chunk's tokens' and where the first one's text starts in the
    /// choice, when the request asked for them.
    pub fn chunk(
        &self,
        index: u32,
        text: &str,
        first: bool,
        reason: Option<FinishReason>,
        include_usage: bool,
        logprobs: Option<(&[TokenLogprobText], usize)>,
    ) -> Chunk {
        let usage = include_usage.then_some(None);
        let finish_reason = reason.map(ApiFinishReason::from);
        match self.endpoint {
            Endpoint::Completions => Chunk::Completion(self.completion_chunk(
                vec![CompletionChunkChoice {
                    index,
                    text: text.to_string(),
                    logprobs: logprobs.map(|(l, offset)| CompletionLogprobs::new(l, offset)),
                    finish_reason,
                }],
                usage,
            )),
            Endpoint::ChatCompletions => {
                let delta = match (first, reason) {
                    (true, _) => ChatDelta {
                        role: Some(AssistantRole::Assistant),
                        content: Some(text.to_string()),
                    },
                    (false, Some(_)) if text.is_empty() => ChatDelta::default(),
                    _ => ChatDelta {
                        role: None,
                        content: Some(text.to_string()),
                    },
                };
                Chunk::Chat(self.chat_chunk(
                    vec![ChatChunkChoice {
                        index,
                        delta,
                        logprobs: logprobs.map(|(l, _)| ChatLogprobs::new(l)),
                        finish_reason,
                    }],
                    usage,
                ))
            }
        }
    }

    /// The last chunk of a stream with `include_usage`: no choices, the token counts.
    pub fn usage_chunk(&self, usage: Usage) -> Chunk {
        let usage = Some(Some(usage.into()));
        match self.endpoint {
            Endpoint::Completions => Chunk::Completion(self.completion_chunk(Vec::new(), usage)),
            Endpoint::ChatCompletions => Chunk::Chat(self.chat_chunk(Vec::new(), usage)),
        }
    }

    fn completion_chunk(
        &self,
        choices: Vec<CompletionChunkChoice>,
        usage: Option<Option<ApiUsage>>,
    ) -> CompletionChunk {
        CompletionChunk {
            id: self.id.clone(),
            object: CompletionObject::TextCompletion,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn chat_chunk(
        &self,
        choices: Vec<ChatChunkChoice>,
        usage: Option<Option<ApiUsage>>,
    ) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: ChatCompletionChunkObject::ChatCompletionChunk,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }
}

/// `object` of a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ListObject {
    List,
}

/// `object` of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelObject {
    Model,
}

/// The served model.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelCard {
    /// The name clients give as `model`.
    pub id: String,
    pub object: ModelObject,
    /// Unix seconds at the server's start.
    pub created: u64,
    pub owned_by: String,
    /// vLLM's extra: the context length (prompt and output) in tokens.
    pub max_model_len: usize,
    /// vkv's extra: token ids are below this (a load generator makes token-id prompts with it).
    pub vocab_size: usize,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelList {
    pub object: ListObject,
    pub data: Vec<ModelCard>,
}

/// `status` of `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthStatus {
    Ok,
}

/// `GET /health` while the engine thread runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct Health {
    pub status: HealthStatus,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn value<T: Serialize>(v: &T) -> Value {
        serde_json::from_str(&json_text(v)).unwrap()
    }

    fn choice(text: &str, reason: FinishReason) -> ChoiceText {
        ChoiceText {
            text: text.into(),
            reason,
            logprobs: None,
            echo: None,
        }
    }

    #[test]
    fn logprobs_take_each_endpoints_shape() {
        let tokens = vec![
            TokenLogprobText {
                token: " Pa".into(),
                logprob: -0.5,
                top: vec![(" Pa".into(), -0.5), (" Lo".into(), f32::NEG_INFINITY)],
            },
            TokenLogprobText {
                token: "ris".into(),
                logprob: -0.25,
                top: vec![("ris".into(), -0.25), ("ris".into(), -3.0)],
            },
        ];
        let chat = value(&ChatLogprobs::new(&tokens));
        assert_eq!(chat["content"][0]["token"], " Pa");
        assert_eq!(chat["content"][0]["bytes"], json!([32, 80, 97]));
        assert_eq!(chat["content"][0]["top_logprobs"][1]["logprob"], -9999.0);
        let legacy = value(&CompletionLogprobs::new(&tokens, 3));
        assert_eq!(
            legacy,
            json!({"tokens": [" Pa", "ris"], "token_logprobs": [-0.5, -0.25],
                   "top_logprobs": [{" Pa": -0.5, " Lo": -9999.0}, {"ris": -0.25}],
                   "text_offset": [3, 6]})
        );
        // Echoed: the prompt's first token has nothing before it.
        let echoed = value(&CompletionLogprobs::echoed(
            "The",
            &tokens[..1],
            &tokens[1..],
        ));
        assert_eq!(
            echoed,
            json!({"tokens": ["The", " Pa", "ris"], "token_logprobs": [null, -0.5, -0.25],
                   "top_logprobs": [null, {" Pa": -0.5, " Lo": -9999.0}, {"ris": -0.25}],
                   "text_offset": [0, 3, 6]})
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
        let first = value(&head.chunk(0, "", true, None, false, None));
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["choices"][0]["logprobs"], Value::Null);
        assert!(first.get("usage").is_none());
        let last = value(&head.chunk(0, "", false, Some(FinishReason::Stop), true, None));
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(last.get("usage"), Some(&Value::Null));
        let usage = value(&head.usage_chunk(Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            cached_tokens: 0,
        }));
        assert_eq!(usage["usage"]["total_tokens"], 7);
        assert_eq!(usage["choices"], json!([]));
    }

    #[test]
    fn whole_responses_have_openai_shapes() {
        let head = ResponseHead {
            endpoint: Endpoint::Completions,
            id: "cmpl-1".into(),
            created: 1,
            model: "m".into(),
        };
        let usage = Usage {
            prompt_tokens: 1,
            completion_tokens: 2,
            cached_tokens: 1,
        };
        let whole = value(&head.response(&[choice("hi", FinishReason::Length)], usage));
        assert_eq!(
            whole,
            json!({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                   "choices": [{"index": 0, "text": "hi", "logprobs": null, "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
                             "prompt_tokens_details": {"cached_tokens": 1}}})
        );
        let chunk = value(&head.chunk(0, "x", false, None, false, None));
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(chunk["object"], "text_completion");
        let head = ResponseHead {
            endpoint: Endpoint::ChatCompletions,
            ..head
        };
        let whole = value(&head.response(&[choice("hi", FinishReason::Abort)], usage));
        assert_eq!(
            whole["choices"][0]["message"],
            json!({"role": "assistant", "content": "hi"})
        );
        assert_eq!(whole["choices"][0]["finish_reason"], "abort");
        assert_eq!(
            value(&Health {
                status: HealthStatus::Ok
            }),
            json!({"status": "ok"})
        );
    }
}
