//! The CUDA side of the kernels crate: NVRTC compilation with an on-disk cache ([`compile`]),
//! plain device buffers ([`buffer`]), the attention launchers ([`attention`]) and the model's other
//! kernels plus cuBLAS GEMMs ([`ops`]).
//!
//! CUDA is reached through cudarc with dynamic loading: nothing CUDA is needed to build, and
//! [`open_device`] checks for the driver library before cudarc's loader (which panics when it is
//! missing) is touched, so a machine without a GPU gets [`KernelError::NoCuda`].

pub mod attention;
pub mod buffer;
pub mod compile;
mod error;
pub mod ops;

use std::sync::Arc;

pub use attention::{
    AppendArgs, Attention, DecodeArgs, DecodePlan, DecodeShape, DecodeWorkspace, Dtype, KvAddress,
    PrefillArgs, PrefillShape,
};
pub use buffer::DeviceBuffer;
pub use compile::{compile_cubin, compile_module, compile_module_in, CacheOutcome, Compiled};
/// cudarc, as this crate uses it.
pub use cudarc;
pub use error::{driver, KernelError, Result};
pub use ops::{Gemm, GemmLibrary, ModelOps};

/// The primary context of device `ordinal`, or [`KernelError::NoCuda`] (never a panic) when there
/// is no driver or device.
pub fn open_device(ordinal: usize) -> Result<Arc<cudarc::driver::CudaContext>> {
    // SAFETY: probes candidate library names with libloading; loads nothing permanently.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(KernelError::NoCuda(
            "the CUDA driver library (libcuda.so) was not found".into(),
        ));
    }
    cudarc::driver::CudaContext::new(ordinal).map_err(|e| KernelError::NoCuda(e.to_string()))
}
