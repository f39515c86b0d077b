//! Beam search in the engine, on the CPU with the real SmolLM2, in every KV mode with prefix
//! caching off and on: its answers are those of a reference beam search that shares nothing
//! (vLLM V1's way: every beam of every step a fresh one-token request with its top
//! log-probabilities), while it runs the beams share their common prefix's KV (the cache's books
//! show it held once), width 1 is greedy, and an abort mid-way leaves nothing.

mod common;

use common::serving::{
    assert_empty, chat_prompts, collect, greedy, sharing_engine, unit_tokens, usage_with,
    SHARING_MODES,
};
use vkv_engine::engine::{event_channel, BeamSearch, Engine, FinishReason};

/// Beam search by hand over one-token requests (no KV shared between beams or steps): each
/// step every beam proposes its `2 × width` most likely tokens, the `width` best cumulative
/// log-probabilities go on (ties: the earlier beam, then the lower token id). No stop tokens
/// (`ignore_eos`), so every answer has `max_tokens` tokens and the length penalty does not
/// change the order. Returns the beams, best first, with their cumulative log-probabilities.
fn reference(e: &Engine, prompt: &[u32], width: usize, max_tokens: usize) -> Vec<(Vec<u32>, f64)> {
    let mut beams: Vec<(Vec<u32>, f64)> = vec![(Vec::new(), 0.0)];
    for _ in 0..max_tokens {
        let (tx, mut rx) = event_channel();
        let ids: Vec<_> = beams
            .iter()
            .map(|(tokens, _)| {
                let mut r = greedy([prompt, tokens].concat(), 1);
                r.logprobs = Some(2 * width);
                e.submit(r, tx.clone()).unwrap()
            })
            .collect();
        let out = collect(&mut rx, ids.len());
        let mut candidates: Vec<(usize, u32, f64)> = Vec::new();
        for (b, id) in ids.iter().enumerate() {
            for &(token, logprob) in &out[id].logprobs[0].top {
                candidates.push((b, token, beams[b].1 + logprob as f64));
            }
        }
        candidates.sort_by(|x, y| y.2.total_cmp(&x.2).then(x.0.cmp(&y.0)).then(x.1.cmp(&y.1)));
        candidates.truncate(width);
        beams = candidates
            .iter()
            .map(|&(b, token, cum)| ([&beams[b].0[..], &[token]].concat(), cum))
            .collect();
    }
    beams
}

fn beam_search(e: &Engine, prompt: &[u32], width: usize, max_tokens: usize) -> Vec<Vec<u32>> {
    let (tx, mut rx) = event_channel();
    let beam = BeamSearch {
        width,
        length_penalty: 1.0,
    };
    let ids = e
        .submit_beam_search(greedy(prompt.to_vec(), max_tokens), beam, tx)
        .unwrap();
    assert_eq!(ids.len(), width);
    let out = collect(&mut rx, width);
    ids.iter()
        .map(|id| {
            let o = &out[id];
            let f = o.finished.as_ref().expect("finished, not failed");
            assert_eq!(f.reason, FinishReason::Length);
            assert_eq!(f.usage.completion_tokens, max_tokens);
            o.tokens.clone()
        })
        .collect()
}

#[test]
fn beams_match_a_search_that_shares_nothing_in_every_mode() {
    for mode in SHARING_MODES {
        for caching in [false, true] {
            let e = sharing_engine(mode, caching, 64 << 20);
            let name = format!("{} caching {caching}", e.metrics().kv_name);
            let prompt = chat_prompts(&e, 2).remove(1);
            let expected = reference(&e, &prompt, 4, 6);
            assert_empty(&e, &name);
            let answers = beam_search(&e, &prompt, 4, 6);
            let expected_tokens: Vec<Vec<u32>> = expected.iter().map(|b| b.0.clone()).collect();
            assert_eq!(answers, expected_tokens, "{name}: {expected:?}");
            // Width 1 is greedy.
            let greedy_answer = common::serving::run_one(&e, greedy(prompt.clone(), 6)).tokens;
            assert_eq!(
                beam_search(&e, &prompt, 1, 6),
                vec![greedy_answer],
                "{name}"
            );
            assert_empty(&e, &name);
        }
    }
}

#[test]
fn beams_share_their_prefix_kv_and_an_abort_frees_everything() {
    for mode in SHARING_MODES {
        let e = sharing_engine(mode, false, 64 << 20);
        let name = e.metrics().kv_name;
        let prompt = chat_prompts(&e, 1).remove(0);
        let (tx, mut rx) = event_channel();
        let beam = BeamSearch {
            width: 4,
            length_penalty: 1.0,
        };
        let ids = e
            .submit_beam_search(greedy(prompt.clone(), 400), beam, tx)
            .unwrap();
        // Four beams hold KV: the prompt's whole units once, not four times.
        let usage = usage_with(&e, 4);
        let per_token = e.metrics().kv_bytes_per_token;
        let saved = usage
            .bytes_holding_tokens
            .saturating_sub(usage.bytes_allocated);
        let at_least = 3 * (prompt.len() - 2 * unit_tokens(mode)) * per_token;
        assert!(
            saved >= at_least,
            "{name}: {usage:?}: {saved} bytes shared, expected at least {at_least}"
        );
        assert!(usage.bytes_without_sharing >= usage.bytes_allocated + at_least);
        // Aborting any answer aborts the search.
        e.abort(ids[2]);
        let out = collect(&mut rx, 4);
        for id in &ids {
            let f = out[id].finished.as_ref().unwrap();
            assert_eq!(f.reason, FinishReason::Abort, "{name}");
        }
        assert_empty(&e, &name);
        // Refused: a width of 0 or over max-num-seqs (16), stop strings.
        for width in [0, 17] {
            let (tx, _rx) = event_channel();
            let beam = BeamSearch {
                width,
                length_penalty: 1.0,
            };
            let refused = e
                .submit_beam_search(greedy(prompt.clone(), 4), beam, tx)
                .unwrap_err();
            assert!(refused.to_string().contains("beam width"), "{refused}");
        }
        let mut with_stop = greedy(prompt.clone(), 4);
        with_stop.stop.stop = vec!["x".into()];
        let (tx, _rx) = event_channel();
        let refused = e.submit_beam_search(with_stop, beam, tx).unwrap_err();
        assert!(refused.to_string().contains("stop strings"), "{refused}");
    }
}
