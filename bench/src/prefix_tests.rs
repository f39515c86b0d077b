//! Test module `tests` of `prefix.rs` (a child module: `super` is `prefix`).

use super::*;

fn spec(num_prefixes: usize, prefix_len: usize, suffix_len: usize) -> PrefixRepetition {
    PrefixRepetition {
        num_prefixes,
        prefix_len,
        suffix_len,
        output_len: 8,
    }
}

#[test]
fn prefix_repetition_requests_share_prefixes_and_differ_in_suffixes() {
    let spec = spec(3, 40, 12);
    let prompts = prefix_repetition_prompts(&spec, 10, 50_000, 7);
    assert_eq!(prompts.len(), 10);
    for (i, prompt) in prompts.iter().enumerate() {
        assert_eq!(prompt.len(), 52);
        assert!(prompt.iter().all(|&t| (256..50_000).contains(&t)));
        for (j, other) in prompts.iter().enumerate().skip(i + 1) {
            // Round-robin: same prefix token for token exactly when i ≡ j (mod 3).
            assert_eq!(prompt[..40] == other[..40], i % 3 == j % 3, "{i} {j}");
            assert_ne!(prompt[40..], other[40..], "suffixes of {i} and {j}");
        }
    }
    // The three prefixes differ from the first token on (random 50k-vocabulary draws).
    assert_ne!(prompts[0][0], prompts[1][0]);
}

#[test]
fn prefix_repetition_is_seeded() {
    let spec = spec(2, 16, 4);
    let a = prefix_repetition_prompts(&spec, 6, 1000, 1);
    assert_eq!(a, prefix_repetition_prompts(&spec, 6, 1000, 1));
    assert_ne!(a, prefix_repetition_prompts(&spec, 6, 1000, 2));
}

#[test]
fn ideal_hits_of_a_hand_case() {
    // Prefixes of 40 tokens, suffixes of 9, block 16: a prompt of 49 tokens has 48 computable
    // ones = 3 whole blocks, of which the first 2 (32 tokens) lie inside the shared prefix.
    // Five requests over two prefixes (A B A B A): the first A and the first B miss, the three
    // others hit 32 tokens each.
    let prompts = prefix_repetition_prompts(&spec(2, 40, 9), 5, 1000, 3);
    let hits = ideal_hits(prompts.iter().map(|p| (p.as_slice(), &[][..])), 16);
    assert_eq!(hits.prompt_tokens, 5 * 49);
    assert_eq!(hits.cached_tokens, 3 * 32);
    assert!((hits.rate() - 96.0 / 245.0).abs() < 1e-12);
    // With block 8, 40 = 5 blocks are shared.
    let hits = ideal_hits(prompts.iter().map(|p| (p.as_slice(), &[][..])), 8);
    assert_eq!(hits.cached_tokens, 3 * 40);
}

#[test]
fn ideal_hits_never_count_the_last_prompt_token() {
    // The same 32-token prompt twice, block 16: the second may reuse only the first block, since
    // its last token must be computed (31 computable tokens = 1 whole block).
    let prompt: Vec<u32> = (0..32).collect();
    let hits = ideal_hits([(&prompt[..], &[][..]), (&prompt[..], &[][..])], 16);
    assert_eq!(hits.cached_tokens, 16);
    // 33 tokens: 32 computable, both blocks reused.
    let prompt: Vec<u32> = (0..33).collect();
    let hits = ideal_hits([(&prompt[..], &[][..]), (&prompt[..], &[][..])], 16);
    assert_eq!(hits.cached_tokens, 32);
}

#[test]
fn ideal_hits_count_cached_output_but_its_last_token() {
    // Turn 2 = turn 1 (10 tokens) + reply (8) + user (10). The cache holds turn 1's prompt and
    // reply but the reply's last token: 17 tokens = 2 blocks of 8 (16 tokens).
    let mut conversation = TokenConversation::default();
    let first = conversation.turn_prompt(&[1; 10]);
    let reply = [2u32; 8];
    conversation.add_reply(&reply);
    let second = conversation.turn_prompt(&[3; 10]);
    let hits = ideal_hits([(&first[..], &reply[..]), (&second[..], &[][..])], 8);
    assert_eq!(hits.cached_tokens, 16);
    assert_eq!(hits.prompt_tokens, 10 + 28);
    // A different earlier block breaks the chain: nothing after it is served.
    let other: Vec<u32> = [vec![9; 8], second[8..].to_vec()].concat();
    let hits = ideal_hits([(&first[..], &reply[..]), (&other[..], &[][..])], 8);
    assert_eq!(hits.cached_tokens, 0);
}

#[test]
fn token_turns_extend_the_previous_prompt_and_reply() {
    let users = user_tokens(2, 3, 5, 1000, 4);
    assert_eq!(users.len(), 2);
    assert!(users
        .iter()
        .all(|c| c.len() == 3 && c.iter().all(|u| u.len() == 5)));
    assert_ne!(users[0][0], users[1][0]);
    let mut conversation = TokenConversation::default();
    let mut previous: Option<(Vec<u32>, Vec<u32>)> = None;
    for (k, user) in users[0].iter().enumerate() {
        let prompt = conversation.turn_prompt(user);
        match &previous {
            None => assert_eq!(&prompt, user),
            Some((before, reply)) => {
                let expected = [before.as_slice(), reply, user].concat();
                assert_eq!(prompt, expected, "turn {k}");
            }
        }
        let reply: Vec<u32> = (0..4).map(|i| 10 * k as u32 + i).collect();
        conversation.add_reply(&reply);
        previous = Some((prompt, reply));
    }
    assert_eq!(previous.unwrap().0.len(), 3 * 5 + 2 * 4);
}

#[test]
fn chat_turns_extend_the_previous_messages_and_reply() {
    let users = user_text(1, 3, 6, 9);
    assert!(users[0].iter().all(|u| u.split(' ').count() == 6));
    assert_eq!(users, user_text(1, 3, 6, 9));
    let mut conversation = ChatConversation::default();
    let first = conversation.turn_messages(&users[0][0]);
    assert_eq!(first, vec![json!({"role": "user", "content": users[0][0]})]);
    conversation.add_reply("the reply");
    let second = conversation.turn_messages(&users[0][1]);
    assert_eq!(second.len(), 3);
    assert_eq!(second[..1], first[..]);
    assert_eq!(
        second[1],
        json!({"role": "assistant", "content": "the reply"})
    );
    assert_eq!(second[2]["content"], users[0][1]);
    conversation.add_reply("again");
    let third = conversation.turn_messages(&users[0][2]);
    assert_eq!(third[..3], second[..]);
    assert_eq!(third[3]["content"], "again");
}

#[test]
fn report_rates_and_server_counters() {
    let ideal = IdealHits {
        block_size: 16,
        prompt_tokens: 200,
        cached_tokens: 100,
    };
    let r = PrefixCacheReport::new(
        200,
        Some(50),
        &CacheBlock::of_kv_mode(KvMode::Paged { block_size: 16 }),
        Some(ideal),
    )
    .with_server_counters(Some(400.0), Some(100.0));
    assert_eq!(r.hit_rate, Some(0.25));
    assert_eq!(r.ideal_hit_rate, Some(0.5));
    assert_eq!(r.server_hit_rate, Some(0.25));
    let none = PrefixCacheReport::new(200, None, &CacheBlock::assumed("test"), None)
        .with_server_counters(None, None);
    assert_eq!(none.hit_rate, None);
    assert!(none
        .lines()
        .iter()
        .all(|(label, _)| !label.starts_with("Server")));
}

#[test]
fn chat_hits_are_estimated_from_the_previous_turn() {
    // Turn 2 may reuse turn 1's 40 + 10 - 1 = 49 tokens: 3 blocks of 16 (its own 70 - 1 = 69
    // computable tokens would allow 4). Turn 3 may reuse 70 + 10 - 1 = 79: 4 blocks (64).
    assert_eq!(
        estimated_chat_hits(&[(40, 10), (70, 10), (100, 10)], 16),
        48 + 64
    );
    // A turn shorter than what came before is bounded by its own prompt.
    assert_eq!(estimated_chat_hits(&[(100, 10), (20, 10)], 16), 16);
    assert_eq!(estimated_chat_hits(&[(100, 10)], 16), 0);
}
