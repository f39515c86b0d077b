//! `vkv generate` as a user runs it: bad model files are one clear message naming what was found.
//! (The happy path on the real model is `tests/model_reference.rs`; a full run here would fetch
//! the model, which that test already does.)

use std::path::PathBuf;

mod common;

use common::vkv;

/// A path `name` in a scratch directory of its own (kept while the first value lives).
fn scratch(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = common::scratch("generate");
    let path = dir.path().join(name);
    (dir, path)
}

/// A minimal GGUF v3 file: string metadata, and optionally one tensor header + data.
fn gguf(
    metadata: &[(&str, &str)],
    u32_metadata: &[(&str, u32)],
    tensor: Option<(&str, u32, u64, usize)>,
) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensor.is_some() as u64).to_le_bytes());
    b.extend(((metadata.len() + u32_metadata.len()) as u64).to_le_bytes());
    let string = |b: &mut Vec<u8>, s: &str| {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    };
    for (k, v) in metadata {
        string(&mut b, k);
        b.extend(8u32.to_le_bytes());
        string(&mut b, v);
    }
    for (k, v) in u32_metadata {
        string(&mut b, k);
        b.extend(4u32.to_le_bytes());
        b.extend(v.to_le_bytes());
    }
    if let Some((name, dtype, elements, bytes)) = tensor {
        string(&mut b, name);
        b.extend(1u32.to_le_bytes());
        b.extend(elements.to_le_bytes());
        b.extend(dtype.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.extend(vec![0u8; bytes]);
    }
    b
}

fn error_of(model: &std::path::Path) -> String {
    let out = vkv(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hi",
        "--max-tokens",
        "1",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn a_missing_file_is_named() {
    let (_dir, path) = scratch("no-such-model.gguf");
    let err = error_of(&path);
    assert!(
        err.contains("no-such-model.gguf") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn a_file_that_is_not_gguf_says_what_it_found() {
    let (_dir, path) = scratch("not-a-model.gguf");
    std::fs::write(&path, b"PK\x03\x04 this is a zip, not a model").unwrap();
    let err = error_of(&path);
    assert!(
        err.contains("not a GGUF file") || err.contains("magic"),
        "{err}"
    );
}

#[test]
fn an_unsupported_architecture_is_named() {
    let (_dir, path) = scratch("gpt2.gguf");
    std::fs::write(&path, gguf(&[("general.architecture", "gpt2")], &[], None)).unwrap();
    let err = error_of(&path);
    assert!(err.contains("unsupported architecture gpt2"), "{err}");
}

#[test]
fn an_unsupported_quantization_is_named() {
    // A llama whose embedding is Q5_0 (type 6: 32 elements in 22 bytes), which vkv cannot dequantize.
    let (_dir, path) = scratch("q5_0.gguf");
    let meta = [
        ("llama.block_count", 1),
        ("llama.embedding_length", 32),
        ("llama.feed_forward_length", 64),
        ("llama.attention.head_count", 1),
        ("llama.vocab_size", 2),
    ];
    std::fs::write(
        &path,
        gguf(
            &[("general.architecture", "llama")],
            &meta,
            Some(("token_embd.weight", 6, 64, 44)),
        ),
    )
    .unwrap();
    let err = error_of(&path);
    assert!(
        err.contains("Q5_0") && err.contains("token_embd.weight"),
        "{err}"
    );
}
