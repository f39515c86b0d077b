//! The CUDA KV caches (`vkv_engine::kv::GpuKv`) held to the same rules as the CPU's: the shared
//! conformance run (`kv::conformance`: random admissions, growth, forks, aborts and preemption,
//! audited after every operation — block reference counts included — and empty at the end) on
//! the paged cache (the CPU's `BlockAllocator` over a device pool) and the vmm cache (`KvSpace`
//! on `CudaVmm`, both layouts); and forks that really share: a sequence forked from another
//! decodes exactly as the source did at that point (the block or page the prefix ends inside
//! copied on the device), and the source is untouched by what the fork writes after.
//!
//! Skips without a GPU; fails without one when `VKV_REQUIRE_GPU=1`.

#![cfg(feature = "cuda")]

mod common;

use common::gpu;
use vkv_engine::kv::conformance::check_random_operations;
use vkv_engine::kv::{GpuKv, KvBudget, KvManager, KvMode};
use vkv_engine::model::cuda::CudaLlama;
use vkv_engine::model::{reserve_batch, Llama, LlamaConfig, SeqChunk};
use vkv_kernels::cpu::RopeStyle;
use vkv_vmm::KvLayout;

const MODES: [KvMode; 4] = [
    KvMode::Paged { block_size: 16 },
    KvMode::Paged { block_size: 32 },
    KvMode::Vmm {
        layout: KvLayout::PerLayer,
        page_size: 2 << 20,
    },
    KvMode::Vmm {
        layout: KvLayout::TokenMajor,
        page_size: 2 << 20,
    },
];

fn config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 1000,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        rope_theta: 10000.0,
        rope_scaling: None,
        rope_style: RopeStyle::Half,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 512,
        tie_word_embeddings: false,
    }
}

#[test]
fn gpu_caches_keep_their_books_through_forks_aborts_and_preemption() {
    let Some(vmm) = gpu() else { return };
    let dims = config().kv_dims();
    for mode in MODES {
        // Paged: 2 MiB, 1 365 tokens; vmm: 6 pages of 2 MiB (per-layer: one sequence's first
        // page in each of its 6 regions; token-major: 6 sequences of up to 1 365 tokens).
        // Sequences of up to 2 048 tokens and 8 slots, so memory and slots run out often.
        let bytes = match mode {
            KvMode::Paged { .. } => 2 << 20,
            KvMode::Vmm { .. } => 12 << 20,
        };
        // And with prefix caching on: the random operations then match and record prefixes as
        // the scheduler does. Only paged hits here: this model's vmm units (the fewest 2 MiB
        // pages holding whole tokens) are 4 096 (token-major) and 8 192 tokens (per-layer),
        // longer than any sequence, so vmm runs only the books' bookkeeping.
        for caching in [false, true] {
            let mut kv = GpuKv::build(&vmm, mode, dims, KvBudget::new(8, 2048, bytes)).unwrap();
            if caching {
                kv.enable_prefix_caching().unwrap();
            }
            let mut preemptions = 0;
            for seed in 0..3 {
                let report = check_random_operations(&mut kv, seed, 400, 2048)
                    .unwrap_or_else(|e| panic!("{mode:?} caching {caching} seed {seed}: {e}"));
                eprintln!("{} caching {caching} seed {seed}: {report:?}", kv.name());
                assert!(
                    report.forks > 10 && report.frees > 10,
                    "{mode:?}: {report:?}"
                );
                preemptions += report.preemptions;
                if caching && matches!(mode, KvMode::Paged { .. }) {
                    assert!(report.hit_tokens > 0, "{mode:?}: {report:?}");
                }
            }
            // Memory ran out and sequences were preempted, in some seed at least (with caching
            // the hits may leave one seed's sequences room enough: H100, 2026-12-07, paged seed 2).
            assert!(preemptions > 0, "{mode:?} caching {caching}: no preemption");
        }
    }
}

fn prompt(seed: u64, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((seed * 7919 + i * 104729 + i * i * 31) % 1000) as u32)
        .collect()
}

/// One decode row per `(seq, position, token)`, kernel by kernel; every row's logits.
fn decode(gpu: &mut CudaLlama, kv: &mut GpuKv, rows: &[(u64, usize, u32)]) -> Vec<Vec<f32>> {
    let tokens: Vec<[u32; 1]> = rows.iter().map(|r| [r.2]).collect();
    let batch: Vec<SeqChunk<'_>> = rows
        .iter()
        .zip(&tokens)
        .map(|(&(seq, start, _), t)| SeqChunk {
            seq,
            tokens: t,
            start,
            all_logits: false,
        })
        .collect();
    reserve_batch(kv, &batch).unwrap();
    gpu.forward(&batch, kv).unwrap()
}

#[test]
fn forked_sequences_decode_as_their_source_and_leave_it_untouched() {
    let Some(vmm) = gpu() else { return };
    let c = config();
    let cpu = Llama::random(c.clone(), 21).unwrap();
    let mut gpu = CudaLlama::from_cpu(vmm.context(), &cpu).unwrap();
    gpu.set_cuda_graphs(false);
    let p = prompt(5, 80);
    for mode in MODES {
        // Seven sequences live at most (source, control, four forks, one twin); per-layer vmm
        // gives each a page in each of its 6 regions from the first token: 42 pages of 2 MiB.
        let mut kv =
            GpuKv::build(&vmm, mode, c.kv_dims(), KvBudget::new(8, 512, 128 << 20)).unwrap();
        // Sources A and A' (its control, never forked): the first 20 tokens prefilled, the rest
        // decoded one by one, keeping A's logits at every decoded position.
        let (a, control) = (1u64, 2u64);
        let first = [a, control].map(|seq| SeqChunk {
            seq,
            tokens: &p[..20],
            start: 0,
            all_logits: false,
        });
        reserve_batch(&mut kv, &first).unwrap();
        gpu.forward(&first, &kv).unwrap();
        let mut at_position = vec![Vec::new(); 20];
        for (pos, &t) in p.iter().enumerate().skip(20) {
            let out = decode(&mut gpu, &mut kv, &[(a, pos, t), (control, pos, t)]);
            at_position.push(out[0].clone());
        }
        // Forks at a block boundary, inside a block, and at the source's whole length.
        // Two forks each time, decoded together: the batch has the shape of the source's steps
        // (two rows), so the same kernels run on the same data.
        for (i, &t) in [32usize, 37, 20, 80].iter().enumerate() {
            let (b, twin) = (10 + 2 * i as u64, 11 + 2 * i as u64);
            kv.fork(a, b, t).unwrap();
            kv.fork(a, twin, t).unwrap();
            kv.audit().unwrap();
            assert_eq!(kv.reserved(b), Some(t));
            if t < p.len() {
                let out = decode(&mut gpu, &mut kv, &[(b, t, p[t]), (twin, t, p[t])]);
                let err = rel_err(&out[0], &at_position[t]).max(rel_err(&out[1], &out[0]));
                assert!(
                    err < 1e-5,
                    "{mode:?}: fork at {t} decodes {err:.2e} away from its source"
                );
            }
            kv.free(twin).unwrap();
            // The fork writes tokens of its own after the prefix (after the one decoded above).
            let next = kv.reserved(b).unwrap();
            for k in 0..5 {
                decode(&mut gpu, &mut kv, &[(b, next + k, 999 - k as u32)]);
            }
        }
        // The source still reads what it wrote: it decodes exactly as its untouched control.
        let out = decode(&mut gpu, &mut kv, &[(a, 80, 7), (control, 80, 7)]);
        let err = rel_err(&out[0], &out[1]);
        assert!(
            err < 1e-6,
            "{mode:?}: the source changed under its forks ({err:.2e})"
        );
        for seq in [a, control, 10, 12, 14, 16] {
            kv.free(seq).unwrap();
        }
        kv.audit().unwrap();
        assert_eq!(kv.usage().bytes_allocated, 0, "{mode:?}");
        eprintln!("{}: forks share and copy as they should", kv.name());
    }
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert!(a.iter().all(|x| x.is_finite()), "logits hold NaN or inf");
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}
