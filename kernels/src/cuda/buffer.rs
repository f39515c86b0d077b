//! `DeviceBuffer`: a plain device allocation (`cuMemAlloc`) addressed by raw pointer.
//!
//! The attention launchers take raw device addresses because the KV cache they read may be a
//! `CudaVmm` reservation (vkv-vmm), a pool of blocks, or an ordinary tensor; this type owns the
//! ordinary allocations (queries, outputs, block tables, workspaces) of launchers, tests and
//! benchmarks. Copies are checked; `upload`/`download` are synchronous (ordered with the legacy
//! default stream only), `upload_on` is ordered on a given stream; the memory is freed on drop.

use std::sync::Arc;

use cudarc::driver::{result, CudaContext, CudaStream, DeviceRepr};

use super::error::{driver, KernelError, Result};

/// An owned device allocation of `bytes` bytes.
#[derive(Debug)]
pub struct DeviceBuffer {
    ctx: Arc<CudaContext>,
    ptr: u64,
    bytes: usize,
}

impl DeviceBuffer {
    /// Allocate `bytes` (at least 1) bytes; the contents are undefined.
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread().map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: the context is current; the pointer is owned by the returned value.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(driver("cuMemAlloc"))?;
        Ok(DeviceBuffer {
            ctx: ctx.clone(),
            ptr,
            bytes,
        })
    }

    /// Allocate and copy `data` in.
    pub fn from_slice<T: DeviceRepr>(ctx: &Arc<CudaContext>, data: &[T]) -> Result<Self> {
        let b = DeviceBuffer::new(ctx, std::mem::size_of_val(data))?;
        b.upload(0, data)?;
        Ok(b)
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn check(&self, offset: usize, bytes: usize) -> Result<()> {
        if offset.checked_add(bytes).is_none_or(|end| end > self.bytes) {
            return Err(KernelError::TooSmall {
                what: "device buffer",
                needed: offset.saturating_add(bytes),
                available: self.bytes,
            });
        }
        Ok(())
    }

    /// Copy `data` to byte `offset` (synchronous).
    pub fn upload<T: DeviceRepr>(&self, offset: usize, data: &[T]) -> Result<()> {
        self.check(offset, std::mem::size_of_val(data))?;
        self.ctx
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: the destination range is inside this allocation (checked).
        unsafe { result::memcpy_htod_sync(self.ptr + offset as u64, data) }
            .map_err(driver("cuMemcpyHtoD"))
    }

    /// Copy `data` to byte `offset`, ordered on `stream` (`cuMemcpyHtoDAsync`): the host data is
    /// staged before this returns (pageable memory), so `data` may be dropped at once; the copy
    /// lands before the stream's later work and after its earlier work.
    pub fn upload_on<T: DeviceRepr>(
        &self,
        stream: &CudaStream,
        offset: usize,
        data: &[T],
    ) -> Result<()> {
        self.check(offset, std::mem::size_of_val(data))?;
        self.ctx
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: the destination range is inside this allocation (checked); pageable host data
        // is staged by the driver before the call returns.
        unsafe { result::memcpy_htod_async(self.ptr + offset as u64, data, stream.cu_stream()) }
            .map_err(driver("cuMemcpyHtoDAsync"))
    }

    /// Copy from byte `offset` into `out` (synchronous).
    pub fn download<T: DeviceRepr>(&self, offset: usize, out: &mut [T]) -> Result<()> {
        self.check(offset, std::mem::size_of_val(out))?;
        self.ctx
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: the source range is inside this allocation (checked).
        unsafe { result::memcpy_dtoh_sync(out, self.ptr + offset as u64) }
            .map_err(driver("cuMemcpyDtoH"))
    }

    /// Copy `bytes` bytes from byte `src` to byte `dst` of this allocation (ranges must not
    /// overlap). Synchronous: the context is synchronized after the copy, so it is complete —
    /// and ordered after every stream's earlier work — when this returns (a device-to-device
    /// `cuMemcpyDtoD` alone does not wait for the host or for other streams).
    pub fn copy_within(&self, src: usize, dst: usize, bytes: usize) -> Result<()> {
        self.check(src, bytes)?;
        self.check(dst, bytes)?;
        if src.max(dst) < src.min(dst) + bytes {
            return Err(KernelError::Shape(format!(
                "copy of {bytes} bytes from {src} to {dst} within one buffer: the ranges overlap"
            )));
        }
        self.ctx
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        self.ctx.synchronize().map_err(driver("cuCtxSynchronize"))?;
        // SAFETY: both ranges are inside this allocation (checked) and do not overlap.
        unsafe {
            result::memcpy_dtod_sync(self.ptr + dst as u64, self.ptr + src as u64, bytes)
                .map_err(driver("cuMemcpyDtoD"))?;
        }
        self.ctx.synchronize().map_err(driver("cuCtxSynchronize"))
    }

    /// Set every byte to `value` (synchronous).
    pub fn fill_bytes(&self, value: u8) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(driver("cuCtxSetCurrent"))?;
        // SAFETY: the whole allocation.
        unsafe { result::memset_d8_sync(self.ptr, value, self.bytes) }.map_err(driver("cuMemsetD8"))
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by cuMemAlloc in this context and freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}
