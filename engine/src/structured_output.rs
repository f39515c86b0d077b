//! Structured outputs (OpenAI's `response_format`): generation constrained to text that parses
//! as JSON — any object (`json_object`) or a value that validates against a JSON Schema
//! (`json_schema`) — by masking, before each token is sampled, every token that could not
//! continue a valid output.
//!
//! The grammar engine is llguidance (guidance-ai; the one llama.cpp, vLLM and SGLang offer). A
//! [`GrammarCompiler`] is built once per engine from the tokenizer's token bytes (its first use
//! takes a few tens of milliseconds); it compiles a request's format into a [`Grammar`] on the
//! caller's thread, so an invalid or unsupported schema is refused before the request is queued
//! ([`GrammarError::Schema`], which the server answers with a 400). Each sequence then carries
//! its own [`Grammar`] (the `n` samples of a request clone it), in its sampler: the serving loop
//! computes the next mask while the device computes the step's forward pass
//! ([`Grammar::prepare`]: off the critical path on the GPU), and the sampler sets the logits of
//! forbidden tokens to −∞ before it picks ([`Grammar::mask`]) and advances the grammar by the
//! token it picked ([`Grammar::accept`]). Rows sampled under a grammar bring their logits back
//! from the device, like rows sampled with temperature.
//!
//! Invariants: a token the mask forbids is never picked; an end-of-sequence token is allowed
//! only where the output is complete; once the grammar has matched a whole value it is
//! [`Grammar::finished`] and the sequence ends (`stop`) even with `ignore_eos`; a grammar that
//! errs (no token can continue, which an unsatisfiable schema can cause) ends its request with
//! the error. Output is compact JSON — no whitespace between the tokens of its syntax — which
//! keeps small models from looping on whitespace (vLLM's `disable-any-whitespace`).

use std::fmt;
use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;
use vkv_model::tokenizer::Tokenizer;

/// What the output must be (OpenAI's `response_format`, beside `text`, which needs no grammar).
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// A JSON value that validates against this schema.
    JsonSchema(Value),
}

/// Why a grammar could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GrammarError {
    /// The model's vocabulary cannot drive a grammar (no end-of-sequence token, token texts that
    /// are not byte-level or byte-fallback).
    #[error("structured outputs are not available for this model: {0}")]
    Vocabulary(String),
    /// The schema is invalid, uses a JSON Schema feature llguidance does not implement, or can
    /// match nothing.
    #[error("the JSON schema cannot be used: {0}")]
    Schema(String),
}

/// The tokenizer as llguidance sees it: each token's bytes (special tokens marked), and
/// tokenizing text with the model's own tokenizer (byte strings that are not UTF-8 fall back to
/// the trie's greedy tokenization).
struct VocabEnv {
    trie: TokTrie,
    encode: Box<Encode>,
}

/// Text to token ids, as the model's tokenizer does it.
type Encode = dyn Fn(&str) -> Vec<u32> + Send + Sync;

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        self.trie
            .tokenize_with_greedy_fallback(s, |text| (self.encode)(text))
    }
}

/// Compiles response formats into grammars for one model's vocabulary.
pub struct GrammarCompiler {
    factory: ParserFactory,
    vocab_size: usize,
}

impl fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

impl GrammarCompiler {
    /// For `tokenizer`, whose model has `vocab_size` logits (at least the tokenizer's ids; the
    /// rest are never allowed), ending a sequence with any of `eos`; `encode` tokenizes text as
    /// the model's tokenizer does (without special tokens).
    pub fn new(
        tokenizer: &Tokenizer,
        encode: impl Fn(&str) -> Vec<u32> + Send + Sync + 'static,
        vocab_size: usize,
        eos: &[u32],
    ) -> Result<GrammarCompiler, GrammarError> {
        let vocabulary = |m: String| GrammarError::Vocabulary(m);
        let json = tokenizer
            .hf_json()
            .map_err(|e| vocabulary(format!("writing the tokenizer out: {e}")))?;
        let json: Value = serde_json::from_str(&json)
            .map_err(|e| vocabulary(format!("reading the tokenizer back: {e}")))?;
        // llguidance asserts on token names it does not expect: a refusal, not a panic.
        let words = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|_| vocabulary("a token's text is not byte-level or byte-fallback".into()))?;
        let mut words = words.map_err(|e| vocabulary(e.to_string()))?;
        if words.len() > vocab_size {
            return Err(vocabulary(format!(
                "the tokenizer has {} tokens, more than the model's {vocab_size} logits",
                words.len()
            )));
        }
        // Ids the tokenizer does not use (padding of the embedding): never allowed, as llguidance
        // never allows an empty token.
        words.resize(vocab_size, Vec::new());
        let Some(&first) = eos.first() else {
            return Err(vocabulary(
                "the model has no end-of-sequence token to end a structured output with".into(),
            ));
        };
        let info = TokRxInfo::new(vocab_size as u32, first);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(VocabEnv {
            trie,
            encode: Box::new(encode),
        });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| vocabulary(e.to_string()))?;
        // llguidance's own logging goes nowhere: errors come back as values.
        factory.quiet();
        Ok(GrammarCompiler {
            factory,
            vocab_size,
        })
    }

    /// The grammar of `format`, at its start.
    pub fn compile(&self, format: &ResponseFormat) -> Result<Grammar, GrammarError> {
        let mut schema = match format {
            ResponseFormat::JsonObject => serde_json::json!({"type": "object"}),
            ResponseFormat::JsonSchema(schema) => schema.clone(),
        };
        if !(schema.is_object() || schema.is_boolean()) {
            return Err(GrammarError::Schema(format!(
                "a schema is an object or a boolean, found {schema}"
            )));
        }
        if let Some(object) = schema.as_object_mut() {
            // Compact output; a client's own `x-guidance` options are not taken.
            object.remove("x-guidance");
            JsonCompileOptions {
                whitespace_flexible: false,
                ..JsonCompileOptions::default()
            }
            .apply_to(&mut schema);
        }
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| GrammarError::Schema(e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Schema(e));
        }
        // A schema that matches nothing errs on its first mask: refuse it now.
        let mask = matcher
            .compute_mask()
            .map_err(|e| GrammarError::Schema(e.to_string()))?;
        if mask.is_zero() {
            return Err(GrammarError::Schema("no output can match it".into()));
        }
        Ok(Grammar {
            matcher,
            next_mask: Some(mask),
            vocab_size: self.vocab_size,
        })
    }
}

/// One sequence's place in its grammar, and the mask of the tokens that may come next once
/// computed.
pub struct Grammar {
    matcher: Matcher,
    next_mask: Option<SimpleVob>,
    vocab_size: usize,
}

impl Clone for Grammar {
    fn clone(&self) -> Self {
        Grammar {
            matcher: self.matcher.deep_clone(),
            next_mask: self.next_mask.clone(),
            vocab_size: self.vocab_size,
        }
    }
}

impl fmt::Debug for Grammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Grammar")
            .field("finished", &self.finished())
            .field("error", &self.error())
            .finish()
    }
}

impl Grammar {
    /// Compute the mask of the next token, if not yet done (the serving loop calls it while the
    /// device computes the logits).
    pub fn prepare(&mut self) {
        if self.next_mask.is_none() && !self.matcher.is_error() {
            // An error stays in the matcher, where `error` finds it.
            self.next_mask = self.matcher.compute_mask_or_eos().ok();
        }
    }

    /// Set the logits of every token the grammar forbids next to −∞. With the grammar in error,
    /// nothing is changed (the request is ended by whoever sees [`Grammar::error`]).
    pub fn mask(&mut self, logits: &mut [f32]) {
        self.prepare();
        let Some(mask) = &self.next_mask else {
            return;
        };
        for (token, logit) in logits.iter_mut().enumerate() {
            if token >= self.vocab_size || !mask.is_allowed(token as u32) {
                *logit = f32::NEG_INFINITY;
            }
        }
    }

    /// Advance by the token sampled. A token the grammar forbids puts it in error.
    pub fn accept(&mut self, token: u32) {
        self.next_mask = None;
        // The error stays in the matcher.
        let _ = self.matcher.consume_token(token);
    }

    /// Whether a whole value has been matched (nothing may follow but end-of-sequence, which
    /// this counts as matched too).
    pub fn finished(&self) -> bool {
        !self.matcher.is_error() && self.matcher.is_stopped()
    }

    /// What went wrong, if the grammar is in error.
    pub fn error(&self) -> Option<String> {
        self.matcher.get_error()
    }
}
