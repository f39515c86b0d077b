//! The OpenAI request and response shapes of `/v1/completions` and `/v1/chat/completions`, as
//! typed serde structs that also describe themselves to the OpenAPI document ([`crate::openapi`])
//! through `utoipa::ToSchema` (OpenAI's API reference; vLLM's `protocol.py` for the extras it
//! accepts: `top_k`, `ignore_eos`, `stop_token_ids`, `add_generation_prompt`).
//!
//! - [`request`]: [`CompletionRequest`] and [`ChatCompletionRequest`], read with
//!   `deny_unknown_fields` (an unknown field is refused as OpenAI refuses it, "Unrecognized
//!   request argument supplied"), then checked once by their `validate` into a [`ValidRequest`],
//!   which [`ValidRequest::to_generation`] tokenizes into the engine's one request type,
//!   [`GenerationRequest`](vkv_engine::engine::GenerationRequest).
//! - [`response`]: the whole responses, the stream chunks, `/v1/models`, `/health`.
//! - [`parse_request`]: body bytes to a [`ValidRequest`]; a serde error becomes a 400 whose `param`
//!   is the path of the field at fault (`messages[0].role`), found by `serde_path_to_error`.
//!   Objects are read through [`Object`], which refuses the arrays serde's derived structs would
//!   otherwise take as fields by position.
//!
//! Fields OpenAI has but vkv does not implement (`n` > 1, `logprobs`, penalties, tools, ...) are
//! accepted at their neutral value only (and the schema says so), so a request never silently
//! means something else. `max_tokens` (or `max_completion_tokens`) left out means the rest of the
//! context, as in vLLM.

pub mod request;
pub mod response;

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_path_to_error::Segment;

pub use request::{
    ChatCompletionRequest, CompletionRequest, Input, Message, MessageContent, Prompt, Stop,
    ValidRequest,
};
pub use response::ResponseHead;

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
}

/// Read a request body for `endpoint` into its typed request and validate it.
pub fn parse_request(body: &[u8], endpoint: Endpoint) -> Result<ValidRequest, ApiError> {
    match endpoint {
        Endpoint::Completions => read_json::<Object<CompletionRequest>>(body)?.0.validate(),
        Endpoint::ChatCompletions => read_json::<Object<ChatCompletionRequest>>(body)?
            .0
            .validate(),
    }
}

/// A JSON object read as `T`, and nothing else: serde's derived structs (and internally tagged
/// enums) also take an array of their fields by position, which OpenAI's API does not.
#[derive(Debug, Clone, PartialEq)]
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Object<T>, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(ObjectVisitor(PhantomData)).map(Object)
    }
}

/// `deserialize_with` for an optional object field (with `#[serde(default)]`).
pub fn optional_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Ok(Option::<Object<T>>::deserialize(d)?.map(|o| o.0))
}

/// Deserialize a JSON body, turning serde's error into a 400 that names the field.
pub fn read_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    match typed_json(body) {
        // JSON Schema's integers include `429.0` (a number with a zero fraction), which serde's
        // integer fields refuse: read such numbers as the integers they are, and try again.
        Err(JsonFailure::Field(e))
            if e.inner()
                .to_string()
                .starts_with("invalid type: floating point") =>
        {
            let mut value: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| JsonFailure::Trailing(e).api())?;
            if !integral_floats_to_integers(&mut value) {
                return Err(json_error(&e));
            }
            serde_path_to_error::deserialize(value).map_err(|e| json_error(&e))
        }
        result => result.map_err(|f| f.api()),
    }
}

/// Why a body is not a `T`: a field (with its path), or something after the object.
enum JsonFailure {
    Field(serde_path_to_error::Error<serde_json::Error>),
    Trailing(serde_json::Error),
}

impl JsonFailure {
    fn api(&self) -> ApiError {
        match self {
            JsonFailure::Field(e) => json_error(e),
            JsonFailure::Trailing(e) => {
                ApiError::invalid(None, format!("the request body is not valid JSON: {e}"))
            }
        }
    }
}

/// `body` as `T`, with the path of the field that failed.
fn typed_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, JsonFailure> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(JsonFailure::Field)?;
    // Trailing characters after the object.
    de.end().map_err(JsonFailure::Trailing)?;
    Ok(value)
}

/// Turn every floating-point number with a zero fraction into that integer, as long as the float
/// is exact (|x| ≤ 2^53: a larger one may be a rounded integer literal such as i64::MIN − 1);
/// returns whether any changed.
fn integral_floats_to_integers(value: &mut serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::Number(n) => {
            let Some(f) = n.as_f64().filter(|f| n.is_f64() && f.fract() == 0.0) else {
                return false;
            };
            if f.abs() > 2f64.powi(53) {
                return false;
            }
            *n = serde_json::Number::from(f as i64);
            true
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |any, v| integral_floats_to_integers(v) | any),
        Value::Object(fields) => fields
            .values_mut()
            .fold(false, |any, v| integral_floats_to_integers(v) | any),
        _ => false,
    }
}

/// The field path of a serde error: `messages[0].content`, empty at the top.
fn field_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

/// The name between the first pair of backticks of serde's message (`unknown field `x``).
fn quoted(message: &str) -> Option<&str> {
    let rest = message.split_once('`')?.1;
    Some(rest.split_once('`')?.0)
}

/// serde's words for Rust types, in JSON's.
fn json_words(message: &str) -> String {
    let mut out = message.to_string();
    for (rust, json) in [
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected i64", "expected an integer from -2^63 to 2^63-1"),
        (
            "expected u32",
            "expected a token id (an integer from 0 to 2^32-1)",
        ),
        ("expected a boolean", "expected a boolean"),
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected an object"),
        ("invalid type: sequence", "invalid type: array"),
        ("invalid type: map", "invalid type: object"),
        ("invalid type: unit value", "invalid type: null"),
    ] {
        out = out.replace(rust, json);
    }
    out
}

fn json_error(e: &serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    use serde_json::error::Category;
    let inner = e.inner();
    if !matches!(inner.classify(), Category::Data) {
        return ApiError::invalid(None, format!("the request body is not valid JSON: {inner}"));
    }
    let full = inner.to_string();
    // serde_json appends the position; the path says more.
    let message = match full.rfind(" at line ") {
        Some(at) => &full[..at],
        None => &full,
    };
    let path = field_path(e.path());
    if let Some(field) = message.strip_prefix("unknown field ").and_then(quoted) {
        let param = if path.ends_with(field) && !path.is_empty() {
            path
        } else {
            join(&path, field)
        };
        return ApiError::field(
            &param,
            format!("Unrecognized request argument supplied: {param}"),
        );
    }
    if let Some(field) = message.strip_prefix("missing field ").and_then(quoted) {
        let param = join(&path, field);
        return ApiError::field(&param, format!("`{param}` is missing"));
    }
    if path.is_empty() {
        if message.starts_with("invalid type") {
            let found = message
                .strip_prefix("invalid type: ")
                .and_then(|m| m.split_once(", expected"))
                .map_or(message, |(found, _)| found);
            return ApiError::invalid(
                None,
                format!(
                    "the request body must be a JSON object, found {}",
                    json_words(&format!("invalid type: {found}"))
                        .trim_start_matches("invalid type: ")
                ),
            );
        }
        return ApiError::invalid(None, format!("the request body is wrong: {message}"));
    }
    ApiError::field(&path, format!("`{path}`: {}", json_words(message)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `body` sent to `/v1/completions` (these helpers serve the request tests too).
    pub(super) fn completion(body: &str) -> Result<ValidRequest, ApiError> {
        parse_request(body.as_bytes(), Endpoint::Completions)
    }

    /// `body` sent to `/v1/chat/completions`.
    pub(super) fn chat(body: &str) -> Result<ValidRequest, ApiError> {
        parse_request(body.as_bytes(), Endpoint::ChatCompletions)
    }

    /// The `param` of a refusal (which must be a 400).
    pub(super) fn param(r: Result<ValidRequest, ApiError>) -> String {
        let e = r.expect_err("should be refused");
        assert_eq!(e.status, hyper::StatusCode::BAD_REQUEST, "{e}");
        e.param.unwrap_or_default()
    }

    fn message(r: Result<ValidRequest, ApiError>) -> String {
        r.expect_err("should be refused").message
    }

    #[test]
    fn serde_errors_name_the_path() {
        for (body, field) in [
            (r#"{"prompt": "a", "temperature": "hot"}"#, "temperature"),
            (r#"{"prompt": "a", "bogus": 1}"#, "bogus"),
            (r#"{}"#, "prompt"),
            (r#"{"prompt": [1, -2]}"#, "prompt[1]"),
            (r#"{"prompt": [1, 4294967296]}"#, "prompt[1]"),
            (
                r#"{"prompt": "a", "stream": true, "stream_options": {"include_usage": 1}}"#,
                "stream_options.include_usage",
            ),
            (
                r#"{"prompt": "a", "stream": true, "stream_options": {"x": 1}}"#,
                "stream_options.x",
            ),
            (
                r#"{"prompt": "a", "stream": true, "stream_options": [true]}"#,
                "stream_options",
            ),
        ] {
            assert_eq!(param(completion(body)), field, "{body}");
        }
        for (body, field) in [
            (
                r#"{"messages": [{"role": "user", "content": "x", "tool_calls": []}]}"#,
                "messages[0].tool_calls",
            ),
            (r#"{"messages": [{"content": "x"}]}"#, "messages[0].role"),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#,
                "messages[0].content[0].text",
            ),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#,
                "messages[0].content[0].type",
            ),
            (r#"{"messages": [["user", "hi"]]}"#, "messages[0]"),
            (
                r#"{"messages": [{"role": "user", "content": [["text", "hi"]]}]}"#,
                "messages[0].content[0]",
            ),
        ] {
            assert_eq!(param(chat(body)), field, "{body}");
        }
        let m = message(completion(r#"{"prompt": "a", "temperature": "hot"}"#));
        assert!(
            m.contains("temperature") && m.contains("hot") && m.contains("a number"),
            "{m}"
        );
        assert!(!m.contains("line 1"), "{m}");
        assert_eq!(
            message(completion(r#"{"prompt": "a", "bogus": 1}"#)),
            "Unrecognized request argument supplied: bogus"
        );
        assert_eq!(message(completion(r#"{}"#)), "`prompt` is missing");
        let e = completion("{not json").unwrap_err();
        assert!(
            e.message.contains("not valid JSON") && e.param.is_none(),
            "{e}"
        );
        let e = completion(r#"{"prompt": "a"} x"#).unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{e}");
        let e = completion(r#"["a"]"#).unwrap_err();
        assert!(e.message.contains("JSON object"), "{e}");
        let e = completion("[1]").unwrap_err();
        assert!(
            e.message.contains("JSON object") && e.message.contains("array"),
            "{e}"
        );
        let e = completion("").unwrap_err();
        assert!(e.message.contains("JSON"), "{e}");
    }
}
