//! CudaVmm on a real GPU: the same real-memory checks as the host backend (vkv_vmm::conformance),
//! plus NVRTC kernels writing through one mapping while the host reads through another.
//!
//! Skips (printing why) without a GPU; fails instead when `VKV_REQUIRE_GPU=1`, as `.gpu/run-tests`
//! sets on the GPU machine (see ../shared/GPU.md).
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;

use common::gpu;
use vkv_vmm::cudarc::driver::{LaunchConfig, PushKernelArg};
use vkv_vmm::cudarc::nvrtc::compile_ptx;
use vkv_vmm::{
    conformance, CudaVmm, KvLayout, KvPart, KvSpace, Mapper, MapperOptions, PhysicalMemory,
    VmmError,
};

const PAGE: usize = 2 << 20;

const KERNELS: &str = r#"
extern "C" __global__ void fill_u32(unsigned int* out, unsigned long long n, unsigned int seed) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x)
        out[i] = (unsigned int)(i * 2654435761ull) ^ seed;
}

__device__ unsigned short kv_value(unsigned int seed, unsigned int t, unsigned int h, unsigned int d) {
    return (unsigned short)((seed ^ (t * 73856093u) ^ (h * 19349663u) ^ (d * 83492791u)) & 0xffffu);
}

// One layer's K or V of tokens [0, ntok) of `slot`, addressed only through a LayerView's strides.
extern "C" __global__ void fill_kv(unsigned short* base, unsigned long long slot_stride,
                                   unsigned long long token_stride, unsigned long long head_stride,
                                   int slot, int ntok, int heads, int head_dim, unsigned int seed) {
    long long total = (long long)ntok * heads * head_dim;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int d = i % head_dim, h = (i / head_dim) % heads, t = i / ((long long)head_dim * heads);
        base[slot * slot_stride + t * token_stride + h * head_stride + d] = kv_value(seed, t, h, d);
    }
}
"#;

fn kv_value(seed: u32, t: u32, h: u32, d: u32) -> u16 {
    ((seed ^ t.wrapping_mul(73856093) ^ h.wrapping_mul(19349663) ^ d.wrapping_mul(83492791))
        & 0xffff) as u16
}

struct Kernels {
    stream: Arc<vkv_vmm::cudarc::driver::CudaStream>,
    fill_u32: vkv_vmm::cudarc::driver::CudaFunction,
    fill_kv: vkv_vmm::cudarc::driver::CudaFunction,
}

fn kernels(vmm: &CudaVmm) -> Kernels {
    let ptx = compile_ptx(KERNELS).expect("NVRTC compiles the test kernels");
    let module = vmm.context().load_module(ptx).expect("load module");
    Kernels {
        stream: vmm.context().default_stream(),
        fill_u32: module.load_function("fill_u32").unwrap(),
        fill_kv: module.load_function("fill_kv").unwrap(),
    }
}

#[test]
fn gpu_granularity_comes_from_the_device_and_bad_sizes_are_typed_errors() {
    let Some(vmm) = gpu() else { return };
    let g = vmm.granularity();
    eprintln!("granularity {g} B");
    assert!(
        g > 0 && PAGE.is_multiple_of(g),
        "2 MiB pages must be allowed (granularity {g})"
    );
    if g > 1 {
        assert!(matches!(
            vmm.create_page(g / 2),
            Err(VmmError::PageSizeNotAligned { .. })
        ));
    }
    let space = conformance::small_space(vmm.clone(), KvLayout::TokenMajor, PAGE, 64, 2);
    let mut space = space;
    let a = space.acquire().unwrap();
    let max = space.config().max_tokens;
    assert!(matches!(
        space.ensure(a, max + 1),
        Err(VmmError::TooManyTokens { .. })
    ));
    assert!(
        matches!(space.ensure(a, max), Err(VmmError::PoolExhausted { .. })),
        "4 pages needed, budget 2"
    );
    assert_eq!(
        space.stats().pages_mapped,
        0,
        "a failed ensure maps nothing"
    );
    for _ in 1..4 {
        space.acquire().unwrap();
    }
    assert!(matches!(space.acquire(), Err(VmmError::NoFreeSlot { .. })));
    space.audit().unwrap();
}

#[test]
fn gpu_kernel_writes_through_one_mapping_and_the_host_reads_through_another() {
    let Some(vmm) = gpu() else { return };
    let k = kernels(&vmm);
    let bytes = 2 * PAGE;
    let a = vmm.reserve(bytes, PAGE).unwrap();
    let b = vmm.reserve(bytes, PAGE).unwrap();
    // Map the two pages in opposite order at the second range: b + 0 shows a's second page.
    let pages = [
        vmm.create_page(PAGE).unwrap(),
        vmm.create_page(PAGE).unwrap(),
    ];
    for (i, &p) in pages.iter().enumerate() {
        vmm.map(p, a + (i * PAGE) as u64).unwrap();
        vmm.map(p, b + ((1 - i) * PAGE) as u64).unwrap();
    }
    vmm.set_access(a, bytes).unwrap();
    vmm.set_access(b, bytes).unwrap();
    // Poison through b, then let the kernel write through a.
    unsafe { vmm.write(b, &vec![0xEE; bytes]).unwrap() };
    let n = (bytes / 4) as u64;
    let seed = 0x5eed_1234u32;
    let mut launch = k.stream.launch_builder(&k.fill_u32);
    launch.arg(&a).arg(&n).arg(&seed);
    unsafe { launch.launch(LaunchConfig::for_num_elems(n as u32)) }.expect("launch fill_u32");
    k.stream.synchronize().expect("fill_u32 ran");
    let mut back = vec![0u8; bytes];
    unsafe { vmm.read(b, &mut back).unwrap() };
    let words: Vec<u32> = back
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let per_page = PAGE / 4;
    for (j, &w) in words.iter().enumerate() {
        // Word j of range b lives in page 1 - j / per_page, which is word i of range a.
        let i = ((1 - j / per_page) * per_page + j % per_page) as u64;
        assert_eq!(
            w,
            (i.wrapping_mul(2654435761) as u32) ^ seed,
            "word {j} of b"
        );
    }
    for (i, &p) in pages.iter().enumerate() {
        vmm.unmap(a + (i * PAGE) as u64, PAGE).unwrap();
        vmm.unmap(b + ((1 - i) * PAGE) as u64, PAGE).unwrap();
        vmm.release_page(p).unwrap();
    }
    vmm.free_reservation(a, bytes).unwrap();
    vmm.free_reservation(b, bytes).unwrap();
}

#[test]
fn gpu_kernel_writes_kv_through_layer_views_and_a_shared_prefix_reads_it_back() {
    let Some(vmm) = gpu() else { return };
    let k = kernels(&vmm);
    for layout in KvLayout::ALL {
        let mut space: KvSpace = conformance::small_space(vmm.clone(), layout, PAGE, 64, 64);
        let c = space.config().clone();
        let tpp = conformance::tokens_per_page(&space);
        let ntok = 2 * tpp + tpp / 3;
        let src = space.acquire().unwrap();
        space.ensure(src, ntok).unwrap();
        for layer in 0..c.num_layers {
            let view = space.layer_view(layer);
            for (part, base) in [(0u32, view.k), (1, view.v)] {
                let seed = 1000 + 2 * layer as u32 + part;
                let (slot, n, heads, dim) = (
                    src.0 as i32,
                    ntok as i32,
                    c.num_kv_heads as i32,
                    c.head_dim as i32,
                );
                let strides = [
                    view.slot_stride as u64,
                    view.token_stride as u64,
                    view.head_stride as u64,
                ];
                let mut launch = k.stream.launch_builder(&k.fill_kv);
                launch
                    .arg(&base)
                    .arg(&strides[0])
                    .arg(&strides[1])
                    .arg(&strides[2]);
                launch.arg(&slot).arg(&n).arg(&heads).arg(&dim).arg(&seed);
                let total = (ntok * c.num_kv_heads * c.head_dim) as u32;
                unsafe { launch.launch(LaunchConfig::for_num_elems(total)) }
                    .expect("launch fill_kv");
            }
        }
        k.stream.synchronize().expect("fill_kv ran");
        let dst = space.acquire().unwrap();
        let prefix = tpp + tpp / 2;
        space.share_prefix(src, dst, prefix).unwrap();
        assert_eq!(space.stats().pages_shared, c.num_regions());
        // The host reads what the kernel wrote, through both slots' mappings.
        for (slot, upto) in [(src, ntok), (dst, prefix)] {
            for layer in 0..c.num_layers {
                for (part_id, part) in [(0u32, KvPart::K), (1, KvPart::V)] {
                    let seed = 1000 + 2 * layer as u32 + part_id;
                    for t in [0, 1, tpp - 1, tpp, prefix - 1, upto - 1] {
                        let got = conformance::read_token(&space, slot, layer, part, t);
                        let expect: Vec<u8> = (0..c.num_kv_heads)
                            .flat_map(|h| (0..c.head_dim).map(move |d| (h, d)))
                            .flat_map(|(h, d)| {
                                kv_value(seed, t as u32, h as u32, d as u32).to_le_bytes()
                            })
                            .collect();
                        assert_eq!(
                            got, expect,
                            "{layout} slot {slot} layer {layer} part {part_id} token {t}"
                        );
                    }
                }
            }
        }
        space.audit().unwrap();
    }
}

#[test]
fn gpu_conformance_bytes_round_trip() {
    let Some(vmm) = gpu() else { return };
    for layout in KvLayout::ALL {
        conformance::bytes_round_trip(vmm.clone(), layout, PAGE);
    }
}

#[test]
fn gpu_conformance_shared_prefix() {
    let Some(vmm) = gpu() else { return };
    for layout in KvLayout::ALL {
        conformance::shared_prefix(vmm.clone(), layout, PAGE);
    }
}

#[test]
fn gpu_conformance_reuse_and_reclaim() {
    let Some(vmm) = gpu() else { return };
    for layout in KvLayout::ALL {
        conformance::reuse_and_reclaim(vmm.clone(), layout, PAGE);
    }
}

#[test]
fn gpu_mapper_maps_ahead_from_its_own_thread() {
    let Some(vmm) = gpu() else { return };
    let space = conformance::small_space(vmm.clone(), KvLayout::PerLayer, PAGE, 64, 64);
    let tpp = conformance::tokens_per_page(&space);
    let mapper = Mapper::spawn(
        space,
        MapperOptions {
            pool_low_water: 4,
            pages_per_lock: 2,
        },
    )
    .unwrap();
    let slot = mapper.space().acquire().unwrap();
    mapper.map_ahead(slot, 2 * tpp).unwrap();
    mapper.sync().unwrap();
    assert!(
        !mapper.ensure(slot, 2 * tpp).unwrap(),
        "pages were mapped ahead: no wait"
    );
    assert!(mapper.ensure(slot, 3 * tpp).unwrap(), "a miss is a wait");
    let stats = mapper.stats();
    eprintln!("{stats:?}");
    assert_eq!((stats.pages_mapped_ahead, stats.waits), (8, 1));
    // Bytes through the mapper thread's mappings are real device memory.
    let space = mapper.space();
    conformance::write_tokens(&space, slot, 0..3 * tpp, 42);
    assert!(conformance::tokens_match(&space, slot, 0..3 * tpp, 42));
    space.audit().unwrap();
}
