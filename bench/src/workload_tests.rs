//! Test module `tests` of `workload.rs` (a child module: `super` is `workload`).

use super::*;

fn mean(values: impl Iterator<Item = usize>) -> f64 {
    let values: Vec<usize> = values.collect();
    values.iter().sum::<usize>() as f64 / values.len() as f64
}

/// The `fraction` quantile (nearest rank, lower) of the values.
fn quantile(values: impl Iterator<Item = usize>, fraction: f64) -> f64 {
    let mut values: Vec<usize> = values.collect();
    values.sort_unstable();
    let index = ((values.len() as f64 * fraction) as usize).min(values.len() - 1);
    values[index] as f64
}

fn within(actual: f64, expected: f64, tolerance: f64) -> bool {
    (actual - expected).abs() <= expected * tolerance
}

fn unique_temp_path(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "vkv-workload-{tag}-{}-{nanos}.jsonl",
        std::process::id()
    ))
}

#[test]
fn parses_every_named_workload() {
    let expected = [
        Workload::ShareGpt,
        Workload::Alpaca,
        Workload::ArxivSummarization,
        Workload::LongBench,
        Workload::HumanEval,
    ];
    assert_eq!(Workload::NAMED.len(), expected.len());
    for (name, workload) in Workload::NAMED.iter().zip(expected) {
        let parsed = Workload::parse(name).unwrap();
        assert_eq!(parsed, workload);
        assert_eq!(parsed.name(), *name);
    }
}

#[test]
fn parses_fixed_and_uniform() {
    let fixed = Workload::parse("fixed:128,256").unwrap();
    assert_eq!(
        fixed,
        Workload::Fixed(RequestShape {
            prompt_len: 128,
            output_len: 256
        })
    );
    assert_eq!(fixed.name(), "fixed:128,256");

    let uniform = Workload::parse("uniform:1-10,5-20").unwrap();
    assert_eq!(
        uniform,
        Workload::Uniform {
            prompt_min: 1,
            prompt_max: 10,
            output_min: 5,
            output_max: 20
        }
    );
    assert_eq!(uniform.name(), "uniform:1-10,5-20");
    assert_eq!(Workload::parse(&uniform.name()).unwrap(), uniform);
    for shape in uniform.sample(1000, 3, None) {
        assert!((1..=10).contains(&shape.prompt_len));
        assert!((5..=20).contains(&shape.output_len));
    }
}

#[test]
fn unknown_name_lists_known_workloads() {
    let error = Workload::parse("sharegtp").unwrap_err();
    assert!(matches!(error, WorkloadError::UnknownName { .. }));
    let message = error.to_string();
    assert!(message.contains("sharegtp"), "{message}");
    assert!(message.contains("sharegpt"), "{message}");
    assert!(message.contains("arxiv-summarization"), "{message}");
}

#[test]
fn bad_fixed_and_uniform_specs_are_errors() {
    for spec in ["fixed:10", "fixed:a,b", "uniform:5-1,1-2", "fixed:0,5"] {
        let error = Workload::parse(spec).unwrap_err();
        assert!(
            matches!(error, WorkloadError::BadSpec { .. }),
            "{spec}: {error:?}"
        );
        assert!(error.to_string().contains(spec), "{error}");
    }
    let missing = Workload::parse("fixed:10").unwrap_err().to_string();
    assert!(missing.contains("two comma-separated parts"), "{missing}");
    let not_number = Workload::parse("fixed:a,b").unwrap_err().to_string();
    assert!(not_number.contains("`a`"), "{not_number}");
    let reversed = Workload::parse("uniform:5-1,1-2").unwrap_err().to_string();
    assert!(reversed.contains("5 > 1"), "{reversed}");
    let zero = Workload::parse("fixed:0,5").unwrap_err().to_string();
    assert!(zero.contains(">= 1") && zero.contains("found 0"), "{zero}");
    assert!(Workload::parse("trace:").is_err());
}

#[test]
fn sample_is_deterministic_per_seed() {
    for name in Workload::NAMED {
        let workload = Workload::parse(name).unwrap();
        let first = workload.sample(500, 42, None);
        assert_eq!(first.len(), 500);
        assert_eq!(first, workload.sample(500, 42, None), "{name}");
        assert_ne!(first, workload.sample(500, 43, None), "{name}");
        assert!(
            first.iter().all(|s| s.prompt_len >= 1 && s.output_len >= 1),
            "{name}"
        );
    }
}

#[test]
fn sharegpt_and_alpaca_means_match_the_paper() {
    let sharegpt = Workload::ShareGpt.sample(20_000, 7, None);
    let prompt = mean(sharegpt.iter().map(|s| s.prompt_len));
    let output = mean(sharegpt.iter().map(|s| s.output_len));
    assert!(within(prompt, 161.0, 0.05), "sharegpt prompt mean {prompt}");
    assert!(within(output, 338.0, 0.05), "sharegpt output mean {output}");

    let alpaca = Workload::Alpaca.sample(20_000, 7, None);
    let prompt = mean(alpaca.iter().map(|s| s.prompt_len));
    let output = mean(alpaca.iter().map(|s| s.output_len));
    assert!(within(prompt, 19.31, 0.05), "alpaca prompt mean {prompt}");
    assert!(within(output, 58.45, 0.05), "alpaca output mean {output}");
}

#[test]
fn arxiv_prompt_median_and_p90() {
    let requests = Workload::ArxivSummarization.sample(20_000, 11, None);
    let median = quantile(requests.iter().map(|s| s.prompt_len), 0.5);
    let p90 = quantile(requests.iter().map(|s| s.prompt_len), 0.9);
    assert!(within(median, 2700.0, 0.03), "arxiv prompt median {median}");
    assert!(within(p90, 3700.0, 0.05), "arxiv prompt p90 {p90}");
    let output_median = quantile(requests.iter().map(|s| s.output_len), 0.5);
    assert!(within(output_median, 170.0, 0.05), "{output_median}");
}

#[test]
fn longbench_prompts_stay_in_range() {
    let requests = Workload::LongBench.sample(5_000, 5, None);
    assert!(requests
        .iter()
        .all(|s| (1900..=2000).contains(&s.prompt_len)));
}

#[test]
fn fixed_returns_the_fixed_shape() {
    let shape = RequestShape {
        prompt_len: 128,
        output_len: 256,
    };
    let requests = Workload::Fixed(shape).sample(100, 9, None);
    assert_eq!(requests, vec![shape; 100]);
    assert_eq!(shape.total_len(), 384);
}

#[test]
fn max_len_clamps_every_request() {
    let mut workloads: Vec<Workload> = Workload::NAMED
        .iter()
        .map(|name| Workload::parse(name).unwrap())
        .collect();
    workloads.push(Workload::parse("fixed:500,500").unwrap());
    workloads.push(Workload::parse("uniform:1-300,1-300").unwrap());
    for workload in &workloads {
        for shape in workload.sample(2_000, 1, Some(100)) {
            assert!(shape.total_len() <= 100, "{}: {shape:?}", workload.name());
            assert!(shape.prompt_len >= 1 && shape.output_len >= 1);
        }
    }
    let clamped = Workload::parse("fixed:500,500")
        .unwrap()
        .sample(1, 0, Some(100));
    assert_eq!(
        clamped[0],
        RequestShape {
            prompt_len: 99,
            output_len: 1
        }
    );
    // A limit below 2 cannot hold two tokens; both lengths still stay at 1.
    let tiny = Workload::ShareGpt.sample(10, 0, Some(0));
    assert!(tiny.iter().all(|s| s.prompt_len == 1 && s.output_len == 1));
}

#[test]
fn jsonl_trace_parses_and_cycles() {
    let text = "{\"prompt_len\": 10, \"output_len\": 20}\n\n  \n\
                {\"prompt_len\": 3, \"output_len\": 4, \"id\": \"x\"}\n";
    let workload = Workload::from_jsonl(text).unwrap();
    let first = RequestShape {
        prompt_len: 10,
        output_len: 20,
    };
    let second = RequestShape {
        prompt_len: 3,
        output_len: 4,
    };
    assert_eq!(
        workload,
        Workload::Trace {
            path: None,
            requests: vec![first, second]
        }
    );
    assert_eq!(workload.name(), "trace:inline");
    assert_eq!(workload.sample(1, 0, None), vec![first]);
    assert_eq!(
        workload.sample(5, 0, None),
        vec![first, second, first, second, first]
    );
}

#[test]
fn jsonl_errors_name_line_and_reason() {
    let malformed = "{\"prompt_len\": 1, \"output_len\": 2}\n{\"prompt_len\": 1,\n";
    let error = Workload::from_jsonl(malformed).unwrap_err();
    assert!(
        matches!(error, WorkloadError::BadTraceLine { line: 2, .. }),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(message.contains("line 2"), "{message}");
    assert!(message.contains("malformed JSON"), "{message}");

    let missing = Workload::from_jsonl("{\"prompt_len\": 5}").unwrap_err();
    let message = missing.to_string();
    assert!(message.contains("line 1"), "{message}");
    assert!(message.contains("output_len"), "{message}");
    assert!(message.contains("missing field"), "{message}");

    let zero = Workload::from_jsonl("{\"prompt_len\": 5, \"output_len\": 0}")
        .unwrap_err()
        .to_string();
    assert!(
        zero.contains("output_len") && zero.contains("found 0"),
        "{zero}"
    );

    let not_object = Workload::from_jsonl("[1, 2]").unwrap_err().to_string();
    assert!(not_object.contains("an array"), "{not_object}");

    let negative = Workload::from_jsonl("{\"prompt_len\": -5, \"output_len\": 1}")
        .unwrap_err()
        .to_string();
    assert!(negative.contains("found -5"), "{negative}");

    for empty in ["", "\n  \n"] {
        let error = Workload::from_jsonl(empty).unwrap_err();
        assert!(
            matches!(error, WorkloadError::EmptyTrace { .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("empty"));
    }
}

#[test]
fn trace_files_load_by_path_and_trace_prefix() {
    let path = unique_temp_path("good");
    std::fs::write(
        &path,
        "{\"prompt_len\": 7, \"output_len\": 8}\n{\"prompt_len\": 9, \"output_len\": 1}\n",
    )
    .unwrap();
    let spec = path.to_str().unwrap().to_string();
    let by_path = Workload::parse(&spec);
    let by_prefix = Workload::parse(&format!("trace:{spec}"));
    let _ = std::fs::remove_file(&path);

    let by_path = by_path.unwrap();
    assert_eq!(by_path, by_prefix.unwrap());
    assert_eq!(by_path.name(), format!("trace:{spec}"));
    assert_eq!(
        by_path.sample(2, 0, None),
        vec![
            RequestShape {
                prompt_len: 7,
                output_len: 8
            },
            RequestShape {
                prompt_len: 9,
                output_len: 1
            }
        ]
    );
}

#[test]
fn missing_trace_file_error_names_the_path() {
    let path = unique_temp_path("missing");
    let spec = path.to_str().unwrap().to_string();
    let error = Workload::parse(&spec).unwrap_err();
    assert!(matches!(error, WorkloadError::TraceIo { .. }), "{error:?}");
    assert!(error.to_string().contains(&spec), "{error}");
}

#[test]
fn bad_trace_file_error_names_the_file() {
    let path = unique_temp_path("bad");
    std::fs::write(&path, "{\"prompt_len\": 7, \"output_len\": 8}\nnot json\n").unwrap();
    let spec = path.to_str().unwrap().to_string();
    let error = Workload::parse(&spec);
    let _ = std::fs::remove_file(&path);
    let message = error.unwrap_err().to_string();
    assert!(
        message.contains(&spec) && message.contains("line 2"),
        "{message}"
    );
}

#[test]
fn parses_prefix_repetition_and_multi_turn() {
    let p = Workload::parse("prefix-repetition:8,2048,128,64").unwrap();
    assert_eq!(
        p,
        Workload::PrefixRepetition(PrefixRepetition {
            num_prefixes: 8,
            prefix_len: 2048,
            suffix_len: 128,
            output_len: 64
        })
    );
    assert_eq!(p.name(), "prefix-repetition:8,2048,128,64");
    assert_eq!(Workload::parse(&p.name()).unwrap(), p);
    let shapes = p.sample(5, 0, None);
    assert!(shapes
        .iter()
        .all(|s| s.prompt_len == 2176 && s.output_len == 64));

    let m = Workload::parse("multi-turn:16,4,100,20,0.5").unwrap();
    let Workload::MultiTurn(spec) = m else {
        panic!("{m:?}")
    };
    assert_eq!(
        (
            spec.conversations,
            spec.turns,
            spec.user_len,
            spec.output_len
        ),
        (16, 4, 100, 20)
    );
    assert_eq!(spec.think_seconds, 0.5);
    assert_eq!(spec.requests(), 64);
    assert_eq!(Workload::parse(&m.name()).unwrap(), m);
    let no_think = Workload::parse("multi-turn:2,3,10,5").unwrap();
    assert!(matches!(no_think, Workload::MultiTurn(s) if s.think_seconds == 0.0));
    // Turn k's prompt: k + 1 user messages and k replies.
    let lens: Vec<usize> = no_think
        .sample(4, 0, None)
        .iter()
        .map(|s| s.prompt_len)
        .collect();
    assert_eq!(lens, vec![10, 25, 40, 10]);
}

#[test]
fn prefix_sharing_spec_errors_name_the_bad_field() {
    let cases = [
        ("prefix-repetition:8,x,128,64", "PREFIX_LEN"),
        ("prefix-repetition:0,2048,128,64", "NUM_PREFIXES"),
        ("prefix-repetition:8,2048,0,64", "SUFFIX_LEN"),
        ("prefix-repetition:8,2048,128,-1", "OUTPUT_LEN"),
        ("prefix-repetition:8,2048,128", "(missing OUTPUT_LEN)"),
        (
            "prefix-repetition:8,2048,128,64,1",
            "4 comma-separated fields",
        ),
        ("multi-turn:a,4,100,20", "CONVERSATIONS"),
        ("multi-turn:16,0,100,20", "TURNS"),
        ("multi-turn:16,4,1.5,20", "USER_LEN"),
        ("multi-turn:16,4,100", "(missing OUTPUT_LEN)"),
        ("multi-turn:16,4,100,20,-2", "THINK_SECONDS"),
        ("multi-turn:16,4,100,20,soon", "THINK_SECONDS"),
        (
            "multi-turn:16,4,100,20,1,2",
            "4 to 5 comma-separated fields",
        ),
    ];
    for (spec, field) in cases {
        let error = Workload::parse(spec).unwrap_err();
        assert!(matches!(error, WorkloadError::BadSpec { .. }), "{spec}");
        let message = error.to_string();
        assert!(message.contains(field), "{spec}: {message}");
    }
}

#[test]
fn prefix_sharing_workloads_must_fit_the_model() {
    let p = Workload::parse("prefix-repetition:2,100,20,10").unwrap();
    assert!(p.check_fits(130).is_ok());
    let error = p.check_fits(129).unwrap_err();
    assert!(matches!(
        error,
        WorkloadError::TooLong {
            needed: 130,
            limit: 129,
            ..
        }
    ));
    // The last of 3 turns: 3 user messages and 3 replies of 10 + 5.
    let m = Workload::parse("multi-turn:2,3,10,5").unwrap();
    assert!(m.check_fits(45).is_ok());
    assert!(m.check_fits(44).is_err());
    assert!(Workload::parse("fixed:100,100")
        .unwrap()
        .check_fits(10)
        .is_ok());
}
