//! Criterion micro-benchmarks of the KV space on the host backend (real mmap/memfd pages):
//! the hot-path `ensure` that finds its pages already mapped, and one page's map + unmap cycle.
//! The whole-system numbers (and the GPU) are `vkv bench vmm`'s job; these catch regressions in
//! the bookkeeping around the system calls.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use vkv_vmm::{HostVmm, KvLayout, KvSpace, KvSpaceConfig};

fn space(layout: KvLayout) -> KvSpace {
    let config = KvSpaceConfig {
        layout,
        num_layers: 32,
        num_kv_heads: 8,
        head_dim: 128,
        dtype_bytes: 2,
        max_slots: 8,
        max_tokens: 4096,
        page_size: 2 << 20,
        max_pages: 4096,
    };
    KvSpace::new(config, Arc::new(HostVmm::new().unwrap())).unwrap()
}

fn ensure(c: &mut Criterion) {
    for layout in KvLayout::ALL {
        let mut s = space(layout);
        let slot = s.acquire().unwrap();
        s.ensure(slot, 1024).unwrap();
        c.bench_function(&format!("ensure already backed ({layout})"), |b| {
            b.iter(|| s.ensure(slot, std::hint::black_box(1000)).unwrap())
        });
        let other = s.acquire().unwrap();
        c.bench_function(
            &format!("map + reclaim one token's pages ({layout})"),
            |b| {
                b.iter(|| {
                    s.ensure(other, 1).unwrap();
                    s.release(other).unwrap();
                    s.reclaim_all().unwrap();
                    let again = s.acquire().unwrap();
                    assert_eq!(again, other);
                })
            },
        );
    }
}

criterion_group!(benches, ensure);
criterion_main!(benches);
