//! `CudaVmm`: the CUDA driver's virtual memory management API, through cudarc (loaded at run time).
//!
//! reserve = `cuMemAddressReserve`, create = `cuMemCreate` (pinned device memory), map =
//! `cuMemMap`, set access = `cuMemSetAccess` (read-write for the owning device), unmap =
//! `cuMemUnmap`, release = `cuMemRelease`, free = `cuMemAddressFree`. The granularity is asked of
//! the device (`cuMemGetAllocationGranularity`, minimum; 2 MiB on H100). This is the mechanism of
//! vAttention (Prabhu et al., 2024); the measured costs per 2 MiB page on an H100 are in
//! docs/benchmarks.md.
//!
//! Every call first makes the device's primary context current on the calling thread, so the
//! backend can be used from the [`crate::Mapper`]'s thread as well as the engine's.

use std::ffi::{c_char, c_int, CStr};
use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::CudaContext;

use crate::faults::{self, Fault};
use crate::physical::check_page_size;
use crate::{CudaProbe, PhysicalMemory, PhysicalPage, Result, VmmError};

const NAME: &str = "cuda";

/// Check that the driver library exists before cudarc's loader (which panics) is touched.
fn driver_present() -> Result<()> {
    // SAFETY: probes candidate library names with libloading; loads nothing permanently.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(VmmError::NoCuda(
            "the CUDA driver library (libcuda.so) was not found".into(),
        ))
    }
}

fn check(call: &'static str, rc: sys::CUresult) -> Result<()> {
    rc.result().map_err(|e| {
        let detail = e.to_string();
        if rc == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
            VmmError::DeviceOutOfMemory {
                backend: NAME,
                call,
                detail,
            }
        } else {
            VmmError::Backend {
                backend: NAME,
                call,
                detail,
            }
        }
    })
}

pub(crate) fn probe() -> Result<CudaProbe> {
    driver_present()?;
    let no_cuda = |what: &str, rc: sys::CUresult| VmmError::NoCuda(format!("{what}: {rc:?}"));
    // SAFETY: driver calls with valid out-pointers; the library is present (checked above).
    unsafe {
        let rc = sys::cuInit(0);
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(no_cuda("cuInit", rc));
        }
        let mut count: c_int = 0;
        let rc = sys::cuDeviceGetCount(&mut count);
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Err(no_cuda("cuDeviceGetCount", rc));
        }
        if count <= 0 {
            return Err(VmmError::NoCuda("the driver reports no CUDA device".into()));
        }
        let mut name = [0 as c_char; 256];
        let mut dev: sys::CUdevice = 0;
        check("cuDeviceGet", sys::cuDeviceGet(&mut dev, 0))?;
        check(
            "cuDeviceGetName",
            sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as c_int, dev),
        )?;
        let mut version: c_int = 0;
        check("cuDriverGetVersion", sys::cuDriverGetVersion(&mut version))?;
        Ok(CudaProbe {
            devices: count as usize,
            name: CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned(),
            driver: format!("{}.{}", version / 1000, version % 1000 / 10),
        })
    }
}

/// CUDA VMM on one device (see the module docs).
#[derive(Debug)]
pub struct CudaVmm {
    ctx: Arc<CudaContext>,
    ordinal: i32,
    granularity: usize,
}

impl CudaVmm {
    /// Open device `ordinal`; fails with [`VmmError::NoCuda`] (never a panic) without a GPU.
    pub fn new(ordinal: usize) -> Result<Self> {
        probe()?;
        let ctx = CudaContext::new(ordinal).map_err(|e| VmmError::NoCuda(e.to_string()))?;
        let ordinal = ordinal as i32;
        let mut vmm = CudaVmm {
            ctx,
            ordinal,
            granularity: 0,
        };
        let prop = vmm.alloc_prop();
        let mut granularity = 0usize;
        // SAFETY: valid out-pointer and property struct.
        check("cuMemGetAllocationGranularity", unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut granularity,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        })?;
        vmm.granularity = granularity;
        Ok(vmm)
    }

    /// The context every call runs in (for loading kernels that use this memory).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    fn location(&self) -> sys::CUmemLocation {
        // SAFETY: a plain C struct for which all-zero is a valid value.
        let mut loc: sys::CUmemLocation = unsafe { std::mem::zeroed() };
        loc.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        loc.id = self.ordinal;
        loc
    }

    fn alloc_prop(&self) -> sys::CUmemAllocationProp {
        // SAFETY: a plain C struct for which all-zero is a valid value.
        let mut prop: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
        prop.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.requestedHandleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
        prop.location = self.location();
        prop
    }

    fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| VmmError::Backend {
            backend: NAME,
            call: "cuCtxSetCurrent",
            detail: e.to_string(),
        })
    }
}

impl PhysicalMemory for CudaVmm {
    fn name(&self) -> &'static str {
        NAME
    }

    fn granularity(&self) -> usize {
        self.granularity
    }

    fn reserve(&self, bytes: usize, alignment: usize) -> Result<u64> {
        self.bind()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out-pointer; the driver validates size and alignment.
        check("cuMemAddressReserve", unsafe {
            sys::cuMemAddressReserve(&mut ptr, bytes, alignment, 0, 0)
        })?;
        Ok(ptr)
    }

    fn free_reservation(&self, addr: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the driver validates that this is a reservation of ours.
        check("cuMemAddressFree", unsafe {
            sys::cuMemAddressFree(addr, bytes)
        })
    }

    fn create_page(&self, size: usize) -> Result<PhysicalPage> {
        check_page_size(NAME, size, self.granularity)?;
        faults::plan().check(Fault::CreatePage, NAME, "cuMemCreate")?;
        self.bind()?;
        let prop = self.alloc_prop();
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: valid out-pointer and property struct.
        check("cuMemCreate", unsafe {
            sys::cuMemCreate(&mut handle, size, &prop, 0)
        })?;
        Ok(PhysicalPage { handle, size })
    }

    fn release_page(&self, page: PhysicalPage) -> Result<()> {
        self.bind()?;
        // SAFETY: the handle came from cuMemCreate and the caller unmapped it everywhere.
        check("cuMemRelease", unsafe { sys::cuMemRelease(page.handle) })
    }

    fn map(&self, page: PhysicalPage, addr: u64) -> Result<()> {
        faults::plan().check(Fault::Map, NAME, "cuMemMap")?;
        self.bind()?;
        // SAFETY: the driver validates the address range and the handle.
        check("cuMemMap", unsafe {
            sys::cuMemMap(addr, page.size, 0, page.handle, 0)
        })
    }

    fn set_access(&self, addr: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        let desc = sys::CUmemAccessDesc {
            location: self.location(),
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: one valid descriptor; the driver validates the range.
        check("cuMemSetAccess", unsafe {
            sys::cuMemSetAccess(addr, bytes, &desc, 1)
        })
    }

    fn unmap(&self, addr: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // SAFETY: the driver validates the range.
        check("cuMemUnmap", unsafe { sys::cuMemUnmap(addr, bytes) })
    }

    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        // Device-to-device copies do not wait for the host; synchronize so the copy is complete
        // (and ordered after earlier work) when this returns.
        // SAFETY: the caller guarantees both ranges are mapped.
        unsafe {
            check("cuMemcpyDtoD", sys::cuMemcpyDtoD_v2(dst, src, bytes))?;
            check("cuCtxSynchronize", sys::cuCtxSynchronize())
        }
    }

    unsafe fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller guarantees the range is mapped; `data` is a valid host buffer.
        check("cuMemcpyHtoD", unsafe {
            sys::cuMemcpyHtoD_v2(addr, data.as_ptr().cast(), data.len())
        })
    }

    unsafe fn read(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: the caller guarantees the range is mapped; `out` is a valid host buffer.
        check("cuMemcpyDtoH", unsafe {
            sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), addr, out.len())
        })
    }
}
