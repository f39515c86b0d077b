//! Launchers of the model kernels (`kernels/cuda/model.cu`) — row gather, RMSNorm with fused
//! residual add, RoPE fused with the QKV split, SiLU·mul, argmax, seeded bf16 fill — and
//! [`Gemm`], bf16 products through cuBLASLt (or cuBLAS's `cublasGemmEx` for comparison), f32
//! accumulation.
//!
//! Like the attention launchers, these take raw device addresses (the model's buffers are
//! [`DeviceBuffer`](super::DeviceBuffer)s); what the host can check (sizes that fit the grid,
//! zero-sized shapes) is checked and returned as a [`KernelError`], and the launchers are `unsafe`
//! because the pointers and the indices stored on the device are the caller's promise.
//! Everything runs on the stream it is given, in order; nothing here synchronizes.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::cublaslt::sys as lt_sys;
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

/// Which library runs [`Gemm::matmul_t`] (one of the [`crate::RuntimeSwitches`]).
pub use crate::switches::GemmLibrary;

/// bf16 matrix products on one stream, through cuBLASLt (default) or cuBLAS.
///
/// cuBLASLt takes descriptors of the operation and the matrices and an algorithm from its
/// heuristic; building them costs tens of microseconds, so a [`LtPlan`] is made once per shape
/// `(m, n, k, output type)` and kept (a serving process sees a few hundred shapes: every decode
/// batch size and prefill chunk length). The workspace is NVIDIA's recommendation for Hopper,
/// 32 MiB, allocated once.
#[derive(Debug)]
pub struct Gemm {
    blas: CudaBlas,
    lt: LtHandle,
    workspace: super::DeviceBuffer,
    plans: std::sync::Mutex<HashMap<(usize, usize, usize, bool), LtPlan>>,
    stream: Arc<CudaStream>,
    library: GemmLibrary,
}

/// NVIDIA's recommended cuBLASLt workspace on Hopper.
const LT_WORKSPACE: usize = 32 << 20;

/// An owned `cublasLtHandle_t`.
#[derive(Debug)]
struct LtHandle(lt_sys::cublasLtHandle_t);

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: created by `create_handle` and destroyed once.
        let _ = unsafe { cudarc::cublaslt::result::destroy_handle(self.0) };
    }
}

/// Descriptors and the chosen algorithm of one product shape (see [`Gemm`]).
#[derive(Debug)]
struct LtPlan {
    desc: lt_sys::cublasLtMatmulDesc_t,
    a: lt_sys::cublasLtMatrixLayout_t,
    b: lt_sys::cublasLtMatrixLayout_t,
    d: lt_sys::cublasLtMatrixLayout_t,
    algo: lt_sys::cublasLtMatmulAlgo_t,
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        use cudarc::cublaslt::result as lt;
        // SAFETY: each descriptor was created once for this plan and is destroyed once.
        unsafe {
            let _ = lt::destroy_matrix_layout(self.a);
            let _ = lt::destroy_matrix_layout(self.b);
            let _ = lt::destroy_matrix_layout(self.d);
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

// SAFETY: the handle, descriptors and plans are only used under `&self` calls that enqueue on
// the one stream, and the plan map is behind a mutex; cuBLASLt handles may be used from any
// thread (NVIDIA's docs), one call at a time here.
unsafe impl Send for Gemm {}
unsafe impl Sync for Gemm {}

fn blas_error(call: &'static str, detail: impl std::fmt::Debug) -> KernelError {
    KernelError::Driver {
        call,
        detail: format!("{detail:?}"),
    }
}

impl Gemm {
    /// cuBLAS and cuBLASLt handles bound to `stream`, the library from runtime switches ([`crate::RuntimeSwitches::gemm`]);
    /// [`KernelError::NoCuda`] when a library is missing.
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        // SAFETY: probe candidate library names; cudarc's loader panics without these checks.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(KernelError::NoCuda(
                "the cuBLAS library (libcublas.so) was not found".into(),
            ));
        }
        if !unsafe { lt_sys::is_culib_present() } {
            return Err(KernelError::NoCuda(
                "the cuBLASLt library (libcublasLt.so) was not found".into(),
            ));
        }
        let blas = CudaBlas::new(stream.clone()).map_err(|e| blas_error("cublasCreate", e))?;
        let lt = LtHandle(
            cudarc::cublaslt::result::create_handle()
                .map_err(|e| blas_error("cublasLtCreate", e))?,
        );
        let workspace = super::DeviceBuffer::new(stream.context(), LT_WORKSPACE)?;
        Ok(Gemm {
            blas,
            lt,
            workspace,
            plans: Default::default(),
            stream,
            library: crate::RuntimeSwitches::get().gemm,
        })
    }

    /// The library products go through.
    pub fn library(&self) -> GemmLibrary {
        self.library
    }

    /// Route products through `library` from now on.
    pub fn set_library(&mut self, library: GemmLibrary) {
        self.library = library;
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
        match self.library {
            // SAFETY: the caller's promise, passed on.
            GemmLibrary::CublasLt => unsafe { self.matmul_lt(x, w, out, (m, n, k), out_f32) },
            // SAFETY: as above.
            GemmLibrary::Cublas => unsafe { self.matmul_blas(x, w, out, (mi, ni, ki), out_f32) },
        }
    }

    /// [`Gemm::matmul_t`] through cuBLASLt.
    unsafe fn matmul_lt(
        &self,
        x: u64,
        w: u64,
        out: u64,
        (m, n, k): (usize, usize, usize),
        out_f32: bool,
    ) -> Result<()> {
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        let plan = match plans.entry((m, n, k, out_f32)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(m, n, k, out_f32)?),
        };
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: the plan's descriptors describe these pointers' matrices (caller's promise on
        // their sizes); the workspace is ours and as large as the heuristic was told.
        unsafe {
            cudarc::cublaslt::result::matmul(
                self.lt.0,
                plan.desc,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w as *const std::ffi::c_void,
                plan.a,
                x as *const std::ffi::c_void,
                plan.b,
                out as *const std::ffi::c_void,
                plan.d,
                out as *mut std::ffi::c_void,
                plan.d,
                &plan.algo,
                self.workspace.ptr() as *mut std::ffi::c_void,
                LT_WORKSPACE,
                self.stream.cu_stream() as lt_sys::cudaStream_t,
            )
        }
        .map_err(|e| KernelError::Driver {
            call: "cublasLtMatmul",
            detail: format!("{e:?} (m {m}, n {n}, k {k})"),
        })
    }

    /// Descriptors and the heuristic's best algorithm for one shape. Column-major view, as
    /// cuBLAS sees it: outᵀ (n × m) = (w as stored, k × n)ᵀ · (x as stored, k × m).
    fn plan(&self, m: usize, n: usize, k: usize, out_f32: bool) -> Result<LtPlan> {
        use cudarc::cublaslt::result as lt;
        use lt_sys::{cublasComputeType_t, cudaDataType};
        let err = |call| move |e| blas_error(call, format!("{e:?} (m {m}, n {n}, k {k})"));
        let d_type = if out_f32 {
            cudaDataType::CUDA_R_32F
        } else {
            cudaDataType::CUDA_R_16BF
        };
        let (m64, n64, k64) = (m as u64, n as u64, k as u64);
        let desc = lt::create_matmul_desc(
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cudaDataType::CUDA_R_32F,
        )
        .map_err(err("cublasLtMatmulDescCreate"))?;
        // From here the plan owns what it holds: an early return drops (destroys) it.
        let mut plan = LtPlan {
            desc,
            a: std::ptr::null_mut(),
            b: std::ptr::null_mut(),
            d: std::ptr::null_mut(),
            algo: lt_sys::cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        let transpose = blas_sys::cublasOperation_t::CUBLAS_OP_T as i32;
        // SAFETY: `desc` is live; the attribute is an int32 operation code.
        unsafe {
            lt::set_matmul_desc_attribute(
                plan.desc,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                (&transpose as *const i32).cast(),
                std::mem::size_of::<i32>(),
            )
        }
        .map_err(err("cublasLtMatmulDescSetAttribute"))?;
        plan.a = lt::create_matrix_layout(cudaDataType::CUDA_R_16BF, k64, n64, k as i64)
            .map_err(err("cublasLtMatrixLayoutCreate"))?;
        plan.b = lt::create_matrix_layout(cudaDataType::CUDA_R_16BF, k64, m64, k as i64)
            .map_err(err("cublasLtMatrixLayoutCreate"))?;
        plan.d = lt::create_matrix_layout(d_type, n64, m64, n as i64)
            .map_err(err("cublasLtMatrixLayoutCreate"))?;
        let pref = lt::create_matmul_pref().map_err(err("cublasLtMatmulPreferenceCreate"))?;
        let bytes = LT_WORKSPACE as u64;
        // SAFETY: every descriptor is live; `pref` is destroyed once below.
        let heuristic = unsafe {
            let set = lt::set_matmul_pref_attribute(
                pref,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes as *const u64).cast(),
                std::mem::size_of::<u64>(),
            );
            let found = set.and_then(|()| {
                lt::get_matmul_algo_heuristic(self.lt.0, plan.desc, plan.a, plan.b, plan.d, plan.d, pref)
            });
            let _ = lt::destroy_matmul_pref(pref);
            found
        }
        .map_err(err("cublasLtMatmulAlgoGetHeuristic"))?;
        plan.algo = heuristic.algo;
        Ok(plan)
    }

    /// [`Gemm::matmul_t`] through cuBLAS.
    unsafe fn matmul_blas(
        &self,
        x: u64,
        w: u64,
        out: u64,
        (mi, ni, ki): (i32, i32, i32),
        out_f32: bool,
    ) -> Result<()> {
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
            detail: format!("{e:?} (m {mi}, n {ni}, k {ki})"),
        })
    }
}
