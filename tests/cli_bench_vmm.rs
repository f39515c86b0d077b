//! `vkv bench vmm` as a user runs it: the real binary on the host backend, its JSON report, and
//! its errors for bad arguments.

mod common;

use common::{assert_one_line_error, vkv};

#[test]
fn bench_vmm_on_the_cpu_reports_every_part_as_json() {
    let out = vkv(&[
        "bench",
        "vmm",
        "--device",
        "cpu",
        "--model",
        "smollm2-135m",
        "--page-size",
        "64KiB,2MiB",
        "--pages",
        "16",
        "--slots",
        "3",
        "--tokens",
        "600",
        "--steps",
        "100",
        "--step-us",
        "100",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report["backend"], "host");
    assert_eq!(report["primitives"].as_array().unwrap().len(), 2);
    assert_eq!(
        report["spaces"].as_array().unwrap().len(),
        4,
        "2 page sizes × 2 layouts"
    );
    assert_eq!(
        report["mappers"].as_array().unwrap().len(),
        8,
        "× with and without look-ahead"
    );
    for p in report["primitives"].as_array().unwrap() {
        assert_eq!(p["create"]["calls"], 16);
        assert!(p["map"]["median_us"].as_f64().unwrap() > 0.0);
    }
    for s in report["spaces"].as_array().unwrap() {
        assert_eq!(
            s["reuse"]["pages"], 0,
            "reuse of a released slot maps nothing"
        );
    }
}

#[test]
fn bench_vmm_table_names_the_backend_and_model() {
    let out = vkv(&[
        "bench",
        "vmm",
        "--device",
        "cpu",
        "--page-size",
        "2MiB",
        "--layout",
        "token-major",
        "--pages",
        "4",
        "--slots",
        "2",
        "--tokens",
        "64",
        "--steps",
        "32",
        "--step-us",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("backend host") && table.contains("llama-3-8b"),
        "{table}"
    );
    assert!(
        table.contains("token-major") && !table.contains("per-layer"),
        "{table}"
    );
}

#[test]
fn bad_arguments_are_one_line_errors() {
    for (args, needle) in [
        (vec!["--model", "gpt-9"], "unknown model preset \"gpt-9\""),
        (vec!["--page-size", "3000"], "not a positive multiple"),
        (vec!["--page-size", "2 parsecs"], "unknown size unit"),
        (vec!["--tokens", "0"], "must be > 0"),
    ] {
        let mut full = vec![
            "bench", "vmm", "--device", "cpu", "--pages", "2", "--steps", "1",
        ];
        full.extend(args.iter());
        assert_one_line_error(&vkv(&full), needle, &format!("{args:?}"));
    }
}
