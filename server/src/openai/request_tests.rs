//! Test module `tests` of `request.rs` (a child module: `super` is `request`).

use super::super::tests::{chat, completion, param};
use super::*;

#[test]
fn min_top_p_is_the_smallest_normal_f32() {
    assert_eq!(MIN_TOP_P, f32::MIN_POSITIVE as f64);
}

#[test]
fn a_full_completion_request_reads_every_field() {
    let r = completion(
        r#"{"model": "m", "prompt": "Hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
            "top_k": 40, "seed": 3, "stop": ["\n", "END"], "stream": true,
            "stream_options": {"include_usage": true}, "n": 1, "ignore_eos": true,
            "presence_penalty": 0, "logprobs": null, "user": "me", "stop_token_ids": [2, 3]}"#,
    )
    .unwrap();
    assert_eq!(r.model.as_deref(), Some("m"));
    assert_eq!(r.input, Input::Prompt(Prompt::Text("Hi".into())));
    assert_eq!(r.max_tokens, Some(7));
    assert_eq!(r.sampling.temperature, 0.5);
    assert_eq!(r.sampling.top_k, 40);
    assert_eq!(r.sampling.seed, Some(3));
    assert_eq!(r.stop.stop, vec!["\n".to_string(), "END".to_string()]);
    assert_eq!(r.stop.stop_token_ids, vec![2, 3]);
    assert!(r.stop.ignore_eos && r.stream && r.include_usage);
    let r = completion(r#"{"prompt": "Hi", "seed": -1, "stop": "x"}"#).unwrap();
    assert_eq!(r.sampling.seed, Some(u64::MAX));
    assert_eq!(r.stop.stop, vec!["x".to_string()]);
    assert!(!r.stream && r.max_tokens.is_none());
}

#[test]
fn prompts_may_be_token_ids() {
    let tokens = |r: ValidRequest| match r.input {
        Input::Prompt(p) => p,
        i => panic!("{i:?}"),
    };
    let r = completion(r#"{"prompt": [1, 2, 3]}"#).unwrap();
    assert_eq!(tokens(r), Prompt::Tokens(vec![1, 2, 3]));
    let r = completion(r#"{"prompt": [[4, 5]]}"#).unwrap();
    assert_eq!(tokens(r), Prompt::Tokens(vec![4, 5]));
    let r = completion(r#"{"prompt": ["a b"]}"#).unwrap();
    assert_eq!(tokens(r), Prompt::Text("a b".into()));
    for (prompt, field) in [
        (r#"["a", "b"]"#, "prompt"),
        ("[[1], [2]]", "prompt"),
        (r#"[1, "a"]"#, "prompt[1]"),
        ("[[]]", "prompt"),
        (r#"[""]"#, "prompt"),
        ("[{}]", "prompt[0]"),
    ] {
        let body = format!(r#"{{"prompt": {prompt}}}"#);
        assert_eq!(param(completion(&body)), field, "{body}");
    }
}

#[test]
fn integers_may_be_written_with_a_zero_fraction_as_json_schema_allows() {
    let r = completion(r#"{"prompt": [429.0, 7], "max_tokens": 2.0, "top_k": 5.0}"#).unwrap();
    assert_eq!(r.input, Input::Prompt(Prompt::Tokens(vec![429, 7])));
    assert_eq!((r.max_tokens, r.sampling.top_k), (Some(2), 5));
    // A fraction is still a mistake, named by its field.
    assert_eq!(
        param(completion(r#"{"prompt": "a", "max_tokens": 2.5}"#)),
        "max_tokens"
    );
    assert_eq!(param(completion(r#"{"prompt": [1.5]}"#)), "prompt[0]");
    // Beside max_completion_tokens, max_tokens is still checked.
    let body = r#"{"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 3, "max_tokens": 0}"#;
    assert_eq!(param(chat(body)), "max_tokens");
    // Past 2^53 a float may be a rounded literal: i64::MIN − 1 is not i64::MIN.
    assert_eq!(
        param(completion(
            r#"{"prompt": "a", "seed": -9223372036854775809}"#
        )),
        "seed"
    );
}

#[test]
fn mistakes_name_their_field() {
    for body in [r#"{"prompt": ""}"#, r#"{"prompt": []}"#, r#"{"prompt": 5}"#] {
        assert_eq!(param(completion(body)), "prompt", "{body}");
    }
    for (field, value) in [
        ("temperature", "3"),
        ("top_p", "0"),
        ("top_p", "2.8e-78"),
        ("top_p", "1.0000001"),
        ("top_k", "-5"),
        ("max_tokens", "0"),
        ("max_tokens", "1.5"),
        ("n", "0"),
        ("n", "129"),
        ("best_of", "0"),
        ("best_of", "129"),
        ("stop", r#""""#),
        ("stop", r#"["x", ""]"#),
        ("stream", r#""yes""#),
        ("echo", r#""yes""#),
        ("length_penalty", "101"),
        ("suffix", r#""x""#),
        ("logprobs", "21"),
        ("logprobs", "-1"),
        ("logit_bias", r#"{"1": 101}"#),
        ("logit_bias", r#"{"01": 5}"#),
        ("logit_bias", r#"{"x": 5}"#),
        ("logit_bias", r#"{"1": "5"}"#),
        ("presence_penalty", "2.5"),
        ("frequency_penalty", "-3"),
        ("stream_options", r#"{"include_usage": true}"#),
        // A chat-only field on completions is unknown there.
        ("messages", "[]"),
    ] {
        let body = format!(r#"{{"prompt": "a", "{field}": {value}}}"#);
        assert_eq!(param(completion(&body)), field, "{body}");
    }
    assert_eq!(
        param(completion(r#"{"prompt": "a", "stop": [1]}"#)),
        "stop[0]"
    );
    assert!(completion(r#"{"prompt": "a", "top_p": 1.1754943508222875e-38}"#).is_ok());
    for (body, field) in [
        (r#"{"messages": []}"#, "messages"),
        (
            r#"{"messages": [{"role": "cat", "content": "x"}]}"#,
            "messages[0].role",
        ),
        (r#"{"messages": [{"role": "user"}]}"#, "messages[0].content"),
        (
            r#"{"messages": [{"role": "user", "content": null}]}"#,
            "messages[0].content",
        ),
        (
            r#"{"messages": [{"role": "user", "content": 5}]}"#,
            "messages[0].content",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -1}"#,
            "max_completion_tokens",
        ),
    ] {
        assert_eq!(param(chat(body)), field, "{body}");
    }
    let user = r#"[{"role": "user", "content": "x"}]"#;
    for (field, value) in [
        ("logprobs", "2"),
        ("top_logprobs", "21"),
        ("tools", r#"[{"type": "function"}]"#),
        ("tool_choice", r#""auto""#),
    ] {
        let body = format!(r#"{{"messages": {user}, "{field}": {value}}}"#);
        assert_eq!(param(chat(&body)), field, "{body}");
    }
    let neutral = format!(
        r#"{{"messages": {user}, "logprobs": false, "top_logprobs": 0, "response_format": {{"type": "text"}},
            "tools": [], "tool_choice": "none", "parallel_tool_calls": true, "n": 1}}"#
    );
    assert!(chat(&neutral).is_ok(), "{neutral}");
    // Log-probabilities: on chat with `logprobs: true`, `top_logprobs` alternatives each.
    let asked = format!(r#"{{"messages": {user}, "logprobs": true, "top_logprobs": 3}}"#);
    assert_eq!(chat(&asked).unwrap().logprobs, Some(3));
    let unused = format!(r#"{{"messages": {user}, "top_logprobs": 3}}"#);
    assert_eq!(chat(&unused).unwrap().logprobs, None);
    assert_eq!(
        completion(r#"{"prompt": "a", "logprobs": 5}"#)
            .unwrap()
            .logprobs,
        Some(5)
    );
}

#[test]
fn response_formats_are_read_and_their_names_checked() {
    use vkv_engine::structured_output::ResponseFormat as Engine;
    let user = r#"[{"role": "user", "content": "x"}]"#;
    let format = |f: &str| {
        chat(&format!(
            r#"{{"messages": {user}, "response_format": {f}}}"#
        ))
    };
    assert_eq!(format(r#"{"type": "text"}"#).unwrap().response_format, None);
    assert_eq!(format("null").unwrap().response_format, None);
    assert_eq!(
        format(r#"{"type": "json_object"}"#)
            .unwrap()
            .response_format,
        Some(Engine::JsonObject)
    );
    let schema = r#"{"type": "json_schema", "json_schema": {"name": "cat_1", "strict": true,
        "schema": {"type": "object", "properties": {"name": {"type": "string"}}}}}"#;
    assert_eq!(
        format(schema).unwrap().response_format,
        Some(Engine::JsonSchema(serde_json::json!(
            {"type": "object", "properties": {"name": {"type": "string"}}}
        )))
    );
    let any = r#"{"type": "json_schema", "json_schema": {"name": "any"}}"#;
    assert_eq!(
        format(any).unwrap().response_format,
        Some(Engine::JsonSchema(Value::Bool(true)))
    );
    let on_completions = r#"{"prompt": "a", "response_format": {"type": "json_object"}}"#;
    assert_eq!(
        completion(on_completions).unwrap().response_format,
        Some(Engine::JsonObject)
    );
    for (f, field) in [
        (r#"{"type": "xml"}"#, "response_format.type"),
        (r#"{"type": "text", "x": 1}"#, "response_format.x"),
        (r#"{"type": "json_schema"}"#, "response_format.json_schema"),
        (
            r#"{"type": "json_schema", "json_schema": {"name": "a b"}}"#,
            "response_format.json_schema.name",
        ),
        (
            // Inside a tagged variant serde loses the path below the field.
            r#"{"type": "json_schema", "json_schema": {"name": "a", "schema": 3}}"#,
            "response_format",
        ),
    ] {
        assert_eq!(param(format(f)), field, "{f}");
    }
    let beam = r#"{"prompt": "a", "n": 2, "use_beam_search": true,
        "response_format": {"type": "json_object"}}"#;
    assert_eq!(param(completion(beam)), "use_beam_search");
}

#[test]
fn chat_content_may_be_text_parts() {
    let r = chat(
        r#"{"messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant"}, {"role": "developer", "content": "x", "name": "d"}],
            "max_completion_tokens": 5}"#,
    )
    .unwrap();
    let Input::Chat { messages, .. } = &r.input else {
        panic!("{r:?}")
    };
    assert_eq!(messages[1], ChatMessage::new("user", "Hi there"));
    assert_eq!(messages[2], ChatMessage::new("assistant", ""));
    assert_eq!(messages[3], ChatMessage::new("system", "x"));
    assert_eq!(
        (r.max_tokens, r.max_tokens_field),
        (Some(5), "max_completion_tokens")
    );
}
