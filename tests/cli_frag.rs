//! `vkv frag` as a user runs it: the real binary, its JSON and plots, and its errors.

mod common;

use common::{assert_one_line_error, scratch, vkv};

#[test]
fn a_small_study_reports_every_policy_and_draws_its_plots() {
    let tmp = scratch("plots");
    let plots = tmp.path();
    let out = vkv(&[
        "frag",
        "--model",
        "smollm2-135m",
        "--kv-memory",
        "256MiB",
        "--workload",
        "alpaca",
        "--num-requests",
        "300",
        "--json",
        "--plot-dir",
        plots.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report["workload"], "alpaca");
    let policies = report["policies"].as_array().unwrap();
    assert_eq!(policies.len(), 11);
    let share = |name: &str| {
        let p = policies.iter().find(|p| p["policy"] == name).unwrap();
        assert_eq!(p["finished"], 300, "{name}");
        p["busy"]["token_share_of_allocated"].as_f64().unwrap()
    };
    assert!(
        share("paged-16") > 0.8 && share("orca-max") < 0.2,
        "{} {}",
        share("paged-16"),
        share("orca-max")
    );
    for svg in ["composition.svg", "batch.svg"] {
        let text = std::fs::read_to_string(plots.join(svg)).unwrap();
        assert!(
            text.starts_with("<svg") && text.contains("paged-16"),
            "{svg}"
        );
    }
}

#[test]
fn an_hf_config_and_a_trace_file_are_accepted() {
    let tmp = scratch("inputs");
    let dir = tmp.path();
    std::fs::write(
        dir.join("config.json"),
        r#"{"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 512,
            "max_position_embeddings": 1024}"#,
    )
    .unwrap();
    let trace = dir.join("trace.jsonl");
    std::fs::write(
        &trace,
        "{\"prompt_len\": 100, \"output_len\": 20}\n{\"prompt_len\": 7, \"output_len\": 300}\n",
    )
    .unwrap();
    let out = vkv(&[
        "frag",
        "--model",
        dir.to_str().unwrap(),
        "--kv-memory",
        "4MiB",
        "--workload",
        trace.to_str().unwrap(),
        "--num-requests",
        "20",
        "--policies",
        "paged-16,vmm-token-major-64KiB",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("inputs") && table.contains("vmm-token-major-64KiB"),
        "{table}"
    );
}

#[test]
fn bad_input_is_a_one_line_error_naming_the_problem() {
    let tmp = scratch("bad");
    let dir = tmp.path();
    let malformed = dir.join("malformed.jsonl");
    std::fs::write(
        &malformed,
        "{\"prompt_len\": 10, \"output_len\": 5}\n{\"prompt_len\": 10,\n",
    )
    .unwrap();
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--workload", "sharegtp"], "sharegpt"),
        (vec!["--model", "gpt-9"], "unknown model preset"),
        (vec!["--workload", malformed.to_str().unwrap()], "line 2"),
        (vec!["--workload", empty.to_str().unwrap()], "empty"),
        (vec!["--kv-memory", "1MiB"], "smaller than one request"),
        (vec!["--policies", "paged-0"], "unknown policy"),
        (vec!["--request-rate=0"], "--request-rate"),
        (
            vec!["--model", "/nonexistent/config.json"],
            "unknown model preset",
        ),
    ];
    for (args, needle) in cases {
        let mut full = vec!["frag", "--num-requests", "5"];
        full.extend(args.iter().copied());
        assert_one_line_error(&vkv(&full), needle, &format!("{args:?}"));
    }
}
