//! Run-time compilation of the CUDA sources with NVRTC, for the device's own architecture, with an
//! on-disk cache.
//!
//! Sources live in `kernels/cuda/*.cu` and are embedded in the binary (`include_str!`), so the
//! workspace builds without nvcc or any CUDA installation; NVRTC (`libnvrtc.so`) is loaded at run
//! time through cudarc's dynamic loading, after checking that the library is there (cudarc's loader
//! panics when it is missing).
//!
//! The target is the device's real architecture: `sm_90a` on Hopper (compute capability 9.0, so
//! that wgmma / setmaxnreg are available), `sm_XY` elsewhere. NVRTC emits a cubin (no PTX JIT at
//! load). Compiling all attention variants takes seconds, so each cubin is cached on disk under
//! `$VKV_KERNEL_CACHE`, else `$XDG_CACHE_HOME/vkv/kernels`, else `~/.cache/vkv/kernels`, named by
//! the SHA-256 of (source, options, architecture, NVRTC version): any change to one of them is a
//! new file, so the cache never needs invalidating. Writes go to a temporary file renamed into
//! place (atomic), and a cache that cannot be read or written only costs a recompile.

use std::ffi::{c_char, c_int, CString};
use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};
use sha2::{Digest, Sha256};

use super::error::{driver, KernelError, Result};

/// Where a module came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Compiled by NVRTC now (and stored, if the cache is writable).
    Compiled,
    /// Read from the on-disk cache.
    Hit,
}

/// A loaded module and how it was obtained.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub module: Arc<CudaModule>,
    pub arch: String,
    pub outcome: CacheOutcome,
    pub cache_file: Option<PathBuf>,
}

/// The NVRTC library's version, `(major, minor)`; fails cleanly when the library is missing.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    // SAFETY: probes candidate library names with libloading; loads nothing permanently.
    if !unsafe { nvrtc_sys::is_culib_present() } {
        return Err(KernelError::NoCuda(
            "the NVRTC library (libnvrtc.so) was not found; put the CUDA toolkit's lib64 on LD_LIBRARY_PATH".into(),
        ));
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: valid out-pointers; the library is present.
    let rc = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    rc.result().map_err(|e| KernelError::Driver {
        call: "nvrtcVersion",
        detail: format!("{e:?}"),
    })?;
    Ok((major, minor))
}

/// The NVRTC architecture name for a compute capability: `sm_90a` for 9.0 (Hopper's
/// architecture-specific features), `sm_MN` otherwise.
pub fn arch_for(major: i32, minor: i32) -> String {
    if (major, minor) == (9, 0) {
        "sm_90a".to_string()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// The cache directory (see the module docs); `None` when no home is known.
pub fn cache_dir() -> Option<PathBuf> {
    crate::RuntimeSwitches::get().kernel_cache_dir.clone()
}

/// The cache key: SHA-256 over source, options, architecture and NVRTC version, hex.
pub fn cache_key(source: &str, options: &[String], arch: &str, nvrtc: (i32, i32)) -> String {
    let mut h = Sha256::new();
    for part in [source.as_bytes(), arch.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    for o in options {
        h.update((o.len() as u64).to_le_bytes());
        h.update(o.as_bytes());
    }
    h.update(nvrtc.0.to_le_bytes());
    h.update(nvrtc.1.to_le_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Compile `source` (named `name` in logs) for `ctx`'s device, or take it from the cache
/// ([`cache_dir`]), and load it.
pub fn compile_module(
    ctx: &Arc<CudaContext>,
    name: &str,
    source: &str,
    extra_options: &[&str],
) -> Result<Compiled> {
    compile_module_in(ctx, name, source, extra_options, cache_dir())
}

/// [`compile_module`] with an explicit cache directory (`None`: no cache).
pub fn compile_module_in(
    ctx: &Arc<CudaContext>,
    name: &str,
    source: &str,
    extra_options: &[&str],
    cache: Option<PathBuf>,
) -> Result<Compiled> {
    let version = nvrtc_version()?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(driver("cuDeviceGetAttribute(compute capability)"))?;
    let arch = arch_for(major, minor);
    let mut options = vec!["--std=c++17".to_string(), format!("-arch={arch}")];
    options.extend(extra_options.iter().map(|s| s.to_string()));
    let file = cache.map(|d| {
        d.join(format!(
            "{name}-{}.cubin",
            &cache_key(source, &options, &arch, version)[..32]
        ))
    });
    if let Some(f) = &file {
        if let Ok(bytes) = std::fs::read(f) {
            if let Ok(module) = ctx.load_module(Ptx::from_binary(bytes)) {
                return Ok(Compiled {
                    module,
                    arch,
                    outcome: CacheOutcome::Hit,
                    cache_file: file,
                });
            }
        }
    }
    let cubin = compile_cubin(name, source, &options, &arch)?;
    if let Some(f) = &file {
        store(f, &cubin);
    }
    let module = ctx
        .load_module(Ptx::from_binary(cubin))
        .map_err(driver("cuModuleLoadData"))?;
    Ok(Compiled {
        module,
        arch,
        outcome: CacheOutcome::Compiled,
        cache_file: file,
    })
}

/// Best-effort atomic write: a temporary file in the same directory, renamed.
fn store(file: &std::path::Path, bytes: &[u8]) {
    let Some(dir) = file.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file.file_name().and_then(|n| n.to_str()).unwrap_or("cubin"),
        std::process::id()
    ));
    if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, file).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

fn nvrtc_err(call: &'static str) -> impl Fn(nvrtc::NvrtcError) -> KernelError {
    move |e| KernelError::Driver {
        call,
        detail: format!("{e:?}"),
    }
}

/// NVRTC to a cubin for `arch` (which `options` must name, as `-arch=...`); no device needed. A
/// compile failure returns [`KernelError::Compile`] with the program log.
pub fn compile_cubin(name: &str, source: &str, options: &[String], arch: &str) -> Result<Vec<u8>> {
    nvrtc_version()?;
    let shape = |what: &str| KernelError::Shape(format!("{what} contains a NUL byte"));
    let src = CString::new(source).map_err(|_| shape("kernel source"))?;
    let cname = CString::new(name).map_err(|_| shape("kernel name"))?;
    let prog =
        nvrtc::create_program(&src, Some(&cname)).map_err(nvrtc_err("nvrtcCreateProgram"))?;
    struct Guard(nvrtc_sys::nvrtcProgram);
    impl Drop for Guard {
        fn drop(&mut self) {
            // SAFETY: the program was created above and is destroyed once.
            let _ = unsafe { nvrtc::destroy_program(self.0) };
        }
    }
    let guard = Guard(prog);
    // SAFETY: `prog` is a live program; options are plain strings.
    let compiled = unsafe { nvrtc::compile_program(guard.0, options) };
    if let Err(e) = compiled {
        // SAFETY: as above.
        let log = unsafe { nvrtc::get_program_log(guard.0) }
            .map(|raw| c_chars_to_string(&raw))
            .unwrap_or_else(|_| format!("(no log: {e:?})"));
        return Err(KernelError::Compile {
            name: name.to_string(),
            arch: arch.to_string(),
            options: options.to_vec(),
            log,
        });
    }
    let mut size = 0usize;
    // SAFETY: live program, valid out-pointer.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(guard.0, &mut size) }
        .result()
        .map_err(nvrtc_err("nvrtcGetCUBINSize"))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: the buffer holds `size` bytes, as NVRTC asked.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(guard.0, cubin.as_mut_ptr() as *mut c_char) }
        .result()
        .map_err(nvrtc_err("nvrtcGetCUBIN"))?;
    if cubin.is_empty() {
        return Err(KernelError::Driver {
            call: "nvrtcGetCUBIN",
            detail: format!("empty cubin (is {arch} a real architecture?)"),
        });
    }
    Ok(cubin)
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_key_changes_with_each_input() {
        let o = vec!["-arch=sm_90a".to_string()];
        let base = cache_key("src", &o, "sm_90a", (13, 0));
        assert_eq!(base.len(), 64);
        assert_eq!(base, cache_key("src", &o, "sm_90a", (13, 0)));
        assert_ne!(base, cache_key("src2", &o, "sm_90a", (13, 0)));
        assert_ne!(base, cache_key("src", &[], "sm_90a", (13, 0)));
        assert_ne!(base, cache_key("src", &o, "sm_80", (13, 0)));
        assert_ne!(base, cache_key("src", &o, "sm_90a", (13, 1)));
        // Concatenation ambiguity: lengths are hashed too.
        assert_ne!(
            cache_key("ab", &[], "c", (1, 0)),
            cache_key("a", &[], "bc", (1, 0))
        );
    }

    /// Runs where NVRTC is installed (no GPU needed); skips with a note elsewhere.
    #[test]
    fn nvrtc_builds_the_attention_source_and_reports_errors_with_the_log() {
        if let Err(e) = nvrtc_version() {
            eprintln!("skipped: {e}");
            return;
        }
        let opts = vec!["--std=c++17".to_string(), "-arch=sm_90a".to_string()];
        let cubin = compile_cubin(
            "attention",
            super::super::attention::ATTENTION_SOURCE,
            &opts,
            "sm_90a",
        )
        .expect("the attention kernels compile");
        assert!(cubin.len() > 1000 && &cubin[..4] == b"\x7fELF");
        let bad = "extern \"C\" __global__ void k(int* p) { p[0] = undeclared_name; }";
        match compile_cubin("bad", bad, &opts, "sm_90a") {
            Err(KernelError::Compile { log, name, .. }) => {
                assert_eq!(name, "bad");
                assert!(log.contains("undeclared_name"), "{log}");
            }
            other => panic!("expected a compile error, got {other:?}"),
        }
    }

    #[test]
    fn hopper_gets_the_architecture_specific_target() {
        assert_eq!(arch_for(9, 0), "sm_90a");
        assert_eq!(arch_for(8, 0), "sm_80");
        assert_eq!(arch_for(8, 9), "sm_89");
    }
}
