//! Replays small enough to compute by hand.

use vkv_vmm::KvLayout;

use super::*;
use crate::workload::Workload;

/// 1 layer, 1 KV head of dim 64, 2-byte elements: 128 B of K (or V) per token, 256 B in all.
fn tiny() -> KvShape {
    KvShape {
        name: "tiny".into(),
        num_layers: 1,
        num_kv_heads: 1,
        head_dim: 64,
        dtype_bytes: 2,
        max_len: 100,
    }
}

fn config(requests: Vec<RequestShape>, kv_memory: usize, max_len: usize) -> FragConfig {
    FragConfig {
        shape: tiny(),
        kv_memory,
        max_len,
        requests,
        arrival: Arrival::AllAtOnce,
        seed: 1,
        timeline_points: 1000,
    }
}

fn one(prompt_len: usize, output_len: usize) -> Vec<RequestShape> {
    vec![RequestShape {
        prompt_len,
        output_len,
    }]
}

fn approx(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn one_request_known_lengths_known_waste() {
    // Prompt 10, output 5: admitted at step 0 holding 10 tokens, 11..14 at steps 1..4, reaches
    // its final 15 tokens at step 5 and is freed. Busy steps 0..4 hold 10..14 tokens: mean 12.
    let c = config(one(10, 5), 1 << 20, 100);
    let bpt = 256.0;
    let cases = [
        // policy, tokens the request holds memory for, reserved mean (tokens), internal (tokens)
        (Policy::Orca(Reservation::Max), 100.0, 3.0, 85.0),
        (Policy::Orca(Reservation::Pow2), 16.0, 3.0, 1.0),
        (Policy::Orca(Reservation::Oracle), 15.0, 3.0, 0.0),
        (Policy::Paged { block_size: 16 }, 16.0, 0.0, 4.0),
        (Policy::Paged { block_size: 8 }, 16.0, 0.0, 4.0),
        // token-major 4 KiB pages: 16 tokens per page; per-layer: 2 regions × 32 tokens per page.
        (
            Policy::Vmm {
                layout: KvLayout::TokenMajor,
                page_size: 4096,
            },
            16.0,
            0.0,
            4.0,
        ),
        (
            Policy::Vmm {
                layout: KvLayout::PerLayer,
                page_size: 4096,
            },
            32.0,
            0.0,
            20.0,
        ),
    ];
    for (policy, held, reserved, internal) in cases {
        let r = replay(&c, policy).unwrap();
        assert_eq!(
            (r.steps, r.finished, r.preemptions, r.peak_running),
            (6, 1, 0, 1),
            "{policy}"
        );
        assert!(
            approx(r.busy.mean.token_bytes, 12.0 * bpt),
            "{policy}: {:?}",
            r.busy.mean
        );
        assert!(
            approx(r.busy.mean.reserved_bytes, reserved * bpt),
            "{policy}: {:?}",
            r.busy.mean
        );
        if !matches!(policy, Policy::Paged { block_size: 8 }) {
            assert!(
                approx(r.busy.mean.internal_bytes, internal * bpt),
                "{policy}: {:?}",
                r.busy.mean
            );
        }
        if !matches!(policy, Policy::Paged { .. }) {
            // The request holds `held` tokens' worth throughout: share = mean(t / held).
            assert!(
                approx(r.busy.token_share_of_allocated, 12.0 / held),
                "{policy}: {}",
                r.busy.token_share_of_allocated
            );
        }
    }
    // paged-8: 2 blocks at 10..14 tokens (16 held), so the same waste as paged-16 here.
    let r = replay(&c, Policy::Paged { block_size: 8 }).unwrap();
    assert!(approx(r.busy.token_share_of_allocated, 12.0 / 16.0));
}

#[test]
fn preemption_by_recompute_when_blocks_run_out() {
    // Two requests of 16 + 16 tokens, paged-16, 3 blocks. Both start with one block; at step 1
    // request 0 takes the third block and request 1 cannot grow: it is preempted, readmitted with
    // its 16 tokens into the block it freed, and the same happens at every step until request 0
    // finishes at step 16 (15 preemptions). Request 1 then grows to 32 tokens at step 31.
    let requests = vec![
        RequestShape {
            prompt_len: 16,
            output_len: 16
        };
        2
    ];
    let c = config(requests, 3 * 16 * 256, 100);
    let r = replay(&c, Policy::Paged { block_size: 16 }).unwrap();
    assert_eq!(
        (r.finished, r.preemptions, r.steps, r.peak_running),
        (2, 15, 32, 2)
    );
}

#[test]
fn reservations_admit_fewer_requests_at_once() {
    // 10 requests of 20 + 10 tokens in 160 tokens of memory: Orca-Max (max 80) fits 2,
    // Orca-Oracle (30 each) 5, paged-16 (2 blocks of 16 at most) 5, and at admission (20
    // tokens, 2 blocks) still 5.
    let requests = vec![
        RequestShape {
            prompt_len: 20,
            output_len: 10
        };
        10
    ];
    let c = config(requests, 160 * 256, 80);
    let peak = |p| replay(&c, p).unwrap().peak_running;
    assert_eq!(peak(Policy::Orca(Reservation::Max)), 2);
    assert_eq!(peak(Policy::Orca(Reservation::Oracle)), 5);
    assert_eq!(peak(Policy::Paged { block_size: 16 }), 5);
    assert_eq!(
        peak(Policy::Paged { block_size: 8 }),
        6,
        "3 blocks of 8 at admission: 160 / 24"
    );
}

#[test]
fn bad_budgets_and_lengths_are_named_errors() {
    let c = config(one(100, 100), 150 * 256, 400);
    let err = replay(&c, Policy::Paged { block_size: 16 }).unwrap_err();
    assert!(
        matches!(
            err,
            FragError::BudgetTooSmall {
                index: 0,
                tokens: 200,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("paged-16"), "{err}");
    let err = replay(
        &config(one(100, 100), 1 << 20, 150),
        Policy::Paged { block_size: 16 },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            FragError::TooLong {
                tokens: 200,
                max_len: 150,
                ..
            }
        ),
        "{err}"
    );
    let err = run(&config(vec![], 1 << 20, 100), &Policy::default_set()).unwrap_err();
    assert!(matches!(err, FragError::NoRequests));
}

#[test]
fn policies_print_and_parse_back() {
    for p in Policy::default_set() {
        assert_eq!(p.to_string().parse::<Policy>().unwrap(), p);
    }
    for bad in [
        "paged-0",
        "paged-x",
        "vmm-per-layer-3GB",
        "orca",
        "vmm-sideways-2MiB",
    ] {
        assert!(
            bad.parse::<Policy>()
                .unwrap_err()
                .to_string()
                .contains("unknown policy"),
            "{bad}"
        );
    }
}

#[test]
fn poisson_arrivals_are_seeded_and_everything_finishes() {
    let requests = Workload::parse("alpaca").unwrap().sample(200, 3, Some(512));
    let mut c = config(requests, 64 << 10, 512);
    c.arrival = Arrival::Poisson { per_step: 0.5 };
    let a = replay(&c, Policy::Paged { block_size: 16 }).unwrap();
    let b = replay(&c, Policy::Paged { block_size: 16 }).unwrap();
    assert_eq!(
        (a.steps, a.finished, a.peak_running),
        (b.steps, b.finished, b.peak_running)
    );
    assert_eq!(a.finished, 200);
    assert!(
        a.steps >= 390,
        "200 arrivals at 0.5 per step take ~400 steps, got {}",
        a.steps
    );
}

#[test]
fn token_major_two_mib_pages_match_paged_16_for_an_8b_model() {
    // Llama-3-8B at 2 MiB token-major pages: 16 tokens per page, the same granule as paged-16.
    let shape = vkv_engine::presets::kv_shape("llama-3-8b").unwrap();
    let requests = Workload::parse("sharegpt")
        .unwrap()
        .sample(150, 7, Some(4096));
    let c = FragConfig {
        shape,
        kv_memory: 4 << 30,
        ..config(requests, 0, 4096)
    };
    let paged = replay(&c, Policy::Paged { block_size: 16 }).unwrap();
    let tm = replay(
        &c,
        Policy::Vmm {
            layout: KvLayout::TokenMajor,
            page_size: 2 << 20,
        },
    )
    .unwrap();
    assert_eq!(tm.granule_tokens, Some(16.0));
    assert_eq!(
        (tm.steps, tm.peak_running, tm.preemptions),
        (paged.steps, paged.peak_running, paged.preemptions)
    );
    for (a, b) in [(&tm.busy, &paged.busy), (&tm.saturated, &paged.saturated)] {
        assert!(approx(
            a.token_share_of_allocated,
            b.token_share_of_allocated
        ));
    }
}

#[test]
fn reused_vmm_slots_give_their_surplus_back_under_load() {
    // Long requests then short ones through the same slots: with deferred reclamation a short
    // request inherits a long one's pages; under load that surplus must be reclaimed, so token-
    // major 4 KiB pages (16 tokens) waste exactly what paged-16 wastes.
    let mut requests = vec![
        RequestShape {
            prompt_len: 60,
            output_len: 30
        };
        6
    ];
    requests.extend(vec![
        RequestShape {
            prompt_len: 3,
            output_len: 2
        };
        40
    ]);
    let c = config(requests, 24 * 16 * 256, 100);
    let paged = replay(&c, Policy::Paged { block_size: 16 }).unwrap();
    let tm = replay(
        &c,
        Policy::Vmm {
            layout: KvLayout::TokenMajor,
            page_size: 4096,
        },
    )
    .unwrap();
    assert!(paged.saturated.steps > 0);
    assert_eq!(
        (tm.steps, tm.peak_running),
        (paged.steps, paged.peak_running)
    );
    assert!(approx(
        tm.saturated.token_share_of_allocated,
        paged.saturated.token_share_of_allocated
    ));
}
