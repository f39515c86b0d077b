//! What the CLI tests share: running the real `vkv` binary, and a scratch directory per test
//! process.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Run `vkv` with `args`.
pub fn vkv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vkv"))
        .args(args)
        .output()
        .expect("run vkv")
}

/// A directory of this test process under the system temp dir, created if needed.
#[allow(dead_code)] // not every test file uses it
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vkv-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
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
