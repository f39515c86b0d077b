//! Parallel sampling (`n > 1`) in the engine, on the CPU with the real SmolLM2, in every KV mode
//! with prefix caching off and on: the samples of one request compute the prompt once and share
//! its KV while they run (the cache's books show the prompt's blocks or pages held once), greedy
//! samples all give the one greedy answer, seeded samples give what each would alone with its
//! own seed (`seed + i`), and aborting them mid-way leaves nothing.

mod common;

use common::serving::{
    assert_empty, chat_prompts, collect, greedy, run_one, sharing_engine, unit_tokens, usage_with,
    SHARING_MODES,
};
use vkv_engine::engine::{event_channel, FinishReason, GenerationRequest};
use vkv_engine::sampler::SamplingParams;

#[test]
fn greedy_samples_share_the_prompt_kv_and_all_give_the_greedy_answer() {
    for mode in SHARING_MODES {
        for caching in [false, true] {
            let e = sharing_engine(mode, caching, 64 << 20);
            let name = format!("{} caching {caching}", e.metrics().kv_name);
            let prompt = chat_prompts(&e, 1).remove(0);
            let reference = run_one(&e, greedy(prompt.clone(), 24)).tokens;
            assert_empty(&e, &name);

            let (tx, mut rx) = event_channel();
            let ids = e
                .submit_samples(greedy(prompt.clone(), 200), 4, tx)
                .unwrap();
            assert_eq!(ids.len(), 4);
            // While all four run: the prompt's whole units are held once. Without sharing the
            // four would hold 4 × their tokens; with it, each sample beyond the first adds only
            // the unit its prompt ends inside (copied) and what it generated since.
            let usage = usage_with(&e, 4);
            let per_token = e.metrics().kv_bytes_per_token;
            let saved = usage
                .bytes_holding_tokens
                .saturating_sub(usage.bytes_allocated);
            let at_least = 3 * (prompt.len() - 2 * unit_tokens(mode) - 24) * per_token;
            assert!(
                saved >= at_least,
                "{name}: {usage:?}: {saved} bytes shared, expected at least {at_least}"
            );
            let out = collect(&mut rx, 4);
            for (i, id) in ids.iter().enumerate() {
                let o = &out[id];
                assert_eq!(o.failed, None, "{name}: sample {i}");
                assert_eq!(&o.tokens[..24], &reference[..], "{name}: sample {i}");
                let f = o.finished.as_ref().unwrap();
                assert_eq!(f.reason, FinishReason::Length, "{name}: sample {i}");
                assert_eq!(f.usage.prompt_tokens, prompt.len(), "{name}");
            }
            // The prompt was computed once, and its last token once per further sample (and, with
            // caching, the second time only the part after its last whole cached unit).
            let m = e.metrics();
            let computed = if caching {
                prompt.len() + unit_tokens(mode) + 3
            } else {
                2 * prompt.len() + 3
            };
            assert!(
                m.prefill_tokens as usize <= computed,
                "{name}: {} prompt tokens computed, expected at most {computed}",
                m.prefill_tokens
            );
            assert_empty(&e, &name);
        }
    }
}

#[test]
fn seeded_samples_are_each_what_their_seed_gives_alone() {
    let sampled = |prompt: &[u32], seed: u64| GenerationRequest {
        sampling: SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.95,
            seed: Some(seed),
        },
        ..greedy(prompt.to_vec(), 16)
    };
    for mode in SHARING_MODES {
        let e = sharing_engine(mode, false, 64 << 20);
        let name = e.metrics().kv_name;
        let prompt = chat_prompts(&e, 2).remove(1);
        let alone: Vec<Vec<u32>> = (0..3)
            .map(|i| run_one(&e, sampled(&prompt, 40 + i)).tokens)
            .collect();
        assert!(
            alone[0] != alone[1] || alone[1] != alone[2],
            "{name}: three seeds gave one output"
        );
        let (tx, mut rx) = event_channel();
        let ids = e.submit_samples(sampled(&prompt, 40), 3, tx).unwrap();
        let out = collect(&mut rx, 3);
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                out[id].tokens,
                alone[i],
                "{name}: sample {i} (seed {})",
                40 + i
            );
        }
        assert_empty(&e, &name);
    }
}

#[test]
fn aborting_samples_mid_way_frees_everything_and_n_zero_is_refused() {
    for mode in SHARING_MODES {
        let e = sharing_engine(mode, true, 64 << 20);
        let name = e.metrics().kv_name;
        let prompt = chat_prompts(&e, 3).remove(2);
        let (tx, mut rx) = event_channel();
        let ids = e
            .submit_samples(greedy(prompt.clone(), 500), 3, tx)
            .unwrap();
        usage_with(&e, 3);
        for &id in &ids {
            e.abort(id);
        }
        let out = collect(&mut rx, 3);
        for id in &ids {
            let f = out[id].finished.as_ref().unwrap();
            assert_eq!(f.reason, FinishReason::Abort, "{name}");
        }
        assert_empty(&e, &name);
        let (tx, _rx) = event_channel();
        let refused = e.submit_samples(greedy(prompt, 4), 0, tx).unwrap_err();
        assert!(
            refused.to_string().contains("n must be at least 1"),
            "{refused}"
        );
    }
}

/// Penalties and `logit_bias` reach every sample: a +100 bias makes every token of every
/// greedy sample the biased one; presence and frequency penalties of 2 keep a greedy answer from repeating a
/// token as often as it does without one; a bias on a token outside the vocabulary is refused.
#[test]
fn logit_bias_and_penalties_apply_to_every_sample() {
    let mode = SHARING_MODES[0];
    let e = sharing_engine(mode, true, 64 << 20);
    let prompt = chat_prompts(&e, 1).remove(0);
    let forced = 1000u32;
    let mut biased = greedy(prompt.clone(), 6);
    biased.adjust.logit_bias = vec![(forced, 100.0)];
    let (tx, mut rx) = event_channel();
    let ids = e.submit_samples(biased, 3, tx).unwrap();
    let out = collect(&mut rx, 3);
    for id in &ids {
        assert_eq!(out[id].tokens, vec![forced; 6]);
    }

    // Greedy SmolLM2 on a counting prompt repeats tokens (", " between numbers); a presence
    // penalty and a frequency penalty of 2 lower how many tokens occur more than once.
    let counting = e
        .model()
        .tokenizer
        .encode("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,", false)
        .unwrap();
    let repeats = |tokens: &[u32]| {
        let distinct: std::collections::HashSet<_> = tokens.iter().collect();
        tokens.len() - distinct.len()
    };
    let plain = run_one(&e, greedy(counting.clone(), 24)).tokens;
    let mut penalised = greedy(counting, 24);
    penalised.adjust.presence_penalty = 2.0;
    penalised.adjust.frequency_penalty = 2.0;
    let penalised = run_one(&e, penalised).tokens;
    assert_ne!(plain, penalised);
    assert!(
        repeats(&penalised) < repeats(&plain),
        "plain {plain:?} penalised {penalised:?}"
    );
    assert_empty(&e, "after adjustments");

    let mut outside = greedy(prompt, 4);
    outside.adjust.logit_bias = vec![(e.model().model.config.vocab_size as u32, 1.0)];
    let (tx, _rx) = event_channel();
    let refused = e.submit(outside, tx).unwrap_err();
    assert!(
        refused.to_string().contains("outside the vocabulary"),
        "{refused}"
    );
}

/// Prompt log-probabilities (`echo` with `logprobs`): one per prompt token, the first `None`,
/// computed over chunks (a prompt longer than the 256-token step) and without prefix-cache
/// hits (caching on, the same prompt twice gives them twice, 0 cached); entry `i` is what a
/// request for the prompt's first `i` tokens reports for its next token. With `n` samples the
/// first one reports them.
#[test]
fn prompt_logprobs_cover_every_prompt_token_over_chunks_and_never_come_from_the_cache() {
    let e = sharing_engine(SHARING_MODES[0], true, 64 << 20);
    let prompt: Vec<u32> = chat_prompts(&e, 2).concat();
    assert!(prompt.len() > 300, "{}", prompt.len());
    let asked = |p: &[u32]| GenerationRequest {
        prompt_logprobs: Some(5),
        ..greedy(p.to_vec(), 2)
    };
    for round in 0..2 {
        let out = run_one(&e, asked(&prompt));
        let lp = out.prompt_logprobs.expect("prompt log-probabilities");
        assert_eq!(lp.len(), prompt.len());
        assert!(lp[0].is_none());
        for (i, l) in lp.iter().enumerate().skip(1) {
            let l = l.as_ref().unwrap();
            assert_eq!(l.token, prompt[i]);
            assert_eq!(l.top.len(), 5);
            assert!(l.logprob <= 0.0 && l.top[0].1 >= l.logprob - 1e-6);
        }
        assert_eq!(
            out.finished.unwrap().usage.cached_tokens,
            0,
            "round {round}"
        );
        for i in [1, 17, 256, 257, prompt.len() - 1] {
            let mut alone = greedy(prompt[..i].to_vec(), 1);
            alone.logprobs = Some(5);
            let first = run_one(&e, alone).logprobs.remove(0);
            let at = lp[i].as_ref().unwrap();
            for (a, b) in at.top.iter().zip(&first.top) {
                assert_eq!(a.0, b.0, "position {i}: {at:?} vs {first:?}");
                assert!(
                    (a.1 - b.1).abs() < 2e-3,
                    "position {i}: {at:?} vs {first:?}"
                );
            }
        }
    }
    let (tx, mut rx) = event_channel();
    let ids = e.submit_samples(asked(&prompt), 3, tx).unwrap();
    let out = collect(&mut rx, 3);
    assert_eq!(
        out[&ids[0]].prompt_logprobs.as_ref().map(Vec::len),
        Some(prompt.len())
    );
    assert_empty(&e, "after prompt logprobs");
}
