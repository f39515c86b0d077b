//! OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status
//! that says whose mistake it was (OpenAI's API reference, "Error codes"; vLLM's `ErrorResponse`).
//!
//! Invariant: a client's mistake is a 4xx naming the field (`param`) and, where there are numbers,
//! the numbers; 5xx is kept for the server's own failures (the engine thread gone, a forward pass
//! that failed), never for something a client sent.

use hyper::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;
use vkv_engine::engine::EngineError;

use crate::openai::response::json_text;

/// One error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`, ...
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code: `context_length_exceeded`, `invalid_api_key`, ...
    pub code: Option<&'static str>,
    /// 405 only: the methods the route takes (the `Allow` header, RFC 9110 section 10.2.1).
    pub allow: Option<&'static str>,
}

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// OpenAI's error object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ErrorDetail {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault (`messages[0].role`), if one is.
    pub param: Option<String>,
    /// `context_length_exceeded`, `invalid_api_key`, `model_not_found`, `not_found`,
    /// `method_not_allowed`, `request_too_large`, `service_unavailable`.
    pub code: Option<String>,
}

impl ApiError {
    /// 400, the client's request is wrong in `param`.
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.into(),
            code: None,
            allow: None,
        }
    }

    /// 400 naming a field by its name.
    pub fn field(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::invalid(Some(param.to_string()), message)
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            message: message.into(),
            param: None,
            code: Some("invalid_api_key"),
            allow: None,
        }
    }

    pub fn too_large(limit: usize) -> ApiError {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            message: format!("the request body is larger than the limit of {limit} bytes"),
            param: None,
            code: Some("request_too_large"),
            allow: None,
        }
    }

    /// The body did not arrive in time (408; the connection is closed after it).
    pub fn body_timeout(timeout: std::time::Duration) -> ApiError {
        ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            kind: "invalid_request_error",
            message: format!(
                "the request body did not arrive within {} s of its headers",
                timeout.as_secs_f64()
            ),
            param: None,
            code: Some("request_timeout"),
            allow: None,
        }
    }

    pub fn not_found(path: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!("no route for {path}"),
            param: None,
            code: Some("not_found"),
            allow: None,
        }
    }

    /// 405; `allow` is the `Allow` header's value (`GET, HEAD`).
    pub fn method_not_allowed(method: &str, path: &str, allow: &'static str) -> ApiError {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            kind: "invalid_request_error",
            message: format!("{path} takes {allow}, not {method}"),
            param: None,
            code: Some("method_not_allowed"),
            allow: Some(allow),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "server_error",
            message: message.into(),
            param: None,
            code: Some("service_unavailable"),
            allow: None,
        }
    }

    /// Another server this one needed (disaggregated serving: the prefill instance holding a
    /// request's KV) failed or could not be reached.
    pub fn bad_gateway(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_GATEWAY,
            kind: "server_error",
            message: message.into(),
            param: None,
            code: Some("bad_gateway"),
            allow: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: message.into(),
            param: None,
            code: None,
            allow: None,
        }
    }

    /// The engine refused a request; `prompt_field` is `prompt` or `messages`, `max_tokens_field`
    /// the name the client used for the output limit.
    pub fn from_engine(e: EngineError, prompt_field: &str, max_tokens_field: &str) -> ApiError {
        match e {
            EngineError::InvalidRequest(m) => {
                let param = if m.starts_with("prompt") || m.starts_with("the prompt") {
                    Some(prompt_field.to_string())
                } else if m.starts_with("max_tokens") {
                    Some(max_tokens_field.to_string())
                } else {
                    [
                        "temperature",
                        "top_p",
                        "top_k",
                        "stop",
                        "seed",
                        "presence_penalty",
                        "frequency_penalty",
                        "logit_bias",
                        "logprobs",
                        "length_penalty",
                    ]
                    .into_iter()
                    .find(|f| m.starts_with(f))
                    .map(str::to_string)
                };
                ApiError::invalid(param, m)
            }
            // The prompt's fault when it alone does not fit; else the room asked for output's.
            EngineError::ContextLength { prompt, limit, .. } if prompt >= limit => {
                ApiError::field(prompt_field, e.to_string()).with_code("context_length_exceeded")
            }
            EngineError::KvCapacity {
                prompt, capacity, ..
            } if prompt >= capacity => {
                ApiError::field(prompt_field, e.to_string()).with_code("context_length_exceeded")
            }
            e @ (EngineError::ContextLength { .. } | EngineError::KvCapacity { .. }) => {
                ApiError::field(max_tokens_field, e.to_string())
                    .with_code("context_length_exceeded")
            }
            e @ (EngineError::ShuttingDown | EngineError::Stopped) => {
                ApiError::unavailable(e.to_string())
            }
            e @ (EngineError::Start(_) | EngineError::KvAudit(_)) => {
                ApiError::internal(e.to_string())
            }
        }
    }

    /// The body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind.to_string(),
                param: self.param.clone(),
                code: self.code.map(str::to_string),
            },
        }
    }

    /// The body as JSON text.
    pub fn json(&self) -> String {
        json_text(&self.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_errors_name_the_field_and_both_numbers() {
        let e = ApiError::from_engine(
            EngineError::ContextLength {
                prompt: 10,
                max_tokens: 9000,
                limit: 8192,
            },
            "prompt",
            "max_completion_tokens",
        );
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.param.as_deref(), Some("max_completion_tokens"));
        let body: serde_json::Value = serde_json::from_str(&e.json()).unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("10") && message.contains("9000") && message.contains("8192"));
        assert_eq!(body["error"]["code"], "context_length_exceeded");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(body["error"]["param"].is_string());
        // A prompt that alone fills the context is the prompt's fault, whatever max_tokens is.
        let e = ApiError::from_engine(
            EngineError::ContextLength {
                prompt: 8192,
                max_tokens: 1,
                limit: 8192,
            },
            "messages",
            "max_completion_tokens",
        );
        assert_eq!(e.param.as_deref(), Some("messages"));
    }

    #[test]
    fn an_engine_that_stopped_is_the_servers_problem() {
        let e = ApiError::from_engine(EngineError::Stopped, "prompt", "max_tokens");
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
