//! The token side of the prefix-sharing workloads ([`crate::workload::Workload::PrefixRepetition`]
//! and [`crate::workload::Workload::MultiTurn`]) and what a benchmark reports about the prefix
//! cache.
//!
//! - [`prefix_repetition_prompts`]: seeded random prefixes and suffixes; request *i* takes prefix
//!   *i* mod `NUM_PREFIXES` (round-robin, so every prefix serves the same number of requests
//!   within one and its first use is among the first `NUM_PREFIXES` requests).
//! - [`TokenConversation`] (token ids, `vkv bench offline`) and [`ChatConversation`] (chat
//!   messages, `vkv bench serve`): the multi-turn prompt builders. A turn's prompt is the whole
//!   conversation so far plus the new user message; the reply recorded is what the engine or
//!   server actually produced. [`user_tokens`] and [`user_text`] make the seeded user messages.
//! - [`PerfectCache`] and [`ideal_hits`]: the workload's ideal prefix hit rate: the share of
//!   prompt tokens a cache with unlimited memory and the engine's block size could serve, taking
//!   requests in the order they were sent. As in vLLM's automatic prefix caching it counts whole
//!   blocks only and never the last prompt token (whose logits must be computed), and caches a
//!   finished request's prompt and output but the last output token (whose KV is never computed).
//!   The first request of each prefix therefore misses.
//! - [`PrefixCacheReport`]: the numbers both benchmarks print: cached prompt tokens summed over
//!   requests (the engine's `Usage::cached_tokens`, the server's
//!   `usage.prompt_tokens_details.cached_tokens`), the hit rate they give, the ideal one beside it,
//!   and the server's own `/metrics` counters when it has them.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};

use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use serde_json::{json, Value};

use crate::offline::Summary;
use crate::workload::{MultiTurn, PrefixRepetition};
use vkv_engine::kv::KvMode;

/// The block size assumed for the ideal hit rate where the KV cache has none of its own (vmm, or
/// a server that does not say): vLLM's default.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The block size of the ideal hit rate and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheBlock {
    pub size: usize,
    pub from: String,
}

impl CacheBlock {
    /// The block of a KV mode: the paged cache's block size; for vmm, which has no block of its
    /// own yet, [`DEFAULT_BLOCK_SIZE`] (and the report says it was assumed).
    pub fn of_kv_mode(mode: KvMode) -> CacheBlock {
        match mode {
            KvMode::Paged { block_size } => CacheBlock {
                size: block_size,
                from: "paged --block-size".into(),
            },
            KvMode::Vmm { .. } => CacheBlock::assumed("vmm KV has no block size"),
        }
    }

    /// [`DEFAULT_BLOCK_SIZE`], assumed because of `why`.
    pub fn assumed(why: &str) -> CacheBlock {
        CacheBlock {
            size: DEFAULT_BLOCK_SIZE,
            from: format!("assumed, {why}"),
        }
    }
}

/// The lowest token id drawn: ids below are often special or byte tokens.
const LOWEST_ORDINARY_TOKEN: u32 = 256;

/// One seeded random token id, an ordinary token (>= 256 where the vocabulary allows, below
/// `vocab_size`).
pub fn random_token<R: Rng + ?Sized>(rng: &mut R, vocab_size: usize) -> u32 {
    let high = u32::try_from(vocab_size).unwrap_or(u32::MAX).max(1);
    let low = LOWEST_ORDINARY_TOKEN.min(high - 1);
    rng.random_range(low..high)
}

/// `n` seeded random token ids (see [`random_token`]).
fn random_tokens<R: Rng + ?Sized>(rng: &mut R, n: usize, vocab_size: usize) -> Vec<u32> {
    (0..n).map(|_| random_token(rng, vocab_size)).collect()
}

/// The prompts of `n` prefix-repetition requests: `num_prefixes` random prefixes of `prefix_len`
/// tokens (drawn first), then for request *i* prefix *i* mod `num_prefixes` followed by
/// `suffix_len` fresh random tokens. The same seed gives the same prompts.
pub fn prefix_repetition_prompts(
    spec: &PrefixRepetition,
    n: usize,
    vocab_size: usize,
    seed: u64,
) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let prefixes: Vec<Vec<u32>> = (0..spec.num_prefixes)
        .map(|_| random_tokens(&mut rng, spec.prefix_len, vocab_size))
        .collect();
    (0..n)
        .map(|i| {
            let mut prompt = Vec::with_capacity(spec.prompt_len());
            prompt.extend_from_slice(&prefixes[i % prefixes.len().max(1)]);
            prompt.extend(random_tokens(&mut rng, spec.suffix_len, vocab_size));
            prompt
        })
        .collect()
}

/// The user messages of a multi-turn run in token ids: `[conversation][turn]`, each `user_len`
/// seeded random tokens.
pub fn user_tokens(
    conversations: usize,
    turns: usize,
    user_len: usize,
    vocab_size: usize,
    seed: u64,
) -> Vec<Vec<Vec<u32>>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..conversations)
        .map(|_| {
            (0..turns)
                .map(|_| random_tokens(&mut rng, user_len, vocab_size))
                .collect()
        })
        .collect()
}

/// Common English words that BPE vocabularies hold as one token each with their leading space,
/// so that `n` of them are about `n` tokens.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "time",
    "people",
    "year",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "name",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "back",
    "face",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
];

/// The user messages of a multi-turn run as text, `[conversation][turn]`: `user_len` seeded
/// random common words each, about `user_len` tokens (the server's `usage` gives the exact
/// count; a word list rather than token ids because a chat message is text).
pub fn user_text(
    conversations: usize,
    turns: usize,
    user_len: usize,
    seed: u64,
) -> Vec<Vec<String>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..conversations)
        .map(|_| {
            (0..turns)
                .map(|_| {
                    let words: Vec<&str> = (0..user_len)
                        .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                        .collect();
                    words.join(" ")
                })
                .collect()
        })
        .collect()
}

/// One multi-turn conversation in token ids: every earlier prompt and reply, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenConversation {
    history: Vec<u32>,
}

impl TokenConversation {
    /// The next turn's prompt: the conversation so far followed by `user`, which joins the
    /// conversation.
    pub fn turn_prompt(&mut self, user: &[u32]) -> Vec<u32> {
        self.history.extend_from_slice(user);
        self.history.clone()
    }

    /// The reply to the last prompt, as generated: it joins the conversation.
    pub fn add_reply(&mut self, reply: &[u32]) {
        self.history.extend_from_slice(reply);
    }
}

/// One multi-turn conversation as OpenAI chat messages.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatConversation {
    messages: Vec<Value>,
}

impl ChatConversation {
    /// The next turn's messages: the conversation so far followed by a user message with `user`,
    /// which joins the conversation.
    pub fn turn_messages(&mut self, user: &str) -> Vec<Value> {
        self.messages.push(json!({"role": "user", "content": user}));
        self.messages.clone()
    }

    /// The assistant's reply to the last messages, as the server returned it.
    pub fn add_reply(&mut self, reply: &str) {
        self.messages
            .push(json!({"role": "assistant", "content": reply}));
    }
}

/// A prefix cache with unlimited memory over whole blocks of `block_size` tokens, keyed as
/// vLLM's (and `vkv_kv::prefix`'s) are: a block by its parent's key and its own tokens.
#[derive(Debug, Clone)]
pub struct PerfectCache {
    block_size: usize,
    blocks: HashSet<u64>,
}

impl PerfectCache {
    /// An empty cache of blocks of `block_size` tokens (at least 1).
    pub fn new(block_size: usize) -> PerfectCache {
        PerfectCache {
            block_size: block_size.max(1),
            blocks: HashSet::new(),
        }
    }

    /// The keys of the whole blocks of `tokens`, each chained over its parent's.
    fn keys(&self, tokens: &[u32]) -> Vec<u64> {
        let mut parent = None::<u64>;
        tokens
            .chunks_exact(self.block_size)
            .map(|block| {
                let mut hasher = DefaultHasher::new();
                parent.hash(&mut hasher);
                block.hash(&mut hasher);
                let key = hasher.finish();
                parent = Some(key);
                key
            })
            .collect()
    }

    /// Prompt tokens the cache serves for `prompt`: the leading whole blocks it holds, never
    /// the last prompt token.
    pub fn lookup(&self, prompt: &[u32]) -> usize {
        let computable = &prompt[..prompt.len().saturating_sub(1)];
        self.keys(computable)
            .into_iter()
            .take_while(|key| self.blocks.contains(key))
            .count()
            * self.block_size
    }

    /// Cache the whole blocks of `tokens` (a finished request's prompt and output but its last
    /// token).
    pub fn insert(&mut self, tokens: &[u32]) {
        let keys = self.keys(tokens);
        self.blocks.extend(keys);
    }
}

/// What a perfect cache would have served of a run.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct IdealHits {
    pub block_size: usize,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
}

impl IdealHits {
    /// Cached / prompt tokens (0 for no prompt tokens).
    pub fn rate(&self) -> f64 {
        ratio(self.cached_tokens, self.prompt_tokens)
    }
}

/// The ideal hits of requests sent in this order, each `(prompt, output)`: a request looks its
/// prompt up, then its prompt and output but the last output token are cached. An output not
/// known ahead (requests sent at once) can be given empty: it only matters when a later prompt
/// contains it.
pub fn ideal_hits<'a>(
    requests: impl IntoIterator<Item = (&'a [u32], &'a [u32])>,
    block_size: usize,
) -> IdealHits {
    let mut cache = PerfectCache::new(block_size);
    let (mut prompt_tokens, mut cached_tokens) = (0, 0);
    for (prompt, output) in requests {
        prompt_tokens += prompt.len();
        cached_tokens += cache.lookup(prompt);
        let mut computed = Vec::with_capacity(prompt.len() + output.len());
        computed.extend_from_slice(prompt);
        computed.extend_from_slice(&output[..output.len().saturating_sub(1)]);
        cache.insert(&computed);
    }
    IdealHits {
        block_size: cache.block_size,
        prompt_tokens,
        cached_tokens,
    }
}

/// An estimate of the ideal hits of one chat conversation known only by its usage counts, each
/// turn `(prompt_tokens, completion_tokens)` in order: turn *k* + 1 may reuse turn *k*'s prompt
/// and reply but its last token, in whole blocks, and never its own last prompt token. Exact
/// only if the chat template renders the earlier turns unchanged and the reply's text
/// tokenizes back to the tokens generated.
pub fn estimated_chat_hits(turns: &[(usize, usize)], block_size: usize) -> usize {
    let block = block_size.max(1);
    let whole = |tokens: usize| tokens / block * block;
    turns
        .windows(2)
        .map(|pair| {
            let ((prompt, reply), (next, _)) = (pair[0], pair[1]);
            let cached = (prompt + reply).saturating_sub(1);
            whole(cached).min(whole(next.saturating_sub(1)))
        })
        .sum()
}

fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The TTFT of a multi-turn run's first turns and of its later ones (which a prefix cache
/// speeds up), in ms.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TurnLatency {
    pub conversations: usize,
    pub turns: usize,
    pub think_seconds: f64,
    pub first_turn_ttft_ms: Summary,
    pub later_turns_ttft_ms: Summary,
}

impl TurnLatency {
    /// From the TTFTs in seconds of first turns and of later turns.
    pub fn new(spec: &MultiTurn, first_s: &[f64], later_s: &[f64]) -> TurnLatency {
        TurnLatency {
            conversations: spec.conversations,
            turns: spec.turns,
            think_seconds: spec.think_seconds,
            first_turn_ttft_ms: Summary::of(first_s).scaled(1e3),
            later_turns_ttft_ms: Summary::of(later_s).scaled(1e3),
        }
    }

    /// Lines for a text table: (label, value in ms).
    pub fn lines(&self) -> Vec<(String, f64)> {
        let mut lines = Vec::new();
        for (which, s) in [
            ("turn 1", self.first_turn_ttft_ms),
            ("turns 2+", self.later_turns_ttft_ms),
        ] {
            lines.push((format!("TTFT {which} median ms"), s.median));
            lines.push((format!("TTFT {which} p99 ms"), s.p99));
        }
        lines
    }
}

/// The prefix-cache numbers of a run, as both benchmarks report them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PrefixCacheReport {
    /// Whether the engine ran with prefix caching (offline: the configuration; serve: unknown).
    pub enabled: Option<bool>,
    /// Prompt tokens of the requests the counts below cover.
    pub prompt_tokens: usize,
    /// Per-request cached prompt tokens summed over requests; `None` when no response gave them.
    pub cached_tokens: Option<usize>,
    /// `cached_tokens / prompt_tokens`.
    pub hit_rate: Option<f64>,
    /// The block size of the ideal hit rate, and where it came from.
    pub block_size: usize,
    pub block_size_from: String,
    /// What a perfect cache (unlimited memory, whole blocks) would have served, in the order the
    /// requests were sent; `None` where it cannot be known.
    pub ideal_cached_tokens: Option<usize>,
    pub ideal_hit_rate: Option<f64>,
    /// How the ideal was found, where it is not exact (`None`: exact, from the token ids).
    pub ideal_note: Option<String>,
    /// The server's `vkv_prefix_cache_queries_total` / `vkv_prefix_cache_hits_total` (tokens)
    /// during the run, and hits / queries, when `/metrics` has them.
    pub server_queries: Option<f64>,
    pub server_hits: Option<f64>,
    pub server_hit_rate: Option<f64>,
}

impl PrefixCacheReport {
    /// The report of `prompt_tokens` of which `cached_tokens` were served from the cache, beside
    /// `ideal` (in blocks of `block_size`, which came `block_size_from`).
    pub fn new(
        prompt_tokens: usize,
        cached_tokens: Option<usize>,
        block: &CacheBlock,
        ideal: Option<IdealHits>,
    ) -> PrefixCacheReport {
        PrefixCacheReport {
            enabled: None,
            prompt_tokens,
            cached_tokens,
            hit_rate: cached_tokens.map(|c| ratio(c, prompt_tokens)),
            block_size: block.size,
            block_size_from: block.from.clone(),
            ideal_cached_tokens: ideal.map(|i| i.cached_tokens),
            ideal_hit_rate: ideal.map(|i| i.rate()),
            ideal_note: None,
            server_queries: None,
            server_hits: None,
            server_hit_rate: None,
        }
    }

    /// The same report with the server's counters over the run.
    pub fn with_server_counters(mut self, queries: Option<f64>, hits: Option<f64>) -> Self {
        self.server_queries = queries;
        self.server_hits = hits;
        self.server_hit_rate = match (queries, hits) {
            (Some(q), Some(h)) if q > 0.0 => Some(h / q),
            _ => None,
        };
        self
    }

    /// The report's lines for a text table: (label, value).
    pub fn lines(&self) -> Vec<(String, String)> {
        let percent = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{:.1}", 100.0 * x));
        let mut lines = vec![
            (
                "Prefix caching:".to_string(),
                self.enabled
                    .map_or("?", |on| if on { "on" } else { "off" })
                    .to_string(),
            ),
            (
                "Cached prompt tokens:".to_string(),
                self.cached_tokens.map_or("-".into(), |c| c.to_string()),
            ),
            ("Prefix hit rate (%):".to_string(), percent(self.hit_rate)),
            (
                format!(
                    "Ideal hit rate, block {} (%){}:",
                    self.block_size,
                    if self.ideal_note.is_some() {
                        " est."
                    } else {
                        ""
                    }
                ),
                percent(self.ideal_hit_rate),
            ),
        ];
        if self.server_queries.is_some() || self.server_hits.is_some() {
            lines.push((
                "Server prefix cache hits/queries:".to_string(),
                format!(
                    "{}/{}",
                    self.server_hits.map_or("-".into(), |h| h.to_string()),
                    self.server_queries.map_or("-".into(), |q| q.to_string())
                ),
            ));
            lines.push((
                "Server prefix hit rate (%):".to_string(),
                percent(self.server_hit_rate),
            ));
        }
        lines
    }
}

#[cfg(test)]
#[path = "prefix_tests.rs"]
mod tests;
