//! `GET /openapi.json`: an OpenAPI 3.1 description of every route, written by hand to match
//! [`crate::openai`] (the fields it reads, their ranges and defaults) and [`crate::api`] (routes,
//! statuses). A unit test checks that every route the server answers is described.

use serde_json::{json, Value};

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    })
}

fn generation_responses(schema: &str, chunk: &str) -> Value {
    json!({
        "200": {
            "description": "The whole response, or (`stream: true`) server-sent events: one `data:` line per chunk, then `data: [DONE]`.",
            "content": {
                "application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}},
                "text/event-stream": {"schema": {"$ref": format!("#/components/schemas/{chunk}")}},
            },
        },
        "400": error_response("A mistake in the request; `param` names the field."),
        "401": error_response("Missing or wrong API key."),
        "413": error_response("The body is over the size limit."),
        "503": error_response("The engine has stopped or is shutting down."),
    })
}

/// The document.
pub fn document() -> Value {
    let common = json!({
        "model": {"type": "string", "description": "The served model name (see /v1/models); optional."},
        "max_tokens": {"type": "integer", "minimum": 1, "description": "Tokens to generate at most; default: the rest of the context."},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2, "default": 1},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
        "top_k": {"type": "integer", "description": "vLLM extra: keep the k most likely tokens; -1 or 0: all.", "default": -1},
        "seed": {"type": "integer", "description": "Same seed, same prompt, same parameters: same output."},
        "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}], "description": "The output ends before the first of these."},
        "stop_token_ids": {"type": "array", "items": {"type": "integer"}, "description": "vLLM extra."},
        "ignore_eos": {"type": "boolean", "default": false, "description": "vLLM extra: keep generating past end-of-sequence tokens."},
        "stream": {"type": "boolean", "default": false},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}, "additionalProperties": false},
        "n": {"type": "integer", "enum": [1]},
        "presence_penalty": {"type": "number", "enum": [0]},
        "frequency_penalty": {"type": "number", "enum": [0]},
        "logit_bias": {"type": "object", "maxProperties": 0},
        "user": {"type": "string"},
    });
    let mut completion = common.clone();
    completion["prompt"] = json!({
        "oneOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
            {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}, "minItems": 1, "maxItems": 1},
        ],
    });
    completion["echo"] = json!({"type": "boolean", "enum": [false]});
    completion["best_of"] = json!({"type": "integer", "enum": [1]});
    completion["logprobs"] = json!({"type": "integer", "enum": [0]});
    let mut chat = common;
    chat["messages"] = json!({
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "required": ["role"],
            "additionalProperties": false,
            "properties": {
                "role": {"type": "string", "enum": ["system", "developer", "user", "assistant"]},
                "content": {"oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}},
                ]},
                "name": {"type": "string"},
            },
        },
    });
    chat["max_completion_tokens"] = json!({"type": "integer", "minimum": 1, "description": "The same as max_tokens (it wins when both are given)."});
    chat["logprobs"] = json!({"type": "boolean", "enum": [false]});
    chat["add_generation_prompt"] = json!({"type": "boolean", "default": true});
    let usage = json!({
        "type": "object",
        "properties": {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        },
    });
    let finish = json!({"type": ["string", "null"], "enum": ["stop", "length", "abort", null]});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "vkv",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "OpenAI-compatible completions and chat completions served by vkv.",
        },
        "paths": {
            "/v1/completions": {"post": {
                "summary": "Continue a prompt.",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CompletionRequest"}}}},
                "responses": generation_responses("Completion", "CompletionChunk"),
            }},
            "/v1/chat/completions": {"post": {
                "summary": "Answer a conversation, through the model's chat template.",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
                "responses": generation_responses("ChatCompletion", "ChatCompletionChunk"),
            }},
            "/v1/models": {"get": {
                "summary": "The served model.",
                "responses": {
                    "200": {"description": "`{object: list, data: [{id, object: model, created, owned_by, max_model_len, vocab_size}]}`"},
                    "401": error_response("Missing or wrong API key."),
                },
            }},
            "/health": {"get": {
                "summary": "Whether the engine thread runs.",
                "responses": {
                    "200": {"description": "`{\"status\": \"ok\"}`"},
                    "503": error_response("The engine thread has stopped."),
                },
            }},
            "/metrics": {"get": {
                "summary": "Prometheus text: requests by status and finish reason, running and waiting requests, KV bytes, TTFT/TPOT/ITL/E2E histograms, preemptions, map waits.",
                "responses": {"200": {"description": "text/plain; version=0.0.4"}},
            }},
            "/openapi.json": {"get": {
                "summary": "This document.",
                "responses": {"200": {"description": "OpenAPI 3.1"}},
            }},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "Needed on /v1/* when the server runs with --api-key."}},
            "schemas": {
                "CompletionRequest": {"type": "object", "required": ["prompt"], "additionalProperties": false, "properties": completion},
                "ChatCompletionRequest": {"type": "object", "required": ["messages"], "additionalProperties": false, "properties": chat},
                "Usage": usage,
                "Completion": {"type": "object", "properties": {
                    "id": {"type": "string"}, "object": {"const": "text_completion"}, "created": {"type": "integer"}, "model": {"type": "string"},
                    "choices": {"type": "array", "items": {"type": "object", "properties": {"index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": finish}}},
                    "usage": {"$ref": "#/components/schemas/Usage"},
                }},
                "CompletionChunk": {"description": "A Completion with the new text; with include_usage, `usage` is null until a last chunk with no choices."},
                "ChatCompletion": {"type": "object", "properties": {
                    "id": {"type": "string"}, "object": {"const": "chat.completion"}, "created": {"type": "integer"}, "model": {"type": "string"},
                    "choices": {"type": "array", "items": {"type": "object", "properties": {"index": {"type": "integer"}, "message": {"type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}, "finish_reason": finish}}},
                    "usage": {"$ref": "#/components/schemas/Usage"},
                }},
                "ChatCompletionChunk": {"description": "object chat.completion.chunk; choices[0].delta has role (first chunk) and content; the last has finish_reason."},
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
                }}}},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_described() {
        let doc = super::document();
        for path in [
            "/v1/completions",
            "/v1/chat/completions",
            "/v1/models",
            "/health",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path}");
        }
        assert!(
            doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"].is_object()
        );
    }
}
