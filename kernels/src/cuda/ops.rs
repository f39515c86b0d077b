//! Launchers of the model kernels (`kernels/cuda/model.cu`) — row gather, RMSNorm with fused
//! residual add, RoPE fused with the QKV split, SiLU·mul, argmax, seeded bf16 fill — and
//! [`Gemm`], bf16 products through cuBLAS (`cublasGemmEx`, f32 accumulation).
//!
//! Like the attention launchers, these take raw device addresses (the model's buffers are
//! [`DeviceBuffer`](super::DeviceBuffer)s); what the host can check (sizes that fit the grid,
//! zero-sized shapes) is checked and returned as a [`KernelError`], and the launchers are `unsafe`
//! because the pointers and the indices stored on the device are the caller's promise.
//! Everything runs on the stream it is given, in order; nothing here synchronizes.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::compile::{compile_module, CacheOutcome};
use super::error::{driver, KernelError, Result};

/// The CUDA source of the model kernels.
pub const MODEL_SOURCE: &str = include_str!("../../cuda/model.cu");

const NAMES: [&str; 6] = [
    "gather_rows",
    "add_rms_norm",
    "rope_split",
    "silu_mul",
    "argmax_rows",
    "fill_bf16",
];

/// The loaded model kernels.
#[derive(Debug)]
pub struct ModelOps {
    functions: HashMap<&'static str, CudaFunction>,
    sms: u32,
    /// Whether the module came from the disk cache.
    pub outcome: CacheOutcome,
}

fn rows_u32(rows: usize) -> Result<u32> {
    if rows == 0 || rows > i32::MAX as usize {
        return Err(KernelError::Shape(format!(
            "{rows} rows: must be 1 ..= {}",
            i32::MAX
        )));
    }
    Ok(rows as u32)
}

fn dim_u32(what: &str, d: usize) -> Result<u32> {
    u32::try_from(d)
        .ok()
        .filter(|&d| d > 0)
        .ok_or_else(|| KernelError::Shape(format!("{what} {d}: must be 1 ..= {}", u32::MAX)))
}

fn cfg(grid: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl ModelOps {
    /// Compile (or load from the cache) and load the module for `ctx`'s device.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        let compiled = compile_module(ctx, "model", MODEL_SOURCE, &[])?;
        let mut functions = HashMap::new();
        for n in NAMES {
            let f = compiled
                .module
                .load_function(n)
                .map_err(driver("cuModuleGetFunction"))?;
            functions.insert(n, f);
        }
        let sms = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(driver("cuDeviceGetAttribute(multiprocessors)"))?
            .max(1) as u32;
        Ok(ModelOps {
            functions,
            sms,
            outcome: compiled.outcome,
        })
    }

    fn f(&self, name: &'static str) -> &CudaFunction {
        // Every name in NAMES was loaded by `new`.
        &self.functions[name]
    }

    /// `out[r] = table[idx[r]]` for `rows` rows of `dim` bf16 elements (`table` has `n_rows`);
    /// `out` is f32 when `out_f32`, else bf16. An index past the table writes NaN.
    ///
    /// # Safety
    /// `table`, `idx` (`u32[rows]`) and `out` must be live device allocations of those sizes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gather_rows(
        &self,
        stream: &CudaStream,
        table: u64,
        idx: u64,
        out: u64,
        rows: usize,
        dim: usize,
        n_rows: usize,
        out_f32: bool,
    ) -> Result<()> {
        let (rows, dim, n_rows) = (
            rows_u32(rows)?,
            dim_u32("dim", dim)?,
            dim_u32("table rows", n_rows)?,
        );
        let flag = u32::from(out_f32);
        let mut l = stream.launch_builder(self.f("gather_rows"));
        l.arg(&table)
            .arg(&idx)
            .arg(&out)
            .arg(&rows)
            .arg(&dim)
            .arg(&n_rows)
            .arg(&flag);
        unsafe { l.launch(cfg(rows, 256)) }.map_err(driver("cuLaunchKernel(gather_rows)"))?;
        Ok(())
    }

    /// Per row: `x += delta` (bf16; `delta = 0` skips the add), then `out = bf16(rmsnorm(x) · w)`.
    /// `x` is f32 `[rows][dim]`, `w` f32 `[dim]`.
    ///
    /// # Safety
    /// The pointers must be live device allocations of those sizes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn add_rms_norm(
        &self,
        stream: &CudaStream,
        x: u64,
        delta: u64,
        w: u64,
        out: u64,
        rows: usize,
        dim: usize,
        eps: f32,
    ) -> Result<()> {
        let (rows, dim) = (rows_u32(rows)?, dim_u32("dim", dim)?);
        let mut l = stream.launch_builder(self.f("add_rms_norm"));
        l.arg(&x).arg(&delta).arg(&w).arg(&out).arg(&dim).arg(&eps);
        unsafe { l.launch(cfg(rows, 256)) }.map_err(driver("cuLaunchKernel(add_rms_norm)"))?;
        Ok(())
    }

    /// Split the fused projection `qkv` (`[rows][(nh + 2·nkv)·hd]` bf16) into `q`
    /// (`[rows][nh][hd]`), `k` and `v` (`[rows][nkv][hd]`), rotating q and k by `pos[r]` with
    /// `inv_freq` (f32 `[hd/2]`); `half_split` picks HF's (i, i + hd/2) pairs over (2i, 2i+1).
    ///
    /// # Safety
    /// The pointers must be live device allocations of those sizes (`pos` is `u32[rows]`).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rope_split(
        &self,
        stream: &CudaStream,
        qkv: u64,
        q: u64,
        k: u64,
        v: u64,
        pos: u64,
        inv_freq: u64,
        rows: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
        half_split: bool,
    ) -> Result<()> {
        if !hd.is_multiple_of(2) {
            return Err(KernelError::Shape(format!("head dim {hd} is odd")));
        }
        let rows = rows_u32(rows)?;
        let (nh, nkv, hd) = (
            dim_u32("heads", nh)?,
            dim_u32("KV heads", nkv)?,
            dim_u32("head dim", hd)?,
        );
        let style = u32::from(half_split);
        let mut l = stream.launch_builder(self.f("rope_split"));
        l.arg(&qkv)
            .arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&pos)
            .arg(&inv_freq)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd)
            .arg(&style);
        unsafe { l.launch(cfg(rows, 256)) }.map_err(driver("cuLaunchKernel(rope_split)"))?;
        Ok(())
    }

    /// `out[r][j] = silu(gu[r][j]) · gu[r][inter + j]` (bf16).
    ///
    /// # Safety
    /// `gu` is `[rows][2·inter]`, `out` `[rows][inter]`, both live.
    pub unsafe fn silu_mul(
        &self,
        stream: &CudaStream,
        gu: u64,
        out: u64,
        rows: usize,
        inter: usize,
    ) -> Result<()> {
        let (r, i) = (rows_u32(rows)?, dim_u32("intermediate size", inter)?);
        let grid = ((rows as u64 * inter as u64).div_ceil(256)).clamp(1, 16 * self.sms as u64);
        let mut l = stream.launch_builder(self.f("silu_mul"));
        l.arg(&gu).arg(&out).arg(&r).arg(&i);
        unsafe { l.launch(cfg(grid as u32, 256)) }.map_err(driver("cuLaunchKernel(silu_mul)"))?;
        Ok(())
    }

    /// `out[r]` = index of the largest of f32 `logits[r][0..n]` (lowest index on ties).
    ///
    /// # Safety
    /// `logits` is `[rows][n]` f32, `out` `u32[rows]`, both live.
    pub unsafe fn argmax_rows(
        &self,
        stream: &CudaStream,
        logits: u64,
        out: u64,
        rows: usize,
        n: usize,
    ) -> Result<()> {
        let (rows, n) = (rows_u32(rows)?, dim_u32("vocabulary", n)?);
        let mut l = stream.launch_builder(self.f("argmax_rows"));
        l.arg(&logits).arg(&out).arg(&n);
        unsafe { l.launch(cfg(rows, 1024)) }.map_err(driver("cuLaunchKernel(argmax_rows)"))?;
        Ok(())
    }

    /// Fill `n` bf16 values uniform in `[-scale, scale)`, hashed from `(seed, index)`.
    ///
    /// # Safety
    /// `ptr` must hold `n` bf16 values.
    pub unsafe fn fill_bf16(
        &self,
        stream: &CudaStream,
        ptr: u64,
        n: usize,
        seed: u64,
        scale: f32,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let n = n as u64;
        let grid = n.div_ceil(256).clamp(1, 64 * self.sms as u64) as u32;
        let mut l = stream.launch_builder(self.f("fill_bf16"));
        l.arg(&ptr).arg(&n).arg(&seed).arg(&scale);
        unsafe { l.launch(cfg(grid, 256)) }.map_err(driver("cuLaunchKernel(fill_bf16)"))?;
        Ok(())
    }
}

/// bf16 matrix products through cuBLAS on one stream.
#[derive(Debug)]
pub struct Gemm {
    blas: CudaBlas,
}

impl Gemm {
    /// A cuBLAS handle bound to `stream`; [`KernelError::NoCuda`] when libcublas is missing.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        // SAFETY: probes candidate library names; cudarc's loader panics without this check.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(KernelError::NoCuda(
                "the cuBLAS library (libcublas.so) was not found".into(),
            ));
        }
        let blas = CudaBlas::new(stream).map_err(|e| KernelError::Driver {
            call: "cublasCreate",
            detail: format!("{e:?}"),
        })?;
        Ok(Gemm { blas })
    }

    /// `out[m][n] = x[m][k] · w[n][k]ᵀ`, row-major: `x` and `w` bf16, `out` f32 when `out_f32`
    /// else bf16; f32 accumulation.
    ///
    /// # Safety
    /// The pointers must be live device allocations of those sizes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul_t(
        &self,
        x: u64,
        w: u64,
        out: u64,
        m: usize,
        n: usize,
        k: usize,
        out_f32: bool,
    ) -> Result<()> {
        let int = |what: &str, v: usize| {
            i32::try_from(v)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| KernelError::Shape(format!("GEMM {what} = {v}")))
        };
        let (mi, ni, ki) = (int("m", m)?, int("n", n)?, int("k", k)?);
        let (alpha, beta) = (1f32, 0f32);
        use blas_sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
        let c_type = if out_f32 {
            cudaDataType::CUDA_R_32F
        } else {
            cudaDataType::CUDA_R_16BF
        };
        // Column-major view: outᵀ (n × m) = wᵀ-as-stored (k × n)ᵀ · xᵀ-as-stored (k × m).
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                ni,
                mi,
                ki,
                (&alpha as *const f32).cast(),
                w as *const std::ffi::c_void,
                cudaDataType::CUDA_R_16BF,
                ki,
                x as *const std::ffi::c_void,
                cudaDataType::CUDA_R_16BF,
                ki,
                (&beta as *const f32).cast(),
                out as *mut std::ffi::c_void,
                c_type,
                ni,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Driver {
            call: "cublasGemmEx",
            detail: format!("{e:?} (m {m}, n {n}, k {k})"),
        })
    }
}
