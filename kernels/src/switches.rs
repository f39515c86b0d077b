//! [`RuntimeSwitches`]: every run-time switch of the program, resolved once at start.
//!
//! The process environment is read here and nowhere else in library code: the `VKV_*`
//! switches (SIMD level, huge pages, GEMM library, CPU activations), the cache directories and
//! the Python used for the default-model fetch. The first [`RuntimeSwitches::get`] resolves them
//! from the environment (or a caller installs its own with [`RuntimeSwitches::install`] before
//! that); afterwards they never change, so a kernel that asked once may cache the answer. The
//! CLI prints the switches (their `Display`: `key=value` pairs) on its startup line and the server exports it as the
//! `vkv_runtime_info` gauge's labels, so every number can be traced to the switches it ran under.
//!
//! CPU features are detected at run time (the binary is portable; see the crate docs) and the
//! switches can only turn a detected feature off, never on. Test and benchmark knobs (sizes of
//! ignored timing tests, model paths of the GPU tests) go through [`knob`] so that reading the
//! environment stays in this one file.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::cpu::Activations;

/// The BLAS library the CUDA device's matrix products go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmLibrary {
    /// cuBLASLt (`cublasLtMatmul`) with the heuristic's algorithm chosen once per shape.
    CublasLt,
    /// cuBLAS (`cublasGemmEx`, `CUBLAS_GEMM_DEFAULT`): the baseline the benchmarks compare with.
    Cublas,
}

impl GemmLibrary {
    /// The name benchmarks and the startup line print.
    pub fn name(self) -> &'static str {
        match self {
            GemmLibrary::CublasLt => "cublaslt",
            GemmLibrary::Cublas => "cublas",
        }
    }
}

/// The x86-64 instruction-set extensions the CPU kernels may use: detected, then masked by the
/// switches. All false elsewhere than x86-64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuFeatures {
    /// AVX2 and FMA (`VKV_NO_SIMD` turns every extension off).
    pub avx2_fma: bool,
    /// F16C half-precision conversions, with AVX2 and FMA.
    pub f16c: bool,
    /// AVX-512F with AVX2, FMA and F16C, for attention's P·V pass (`VKV_NO_AVX512` says no).
    pub avx512: bool,
    /// AVX-512 VNNI (with F, BW, AVX2, FMA, F16C) for the int8 products (`VKV_NO_VNNI` says no).
    pub avx512_vnni: bool,
}

impl CpuFeatures {
    /// What this CPU has, less what the three switches turn off.
    pub fn detect(no_simd: bool, no_avx512: bool, no_vnni: bool) -> CpuFeatures {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2_fma = !no_simd && has!("avx2") && has!("fma");
            let f16c = avx2_fma && has!("f16c");
            CpuFeatures {
                avx2_fma,
                f16c,
                avx512: f16c && !no_avx512 && has!("avx512f"),
                avx512_vnni: f16c
                    && !no_vnni
                    && has!("avx512f")
                    && has!("avx512bw")
                    && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (no_simd, no_avx512, no_vnni);
            CpuFeatures::default()
        }
    }

    /// The widest level in use, as the startup line names it.
    pub fn level(&self) -> &'static str {
        match (self.avx2_fma, self.avx512, self.avx512_vnni) {
            (false, ..) => "portable",
            (true, true, true) => "avx512+vnni",
            (true, true, false) => "avx512",
            (true, false, true) => "avx2+vnni",
            (true, false, false) => "avx2",
        }
    }
}

/// Every run-time switch, resolved once (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSwitches {
    /// CPU extensions the kernels may use.
    pub cpu: CpuFeatures,
    /// Whether large host buffers (packed weights, KV pools, host vmm memory) are advised for
    /// transparent huge pages (`VKV_NO_HUGE_PAGES` says no).
    pub huge_pages: bool,
    /// The CUDA device's GEMM library (`VKV_GEMM=cublas`; cuBLASLt otherwise).
    pub gemm: GemmLibrary,
    /// The CPU model's activation precision when asked for (`VKV_CPU_ACTIVATIONS=f32|int8`);
    /// `None` leaves the model's default.
    pub cpu_activations: Option<Activations>,
    /// vkv's cache directory: `$VKV_CACHE_DIR`, else `$XDG_CACHE_HOME/vkv`, else
    /// `$HOME/.cache/vkv`; `None` when none is known.
    pub cache_dir: Option<PathBuf>,
    /// The NVRTC cubin cache: `$VKV_KERNEL_CACHE`, else `$XDG_CACHE_HOME/vkv/kernels`, else
    /// `$HOME/.cache/vkv/kernels`.
    pub kernel_cache_dir: Option<PathBuf>,
    /// The Python whose pip fetches the default model (`VKV_PYTHON`, else `python3`).
    pub python: String,
}

static SWITCHES: OnceLock<RuntimeSwitches> = OnceLock::new();

/// [`RuntimeSwitches::install`] came after the switches were already resolved.
#[derive(Debug, thiserror::Error)]
#[error("runtime switches were already resolved ({0}); install them before the first use")]
pub struct AlreadyResolved(String);

impl RuntimeSwitches {
    /// The process's switches, resolved from the environment on the first call.
    pub fn get() -> &'static RuntimeSwitches {
        SWITCHES.get_or_init(RuntimeSwitches::from_env)
    }

    /// Makes `switches` the process's, if nothing has asked for them yet.
    pub fn install(switches: RuntimeSwitches) -> Result<(), AlreadyResolved> {
        SWITCHES
            .set(switches)
            .map_err(|_| AlreadyResolved(RuntimeSwitches::get().to_string()))
    }

    /// The switches as this process's environment sets them.
    pub fn from_env() -> RuntimeSwitches {
        RuntimeSwitches::resolve(|name| std::env::var_os(name))
    }

    /// The switches as `var` (an environment: name → value) sets them. Empty values count as
    /// unset for paths and names; any value (even empty) sets a `VKV_NO_*` switch.
    pub fn resolve(var: impl Fn(&str) -> Option<OsString>) -> RuntimeSwitches {
        let is_set = |name: &str| var(name).is_some();
        let text = |name: &str| {
            var(name)
                .filter(|v| !v.is_empty())
                .map(|v| v.to_string_lossy().into_owned())
        };
        let path = |name: &str| var(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let xdg_or_home = || {
            path("XDG_CACHE_HOME")
                .map(|d| d.join("vkv"))
                .or_else(|| path("HOME").map(|h| h.join(".cache").join("vkv")))
        };
        RuntimeSwitches {
            cpu: CpuFeatures::detect(
                is_set("VKV_NO_SIMD"),
                is_set("VKV_NO_AVX512"),
                is_set("VKV_NO_VNNI"),
            ),
            huge_pages: !is_set("VKV_NO_HUGE_PAGES"),
            gemm: match text("VKV_GEMM").as_deref() {
                Some("cublas") => GemmLibrary::Cublas,
                _ => GemmLibrary::CublasLt,
            },
            cpu_activations: match text("VKV_CPU_ACTIVATIONS").as_deref() {
                Some("f32") => Some(Activations::F32),
                Some("int8") => Some(Activations::Int8),
                _ => None,
            },
            cache_dir: path("VKV_CACHE_DIR").or_else(xdg_or_home),
            kernel_cache_dir: path("VKV_KERNEL_CACHE")
                .or_else(|| xdg_or_home().map(|d| d.join("kernels"))),
            python: text("VKV_PYTHON").unwrap_or_else(|| "python3".to_string()),
        }
    }

    /// The switches as `(key, value)` pairs, for labels.
    pub fn pairs(&self) -> Vec<(&'static str, String)> {
        vec![
            ("simd", self.cpu.level().to_string()),
            ("huge_pages", on_off(self.huge_pages).to_string()),
            ("gemm", self.gemm.name().to_string()),
            (
                "cpu_activations",
                match self.cpu_activations {
                    None => "default".to_string(),
                    Some(Activations::F32) => "f32".to_string(),
                    Some(Activations::Int8) => "int8".to_string(),
                },
            ),
        ]
    }
}

/// One line of `key=value` pairs: the startup line's account of the switches.
impl fmt::Display for RuntimeSwitches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pairs: Vec<String> = self
            .pairs()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        f.write_str(&pairs.join(" "))
    }
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// A numeric knob of a test or benchmark (`name` in the environment), else `default`. Product
/// code takes its switches from [`RuntimeSwitches`], never from here.
pub fn knob<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A path or text knob of a test (`name` in the environment, non-empty), if set.
pub fn knob_text(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn an_empty_environment_gives_the_defaults() {
        let s = RuntimeSwitches::resolve(env(&[]));
        assert!(s.huge_pages);
        assert_eq!(s.gemm, GemmLibrary::CublasLt);
        assert_eq!(s.cpu_activations, None);
        assert_eq!(s.cache_dir, None);
        assert_eq!(s.kernel_cache_dir, None);
        assert_eq!(s.python, "python3");
        assert_eq!(s.cpu, CpuFeatures::detect(false, false, false));
    }

    #[test]
    fn each_switch_is_read() {
        let s = RuntimeSwitches::resolve(env(&[
            ("VKV_NO_SIMD", ""),
            ("VKV_NO_HUGE_PAGES", "1"),
            ("VKV_GEMM", "cublas"),
            ("VKV_CPU_ACTIVATIONS", "f32"),
            ("VKV_PYTHON", "/opt/py/bin/python3"),
            ("HOME", "/home/u"),
        ]));
        assert_eq!(
            s.cpu,
            CpuFeatures::default(),
            "VKV_NO_SIMD turns every extension off"
        );
        assert_eq!(s.cpu.level(), "portable");
        assert!(!s.huge_pages);
        assert_eq!(s.gemm, GemmLibrary::Cublas);
        assert_eq!(s.cpu_activations, Some(Activations::F32));
        assert_eq!(s.python, "/opt/py/bin/python3");
        assert_eq!(s.cache_dir, Some(PathBuf::from("/home/u/.cache/vkv")));
        assert_eq!(
            s.kernel_cache_dir,
            Some(PathBuf::from("/home/u/.cache/vkv/kernels"))
        );
        assert_eq!(
            s.to_string(),
            "simd=portable huge_pages=off gemm=cublas cpu_activations=f32"
        );
    }

    #[test]
    fn cache_directories_prefer_the_specific_variable_then_xdg_then_home() {
        let s = RuntimeSwitches::resolve(env(&[
            ("VKV_CACHE_DIR", "/c"),
            ("XDG_CACHE_HOME", "/x"),
            ("HOME", "/h"),
        ]));
        assert_eq!(s.cache_dir, Some(PathBuf::from("/c")));
        assert_eq!(s.kernel_cache_dir, Some(PathBuf::from("/x/vkv/kernels")));
        let s = RuntimeSwitches::resolve(env(&[
            ("VKV_CACHE_DIR", ""),
            ("VKV_KERNEL_CACHE", "/k"),
            ("XDG_CACHE_HOME", "/x"),
        ]));
        assert_eq!(
            s.cache_dir,
            Some(PathBuf::from("/x/vkv")),
            "empty counts as unset"
        );
        assert_eq!(s.kernel_cache_dir, Some(PathBuf::from("/k")));
    }

    #[test]
    fn switches_only_turn_features_off() {
        let all = CpuFeatures::detect(false, false, false);
        let no_avx512 = CpuFeatures::detect(false, true, false);
        assert!(!no_avx512.avx512);
        assert_eq!(no_avx512.avx512_vnni, all.avx512_vnni);
        let no_vnni = CpuFeatures::detect(false, false, true);
        assert!(!no_vnni.avx512_vnni);
        assert_eq!(no_vnni.avx512, all.avx512);
        assert!(!all.f16c || all.avx2_fma);
    }

    #[test]
    fn unknown_values_keep_the_defaults() {
        let s =
            RuntimeSwitches::resolve(env(&[("VKV_GEMM", "mkl"), ("VKV_CPU_ACTIVATIONS", "fp4")]));
        assert_eq!(s.gemm, GemmLibrary::CublasLt);
        assert_eq!(s.cpu_activations, None);
    }
}
