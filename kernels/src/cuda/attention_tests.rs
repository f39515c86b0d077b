//! Test module `tests` of `attention.rs` (a child module: `super` is `attention`).

use super::*;

fn shape(batch: usize, n_heads: usize, n_kv_heads: usize, max_context: usize) -> DecodeShape {
    DecodeShape {
        batch,
        n_heads,
        n_kv_heads,
        head_dim: 128,
        max_context,
    }
}

/// H100: 132 SMs × 4 CTAs of the 4-heads-per-CTA kernel.
const RESIDENT: usize = 528;

#[test]
fn a_full_batch_is_not_split_and_a_small_one_fills_one_wave() {
    let p = split_plan(&shape(64, 32, 8, 2048), RESIDENT, None).unwrap();
    assert_eq!((p.splits, p.ctas, p.gmax, p.head_chunks), (1, 512, 4, 1));
    let p = split_plan(&shape(8, 32, 8, 16384), RESIDENT, None).unwrap();
    assert_eq!(
        p.splits, 8,
        "one wave of 512 CTAs, not 9 splits in two waves"
    );
    assert!(p.ctas <= RESIDENT);
    let p = split_plan(&shape(1, 32, 8, 512), RESIDENT, None).unwrap();
    assert_eq!(p.splits, 8, "at least 64 tokens per split");
    assert!(p.split_tokens * p.splits >= 512 && p.split_tokens.is_multiple_of(32));
}

#[test]
fn forced_splits_cover_the_context_and_large_groups_take_several_ctas() {
    let p = split_plan(&shape(3, 32, 2, 1000), RESIDENT, Some(7)).unwrap();
    assert_eq!(p.head_chunks, 2, "16 heads per KV head: two CTAs of 8");
    assert!(p.splits <= 7 && p.splits * p.split_tokens >= 1000);
    assert!(
        (p.splits - 1) * p.split_tokens < 1000,
        "no empty trailing split"
    );
    let p = split_plan(&shape(1, 6, 3, 10), RESIDENT, Some(100)).unwrap();
    assert_eq!(
        p.splits, 1,
        "never more splits than 32-token pieces of the context"
    );
    assert_eq!(gmax_for(6), 8);
    assert_eq!(gmax_for(1), 1);
    assert_eq!(gmax_for(3), 4);
}
