//! Faults on the CUDA device ([`vkv_vmm::faults`]; the scenarios are tests/common/faults.rs,
//! which the CPU runs in tests/faults.rs): a forward pass that fails to launch and a step that
//! panics (paged and vmm), the vmm Mapper thread dying, `cuMemMap` failing, `cuMemCreate` failing
//! at start — and a
//! really exhausted device: with the GPU's memory taken by another allocation, `cuMemCreate`
//! answers `CUDA_ERROR_OUT_OF_MEMORY`, which the vmm cache reports as out of memory (what the
//! scheduler preempts on, or fails a lone request with), keeping its books; once the memory is
//! back, the same reservation succeeds.
//!
//! Skips without a GPU (fails with `VKV_REQUIRE_GPU=1`). The tests take the fault plan's lock,
//! which also keeps their engines from sharing the GPU's memory.
#![cfg(feature = "cuda")]

mod common;

use std::sync::{Arc, MutexGuard};

use common::faults;
use vkv_engine::device::Device;
use vkv_engine::engine::{Engine, EngineConfig};
use vkv_engine::kv::{GpuKv, KvError, KvManager, KvMode, VmmShape};
use vkv_kernels::cuda::DeviceBuffer;
use vkv_vmm::faults::{plan, Fault};
use vkv_vmm::{CudaVmm, KvLayout};

const PAGED: KvMode = KvMode::Paged { block_size: 16 };
const VMM: KvMode = KvMode::Vmm {
    layout: KvLayout::TokenMajor,
    page_size: 2 << 20,
};

/// The fault plan to ourselves and a GPU, or `None` (skipped, saying why).
fn gpu_and_device() -> Option<(MutexGuard<'static, ()>, Arc<CudaVmm>)> {
    let plan = faults::lock();
    Some((plan, common::gpu()?))
}

/// [`gpu_and_device`] for the engine tests, which open the device themselves.
fn gpu() -> Option<MutexGuard<'static, ()>> {
    gpu_and_device().map(|(plan, _)| plan)
}

fn config(mode: KvMode) -> EngineConfig {
    EngineConfig {
        device: Device::Cuda,
        kv_mode: mode,
        kv_memory: Some(1 << 30),
        max_num_seqs: 16,
        max_num_batched_tokens: 512,
        max_model_len: Some(1024),
        ..EngineConfig::default()
    }
}

fn engine(mode: KvMode) -> Engine {
    Engine::start(common::smollm2(), config(mode)).expect("start the engine")
}

#[test]
fn gpu_a_failed_launch_or_a_panicking_step_fails_its_requests_and_the_engine_serves_on() {
    let Some(_plan) = gpu() else { return };
    for mode in [PAGED, VMM] {
        let e = engine(mode);
        faults::launch_failure(&e, &format!("{mode:?}"));
        faults::step_panic(&e, &format!("{mode:?}: a panicking step"));
    }
}

#[test]
fn gpu_a_dead_mapper_thread_fails_nothing_and_is_started_again() {
    let Some(_plan) = gpu() else { return };
    faults::mapper_death(&engine(VMM), "vmm", 4, None);
}

#[test]
fn gpu_failing_page_maps_fail_the_admissions_and_the_engine_serves_on() {
    let Some(_plan) = gpu() else { return };
    plan().arm(Fault::Map, usize::MAX);
    faults::map_failure(&engine(VMM), "vmm");
}

#[test]
fn gpu_page_creation_failing_at_start_is_a_clear_start_error() {
    let Some(_plan) = gpu() else { return };
    // Every creation fails: the Mapper thread's pool top-up could take a single fault first.
    plan().arm(Fault::CreatePage, usize::MAX);
    let err = match Engine::start(common::smollm2(), config(VMM)) {
        Ok(_) => panic!("the engine started without its pages"),
        Err(e) => e.to_string(),
    };
    plan().disarm();
    assert!(err.contains("out of device memory"), "{err}");
    // And the device is usable afterwards.
    faults::launch_failure(&engine(VMM), "vmm after a failed start");
}

#[test]
fn gpu_an_exhausted_device_is_out_of_memory_for_the_vmm_cache_until_memory_returns() {
    let Some((_plan, vmm)) = gpu_and_device() else {
        return;
    };
    let dims = vkv_engine::kv::KvDims {
        num_layers: 30,
        num_kv_heads: 3,
        head_dim: 64,
    };
    // Pages created on demand (no pool kept ahead), up to 8 GiB of them.
    let shape = VmmShape::new(KvLayout::TokenMajor, 4, 32768, 2 << 20, 4096);
    let mut kv = match GpuKv::vmm(vmm.clone(), dims, shape).unwrap() {
        GpuKv::Vmm(m) => m,
        GpuKv::Paged(_) => unreachable!(),
    };
    // Take all but 64 MiB of the device's free memory.
    vmm.context().bind_to_thread().unwrap();
    let (free, _) = vkv_kernels::cuda::cudarc::driver::result::mem_get_info().unwrap();
    let filler = DeviceBuffer::new(vmm.context(), free - (64 << 20)).expect("fill the GPU");
    // 16 384 tokens of 23 040 B: 180 pages of 2 MiB, more than the 64 MiB left.
    let err = kv.reserve(1, 16384).expect_err("the device is full");
    assert!(
        matches!(&err, KvError::OutOfMemory { detail } if detail.contains("out of device memory")),
        "{err}"
    );
    kv.audit().unwrap();
    assert_eq!(kv.usage().sequences, 0, "a failed admission holds nothing");
    drop(filler);
    kv.reserve(1, 16384).expect("the memory is back");
    kv.free(1).unwrap();
    kv.audit().unwrap();
    assert_eq!(kv.usage().sequences, 0);
}
