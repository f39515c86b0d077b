//! Structured outputs in the engine, on the CPU with the real SmolLM2: for JSON Schemas drawn at
//! random (objects, arrays, strings, integers, booleans, null and enums, nested, every output
//! bounded in length), sampled output always parses and validates against its schema — checked
//! by a validator written here, not by the grammar engine that constrained it — and ends with
//! `stop`, never `length`; `n` samples each follow the schema; `json_object` gives an object;
//! schemas no output can match are refused when compiled.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::serving::{assert_empty, collect, greedy, sharing_engine};
use proptest::prelude::*;
use serde_json::{json, Value};
use vkv_engine::engine::{event_channel, Engine, FinishReason, GenerationRequest};
use vkv_engine::kv::KvMode;
use vkv_engine::sampler::SamplingParams;
use vkv_engine::structured_output::{GrammarError, ResponseFormat};

/// Leaves: strings and integers bounded, booleans, null, enums of short words.
fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0usize..3, 0usize..6).prop_map(|(min, extra)| {
            json!({"type": "string", "minLength": min, "maxLength": min + extra})
        }),
        (-50i64..50, 0i64..2000)
            .prop_map(|(lo, span)| json!({"type": "integer", "minimum": lo, "maximum": lo + span})),
        Just(json!({"type": "boolean"})),
        Just(json!({"type": "null"})),
        prop::collection::btree_set("[a-z]{1,6}", 1..4).prop_map(|words| json!({"enum": words})),
    ]
}

/// Schemas two levels deep at most: arrays of up to 2 items, closed objects of 1 to 3
/// properties, each required or not.
fn schema() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(2, 12, 3, |inner| {
        prop_oneof![
            (inner.clone(), 0usize..3).prop_map(|(items, max)| {
                json!({"type": "array", "items": items, "maxItems": max})
            }),
            (
                prop::collection::btree_map("[a-z]{1,6}", inner, 1..4),
                any::<u8>()
            )
                .prop_map(|(properties, bits)| object(properties, bits)),
        ]
    })
}

/// A closed object of `properties`, the `i`-th required where bit `i` of `bits` is set.
fn object(properties: BTreeMap<String, Value>, bits: u8) -> Value {
    let required: Vec<&String> = properties
        .keys()
        .enumerate()
        .filter(|(i, _)| bits >> i & 1 == 1)
        .map(|(_, k)| k)
        .collect();
    json!({"type": "object", "properties": properties, "required": required,
        "additionalProperties": false})
}

/// The most bytes a compact JSON value of `schema` can take (a string character as a `\uXXXX`
/// escape): with no empty token, the most tokens its output can take, less the end.
fn max_bytes(schema: &Value) -> usize {
    if let Some(words) = schema["enum"].as_array() {
        return words.iter().map(|w| w.to_string().len()).max().unwrap_or(0);
    }
    let n = |key: &str| schema[key].as_i64().unwrap_or(0);
    match schema["type"].as_str() {
        Some("string") => 2 + 6 * n("maxLength") as usize,
        Some("integer") => 1 + n("minimum").abs().max(n("maximum").abs()).to_string().len(),
        Some("boolean") => 5,
        Some("null") => 4,
        Some("array") => 2 + n("maxItems") as usize * (max_bytes(&schema["items"]) + 1),
        Some("object") => {
            let properties = schema["properties"].as_object().unwrap();
            2 + properties
                .iter()
                .map(|(k, v)| k.len() + 4 + max_bytes(v))
                .sum::<usize>()
        }
        other => panic!("no bound for {other:?}"),
    }
}

/// Whether `value` validates against `schema` (the keywords `schema()` uses).
fn validates(value: &Value, schema: &Value) -> Result<(), String> {
    let fail = |why: String| Err(format!("{value} against {schema}: {why}"));
    if let Some(words) = schema["enum"].as_array() {
        return match words.contains(value) {
            true => Ok(()),
            false => fail("not one of the enum".into()),
        };
    }
    let n = |key: &str| schema[key].as_i64();
    match (schema["type"].as_str(), value) {
        (Some("string"), Value::String(s)) => {
            let chars = s.chars().count() as i64;
            if n("minLength").is_some_and(|m| chars < m)
                || n("maxLength").is_some_and(|m| chars > m)
            {
                return fail(format!("{chars} characters"));
            }
            Ok(())
        }
        (Some("integer"), Value::Number(x)) => match x.as_i64() {
            Some(i)
                if n("minimum").is_some_and(|m| i < m) || n("maximum").is_some_and(|m| i > m) =>
            {
                fail("out of range".into())
            }
            Some(_) => Ok(()),
            None => fail("not an integer".into()),
        },
        (Some("boolean"), Value::Bool(_)) | (Some("null"), Value::Null) => Ok(()),
        (Some("array"), Value::Array(items)) => {
            if n("maxItems").is_some_and(|m| items.len() as i64 > m) {
                return fail(format!("{} items", items.len()));
            }
            items
                .iter()
                .try_for_each(|i| validates(i, &schema["items"]))
        }
        (Some("object"), Value::Object(fields)) => {
            let properties = schema["properties"].as_object().unwrap();
            for required in schema["required"].as_array().unwrap() {
                if !fields.contains_key(required.as_str().unwrap()) {
                    return fail(format!("{required} missing"));
                }
            }
            for (k, v) in fields {
                match properties.get(k) {
                    Some(s) => validates(v, s)?,
                    None => return fail(format!("{k} is not a property")),
                }
            }
            Ok(())
        }
        _ => fail("wrong type".into()),
    }
}

fn engine() -> Engine {
    sharing_engine(KvMode::Paged { block_size: 16 }, false, 256 << 20)
}

/// A chat turn asking for JSON, constrained to `format`, sampled at temperature 1 with `seed`.
fn request(e: &Engine, format: &ResponseFormat, seed: u64, max_tokens: usize) -> GenerationRequest {
    let text = "<|im_start|>user\nDescribe a cat as JSON.<|im_end|>\n<|im_start|>assistant\n";
    let prompt = e.model().tokenizer.encode(text, false).unwrap();
    let mut r = greedy(prompt, max_tokens);
    r.stop.ignore_eos = false;
    r.sampling = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        seed: Some(seed),
    };
    r.grammar = Some(e.compile_grammar(format).expect("the schema compiles"));
    r
}

/// Run `schemas` at once; every output parses, validates and ends with `stop`.
fn check_outputs(e: &Engine, schemas: &[Value], seed: u64) {
    let (tx, mut rx) = event_channel();
    let mut ids = Vec::new();
    for (i, s) in schemas.iter().enumerate() {
        let format = ResponseFormat::JsonSchema(s.clone());
        let r = request(e, &format, seed + i as u64, max_bytes(s) + 2);
        ids.push(e.submit(r, tx.clone()).unwrap());
    }
    let out = collect(&mut rx, ids.len());
    for (id, s) in ids.iter().zip(schemas) {
        let o = &out[id];
        assert_eq!(o.failed, None, "{s}");
        let f = o.finished.as_ref().unwrap();
        assert_eq!(f.reason, FinishReason::Stop, "{s}: {:?}", o.text);
        let value: Value = serde_json::from_str(&o.text)
            .unwrap_or_else(|err| panic!("{s}: {:?} is not JSON: {err}", o.text));
        validates(&value, s).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, max_shrink_iters: 16, ..ProptestConfig::default() })]
    #[test]
    fn sampled_output_always_validates_against_its_schema(
        schemas in prop::collection::vec(schema(), 6),
        seed in any::<u32>(),
    ) {
        thread_local! { static ENGINE: Engine = engine(); }
        ENGINE.with(|e| {
            // Nested schemas at the top too: an object around them.
            let top: BTreeMap<String, Value> = schemas.iter().take(2).cloned()
                .enumerate().map(|(i, s)| (format!("f{i}"), s)).collect();
            let mut all = schemas.clone();
            all.push(object(top, 0xff));
            check_outputs(e, &all, seed as u64);
            assert_empty(e, "structured outputs");
        });
    }
}

#[test]
fn json_object_samples_and_greedy_each_follow_the_format() {
    let e = engine();
    let (tx, mut rx) = event_channel();
    let mut r = request(&e, &ResponseFormat::JsonObject, 7, 200);
    // A bound: any object may run long; what was generated until then must be a prefix.
    r.sampling.temperature = 0.0;
    let greedy_id = e.submit(r.clone(), tx.clone()).unwrap();
    r.sampling.temperature = 1.0;
    let ids = e.submit_samples(r, 3, tx).unwrap();
    let out = collect(&mut rx, 4);
    for id in ids.iter().chain([&greedy_id]) {
        let o = &out[id];
        assert_eq!(o.failed, None);
        let f = o.finished.as_ref().unwrap();
        if f.reason == FinishReason::Stop {
            let v: Value =
                serde_json::from_str(&o.text).unwrap_or_else(|err| panic!("{:?}: {err}", o.text));
            assert!(v.is_object(), "{v}");
        } else {
            assert!(o.text.starts_with('{'), "{:?}", o.text);
        }
    }
    assert_empty(&e, "json_object");
}

#[test]
fn schemas_that_cannot_be_used_are_refused_with_the_reason() {
    let e = engine();
    let refused = |schema: Value, needle: &str| match e
        .compile_grammar(&ResponseFormat::JsonSchema(schema.clone()))
    {
        Err(GrammarError::Schema(why)) => assert!(why.contains(needle), "{schema}: {why}"),
        other => panic!("{schema}: {other:?}"),
    };
    refused(
        json!({"type": "string", "minLength": 5, "maxLength": 2}),
        "",
    );
    refused(json!({"type": "integer", "minimum": 3, "maximum": 1}), "");
    refused(
        json!({"type": "object", "properties": {"a": {"type": 5}}}),
        "",
    );
    refused(json!({"$ref": "#/$defs/missing"}), "missing");
    refused(json!("a string"), "object or a boolean");
    let unique: BTreeSet<&str> = ["uniqueItems"].into();
    for keyword in unique {
        refused(
            json!({"type": "array", keyword: true, "items": {"type": "integer"}}),
            keyword,
        );
    }
}
