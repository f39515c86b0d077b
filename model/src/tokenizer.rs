//! Tokenizers, chat templates and streaming detokenization for Llama-family models.
//!
//! This module owns the text side of a model: a [`Tokenizer`] built either from the vocabulary a
//! GGUF file carries ([`GgufVocab`]: the `tokenizer.ggml.*` keys) or from a Hugging Face
//! `tokenizer.json` (plus `tokenizer_config.json`); chat templates rendered with `minijinja`; and a
//! [`StreamDecoder`] that turns generated token ids into text incrementally without ever emitting
//! half a UTF-8 character. Only gpt2-style byte-level BPE vocabularies are accepted from GGUF, which
//! covers Llama 3, Qwen2, SmolLM and the other `tokenizer.ggml.model = "gpt2"` families; the
//! SentencePiece (`"llama"`) vocabularies of Llama 1/2 are rejected with a clear error.
//!
//! Where the ideas come from: building the BPE from GGUF tokens, merges and the `tokenizer.ggml.pre`
//! name follows llama.cpp's gpt2/BPE vocabulary handling (`llama-vocab.cpp`: merges split at the
//! first space after the first byte, per-`pre` regex lists, control and user-defined tokens matched
//! as a whole before pre-tokenization); the tokenizer itself is HF `tokenizers`' ByteLevel BPE
//! (GPT-2's byte-to-unicode alphabet, `Split` pre-tokenizers, ByteLevel decoder); chat templates are
//! HF chat templates (Jinja with `trim_blocks`/`lstrip_blocks`, the `messages` /
//! `add_generation_prompt` / `bos_token` / `eos_token` variables, `raise_exception`, a few Python
//! string and dict methods); the streaming decoder is the prefix-window scheme of HF's
//! `DecodeStream` and vLLM's incremental detokenizer.

use std::fmt;
use std::path::Path;

use minijinja::Environment;
use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

mod chat_template;
mod stream;
use chat_template::compile_chat_template;
pub use stream::StreamDecoder;

/// The GPT-2 pre-tokenizer pattern (also HF ByteLevel's built-in regex).
pub const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// The Llama-3 pre-tokenizer pattern, with llama.cpp's spelled-out case-insensitive contractions.
pub const LLAMA3_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2 pre-tokenizer pattern: as Llama 3, but digits one at a time.
pub const QWEN2_PATTERN: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Token texts that end generation when present in the vocabulary (besides the eos id).
const STOP_TOKENS: [&str; 5] = [
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "</s>",
    "<|endoftext|>",
];

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

const CHAT_TEMPLATE_NAME: &str = "chat_template";

/// Everything that can go wrong building or using a [`Tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The GGUF vocabulary is not a gpt2-style BPE.
    #[error("unsupported tokenizer model \"{model}\" ({kind}): only gpt2-style BPE is supported")]
    UnsupportedModel { model: String, kind: &'static str },
    /// `tokenizer.ggml.tokens` is empty.
    #[error("empty vocabulary: expected at least one token in tokenizer.ggml.tokens, found none")]
    EmptyVocab,
    /// `tokenizer.ggml.token_type` does not have one entry per token.
    #[error(
        "tokenizer.ggml.token_type has {found} entries: expected one per token in \
         tokenizer.ggml.tokens ({expected})"
    )]
    TokenTypeCount { expected: usize, found: usize },
    /// Two ids carry the same token text (llama.cpp refuses these vocabularies too).
    #[error("token {id} {token:?} repeats token {first}: expected every token text to be unique")]
    DuplicateToken { token: String, first: u32, id: u32 },
    /// A special token id (bos, eos, ...) is not a vocabulary id.
    #[error("{which} token id {id} is out of range: expected an id below the vocabulary size {vocab_size}")]
    SpecialIdOutOfRange {
        which: &'static str,
        id: u32,
        vocab_size: usize,
    },
    /// A merge is not two tokens separated by a space.
    #[error("merge {index} {merge:?}: expected two tokens separated by a space")]
    MalformedMerge { index: usize, merge: String },
    /// A merge names a token (or produces one) that is not in the vocabulary.
    #[error("merge {index} {merge:?}: expected {token:?} in the vocabulary, found no such token")]
    MergeUnknownToken {
        index: usize,
        merge: String,
        token: String,
    },
    /// HF `tokenizers` refused the model or a pre-tokenizer.
    #[error("could not build the tokenizer: {0}")]
    Build(String),
    /// A file could not be read or parsed.
    #[error("could not load {path}: {message}")]
    Load { path: String, message: String },
    /// An id passed to decode is not in the vocabulary.
    #[error(
        "token id {id} is out of range: expected an id in the vocabulary of {vocab_size} tokens"
    )]
    IdOutOfRange { id: u32, vocab_size: usize },
    /// HF `tokenizers` failed to encode.
    #[error("could not encode text: {0}")]
    Encode(String),
    /// HF `tokenizers` failed to decode.
    #[error("could not decode ids: {0}")]
    Decode(String),
    /// [`Tokenizer::apply_chat_template`] on a tokenizer without one.
    #[error(
        "no chat template: expected tokenizer.chat_template (GGUF) or chat_template \
         (tokenizer_config.json), found none"
    )]
    NoChatTemplate,
    /// The chat template failed to compile or render, or called `raise_exception`.
    #[error("chat template: {0}")]
    ChatTemplate(String),
    /// The streaming decoder saw earlier text change (only possible with decoders that are not
    /// prefix-stable; never with byte-level BPE).
    #[error("streaming decode: expected the text to start with {expected:?}, found {found:?}")]
    StreamPrefix { expected: String, found: String },
}

/// What a GGUF file says about its vocabulary (`tokenizer.ggml.*` keys and `tokenizer.chat_template`).
///
/// Serde support (every field defaulted) lets tests and tools keep a vocabulary as JSON.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`, e.g. "gpt2".
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. "smollm", "llama-bpe", "qwen2".
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens` (byte-level BPE strings, e.g. "Ġthe").
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.token_type`: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    /// Empty means "all normal" (llama.cpp treats a missing array the same way).
    pub token_types: Vec<i64>,
    /// `tokenizer.ggml.merges`, "a b" per entry, highest priority first.
    pub merges: Vec<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub unknown_token_id: Option<u32>,
    pub padding_token_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (false when absent).
    pub add_bos_token: bool,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
}

/// One chat turn, as chat templates see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The compiled chat template, or why it would not compile (reported when it is used, so that a
/// model with a template minijinja cannot parse still serves plain completions).
enum ChatTemplate {
    None,
    Ready(Box<Environment<'static>>),
    Broken(String),
}

/// A text tokenizer: HF `tokenizers` underneath, plus the special ids, BOS policy and chat
/// template of the model.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    stop_ids: Vec<u32>,
    bos_text: String,
    eos_text: String,
    chat: ChatTemplate,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .field("stop_ids", &self.stop_ids)
            .field("has_chat_template", &self.has_chat_template())
            .finish_non_exhaustive()
    }
}

/// What kind of tokenizer a non-gpt2 `tokenizer.ggml.model` names (for the error message).
fn model_kind(model: &str) -> &'static str {
    match model {
        "llama" => "SentencePiece",
        "bert" => "WordPiece",
        "t5" => "Unigram",
        "rwkv" => "RWKV",
        "plamo2" => "PLaMo-2",
        "no_vocab" | "none" => "no vocabulary",
        "" => "tokenizer.ggml.model missing",
        _ => "unknown",
    }
}

/// The pre-tokenizer regexes for a `tokenizer.ggml.pre` value, applied in order (each one splits
/// the pieces the previous one left, keeping matches and non-matches: `Split(.., Isolated)`), and
/// whether BPE should take a whole piece that is itself a token before merging (`ignore_merges`).
///
/// Follows llama.cpp's table for the families it knows:
/// * "llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral", "dbrx", "smaug-bpe": the Llama-3
///   pattern, with `ignore_merges` (as Llama 3's tokenizer.json and llama.cpp);
/// * "qwen2", "deepseek-r1-qwen", "stablelm2", "megrez": the Qwen2 pattern;
/// * "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b": `\p{N}`
///   (digits one at a time, HF's `Digits(individual_digits)`) and then the GPT-2 pattern;
/// * "gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2": the GPT-2 pattern.
///
/// Any other value, and a missing `pre`, also gets the plain GPT-2 pattern. llama.cpp would use
/// its own "default" regex list there instead; GPT-2's is the byte-level BPE baseline, and a model
/// whose `pre` is unknown here may tokenize slightly differently from its reference tokenizer.
fn pre_tokenizer_patterns(pre: Option<&str>) -> (&'static [&'static str], bool) {
    match pre.unwrap_or("") {
        "llama-bpe" | "llama3" | "llama-v3" | "falcon3" | "pixtral" | "dbrx" | "smaug-bpe" => {
            (&[LLAMA3_PATTERN], true)
        }
        "qwen2" | "deepseek-r1-qwen" | "stablelm2" | "megrez" => (&[QWEN2_PATTERN], false),
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            (&[r"\p{N}", GPT2_PATTERN], false)
        }
        _ => (&[GPT2_PATTERN], false),
    }
}

/// Split a GGUF merge "a b" at the first space after the first character (llama.cpp looks from
/// byte 1 so that a merge of a leading-space token would still split; byte-level tokens never
/// contain a literal space).
fn split_merge(merge: &str) -> Option<(&str, &str)> {
    let (pos, _) = merge.char_indices().skip(1).find(|&(_, c)| c == ' ')?;
    let (a, b) = (&merge[..pos], &merge[pos + 1..]);
    (!a.is_empty() && !b.is_empty()).then_some((a, b))
}

/// A string or `{"content": "..."}` from tokenizer_config.json.
fn config_token(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of `{name, template}` from which
/// "default" (else the first) is taken.
fn config_chat_template(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(list) => {
            let named = |want: Option<&str>| {
                list.iter().find_map(|t| {
                    let name = t.get("name").and_then(|n| n.as_str());
                    if want.is_none() || name == want {
                        t.get("template")?.as_str().map(str::to_owned)
                    } else {
                        None
                    }
                })
            };
            named(Some("default")).or_else(|| named(None))
        }
        _ => None,
    }
}

fn load_error(path: &Path, message: impl fmt::Display) -> TokenizerError {
    TokenizerError::Load {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn template_error(e: minijinja::Error) -> TokenizerError {
    TokenizerError::ChatTemplate(template_message(&e))
}

/// A minijinja error's message with its sources', joined by ": ".
fn template_message(e: &minijinja::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

impl Tokenizer {
    /// Build a byte-level BPE tokenizer from GGUF vocabulary metadata, as llama.cpp does for
    /// `tokenizer.ggml.model = "gpt2"`: BPE over `tokens` (text → id) and `merges` (rank = index),
    /// pre-tokenized by the regexes of `pre` and then ByteLevel (no prefix space, no regex of its
    /// own), decoded by ByteLevel. Control (3) and user-defined (4) tokens are added tokens,
    /// matched as a whole in text; control tokens are special (dropped by
    /// `decode(.., skip_special = true)`).
    ///
    /// `pre` → regexes (llama.cpp's table for these families): "llama-bpe", "llama3", "llama-v3",
    /// "falcon3", "pixtral", "dbrx", "smaug-bpe" → [`LLAMA3_PATTERN`] with `ignore_merges`;
    /// "qwen2", "deepseek-r1-qwen", "stablelm2", "megrez" → [`QWEN2_PATTERN`]; "smollm",
    /// "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b" → `\p{N}` (single
    /// digits) then [`GPT2_PATTERN`]; "gpt2" and anything else, including a missing `pre` →
    /// [`GPT2_PATTERN`] (for unknown values llama.cpp would use its own "default" list instead).
    pub fn from_gguf_vocab(vocab: GgufVocab) -> Result<Tokenizer, TokenizerError> {
        if vocab.model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel {
                kind: model_kind(&vocab.model),
                model: vocab.model,
            });
        }
        let n = vocab.tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if !vocab.token_types.is_empty() && vocab.token_types.len() != n {
            return Err(TokenizerError::TokenTypeCount {
                expected: n,
                found: vocab.token_types.len(),
            });
        }
        if u32::try_from(n).is_err() {
            return Err(TokenizerError::Build(format!(
                "{n} tokens: expected at most {} ids",
                u32::MAX
            )));
        }
        for (which, id) in [
            ("bos", vocab.bos_token_id),
            ("eos", vocab.eos_token_id),
            ("unknown", vocab.unknown_token_id),
            ("padding", vocab.padding_token_id),
        ] {
            if let Some(id) = id.filter(|&id| id as usize >= n) {
                return Err(TokenizerError::SpecialIdOutOfRange {
                    which,
                    id,
                    vocab_size: n,
                });
            }
        }

        // llama.cpp names empty tokens "[EMPTY_<id>]" so that every id has a distinct text.
        let tokens: Vec<String> = vocab
            .tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t
                }
            })
            .collect();
        let mut ids = Vocab::default();
        ids.reserve(n);
        for (i, t) in tokens.iter().enumerate() {
            let id = i as u32;
            if let Some(first) = ids.insert(t.clone(), id) {
                return Err(TokenizerError::DuplicateToken {
                    token: t.clone(),
                    first,
                    id,
                });
            }
        }

        let mut merges = Vec::with_capacity(vocab.merges.len());
        for (index, merge) in vocab.merges.iter().enumerate() {
            let (a, b) = split_merge(merge).ok_or_else(|| TokenizerError::MalformedMerge {
                index,
                merge: merge.clone(),
            })?;
            for token in [a.to_owned(), b.to_owned(), format!("{a}{b}")] {
                if !ids.contains_key(&token) {
                    return Err(TokenizerError::MergeUnknownToken {
                        index,
                        merge: merge.clone(),
                        token,
                    });
                }
            }
            merges.push((a.to_owned(), b.to_owned()));
        }

        let (patterns, ignore_merges) = pre_tokenizer_patterns(vocab.pre.as_deref());
        let mut builder = BPE::builder()
            .vocab_and_merges(ids, merges)
            .ignore_merges(ignore_merges);
        if let Some(unk) = vocab.unknown_token_id {
            builder = builder.unk_token(tokens[unk as usize].clone());
        }
        let bpe = builder
            .build()
            .map_err(|e| TokenizerError::Build(format!("BPE model: {e}")))?;

        let mut steps = Vec::with_capacity(patterns.len() + 1);
        for p in patterns {
            let split = Split::new(
                SplitPattern::Regex((*p).to_owned()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Build(format!("pre-tokenizer regex {p:?}: {e}")))?;
            steps.push(PreTokenizerWrapper::Split(split));
        }
        steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            false, true, false,
        )));

        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(Sequence::new(steps)))
            .with_decoder(Some(ByteLevel::default()));
        let added: Vec<AddedToken> = vocab
            .token_types
            .iter()
            .zip(&tokens)
            .filter_map(|(&ty, t)| match ty {
                TOKEN_TYPE_CONTROL => Some(AddedToken::from(t.clone(), true)),
                TOKEN_TYPE_USER_DEFINED => {
                    Some(AddedToken::from(t.clone(), false).normalized(false))
                }
                _ => None,
            })
            .collect();
        if !added.is_empty() {
            inner.add_special_tokens(&added);
        }

        let text_of = |id: Option<u32>| id.map(|i| tokens[i as usize].clone()).unwrap_or_default();
        let bos_text = text_of(vocab.bos_token_id);
        let eos_text = text_of(vocab.eos_token_id);
        Ok(Self::assemble(
            inner,
            n,
            vocab.bos_token_id,
            vocab.eos_token_id,
            vocab.add_bos_token,
            bos_text,
            eos_text,
            vocab.chat_template,
        ))
    }

    /// An HF tokenizer.json (and, if given, tokenizer_config.json for bos/eos/chat_template/add_bos).
    ///
    /// From the config: `bos_token` and `eos_token` (strings or `{"content": ..}`), `add_bos_token`
    /// and `chat_template` (a string, or a list of named templates of which "default" is taken);
    /// a `chat_template.jinja` next to the config is used when the config has none. Without
    /// `add_bos_token`, BOS is added when the tokenizer.json's own post-processor adds the BOS
    /// token (as Llama 3's does). Without a config, the token that post-processor puts first, if
    /// any, is BOS, and there is no eos id or chat template.
    pub fn from_files(
        tokenizer_json: &Path,
        tokenizer_config: Option<&Path>,
    ) -> Result<Tokenizer, TokenizerError> {
        let mut inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| load_error(tokenizer_json, e))?;
        // A tokenizer.json may carry truncation or padding settings for training; a server must
        // never cut or pad a prompt behind the caller's back.
        inner
            .with_truncation(None)
            .map_err(|e| load_error(tokenizer_json, e))?
            .with_padding(None);
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&m| m as usize + 1);
        let post_ids = inner
            .encode("", true)
            .map(|e| e.get_ids().to_vec())
            .unwrap_or_default();

        let mut bos = None;
        let mut eos = None;
        let mut add_bos = None;
        let mut chat_template = None;
        if let Some(path) = tokenizer_config {
            let text = std::fs::read_to_string(path).map_err(|e| load_error(path, e))?;
            let config: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| load_error(path, e))?;
            if !config.is_object() {
                return Err(load_error(path, "expected a JSON object"));
            }
            bos = config_token(config.get("bos_token"));
            eos = config_token(config.get("eos_token"));
            add_bos = config.get("add_bos_token").and_then(|v| v.as_bool());
            chat_template = config_chat_template(config.get("chat_template"));
            if chat_template.is_none() {
                let jinja = path.with_file_name("chat_template.jinja");
                if jinja.is_file() {
                    chat_template =
                        Some(std::fs::read_to_string(&jinja).map_err(|e| load_error(&jinja, e))?);
                }
            }
        } else if let Some(&first) = post_ids.first() {
            bos = inner.id_to_token(first);
        }

        let bos_id = bos.as_deref().and_then(|t| inner.token_to_id(t));
        let eos_id = eos.as_deref().and_then(|t| inner.token_to_id(t));
        let add_bos =
            add_bos.unwrap_or_else(|| bos_id.is_some() && post_ids.first() == bos_id.as_ref());
        Ok(Self::assemble(
            inner,
            vocab_size,
            bos_id,
            eos_id,
            add_bos,
            bos.unwrap_or_default(),
            eos.unwrap_or_default(),
            chat_template,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        inner: tokenizers::Tokenizer,
        vocab_size: usize,
        bos: Option<u32>,
        eos: Option<u32>,
        add_bos: bool,
        bos_text: String,
        eos_text: String,
        chat_template: Option<String>,
    ) -> Tokenizer {
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for t in STOP_TOKENS {
            if let Some(id) = inner.token_to_id(t) {
                if !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        let chat = match chat_template {
            None => ChatTemplate::None,
            Some(source) => match compile_chat_template(source) {
                Ok(env) => ChatTemplate::Ready(Box::new(env)),
                Err(e) => ChatTemplate::Broken(template_message(&e)),
            },
        };
        Tokenizer {
            inner,
            vocab_size,
            bos,
            eos,
            add_bos,
            stop_ids,
            bos_text,
            eos_text,
            chat,
        }
    }

    /// Encode; adds BOS only when `add_special_tokens` and the vocab says add_bos. Special/control
    /// tokens written in the text (e.g. "<|im_start|>") are recognized as single tokens.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let body = encoding.get_ids();
        let bos = self.bos.filter(|_| add_special_tokens && self.add_bos);
        let mut ids = Vec::with_capacity(body.len() + usize::from(bos.is_some()));
        ids.extend(bos);
        ids.extend_from_slice(body);
        Ok(ids)
    }

    /// Decode, skipping nothing (special tokens are rendered as their text) unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(TokenizerError::IdOutOfRange {
                id,
                vocab_size: self.vocab_size,
            });
        }
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Number of token ids (one past the largest id).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// Token ids that end generation: eos, plus "<|im_end|>", "<|eot_id|>", "<|end_of_text|>",
    /// "</s>", "<|endoftext|>" when present in the vocab.
    pub fn stop_token_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn has_chat_template(&self) -> bool {
        !matches!(self.chat, ChatTemplate::None)
    }

    /// Render the chat template with minijinja: variables messages, add_generation_prompt,
    /// bos_token, eos_token. Supports what HF templates use: loop.first/loop.last,
    /// `raise_exception(msg)` (→ error), `.strip()` and other common str/dict methods, `|trim`,
    /// `|tojson`; blocks are trimmed as HF does (`trim_blocks`, `lstrip_blocks`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let env = match &self.chat {
            ChatTemplate::None => return Err(TokenizerError::NoChatTemplate),
            ChatTemplate::Broken(e) => return Err(TokenizerError::ChatTemplate(e.clone())),
            ChatTemplate::Ready(env) => env,
        };
        let template = env
            .get_template(CHAT_TEMPLATE_NAME)
            .map_err(template_error)?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_text,
                eos_token => &self.eos_text,
            })
            .map_err(template_error)
    }

    /// The tokenizer as HF `tokenizer.json` text (a GGUF vocabulary as the BPE model built from
    /// it): what grammar engines read token bytes from.
    pub fn hf_json(&self) -> Result<String, TokenizerError> {
        self.inner
            .to_string(false)
            .map_err(|e| TokenizerError::Build(format!("writing tokenizer.json: {e}")))
    }

    /// A streaming decoder over this tokenizer.
    pub fn stream(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            ids: Vec::new(),
            prefix: String::new(),
            prefix_len: 0,
        }
    }
}

#[cfg(test)]
#[path = "tokenizer_tests.rs"]
mod tests;
