//! The error type of the CUDA side of the kernels crate. Every failure a caller can provoke — no
//! driver or NVRTC library, a compile error (with NVRTC's log), a shape a kernel does not support,
//! a misaligned pointer or stride, a driver call that fails — is a variant; nothing panics.

/// Errors of the CUDA kernels; each says what was expected and what was found.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// No usable CUDA driver, device or NVRTC library here.
    #[error("CUDA is not available: {0}")]
    NoCuda(String),
    /// NVRTC rejected a source; `log` is NVRTC's program log.
    #[error("NVRTC could not compile {name} for {arch} (options {options:?}):\n{log}")]
    Compile {
        name: String,
        arch: String,
        options: Vec<String>,
        log: String,
    },
    /// A driver or NVRTC call failed.
    #[error("{call} failed: {detail}")]
    Driver { call: &'static str, detail: String },
    /// A shape, size or option the kernels do not support.
    #[error("unsupported shape: {0}")]
    Shape(String),
    /// A pointer or stride that breaks the kernels' 16-byte access rule.
    #[error("misaligned {what}: {value:#x} is not a multiple of {align}")]
    Misaligned {
        what: &'static str,
        value: u64,
        align: u64,
    },
    /// A workspace or buffer smaller than the launch needs.
    #[error("{what} too small: {needed} needed, {available} available")]
    TooSmall {
        what: &'static str,
        needed: usize,
        available: usize,
    },
}

/// Results of the CUDA kernels.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

/// Map a failed driver call to [`KernelError::Driver`] naming `call` (for `map_err`).
pub fn driver(call: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> KernelError {
    move |e| KernelError::Driver {
        call,
        detail: e.to_string(),
    }
}
