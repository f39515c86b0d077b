//! Automatic prefix caching in the engine, on the CPU with the real SmolLM2: greedy outputs are
//! the same with caching on and off — for requests sharing a long system prompt, sent one by
//! one and all at once, for a chat's second turn, and under a KV budget so small that requests
//! are preempted and cached blocks evicted — while the later requests report the tokens they
//! found cached, a different `cache_salt` finds none, and nothing is left referenced at the end.

mod common;

use common::serving::{
    assert_empty, chat_prompts, collect, greedy, run_one, sharing_engine as engine,
    SHARING_MODES as MODES,
};

use vkv_engine::engine::{event_channel, GenerationRequest, RequestId};

fn salted(prompt: Vec<u32>, max_tokens: usize, salt: &str) -> GenerationRequest {
    GenerationRequest {
        cache_salt: Some(salt.to_string()),
        ..greedy(prompt, max_tokens)
    }
}

#[test]
fn greedy_outputs_are_the_same_with_caching_on_and_off() {
    for mode in MODES {
        let off = engine(mode, false, 64 << 20);
        let on = engine(mode, true, 64 << 20);
        let name = on.metrics().kv_name;
        let prompts = chat_prompts(&on, 6);
        assert!(
            prompts[0].len() > 200,
            "{name}: {} tokens",
            prompts[0].len()
        );
        let reference: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| run_one(&off, greedy(p.clone(), 16)).tokens)
            .collect();
        assert_eq!(off.metrics().prefix, None, "{name}: caching is off");

        // One by one: the first computes everything, the next find the system prompt cached.
        let first = run_one(&on, greedy(prompts[0].clone(), 16));
        assert_eq!(first.tokens, reference[0], "{name}");
        assert_eq!(first.finished.unwrap().usage.cached_tokens, 0, "{name}");
        let second = run_one(&on, greedy(prompts[1].clone(), 16));
        assert_eq!(second.tokens, reference[1], "{name}: second request");
        let cached = second.finished.unwrap().usage.cached_tokens;
        assert!(
            cached >= 150 && cached < prompts[1].len(),
            "{name}: {cached} cached"
        );

        // A chat's second turn: the first turn's prompt and answer, then a new question.
        let mut turn2 = prompts[0].clone();
        turn2.extend(&first.tokens);
        turn2.extend(
            on.model()
                .tokenizer
                .encode("\nAnd why is it red at dusk?", false)
                .unwrap(),
        );
        let turn2_off = run_one(&off, greedy(turn2.clone(), 16));
        let turn2_on = run_one(&on, greedy(turn2.clone(), 16));
        assert_eq!(turn2_on.tokens, turn2_off.tokens, "{name}: second turn");
        let cached = turn2_on.finished.unwrap().usage.cached_tokens;
        assert!(
            cached >= prompts[0].len() - 16,
            "{name}: turn 2 found {cached} cached"
        );

        // All at once, repeated: batched with each other, sharing blocks while they run.
        let (tx, mut rx) = event_channel();
        let ids: Vec<RequestId> = prompts
            .iter()
            .chain(&prompts)
            .map(|p| on.submit(greedy(p.clone(), 16), tx.clone()).unwrap())
            .collect();
        let out = collect(&mut rx, ids.len());
        let wrong: Vec<(usize, usize, Option<String>)> = ids
            .iter()
            .enumerate()
            .filter(|(i, id)| out[id].tokens != reference[i % prompts.len()])
            .map(|(i, id)| {
                let f = out[id]
                    .finished
                    .as_ref()
                    .map_or(0, |f| f.usage.cached_tokens);
                (i, f, out[id].failed.clone())
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{name}: batched, differing (request, cached, failed): {wrong:?}"
        );

        // Another tenant's salt finds nothing cached, and gets the same answer.
        let other = run_one(&on, salted(prompts[2].clone(), 16, "tenant-b"));
        assert_eq!(other.tokens, reference[2], "{name}");
        assert_eq!(
            other.finished.unwrap().usage.cached_tokens,
            0,
            "{name}: salted"
        );

        let stats = on.metrics().prefix.expect("caching is on");
        assert!(
            stats.hit_tokens > 0 && stats.hit_tokens < stats.queried_tokens,
            "{name}: {stats:?}"
        );
        assert!(stats.evictable_units > 0, "{name}: {stats:?}");
        assert_empty(&on, &name);
        assert_empty(&off, &name);
    }
}

#[test]
fn preemption_and_eviction_under_a_tiny_budget_change_no_output_and_leak_nothing() {
    for mode in MODES {
        // About 700 tokens of f32 KV (46 080 bytes a token): two or three of these requests
        // (about 260 tokens each with their output) at a time, so later ones preempt and evict.
        let kv_memory = 700 * 46_080;
        let off = engine(mode, false, kv_memory);
        let on = engine(mode, true, kv_memory);
        let name = on.metrics().kv_name;
        let mut prompts = chat_prompts(&on, 8);
        // Half of them with a different start, so they compete for the cache.
        for p in prompts.iter_mut().skip(4) {
            p.reverse();
        }
        let reference: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| run_one(&off, greedy(p.clone(), 24)).tokens)
            .collect();
        let (tx, mut rx) = event_channel();
        let ids: Vec<RequestId> = prompts
            .iter()
            .map(|p| on.submit(greedy(p.clone(), 24), tx.clone()).unwrap())
            .collect();
        let out = collect(&mut rx, ids.len());
        for (i, id) in ids.iter().enumerate() {
            assert!(out[id].failed.is_none(), "{name}: {:?}", out[id].failed);
            assert_eq!(out[id].tokens, reference[i], "{name}: request {i}");
        }
        let m = on.metrics();
        let stats = m.prefix.expect("caching is on");
        assert!(m.preemptions > 0, "{name}: no preemption");
        assert!(stats.evictions > 0, "{name}: no eviction {stats:?}");
        assert_empty(&on, &name);
    }
}
